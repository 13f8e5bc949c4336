"""MLA attention (the latent as key, its first kv_lora_rank columns as value): the jnp reference, the
Mosaic GPU kernel in interpret mode vs float64 (ragged batches and the padded contract), ops
dispatch, a deliberately wrong mask caught, lowering at DeepSeek-V3's full shapes, bad arguments."""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from models.attention import FP8_KV_DTYPE as FP8, quantize_kv
from pallas_kernels import blocked_attention as ba
from pallas_kernels import hopper
from pallas_kernels import mla_attention as mla
from pallas_kernels import ops
from pallas_kernels.testing import paged_np, ragged_np, random_paged, random_ragged
from test_kernel_lowering import kernel_tolerance, lower_for_cuda, race_checked_interpret, sds

KERNEL_NAME = re.compile(r"mla_attention_q(\d+)_kv(\d+)_wg(\d+)x(\d+)_s(\d+)(?=\\00)")


def random_latent(seed, lens, q_len, hq, d, page_size, max_pages, dtype=jnp.float32):
    """q [B, Q, Hq, D], latent pages [1, N, page_size, D] (shuffled, garbage in the null page), tables, lens."""
    q, latent, _, tables, lens, _ = random_paged(seed, lens, q_len, hq, 1, d, page_size, max_pages, dtype)
    return q, latent, tables, lens


def mla_np(q, latent, tables, lens, kv_lora_rank, scale=None):
    """Float64: paged attention with K = V = latent, the first kv_lora_rank output columns."""
    return paged_np(q, latent, latent, tables, lens, None, None, scale)[..., :kv_lora_rank]


def bf16(x):
    """The abstract array the GPU engine passes: float data in bf16 (its pool dtype), ints as they are."""
    return sds(x.shape, x.dtype if x.dtype == jnp.int32 else jnp.bfloat16)


def kernel_names(text):
    """The MLA kernels a lowered module launches: {(block_q, block_kv, warpgroups, chunk, splits)}."""
    return {tuple(map(int, m)) for m in KERNEL_NAME.findall(text)}


def test_reference_matches_float64():
    args = random_latent(0, [0, 21, 50], 2, 4, 40, 8, 7)
    got = mla.mla_attention_reference(*args, kv_lora_rank=32, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), mla_np(*args, 32, 0.3), atol=2e-5, rtol=2e-5)


def test_value_chunks_and_smem_budget():
    """DeepSeek-V3: two warpgroups of 256 value columns; the SMEM arithmetic of the docstring, which
    the compiled kernel's resources report (230,400 bytes) and which fits an H100's 232,448."""
    assert mla.value_chunks(512, 256) == (256, 2)
    assert mla.value_chunks(128, 64) == (64, 2)
    assert mla.value_chunks(320, 256) == (192, 2)  # equal chunks of 64-column multiples, 384 >= 320
    assert mla.value_chunks(32, 256) == (64, 1)
    assert mla.smem_bytes(576, 64, 256, 2, 2) == 73_728 + 156_672 == 230_400
    assert mla.smem_bytes(576, 64, 256, 2, 2) + 8 * mla.NUM_BARRIERS <= hopper.SMEM_BYTES
    # An FP8 latent ring (1 byte) plus the f16 block it is upcast into: the bf16 ring's bytes again.
    assert mla.smem_bytes(576, 64, 256, 2, 2, fp8=True) == 230_400


# Ragged batches, (seqs [(context_len, q_len)], pad_rows, Hq, D, kv_lora_rank, page_size, max_pages,
# max_query_len, config, dtype). Every case has zero-length, one-token and multi-token sequences,
# contexts across page and 64-token block boundaries, >= 2 KV splits (few programs, several blocks)
# and padding rows. Hq 4: a 64-row program holds 16 tokens, so a 17-token chunk takes two query tiles
# and one tile's rows see different causal ends; Hq 96: a token's heads straddle two programs
# (block_q 2, 192 rows, 3 row tiles); Hq 128: DeepSeek-V3's heads, one token per two programs, and
# two value warpgroups (value_chunk 64 of rank 128: the 2 x 256 of rank 512 in miniature).
RAGGED_CASES = {
    "hq4_page16_two_warpgroups_f32": ([(20, 3), (0, 0), (33, 1), (130, 17)], 2, 4, 192, 128, 16, 9, None,
                                      mla.MLADecodeConfig(value_chunk=64), jnp.float32),
    "hq96_page64_bf16": ([(70, 2), (5, 1), (0, 0), (130, 3)], 1, 96, 128, 64, 64, 3, 3,
                         mla.MLADecodeConfig(), jnp.bfloat16),
    "hq128_page16_two_warpgroups_bf16": ([(0, 0), (66, 2), (17, 1)], 1, 128, 192, 128, 16, 5, 2,
                                         mla.MLADecodeConfig(value_chunk=64), jnp.bfloat16),
    "decode_only_page64_f32": ([(65, 1), (0, 0), (1, 1), (128, 1)], 3, 16, 128, 96, 64, 2, 1,
                               mla.MLADecodeConfig(), jnp.float32),
}


