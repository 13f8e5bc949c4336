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
  """
  gpu_interpret.reset_gpu_interpret_mode_state()
  try:
    yield plgpu.InterpretGPUParams(detect_races=True)
    assert not gpu_interpret.get_races().races_found, "interpret mode found a data race"
  finally:
    gpu_interpret.reset_gpu_interpret_mode_state()


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
    out = plgpu.kernel(body, out_type=sds((128, 64), jnp.float32), interpret=params,
                       scratch_types=[plgpu.SMEM((64, 64), jnp.float32), plgpu.Barrier()])(x)
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
  return (sds((batch, q_len, hq, d)), sds((hkv, pages, page_size, d)),
          sds((hkv, pages, page_size, d)), sds((batch, max_pages), jnp.int32),
          sds((batch,), jnp.int32))


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


@pytest.mark.parametrize("name", list(PAGED_SHAPES))
def test_paged_attention_lowers_for_h100(name):
  batch, q_len, hq, hkv, d, page_size, context, window, with_sinks = PAGED_SHAPES[name]
  args = paged_args(batch, q_len, hq, hkv, d, page_size, context)
  sinks = sds((hq,), jnp.float32) if with_sinks else None
  f = lambda *a: pa.paged_attention_kernel(*a[:5], sliding_window=window, sinks=a[5])
  text = lower_for_cuda(f, *args, sinks)
  assert "mosaic_gpu" in text
