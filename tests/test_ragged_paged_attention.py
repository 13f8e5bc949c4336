"""Ragged paged attention: the jnp reference, the C++ kernel's native ragged mode (impl "cpu"), the
per-token and tiled reductions onto the padded implementations and ops dispatch vs float64 NumPy;
jit with engine-style static shapes; interpret mode."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels.testing import ragged_np, random_ragged
from test_kernel_lowering import race_checked_interpret


# (seqs [(context_len, q_len)], pad_rows, pad_seqs, Hq, Hkv, D, page_size, max_pages, window, sinks):
# decode rows, verify rows (k+1), prefill chunks (whole and mid-context; 37 and 40 rows span two of
# the C++ kernel's 32-row tiles), page boundaries, zero-length sequences between and after the
# others, padding rows, GQA 1-8, windows, sinks.
CASES = [
    ([(5, 1), (16, 1), (1, 1), (33, 1)], 3, 2, 4, 4, 16, 8, 5, None, False),
    ([(17, 4), (9, 9), (40, 1), (24, 12)], 0, 0, 8, 2, 32, 8, 6, None, True),
    ([(12, 5), (30, 30), (8, 1)], 5, 3, 8, 1, 16, 4, 8, 4, True),
    ([(64, 40), (50, 2), (0, 0), (2, 2)], 1, 1, 4, 4, 64, 16, 4, 7, False),
    ([(70, 37), (33, 3), (16, 16), (17, 1)], 4, 0, 2, 2, 16, 16, 5, 64, True),
]

def jitted(fn, *static):
    """fn under jit (one compilation per case, not one per eager op); window, scale and static static."""
    return jax.jit(fn, static_argnames=("sliding_window", "scale", *static))


RAGGED = jitted(ops.ragged_paged_attention, "impl", "max_query_len")


IMPLEMENTATIONS = {
    "reference": jitted(rpa.ragged_paged_attention_reference),
    "xla": functools.partial(RAGGED, impl="xla"),  # tiles of BLOCK_Q
    "xla_tiles_of_4": jitted(functools.partial(rpa.ragged_paged_attention_tiled, pa.paged_attention_blocked,
                                               block_q=4)),
    "xla_per_token": jitted(functools.partial(rpa.ragged_paged_attention_per_token, pa.paged_attention_blocked)),
    "cpu": functools.partial(RAGGED, impl="cpu"),  # the C++ kernel's ragged mode
}


def check(got, args, window, sinks, scale=None, tol=2e-5):
    """got matches float64 NumPy, is finite, and its padding rows are exactly zero."""
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    total = int(args[3][-1])
    np.testing.assert_array_equal(got[total:], 0.0)
    np.testing.assert_allclose(got, ragged_np(*args, window, sinks, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("seed,case", list(enumerate(CASES)))
def test_matches_float64(seed, case, impl):
    seqs, pad_rows, pad_seqs, hq, hkv, d, page_size, max_pages, window, with_sinks = case
    args, sinks = random_ragged(seed, seqs, pad_rows, hq, hkv, d, page_size, max_pages, with_sinks=with_sinks,
                                pad_seqs=pad_seqs)
    check(IMPLEMENTATIONS[impl](*args, sliding_window=window, sinks=sinks), args, window, sinks)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bf16_keeps_dtype_and_custom_scale(impl):
    args, sinks = random_ragged(7, [(13, 13), (29, 1), (40, 5)], 2, 8, 1, 64, 8, 5, jnp.bfloat16, True, pad_seqs=1)
    got = IMPLEMENTATIONS[impl](*args, sinks=sinks, scale=0.2)
    assert got.dtype == jnp.bfloat16
    check(got, args, None, sinks, scale=0.2, tol=2e-2)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_decode_only_max_query_len_1(impl):
    """The engine's decode step: one row per sequence, zero-length sequences after, padding rows."""
    rng = np.random.default_rng(3)
    seqs = [(int(n), 1) for n in rng.integers(1, 60, 9)]
    args, sinks = random_ragged(3, seqs, 7, 9, 3, 64, 16, 4, with_sinks=True, pad_seqs=6)
    check(RAGGED(*args, sinks=sinks, impl=impl, max_query_len=1), args, None, sinks)


@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_cpu_head_dims_and_auto(head_dim):
    args, sinks = random_ragged(head_dim, [(20, 7), (3, 1), (47, 16)], 2, 6, 3, head_dim, 16, 3, with_sinks=True)
    check(RAGGED(*args, sinks=sinks, sliding_window=9, impl="cpu"), args, 9, sinks)
    check(RAGGED(*args, sinks=sinks, sliding_window=9), args, 9, sinks)


def test_auto_falls_back_to_xla_for_odd_head_dim():
    args, sinks = random_ragged(5, [(9, 3), (21, 1)], 1, 4, 2, 8, 4, 6, with_sinks=True)
    with pytest.raises(ValueError, match="head_dim divisible by 16, got 8"):
        RAGGED(*args, impl="cpu")
    check(RAGGED(*args, sinks=sinks, impl="auto"), args, None, sinks)


