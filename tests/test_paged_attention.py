"""Paged attention: the jnp reference, its blocked form and the C++ CPU kernel vs float64 NumPy;
ops dispatch; interpret mode."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_paged_attention as cpa
from pallas_kernels import ops
from pallas_kernels import paged_attention as pa
from pallas_kernels.testing import paged_np, random_paged
from test_kernel_lowering import kernel_tolerance, race_checked_interpret, stored_pool

# (context_lens, Q, Hq, Hkv, D, page_size, max_pages, window, sinks): ragged lengths, partly
# filled last pages, context_len 0 and < Q, GQA 1/4/8, window edges.
REFERENCE_CASES = [
    ([5, 16, 1, 33], 1, 4, 4, 16, 8, 5, None, False),
    ([0, 17, 9], 1, 8, 2, 32, 4, 5, None, True),
    ([40, 3, 24], 4, 8, 1, 16, 8, 6, None, False),
    ([12, 30], 5, 4, 1, 16, 4, 8, 4, True),
    ([31, 8, 0, 2], 3, 16, 2, 16, 16, 2, 1, False),
    ([20, 20], 20, 2, 2, 16, 4, 5, 7, True),
    ([64, 50], 2, 4, 4, 64, 16, 4, 64, False),
    ([3], 1, 4, 1, 16, 4, 8, None, True),  # one partly filled page in a wide table
]


# The off-GPU implementations: the jnp reference, its blocked form (impl="xla") and the C++ kernel
# (impl="cpu").
IMPLEMENTATIONS = {"reference": pa.paged_attention_reference, "blocked": pa.paged_attention_blocked,
                   "cpu": cpa.paged_attention_cpu}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("seed,case", list(enumerate(REFERENCE_CASES)))
def test_reference_matches_float64(seed, case, impl):
    lens, q_len, hq, hkv, d, page_size, max_pages, window, with_sinks = case
    *args, sinks = random_paged(seed, lens, q_len, hq, hkv, d, page_size, max_pages, with_sinks=with_sinks)
    got = IMPLEMENTATIONS[impl](*args, sliding_window=window, sinks=sinks)
    want = paged_np(*args, window, sinks)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_context_len_zero_gives_zeros_not_nan(impl):
    *args, sinks = random_paged(1, [0, 0], 2, 4, 2, 16, 8, 2, with_sinks=True)
    got = IMPLEMENTATIONS[impl](*args, sinks=sinks)
    np.testing.assert_array_equal(np.asarray(got), 0.0)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_reference_bf16_keeps_dtype_and_custom_scale(impl):
    *args, sinks = random_paged(2, [13, 29], 3, 8, 1, 64, 8, 4, jnp.bfloat16, with_sinks=True)
    got = IMPLEMENTATIONS[impl](*args, sinks=sinks, scale=0.2)
    assert got.dtype == jnp.bfloat16
    want = paged_np(*args, None, sinks, scale=0.2)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)


def test_cpu_kernel_many_sequences_long_context():
    """Enough (sequence, KV head) items to spread over the thread pool, pages in random order."""
    rng = np.random.default_rng(7)
    lens = list(rng.integers(0, 300, 37))
    *args, sinks = random_paged(7, lens, 1, 12, 3, 64, 16, 19, with_sinks=True)
    got = jax.jit(lambda *a: cpa.paged_attention_cpu(*a, sinks=sinks))(*args)
    np.testing.assert_allclose(np.asarray(got), paged_np(*args, None, sinks), atol=2e-5, rtol=2e-5)


def test_cpu_kernel_clamps_bad_page_ids():
    q, k_pages, v_pages, tables, lens, _ = random_paged(8, [20], 1, 4, 2, 16, 8, 3)
    bad = tables.at[0, 1].set(10**6)
    got = cpa.paged_attention_cpu(q, k_pages, v_pages, bad, lens)
    clamped = tables.at[0, 1].set(k_pages.shape[1] - 1)
    np.testing.assert_allclose(np.asarray(got), paged_np(q, k_pages, v_pages, clamped, lens, None, None),
                               atol=2e-5, rtol=2e-5)


def test_auto_picks_cpu_kernel_and_falls_back_for_odd_head_dim():
    assert ops.resolve_impl("auto") == "cpu"  # the tests run on CPU
    *args, sinks = random_paged(9, [9, 21], 2, 4, 2, 8, 4, 6, with_sinks=True)
    with pytest.raises(ValueError, match="head_dim divisible by 16, got 8"):
        ops.paged_attention(*args, sinks=sinks, impl="cpu")
    got = ops.paged_attention(*args, sinks=sinks, impl="auto")
    np.testing.assert_allclose(np.asarray(got), paged_np(*args, None, sinks), atol=2e-5, rtol=2e-5)


def test_cpu_kernel_build_is_cached_and_needs_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path))
    library = cpa.build()
    assert library.parent == tmp_path and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    assert cpa.build() == library and library.stat().st_mtime_ns == built
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(cpa.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+17 compiler"):
        cpa.build()


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_ops_matches_float64_under_jit(impl):
    *args, sinks = random_paged(4, [9, 22, 1], 2, 4, 2, 16, 4, 6, with_sinks=True)
    f = jax.jit(lambda *a: ops.paged_attention(*a, sliding_window=5, sinks=sinks, impl=impl))
    want = paged_np(*args, 5, sinks)
    np.testing.assert_allclose(np.asarray(f(*args)), want, atol=2e-5, rtol=2e-5)


def test_unknown_impl_raises():
    *args, _ = random_paged(0, [3], 1, 2, 2, 8, 4, 1)
    with pytest.raises(ValueError, match="'cuda'"):
        ops.paged_attention(*args, impl="cuda")


# Interpret-mode kernel cases, small but on every edge: (context_lens, Q, Hq, Hkv, D, page_size,
# max_pages, window, sinks, block_kv, max_splits, dtype).
KERNEL_CASES = {
    "decode_gqa4_ragged_sinks_splits": ([5, 170, 0, 33], 1, 8, 2, 64, 16, 11, None, True, 64, 2, jnp.bfloat16),
    "verify_gqa1_window_small_pages": ([1, 145], 3, 2, 2, 64, 8, 19, 70, False, 64, 1, jnp.bfloat16),
    "chunk_gqa8_two_row_tiles_window": ([12, 190], 10, 8, 1, 64, 32, 6, 7, True, 64, 2, jnp.float16),
    "f32_inputs_head_dim_128": ([130, 17], 2, 4, 1, 128, 16, 9, None, False, 64, 1, jnp.float32),
    "f32_tiny_llama_head_dim_16": ([70, 0, 9], 1, 4, 2, 16, 16, 5, None, True, 64, 2, jnp.float32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_interpret_matches_float64(name):
    lens, q_len, hq, hkv, d, page_size, max_pages, window, with_sinks, block_kv, max_splits, dtype = KERNEL_CASES[name]
    *args, sinks = random_paged(len(name), lens, q_len, hq, hkv, d, page_size, max_pages, dtype, with_sinks=with_sinks)
    config = pa.PagedAttentionConfig(block_kv=block_kv, max_splits=max_splits)
    with race_checked_interpret() as params:
        if params is None and d % 64:
            pytest.skip("compiled for the GPU the pool's head_dim must be a multiple of 64 (read in place)")
        q, k_pages, v_pages, *rest = args
        pools = (stored_pool(k_pages, params), stored_pool(v_pages, params))
        got = pa.paged_attention_kernel(q, *pools, *rest, sliding_window=window, sinks=sinks, interpret=params,
                                        config=config)
    assert got.dtype == dtype
    want = paged_np(*args, window, sinks)
    tol = kernel_tolerance(dtype, params)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.interpret_only
def test_ops_interpret_matches_xla():
    *args, sinks = random_paged(11, [9, 40], 2, 4, 2, 64, 16, 3, jnp.bfloat16, with_sinks=True)
    with race_checked_interpret():
        got = ops.paged_attention(*args, sinks=sinks, impl="interpret")
    want = ops.paged_attention(*args, sinks=sinks, impl="xla")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
