"""The native ragged Mosaic GPU kernel: interpret mode (race-checked, NaN-poisoned outputs) vs float64
on random mixed batches, ops dispatch, and lowering for an abstract H100 at full-size preset shapes."""

import re

import numpy as np
import pytest

import jax.numpy as jnp

from models.attention import FP8_KV_DTYPE as FP8, quantize_kv
from pallas_kernels import blocked_attention as ba
from pallas_kernels import hopper
from pallas_kernels import ops
from pallas_kernels import ragged_paged_attention_mgpu as rpm
from pallas_kernels.testing import random_ragged
from test_kernel_lowering import (BF16, kernel_tolerance, mosaic_calls, race_checked_interpret, sds, stored_pool,
                                  tensor_shape, tensor_type)
from test_ragged_paged_attention import check


def random_mixed(seed, num_seqs, max_context, max_q, decode_share=0.5):
    """[(context_len, q_len)]: contexts 0..max_context, about decode_share of them decode rows (q 1),
    the others q 1..min(context, max_q); a zero context has q 0."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num_seqs):
        n = int(rng.integers(0, max_context + 1))
        q = 0 if n == 0 else 1 if rng.random() < decode_share else int(rng.integers(1, min(n, max_q) + 1))
        seqs.append((n, q))
    return seqs


# name: (seed, seqs, pad_rows, Hq, Hkv, D, page_size, max_pages, window, sinks, config, dtype): GQA 1-8,
# decode-only, prefill spanning tiles (G=1: 64 tokens per tile), a 3-head group (21 tokens, 63
# rows per tile; decode tiles of 5 tokens in 15 of 16 rows), a padded head dim, programs walking
# more blocks than the ring has slots (460 and 300 tokens unsplit: the pages read ahead are used, a
# window skips the first blocks), 64-token pages (one page per block), the 2-slot ring, splits.
# Short sequences (<= decode_rows // G new tokens) take the A/B-swapped decode tile: verify rows of
# 2-4 tokens at G=4, 32-row decode tiles at G=8, and the decode tile turned off (decode_rows=0).
CONFIG = rpm.RaggedAttentionConfig
CASES = {
    "mixed_gqa4_window_sinks_splits_f32": (0, random_mixed(0, 7, 90, 12), 3, 8, 2, 64, 8, 12, 7, True,
                                           CONFIG(max_splits=3), jnp.float32),
    "decode_only_gqa8_long_ring_f32": (1, [(65, 1), (1, 1), (0, 0), (460, 1), (64, 1)], 2, 8, 1, 64, 16, 29, None,
                                       False, CONFIG(max_splits=1), jnp.float32),
    "prefill_gqa1_two_tiles_bf16": (2, [(90, 70), (5, 1), (33, 33)], 1, 2, 2, 64, 8, 12, None, True, CONFIG(),
                                    jnp.bfloat16),
    "gqa3_head_dim_40_window_f32": (3, random_mixed(3, 5, 60, 30, 0.3) + [(300, 25)], 0, 6, 2, 40, 8, 38, 90,
                                    True, CONFIG(max_splits=1), jnp.float32),
    "page_64_two_stage_ring_bf16": (4, [(130, 9), (64, 64), (0, 0), (200, 1)], 4, 4, 4, 64, 64, 4, 100, False,
                                    CONFIG(max_stages=2, max_splits=2), jnp.bfloat16),
    "verify_gqa4_decode_tiles_window_splits_f32": (5, [(77, 4), (3, 3), (150, 2), (40, 1), (66, 5), (9, 9)], 2, 8,
                                                   2, 64, 16, 10, 50, True, CONFIG(max_splits=4), jnp.float32),
    "decode_rows_32_gqa8_bf16": (6, [(45, 4), (130, 1), (20, 3), (70, 12)], 1, 16, 2, 128, 16, 9, None, True,
                                 CONFIG(decode_rows=32), jnp.bfloat16),
    "decode_tile_off_gqa4_f32": (7, [(50, 1), (33, 3), (90, 20)], 2, 8, 2, 64, 8, 12, None, False,
                                 CONFIG(decode_rows=0, max_splits=2), jnp.float32),
}


def case_args(name):
    seed, seqs, pad_rows, hq, hkv, d, page_size, max_pages, window, with_sinks, config, dtype = CASES[name]
    args, sinks = random_ragged(seed, seqs, pad_rows, hq, hkv, d, page_size, max_pages, dtype, with_sinks)
    return args, sinks, window, config


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_interpret_matches_float64(name):
    """Interpreted the kernel reads the case's pool as it is (f32 too); compiled on a GPU, a bf16
    pool (the engine's there), and a head dim off a multiple of 64 is refused (tested below)."""
    args, sinks, window, config = case_args(name)
    with race_checked_interpret() as params:
        if params is None and args[0].shape[-1] % ba.HEAD_DIM_MULTIPLE:
            pytest.skip("compiled, the kernel reads the pool in place: head_dim must be a multiple of 64")
        pools = [stored_pool(x, params) for x in args[1:3]]
        got = rpm.ragged_paged_attention_kernel(args[0], *pools, *args[3:], sliding_window=window, sinks=sinks,
                                                scale=0.3, interpret=params, config=config)
    assert got.dtype == args[0].dtype and got.shape == args[0].shape
    check(got, args, window, sinks, scale=0.3, tol=kernel_tolerance(args[0].dtype, params))


def lowered_launches(args, sinks, window, config: rpm.RaggedAttentionConfig | None, pool_dtype=BF16) -> list:
    """The kernel launches of a case lowered for an H100, its pool the bf16 one the GPU engine
    stores (or FP8); config None: through ops.ragged_paged_attention(impl="pallas"), the engine's dispatch."""
    q, k_pages, _, *rest = (sds(x.shape, x.dtype) for x in args)
    pool = sds(k_pages.shape, pool_dtype)
    if config is None:
        f = lambda *a: ops.ragged_paged_attention(*a[:6], sliding_window=window, sinks=a[6],  # noqa: E731
                                                  impl="pallas")
    else:
        f = lambda *a: rpm.ragged_paged_attention_kernel(*a[:6], sliding_window=window, sinks=a[6],  # noqa: E731
                                                         config=config)
    return mosaic_calls(f, q, pool, pool, *rest, sinks)


def check_launches(calls: list, head_dim: int, pool_shape: tuple, config: rpm.RaggedAttentionConfig,
                   pool_dtype=BF16) -> None:
    """A query-tile launch and, unless decode tiles are off, an A/B-swapped decode-tile launch, each
    taking bf16 (FP8 pool: f16) q tiles [N, Hkv, rows, D] and the pool itself (no cast, no pad) and writing its
    tiles' f32 partials (transposed, [D, rows], in decode tiles) and log-sum-exps per KV split."""
    d_pad, hkv, pool = hopper.round_up(head_dim, 64), pool_shape[0], tensor_type(pool_shape, pool_dtype)
    names = [re.fullmatch(r"ragged_paged_attention_(ab_)?r(\d+)_kv\d+_st[23]_s(\d+)", c.name) for c in calls]
    assert all(names), [c.name for c in calls]
    assert [(m[1], int(m[2])) for m in names] == ([(None, config.block_rows)]
                                                  + [("ab_", config.decode_rows)] * bool(config.decode_rows))
    for call, m in zip(calls, names):
        rows, splits = int(m[2]), int(m[3])
        tiles = tensor_shape(call.operands[0])[0]
        out = (rows, d_pad) if m[1] is None else (d_pad, rows)
        q_dtype = hopper.mma_dtype(pool_dtype, None)  # f16 for an FP8 pool
        assert call.operands[:3] == (tensor_type((tiles, hkv, rows, d_pad), q_dtype), pool, pool)
        assert call.results == (tensor_type((tiles, hkv, splits, *out), jnp.float32),
                                tensor_type((tiles, hkv, splits, rows), jnp.float32))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_cases_lower_for_h100(name):
    """The interpreted cases also obey the hardware path's rules (so they run compiled on a GPU),
    with the pool in place; a head dim off a multiple of 64 is refused there."""
    args, sinks, window, config = case_args(name)
    if args[0].shape[-1] % ba.HEAD_DIM_MULTIPLE:
        with pytest.raises(ValueError, match="head_dim a multiple of 64"):
            lowered_launches(args, sinks, window, config)
        return
    check_launches(lowered_launches(args, sinks, window, config), args[0].shape[-1], args[1].shape, config)


@pytest.mark.slow
@pytest.mark.interpret_only
def test_ops_pallas_runs_the_native_kernel(monkeypatch):
    """impl="interpret" goes through the native kernel where it supports the shapes (4-token pages
    would fall back to the per-token adapter) and matches float64."""
    calls = []
    native = rpm.ragged_paged_attention_kernel
    monkeypatch.setattr(rpm, "ragged_paged_attention_kernel", lambda *a, **k: calls.append(1) or native(*a, **k))
    args, sinks = random_ragged(9, [(20, 3), (9, 1), (41, 1)], 2, 4, 2, 64, 8, 12, with_sinks=True)
    with race_checked_interpret():
        got = ops.ragged_paged_attention(*args, sinks=sinks, impl="interpret")
    check(got, args, None, sinks, tol=1e-4)
    assert len(calls) == 1
    assert not rpm.supported(64, 4, 2, 4) and rpm.supported(64, 4, 2, 8)


FP8_CASES = ["mixed_gqa4_window_sinks_splits_f32", "prefill_gqa1_two_tiles_bf16", "decode_rows_32_gqa8_bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FP8_CASES)
def test_fp8_pool_interpret_matches_float64(name):
    """An FP8 pool (e4m3 pages, as the engine writes them) is read as stored and each block
    dequantized to f16 in SMEM: it matches float64 attention over the same e4m3 values."""
    args, sinks, window, config = case_args(name)
    pools = [quantize_kv(x, FP8) for x in args[1:3]]
    with race_checked_interpret() as params:
        got = rpm.ragged_paged_attention_kernel(args[0], *pools, *args[3:], sliding_window=window, sinks=sinks,
                                                scale=0.3, interpret=params, config=config)
    assert got.dtype == args[0].dtype
    check(got, (args[0], *(p.astype(jnp.float32) for p in pools), *args[3:]), window, sinks, scale=0.3, tol=3e-2)


@pytest.mark.parametrize("name", ["llama3_8b_mixed_512_tokens_64_seqs", "gpt_oss_120b_mixed_window_sinks"])
def test_fp8_pool_lowers_for_h100(name):
    """Through ops (impl="pallas"), an FP8 pool goes to the native kernel in place: no cast or pad
    of the pool, 64-byte swizzled rows at gpt-oss's head dim 64."""
    t, s, hq, hkv, d, page_size, context, window, with_sinks = FULL_SIZE[name]
    sinks = sds((hq,), jnp.float32) if with_sinks else None
    args = ragged_sds(t, s, hq, hkv, d, page_size, context)
    calls = lowered_launches(args, sinks, window, None, FP8)
    check_launches(calls, d, args[1].shape, CONFIG(), FP8)


def test_unsupported_shapes_are_value_errors():
    args, _ = random_ragged(0, [(9, 2)], 0, 4, 2, 64, 4, 4)
    with pytest.raises(ValueError, match="page_size 4"):
        rpm.ragged_paged_attention_kernel(*args)
    assert not rpm.supported(576, 128, 1, 16)  # MLA's latent: its own kernel (mla_attention.py)
    assert not rpm.supported(64, 128, 1, 16)  # a group larger than a tile's 64 rows


def test_ring_depth_by_shared_memory():
    """3 slots at head dim 64/128 with 64-token blocks; 2 where 3 overflow; none above the budget."""
    config = CONFIG()
    assert rpm.ring_stages(config, 64, 64, 128, 2) == 3
    assert rpm.ring_stages(config, 64, 128, 128, 2) == 2
    assert rpm.ring_stages(config, 64, 64, 192, 2) == 2  # 3 slots lowered to 56 B over (the slack)
    assert rpm.ring_stages(config, 64, 1024, 128, 2) is None
    assert rpm.smem_bytes(64, 64, 128, 3, 2) <= hopper.SMEM_BYTES < rpm.smem_bytes(64, 128, 128, 3, 2)


def ragged_sds(tokens, seqs, hq, hkv, d, page_size, context):
    """Abstract ragged inputs: q [T, Hq, D], a pool of pages, S sequences of `context` tokens' tables."""
    max_pages = context // page_size
    pages = sds((hkv, seqs * max_pages + 1, page_size, d))
    return (sds((tokens, hq, d)), pages, pages, sds((seqs + 1,), jnp.int32), sds((seqs,), jnp.int32),
            sds((seqs, max_pages), jnp.int32))


# name: (T, S, Hq, Hkv, D, page_size, context, window, sinks): the engine's mixed step at 512 tokens
# and 64 sequences, a decode step, one long prefill chunk, gpt-oss-120b's windowed / sink layers,
# the head dim where the SMEM estimate's slack decides the ring depth.
FULL_SIZE = {
    "llama3_8b_mixed_512_tokens_64_seqs": (512, 64, 32, 8, 128, 16, 4096, None, False),
    "llama3_8b_decode_b64_4k": (64, 64, 32, 8, 128, 16, 4096, None, False),
    "llama3_8b_chunk_2048_after_30k": (2048, 1, 32, 8, 128, 16, 32768, None, False),
    "llama3_70b_mixed_512_tokens": (512, 64, 64, 8, 128, 16, 4096, None, False),
    "gpt_oss_120b_mixed_window_sinks": (512, 64, 64, 8, 64, 16, 4096, 128, True),
    "gpt_oss_120b_mixed_sinks_page_256": (512, 16, 64, 8, 64, 256, 4096, None, True),
    "head_dim_192_two_slot_ring": (64, 8, 32, 8, 192, 16, 1024, None, False),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_shapes_lower_for_h100(name):
    t, s, hq, hkv, d, page_size, context, window, with_sinks = FULL_SIZE[name]
    sinks = sds((hq,), jnp.float32) if with_sinks else None
    args = ragged_sds(t, s, hq, hkv, d, page_size, context)
    assert rpm.supported(d, hq, hkv, page_size)
    check_launches(lowered_launches(args, sinks, window, None), d, args[1].shape, CONFIG())
