"""MLA decode attention (the latent as key, its first kv_lora_rank columns as value): the jnp
reference and the Mosaic GPU kernel in interpret mode vs float64; ops dispatch; bad arguments."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import mla_attention as mla
from pallas_kernels import ops
from test_kernel_lowering import kernel_tolerance, lower_for_cuda, race_checked_interpret, sds
from test_paged_attention import paged_np, random_paged
from test_ragged_paged_attention import ragged_np, random_ragged


def random_latent(seed, lens, q_len, hq, d, page_size, max_pages, dtype=jnp.float32):
    """q [B, Q, Hq, D], latent pages [1, N, page_size, D] (shuffled, garbage in the null page), tables, lens."""
    q, latent, _, tables, lens, _ = random_paged(seed, lens, q_len, hq, 1, d, page_size, max_pages, dtype)
    return q, latent, tables, lens


def mla_np(q, latent, tables, lens, kv_lora_rank, scale=None):
    """Float64: paged attention with K = V = latent, the first kv_lora_rank output columns."""
    return paged_np(q, latent, latent, tables, lens, None, None, scale)[..., :kv_lora_rank]


def test_reference_matches_float64():
    args = random_latent(0, [0, 21, 50], 2, 4, 40, 8, 7)
    got = mla.mla_attention_reference(*args, kv_lora_rank=32, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), mla_np(*args, 32, 0.3), atol=2e-5, rtol=2e-5)


# (context_lens, Q, Hq, D, kv_lora_rank, page_size, max_pages, config, dtype): ragged lengths with
# a 0, KV splits, two value launches, two row tiles (Q x Hq = 96 rows), DeepSeek-V3's 576/512
# split in miniature (192/128), tiny-deepseek-v3's unpadded 40/32.
KERNEL_CASES = {
    "decode_ragged_splits_f32": ([0, 37, 130], 1, 4, 192, 128, 16, 9, mla.MLADecodeConfig(), jnp.float32),
    "two_value_launches_bf16": ([70, 5], 1, 8, 192, 128, 8, 10, mla.MLADecodeConfig(value_chunk=64), jnp.bfloat16),
    "verify_q3_two_row_tiles_bf16": ([66, 100], 3, 32, 128, 64, 16, 7, mla.MLADecodeConfig(max_splits=1),
                                     jnp.bfloat16),
    "tiny_deepseek_head_dims_f32": ([9, 30], 1, 4, 40, 32, 8, 4, mla.MLADecodeConfig(), jnp.float32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_interpret_matches_float64(name):
    lens, q_len, hq, d, rank, page_size, max_pages, config, dtype = KERNEL_CASES[name]
    args = random_latent(len(name), lens, q_len, hq, d, page_size, max_pages, dtype)
    with race_checked_interpret() as params:
        got = mla.mla_decode_kernel(*args, kv_lora_rank=rank, scale=0.2, interpret=params, config=config)
    assert got.dtype == dtype and got.shape == (len(lens), q_len, hq, rank)
    tol = kernel_tolerance(dtype, params)
    np.testing.assert_allclose(np.asarray(got, np.float32), mla_np(*args, rank, 0.2), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_cases_lower_for_h100(name):
    """The interpreted cases also obey the hardware path's rules (so they run compiled on a GPU)."""
    lens, q_len, hq, d, rank, page_size, max_pages, config, dtype = KERNEL_CASES[name]
    q, latent, tables, lens = random_latent(0, lens, q_len, hq, d, page_size, max_pages, dtype)
    f = lambda *a: mla.mla_decode_kernel(*a, kv_lora_rank=rank, config=config)  # noqa: E731
    assert "mosaic_gpu" in lower_for_cuda(f, *(sds(x.shape, x.dtype) for x in (q, latent, tables, lens)))


@pytest.mark.slow
def test_ops_ragged_interpret_matches_float64_and_xla():
    """A mixed batch (a 3-token chunk, two decodes, padding rows) through ops.mla_attention."""
    args, _ = random_ragged(5, [(20, 3), (9, 1), (41, 1)], 2, 4, 1, 64, 8, 6)
    q, latent, _, starts, lens, tables = args
    kwargs = dict(kv_lora_rank=48, scale=0.25, max_query_len=3)
    with race_checked_interpret():
        got = ops.mla_attention(q, latent, starts, lens, tables, impl="interpret", **kwargs)
    want = ragged_np(q, latent, latent, starts, lens, tables, None, None, 0.25)[..., :48]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    xla = ops.mla_attention(q, latent, starts, lens, tables, impl="xla", **kwargs)
    np.testing.assert_allclose(np.asarray(xla), want, atol=2e-5, rtol=2e-5)


def test_bad_arguments_are_value_errors():
    q, latent, tables, lens = random_latent(3, [5], 1, 4, 64, 16, 2)
    with pytest.raises(ValueError, match="latent_pages must be"):
        mla.mla_decode_kernel(q, jnp.concatenate([latent, latent]), tables, lens, kv_lora_rank=32)
    with pytest.raises(ValueError, match="kv_lora_rank 80"):
        mla.mla_decode_kernel(q, latent, tables, lens, kv_lora_rank=80)
    for page_size in (48, 4):  # not dividing the 64-token block; not whole 8-row SMEM tiles
        q, latent, tables, lens = random_latent(3, [5], 1, 4, 64, page_size, 2)
        with pytest.raises(ValueError, match=f"page_size {page_size} must be a multiple of 8 dividing block_kv 64"):
            mla.mla_decode_kernel(q, latent, tables, lens, kv_lora_rank=32)
    with pytest.raises(ValueError, match="value_chunk <= 256"):
        mla.MLADecodeConfig(value_chunk=512)