def test_oracle_detects_position_shift():
    """Each query placed one position early (it misses its own key) fails the comparison."""
    args, sinks = random_ragged(11, [(12, 4), (30, 1), (19, 19)], 0, 4, 2, 16, 8, 4)
    got = np.asarray(IMPLEMENTATIONS["reference"](*args))
    q, k_pages, v_pages, starts, lens, tables = args
    shifted = ragged_np(q, k_pages, v_pages, starts, lens - 1, tables, None, None)
    assert not np.isclose(got, shifted, atol=1e-3).all(axis=(1, 2)).any()  # every row differs


def test_query_tiles_layout():
    """Tiles of 4 over q_lens [6, 0, 1, 4]: [rows 0-3], [4-5 right-aligned], [6], [7-10]; unused tiles
    have context 0; every row is found again at its (tile, slot)."""
    starts = jnp.array([0, 6, 6, 7, 11], jnp.int32)
    lens = jnp.array([10, 0, 3, 4], jnp.int32)
    tables = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)
    tiles = jax.jit(rpa.query_tiles, static_argnums=(3, 4))(starts, lens, tables, 12, 4)
    assert tiles.rows.shape == (rpa.num_query_tiles(12, 4, 4), 4) == (7, 4)
    np.testing.assert_array_equal(tiles.rows[:4], [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6], [7, 8, 9, 10]])
    np.testing.assert_array_equal(tiles.lens, [8, 10, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(tiles.tables[:4, 0], [0, 0, 4, 6])
    valid = np.asarray(tiles.token_valid)
    np.testing.assert_array_equal(valid, np.arange(12) < 11)
    found = np.asarray(tiles.rows)[tiles.token_tile, tiles.token_slot]
    np.testing.assert_array_equal(found[valid], np.arange(11))



def test_short_sequences_take_sequence_tiles_the_rest_query_tiles():
    """q_lens [6, 0, 1, 4] with decode tiles of 2 tokens: only sequence 2 (1 row) is short; its one
    right-aligned tile holds row 6, the query tiles (of sequences with >= 3 rows) skip it, and
    each row is valid on one side."""
    starts = jnp.array([0, 6, 6, 7, 11], jnp.int32)
    lens = jnp.array([10, 0, 3, 4], jnp.int32)
    tables = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)
    short = rpa.short_sequences(starts, 2)
    np.testing.assert_array_equal(short, [False, False, True, False])
    seq = rpa.sequence_tiles(starts, lens, tables, 12, 2)
    np.testing.assert_array_equal(seq.lens, [0, 0, 3, 0])
    np.testing.assert_array_equal(seq.rows[2], [5, 6])
    long = rpa.query_tiles(starts, lens, tables, 12, 4, min_q=3)
    assert long.rows.shape == (rpa.num_query_tiles(12, 4, 4, 3), 4) == (3 + 4, 4)  # S = 4 <= 12 // 3
    assert rpa.num_query_tiles(64, 64, 16, 5) == 4 + 12  # a decode step's 64 tokens: 12 long ones at most
    np.testing.assert_array_equal(long.lens, [8, 10, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(seq.token_valid, np.arange(12) == 6)
    np.testing.assert_array_equal(long.token_valid, (np.arange(12) < 11) & (np.arange(12) != 6))
    for tiles in (seq, long):
        found = np.asarray(tiles.rows)[tiles.token_tile, tiles.token_slot]
        np.testing.assert_array_equal(found[tiles.token_valid], np.arange(12)[tiles.token_valid])

@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_jit_engine_shapes_one_compilation(impl):
    """S = max_num_seqs with zero-length sequences, T = a power-of-two bucket: two different
    batches of the same shapes reuse one compilation and both match."""
    f = jax.jit(functools.partial(ops.ragged_paged_attention, impl=impl))
    for seed, seqs in enumerate([[(30, 16), (5, 1), (9, 3)], [(3, 1), (40, 20), (2, 2), (7, 1), (16, 1)]]):
        seqs = seqs + [(0, 0)] * (8 - len(seqs))
        pad_rows = 32 - sum(q_len for _, q_len in seqs)
        args, _ = random_ragged(seed, seqs, pad_rows, 4, 2, 16, 8, 6)
        check(f(*args), args, None, None)
    assert f._cache_size() == 1


@pytest.mark.slow
def test_interpret_kernel_per_token():
    """The Mosaic kernel (interpret mode, race-checked) through the per-token reduction."""
    args, sinks = random_ragged(13, [(20, 3), (70, 1)], 2, 4, 2, 64, 16, 5, jnp.bfloat16, True, pad_seqs=1)
    config = pa.PagedAttentionConfig(block_kv=64, max_splits=2)
    with race_checked_interpret() as params:
        kernel = functools.partial(pa.paged_attention_kernel, interpret=params, config=config)
        got = rpa.ragged_paged_attention_per_token(kernel, *args, sinks=sinks, sliding_window=30)
    assert got.dtype == jnp.bfloat16
    check(got, args, 30, sinks, tol=3e-2)
