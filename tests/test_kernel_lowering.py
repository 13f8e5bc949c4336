"""Cross-lowering of the Mosaic GPU kernels to CUDA at benchmark shapes, on CPU.

Lowering under an abstract H100 runs Mosaic GPU's own checks (shared-memory budget, wgmma and
TMA shape rules) that interpret mode skips; only ptxas needs a real GPU. This module also holds
the helpers the kernel test files share: the abstract H100 and race-checked interpret mode.
"""

import contextlib
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels import flash_attention as fa
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import mla_attention as mla
from pallas_kernels import ops
from pallas_kernels import paged_attention as pa

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
BF16 = jnp.bfloat16


def abstract_h100():
    """Context in which kernels that ask for the device see an H100."""
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100))


@contextlib.contextmanager
def race_checked_interpret():
    """Yields GPU interpret params with race detection; fails on races; always resets state.

    Interpreter state is process-global and an exception leaves it dirty, so reset on both ends.
    On an H100/H200 it yields None instead: the same tests then run the compiled kernels
    (scripts/gpu_checklist.sh).
    """
    if ops.is_sm90_gpu():
        yield None
        return
    gpu_interpret.reset_gpu_interpret_mode_state()
    try:
        yield plgpu.InterpretGPUParams(detect_races=True)
        assert not gpu_interpret.get_races().races_found, "interpret mode found a data race"
    finally:
        gpu_interpret.reset_gpu_interpret_mode_state()


def kernel_tolerance(dtype, interpret) -> float:
    """assert_allclose tolerance by the dtype the kernel multiplies in (fa.mma_dtype): f32 inputs
    stay f32 when interpreted, but compiled for the GPU (interpret None) they run in bf16."""
    return 1e-4 if fa.mma_dtype(dtype, interpret) == jnp.float32 else 3e-2


def lower_for_cuda(f, *args):
    """Lowers jit(f) for CUDA under the abstract H100; returns the StableHLO text."""
    with abstract_h100():
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def sds(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_interpret_mode_poisons_unwritten_outputs():
    """The poisoning the interpret tests rely on: an output element nobody writes reads NaN."""

    def body(x_ref, o_ref, smem, barrier):
        plgpu.copy_gmem_to_smem(x_ref, smem, barrier)
        plgpu.barrier_wait(barrier)
        plgpu.copy_smem_to_gmem(smem, o_ref.at[pl.ds(0, 64)])
        plgpu.wait_smem_to_gmem(0)

    x = jnp.ones((64, 64), jnp.float32)
    with race_checked_interpret() as params:
        out = plgpu.kernel(
            body,
            out_type=sds((128, 64), jnp.float32),
            interpret=params,
            scratch_types=[plgpu.SMEM((64, 64), jnp.float32), plgpu.Barrier()],
        )(x)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:64], 1.0)
    assert np.isnan(out[64:]).all()


def test_lowering_catches_shared_memory_overflow():
    """Cross-lowering is a real check: a config too big for an H100's SMEM must fail."""
    args = paged_args(batch=8, q_len=1, hq=32, hkv=8, d=128, page_size=16, context=4096)
    f = functools.partial(pa.paged_attention_kernel, config=pa.PagedAttentionConfig(block_kv=1024))
    with pytest.raises(ValueError, match="shared memory"):
        lower_for_cuda(f, *args)


def paged_args(batch, q_len, hq, hkv, d, page_size, context):
    """Abstract paged-attention inputs with one page table row per sequence."""
    max_pages = context // page_size
    pages = batch * max_pages + 1
    return (
        sds((batch, q_len, hq, d)),
        sds((hkv, pages, page_size, d)),
        sds((hkv, pages, page_size, d)),
        sds((batch, max_pages), jnp.int32),
        sds((batch,), jnp.int32),
    )


# name: (batch, Q, Hq, Hkv, D, page_size, context, window, sinks)
PAGED_SHAPES = {
    "llama3_8b_decode_b64_4k": (64, 1, 32, 8, 128, 16, 4096, None, False),
    "llama3_8b_decode_b1_32k": (1, 1, 32, 8, 128, 16, 32768, None, False),
    "llama3_8b_decode_b256_1k": (256, 1, 32, 8, 128, 32, 1024, None, False),
    "llama3_8b_verify_q5": (16, 5, 32, 8, 128, 16, 4096, None, False),
    "llama3_8b_prefill_chunk_512": (2, 512, 32, 8, 128, 16, 8192, None, False),
    "gpt_oss_decode_window_sinks": (64, 1, 64, 8, 64, 16, 4096, 128, True),
    "gpt_oss_page_256": (8, 1, 64, 8, 64, 256, 4096, None, True),
}


def test_paged_attention_f32_cache_lowers_as_bf16():
    """Compiled for the GPU, an f32 cache goes through the kernel as bf16 (f32 wgmma is tf32)."""
    args = [
        jax.ShapeDtypeStruct(a.shape, jnp.float32 if a.dtype == BF16 else a.dtype)
        for a in paged_args(batch=4, q_len=1, hq=8, hkv=2, d=64, page_size=16, context=512)
    ]
    assert "mosaic_gpu" in lower_for_cuda(pa.paged_attention_kernel, *args)


@pytest.mark.parametrize("name", list(PAGED_SHAPES))
def test_paged_attention_lowers_for_h100(name):
    batch, q_len, hq, hkv, d, page_size, context, window, with_sinks = PAGED_SHAPES[name]
    args = paged_args(batch, q_len, hq, hkv, d, page_size, context)
    sinks = sds((hq,), jnp.float32) if with_sinks else None
    f = lambda *a: pa.paged_attention_kernel(*a[:5], sliding_window=window, sinks=a[5])
    text = lower_for_cuda(f, *args, sinks)
    assert "mosaic_gpu" in text