def ragged_case(name, seed=None):
    seqs, pad_rows, hq, d, rank, page_size, max_pages, max_q, config, dtype = RAGGED_CASES[name]
    seed = len(name) if seed is None else seed
    (q, latent, _, starts, lens, tables), _ = random_ragged(seed, seqs, pad_rows, hq, 1, d, page_size, max_pages,
                                                            dtype)
    kwargs = dict(kv_lora_rank=rank, scale=0.2, max_query_len=max_q, config=config)
    return (q, latent, starts, lens, tables), kwargs


def ragged_want(args, kwargs):
    q, latent, starts, lens, tables = args
    return ragged_np(q, latent, latent, starts, lens, tables, None, None, kwargs["scale"])[..., :kwargs["kv_lora_rank"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RAGGED_CASES))
def test_ragged_kernel_interpret_matches_float64(name):
    args, kwargs = ragged_case(name)
    with race_checked_interpret() as params:
        got = mla.mla_ragged_kernel(*args, **kwargs, interpret=params)
    q = args[0]
    assert got.dtype == q.dtype and got.shape == (*q.shape[:2], kwargs["kv_lora_rank"])
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    assert (got[int(args[2][-1]):] == 0).all()  # padding rows
    tol = kernel_tolerance(q.dtype, params)
    np.testing.assert_allclose(got, ragged_want(args, kwargs), atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hq4_page16_two_warpgroups_f32", "hq128_page16_two_warpgroups_bf16"])
def test_fp8_latent_interpret_matches_float64(name):
    """An FP8 latent pool (e4m3, as the engine writes it): warpgroup 0 upcasts each block to f16 in
    SMEM for its QK and every warpgroup's PV; matches float64 over the same e4m3 values."""
    (q, latent, *rest), kwargs = ragged_case(name)
    latent = quantize_kv(latent, FP8)
    with race_checked_interpret() as params:
        got = mla.mla_ragged_kernel(q, latent, *rest, **kwargs, interpret=params)
    assert got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), ragged_want((q, latent.astype(jnp.float32), *rest), kwargs),
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", list(RAGGED_CASES))
def test_ragged_cases_lower_for_h100_with_kv_splits(name):
    """The interpreted cases obey the hardware path's rules too, and really split the KV range."""
    args, kwargs = ragged_case(name)
    text = lower_for_cuda(lambda *a: mla.mla_ragged_kernel(*a, **kwargs), *map(bf16, args))
    [(block_q, _, warpgroups, _, splits)] = kernel_names(text)
    hq, d = args[0].shape[1:]
    assert block_q == min(64 // np.gcd(hq, 64), kwargs["max_query_len"] or 64)
    assert warpgroups == (2 if kwargs["config"].value_chunk == 64 else 1) and splits >= 2


@pytest.mark.slow
def test_a_mask_off_by_one_fails():
    """The ragged cases catch a deliberately wrong kernel: every row masked at the next token's
    position (one future key visible)."""
    args, kwargs = ragged_case("hq4_page16_two_warpgroups_f32")
    block_mask = ba.block_mask

    def wrong(length, row0, num_rows, blk, st, keys_axis=1):
        return block_mask(length, row0 + st.group, num_rows, blk, st, keys_axis)

    with pytest.MonkeyPatch.context() as patch, race_checked_interpret() as params:
        patch.setattr(ba, "block_mask", wrong)
        got = mla.mla_ragged_kernel(*args, **kwargs, interpret=params)
    assert not np.allclose(np.asarray(got), ragged_want(args, kwargs), atol=1e-2, rtol=1e-2)


# The padded contract, (context_lens, Q, Hq, D, kv_lora_rank, page_size, max_pages, config, dtype):
# ragged lengths with a 0, KV splits, two value warpgroups, two row tiles (Q x Hq = 96 rows),
# tiny-deepseek-v3's unpadded 40/32.
KERNEL_CASES = {
    "decode_ragged_splits_f32": ([0, 37, 130], 1, 4, 192, 128, 16, 9, mla.MLADecodeConfig(), jnp.float32),
    "two_value_warpgroups_bf16": ([70, 5], 1, 8, 192, 128, 8, 10, mla.MLADecodeConfig(value_chunk=64),
                                  jnp.bfloat16),
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
    """The interpreted cases also obey the hardware path's rules (so they run compiled on a GPU); a
    head dim that is not a multiple of 64 is refused compiled (a pad would copy the pool per call)."""
    lens, q_len, hq, d, rank, page_size, max_pages, config, dtype = KERNEL_CASES[name]
    args = tuple(map(bf16, random_latent(0, lens, q_len, hq, d, page_size, max_pages, dtype)))
    f = lambda *a: mla.mla_decode_kernel(*a, kv_lora_rank=rank, config=config)  # noqa: E731
    if d % 64:
        with pytest.raises(ValueError, match="in place"):
            lower_for_cuda(f, *args)
        return
    text = lower_for_cuda(f, *args)
    [(block_q, _, warpgroups, _, _)] = kernel_names(text)
    assert block_q == q_len and warpgroups == (2 if config.value_chunk == 64 else 1)


@pytest.mark.slow
@pytest.mark.interpret_only
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


def test_ops_pallas_path_is_the_ragged_kernel():
    """ops.mla_attention's GPU path launches the ragged kernel once (query tiles of max_query_len
    tokens at Hq 4), not the one-token kernel per token."""
    args = (sds((40, 4, 192)), sds((1, 33, 16, 192)), sds((4,), jnp.int32), sds((3,), jnp.int32),
            sds((3, 8), jnp.int32))
    f = lambda *a: ops.mla_attention(*a, kv_lora_rank=128, impl="pallas", max_query_len=8)  # noqa: E731
    [(block_q, _, _, _, _)] = kernel_names(lower_for_cuda(f, *args))
    assert block_q == 8


# DeepSeek-V3 at full size through the ragged entry (the engine's path), (tokens, sequences,
# context, page_size, max_query_len): a decode step of 64 sequences, a mixed step of 512 tokens
# (prefill chunks beside decodes), speculative verification of 4 tokens.
DEEPSEEK_SHAPES = {
    "decode_b64_4k_page16": (64, 64, 4096, 16, 1),
    "decode_b64_4k_page64": (64, 64, 4096, 64, 1),
    "mixed_512_tokens_page16": (512, 64, 4096, 16, 512),
    "mixed_512_tokens_page64": (512, 64, 4096, 64, 512),
    "verify_b32_q4_page16": (128, 32, 4096, 16, 4),
    "decode_b1_32k_page16": (1, 1, 32768, 16, 1),
}


@pytest.mark.parametrize("name", list(DEEPSEEK_SHAPES))
@pytest.mark.parametrize("pool", ["bf16", "fp8"])
def test_deepseek_v3_mla_lowers_for_h100(name, pool):
    """128 heads x (512 + 64): one launch of two 256-column value warpgroups per 64 rows, the bf16
    (or FP8) latent pool read in place (the kernel's operand is the function's argument: no pad or cast)."""
    tokens, seqs, context, page_size, max_q = DEEPSEEK_SHAPES[name]
    pages = context // page_size
    pool_dtype = FP8 if pool == "fp8" else jnp.bfloat16
    latent = sds((1, seqs * pages + 1, page_size, 576), pool_dtype)
    args = (sds((tokens, 128, 576)), latent, sds((seqs + 1,), jnp.int32), sds((seqs,), jnp.int32),
            sds((seqs, pages), jnp.int32))
    f = lambda *a: mla.mla_ragged_kernel(*a, kv_lora_rank=512, scale=0.1352, max_query_len=max_q)  # noqa: E731
    text = lower_for_cuda(f, *args)
    [(block_q, block_kv, warpgroups, chunk, splits)] = kernel_names(text)
    assert (block_q, block_kv, warpgroups, chunk) == (1, 64, 2, 256)
    assert splits == (16 if seqs == 1 else 1 if tokens >= 128 else 2)
    [call] = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    assert re.search(r"@mosaic_gpu\w*\(%\w+, %arg1, ", call)  # the jitted function's latent argument itself
    assert f"tensor<1x{seqs * pages + 1}x{page_size}x576x{'f8E4M3FN' if pool == 'fp8' else 'bf16'}>" in \
        call.rsplit(" : (", 1)[1]


def test_bad_arguments_are_value_errors():
    q, latent, tables, lens = random_latent(3, [5], 1, 4, 64, 16, 2)
    with pytest.raises(ValueError, match="latent_pages must be"):
        mla.mla_decode_kernel(q, jnp.concatenate([latent, latent]), tables, lens, kv_lora_rank=32)
    with pytest.raises(ValueError, match="kv_lora_rank 80"):
        mla.mla_decode_kernel(q, latent, tables, lens, kv_lora_rank=80)
    with pytest.raises(ValueError, match="in place"):  # compiled, an f32 pool would be cast (copied) per call
        jax.eval_shape(lambda *a: mla.mla_decode_kernel(*a, kv_lora_rank=32), q, latent, tables, lens)
    for page_size in (48, 4):  # not dividing the 64-token block; not whole 8-row SMEM tiles
        q, latent, tables, lens = random_latent(3, [5], 1, 4, 64, page_size, 2)
        with pytest.raises(ValueError, match=f"page_size {page_size} must be a multiple of 8 dividing block_kv 64"):
            mla.mla_decode_kernel(q, latent, tables, lens, kv_lora_rank=32)
    with pytest.raises(ValueError, match="value_chunk <= 256"):
        mla.MLADecodeConfig(value_chunk=512)
    with pytest.raises(ValueError, match="bytes of SMEM"):  # a 128-token ring of 576 columns: 304 KiB
        jax.eval_shape(lambda *a: mla.mla_decode_kernel(*a, kv_lora_rank=512, config=mla.MLADecodeConfig(block_kv=128)),
                       sds((2, 1, 128, 576)), sds((1, 9, 64, 576)), sds((2, 4), jnp.int32), sds((2,), jnp.int32))