# name: (M rows = tokens x top-k, K, N, experts): gpt-oss-120b (hidden = intermediate = 2880,
# gate and up fused) and DeepSeek-V3 (hidden 7168, moe intermediate 2048) expert GEMMs.
GROUPED_SHAPES = {
    "gpt_oss_120b_gate_up": (4096 * 4, 2880, 2 * 2880, 128),
    "gpt_oss_120b_down": (4096 * 4, 2880, 2880, 128),
    "deepseek_v3_gate_up": (4096 * 8, 7168, 2 * 2048, 256),
    "deepseek_v3_down_decode": (64 * 8, 2048, 7168, 256),
}


@pytest.mark.parametrize("name", list(GROUPED_SHAPES))
def test_grouped_matmul_lowers_for_h100(name):
    m, k, n, experts = GROUPED_SHAPES[name]
    args = (sds((m, k)), sds((experts, k, n)), sds((experts,), jnp.int32))
    assert "mosaic_gpu" in lower_for_cuda(gmm.grouped_matmul_kernel, *args)


def test_grouped_matmul_h100_configs_are_persistent():
    """On an H100 the persistent warp-specialized kernel runs: prefill tiles for thousands of rows
    per expert, wgmma's smallest M with a deeper ring for decode's few."""
    for name, tiles in (("deepseek_v3_gate_up", "m128_n128_k64_st3"), ("deepseek_v3_down_decode", "m64_n64_k64_st6")):
        m, k, n, experts = GROUPED_SHAPES[name]
        text = lower_for_cuda(gmm.grouped_matmul_kernel, sds((m, k)), sds((experts, k, n)), sds((experts,), jnp.int32))
        assert f"grouped_matmul_{tiles}_persistent" in text, name


def test_grouped_matmul_expert_shard_lowers_for_h100():
    m, k, n, experts = GROUPED_SHAPES["gpt_oss_120b_down"]
    args = (sds((m, k)), sds((experts // 8, k, n)), sds((experts,), jnp.int32), sds((), jnp.int32))
    f = lambda lhs, rhs, sizes, offset: gmm.grouped_matmul_kernel(lhs, rhs, sizes, group_offset=offset)
    assert "mosaic_gpu" in lower_for_cuda(f, *args)


# name: (batch, T, S, Hq, Hkv, D, window, sinks): Llama-3-8B prefill 1k-8k and a chunk after
# context; gpt-oss-120b (64 q heads, 8 kv heads, head_dim 64, window 128, sinks).
FLASH_SHAPES = {
    "llama3_8b_prefill_1k": (8, 1024, 1024, 32, 8, 128, None, False),
    "llama3_8b_prefill_8k": (1, 8192, 8192, 32, 8, 128, None, False),
    "llama3_8b_chunk_512_after_4k": (1, 512, 4608, 32, 8, 128, None, False),
    "gpt_oss_prefill_4k_window_sinks": (1, 4096, 4096, 64, 8, 64, 128, True),
    "deepseek_v3_expanded_prefill_4k": (1, 4096, 4096, 128, 128, 192, None, False),  # 128 nope + 64 rope
}


@pytest.mark.parametrize("name", list(FLASH_SHAPES))
def test_flash_attention_lowers_for_h100(name):
    batch, t, s, hq, hkv, d, window, with_sinks = FLASH_SHAPES[name]
    args = (
        sds((batch, t, hq, d)),
        sds((batch, s, hkv, d)),
        sds((batch, s, hkv, d)),
        sds((hq,), jnp.float32) if with_sinks else None,
    )
    f = lambda q, k, v, sinks: fa.flash_attention_kernel(q, k, v, sliding_window=window, sinks=sinks)
    assert "mosaic_gpu" in lower_for_cuda(f, *args)


# name: (batch, Q, context, page_size): DeepSeek-V3's latent (512 + 64 rope, 128 heads) at decode
# batch 64 and 256, one long sequence (KV splits), and a mixed step's 512 tokens as Q=1 rows.
MLA_SHAPES = {
    "deepseek_v3_decode_b64_4k": (64, 1, 4096, 16),
    "deepseek_v3_decode_b256_2k_page64": (256, 1, 2048, 64),
    "deepseek_v3_decode_b1_32k": (1, 1, 32768, 16),
    "deepseek_v3_mixed_512_rows": (512, 1, 4096, 16),
}


@pytest.mark.parametrize("name", list(MLA_SHAPES))
def test_mla_decode_lowers_for_h100(name):
    batch, q_len, context, page_size = MLA_SHAPES[name]
    q, latent, _, tables, lens = paged_args(batch, q_len, 128, 1, 576, page_size, context)
    f = lambda *a: mla.mla_decode_kernel(*a, kv_lora_rank=512, scale=0.1352)
    assert "mosaic_gpu" in lower_for_cuda(f, q, latent, tables, lens)


def test_grouped_matmul_pipeline_waits_for_the_previous_wgmma():
    """delay_release=1 refills the previous step's operand slots: the body must wgmma_wait(1) (the
    pairing of upstream's hopper_matmul_mgpu.py). Interpret mode cannot see the race; the lowered
    module names the primitive only when the body waits."""
    args = (sds((512, 256)), sds((4, 256, 256)), sds((4,), jnp.int32))
    assert "wgmma_wait" in lower_for_cuda(gmm.grouped_matmul_kernel, *args)
