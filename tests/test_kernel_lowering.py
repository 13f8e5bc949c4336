"""Cross-lowering of the Mosaic GPU kernels to CUDA at benchmark shapes, on CPU.

Lowering under an abstract H100 runs Mosaic GPU's own checks (shared-memory budget, wgmma and
TMA shape rules) that interpret mode skips; only ptxas needs a real GPU. The tests read what was
lowered (mosaic_calls): each kernel launch's custom call with its operand and result types, and
from the kernel's own Mosaic module its kernel_name, grid and code. This module also holds the
helpers the kernel test files share: the abstract H100 and race-checked interpret mode.
"""

import contextlib
import dataclasses
import functools
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental.mosaic.gpu import core as mosaic_core
from jax.experimental.mosaic.gpu import dialect as mosaic_dialect
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from engine import kv_cache
from engine.config import EngineConfig
from engine.runner import jitted_steps, padding_decode, padding_mixed
from models.registry import abstract_model, get_preset
from pallas_kernels import flash_attention as fa
from pallas_kernels import hopper
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import mla_attention as mla
from pallas_kernels import ops
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention_mgpu as rpm
from pallas_kernels import warp_specialized_attention as ws

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
BF16 = jnp.bfloat16


def abstract_h100(device: AbstractDevice = H100):
    """Context in which kernels that ask for the device see an H100 (or `device`)."""
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device))


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


def stored_pool(pages: jax.Array, interpret) -> jax.Array:
    """A test's KV pool as the paged kernels read it: compiled for the GPU (interpret None, on an
    H100) in bfloat16, as the engine stores it there (kv_cache.pool_dtype); as is when interpreted."""
    return pages.astype(BF16) if interpret is None and pages.dtype == jnp.float32 else pages


def kernel_tolerance(dtype, interpret) -> float:
    """assert_allclose tolerance by the dtype the kernel multiplies in (hopper.mma_dtype): f32 inputs
    stay f32 when interpreted, but compiled for the GPU (interpret None) they run in bf16."""
    return 1e-4 if hopper.mma_dtype(dtype, interpret) == jnp.float32 else 3e-2


def lower_for_cuda(f, *args):
    """Lowers jit(f) for CUDA under the abstract H100; returns the StableHLO text."""
    with abstract_h100():
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def ops_named(module: ir.Module, name: str) -> list[ir.Operation]:
    """Every op called `name` ("stablehlo.custom_call", "gpu.launch", ...) in an MLIR module, nested
    ones too."""
    found = []

    def walk(op: ir.Operation) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == name:
                        found.append(child.operation)
                    walk(child.operation)

    walk(module.operation)
    return found


@dataclasses.dataclass(frozen=True)
class MosaicCall:
    """One Mosaic GPU kernel launch of a lowered module: its custom call's operand and result
    types (StableHLO, e.g. "tensor<512x256xbf16>"), and from the kernel's own module (the custom
    call's serialized Mosaic GPU MLIR, `module` as text) its kernel_name, grid, threads per block
    and dynamic SMEM."""

    name: str
    operands: tuple[str, ...]
    results: tuple[str, ...]
    grid: tuple[int, int, int]
    threads: int
    smem_bytes: int
    module: str = dataclasses.field(repr=False)


def _launch_constant(value: ir.Value) -> int:
    """The integer a gpu.launch operand is defined as (an arith.constant)."""
    return ir.IntegerAttr(value.owner.attributes["value"]).value


def _mosaic_call(op: ir.Operation) -> MosaicCall:
    """MosaicCall of one mosaic_gpu custom call: its serialized kernel module is parsed back (Mosaic
    GPU's own deserialization pass) to read the module name (the kernel_name) and its gpu.launch."""
    context = jax_mlir.make_ir_context()
    mosaic_dialect.register_dialect(context)
    context.allow_unregistered_dialects = True
    with context:
        module = ir.Module.parse(op.attributes["mhlo.backend_config"]["module"].value_bytes)
        module = mosaic_core._run_serde_pass(module, serialize=False)
        [launch] = [launch.opview for launch in ops_named(module, "gpu.launch")]
        grid = tuple(_launch_constant(v) for v in (launch.gridSizeX, launch.gridSizeY, launch.gridSizeZ))
        threads = [_launch_constant(v) for v in (launch.blockSizeX, launch.blockSizeY, launch.blockSizeZ)]
        return MosaicCall(name=ir.StringAttr(module.operation.attributes["sym_name"]).value,
                          operands=tuple(str(v.type) for v in op.operands),
                          results=tuple(str(r.type) for r in op.results), grid=grid, threads=int(np.prod(threads)),
                          smem_bytes=_launch_constant(launch.dynamicSharedMemorySize), module=str(module))


def module_mosaic_calls(module: ir.Module) -> list[MosaicCall]:
    """The Mosaic GPU kernel launches of a lowered module."""
    return [_mosaic_call(op) for op in ops_named(module, "stablehlo.custom_call")
            if ir.StringAttr(op.attributes["call_target_name"]).value.startswith("mosaic_gpu")]


def mosaic_calls(f, *args, device: AbstractDevice = H100) -> list[MosaicCall]:
    """The Mosaic GPU kernel launches of jit(f) lowered for CUDA under an abstract `device`."""
    with abstract_h100(device):
        return module_mosaic_calls(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo"))


def tensor_shape(tensor: str) -> tuple[int, ...]:
    """The shape of a StableHLO tensor type: tensor<4x256x256xbf16> -> (4, 256, 256)."""
    return tuple(int(x) for x in re.fullmatch(r"tensor<((?:\d+x)*)\w+>", tensor)[1].split("x")[:-1])


def tensor_type(shape, dtype=BF16) -> str:
    """The StableHLO type of an array, as MosaicCall and the module print it: tensor<4x256x256xbf16>."""
    with jax_mlir.make_ir_context(), ir.Location.unknown():
        return str(ir.RankedTensorType.get(shape, jax_mlir.dtype_to_ir_type(jnp.dtype(dtype))))


def sds(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.interpret_only
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


def test_compiled_paged_kernels_read_the_pool_in_place_or_refuse_it():
    """Compiled for the GPU the paged kernels take the KV pool as stored: a float32 pool or a head
    dim off a multiple of 64 is a ValueError naming the dtype and shape (a cast or pad would copy
    the whole cache every step), for the paged and the ragged kernel alike."""
    ragged = lambda q, k, v, tables, lens: rpm.ragged_paged_attention_kernel(  # noqa: E731
        q[:, 0], k, v, jnp.arange(q.shape[0] + 1, dtype=jnp.int32), lens, tables)
    for kernel in (pa.paged_attention_kernel, ragged):
        f32_pool = [sds(a.shape, jnp.float32 if a.dtype == BF16 else a.dtype)
                    for a in paged_args(batch=4, q_len=1, hq=8, hkv=2, d=64, page_size=16, context=512)]
        with pytest.raises(ValueError, match=r"KV pool in place.*got float32\[2, 129, 16, 64\]"):
            lower_for_cuda(kernel, *f32_pool)
        with pytest.raises(ValueError, match=r"head_dim a multiple of 64.*got bfloat16\[2, 129, 16, 40\]"):
            lower_for_cuda(kernel, *paged_args(batch=4, q_len=1, hq=8, hkv=2, d=40, page_size=16, context=512))


def test_the_engine_stores_its_gpu_pool_as_the_kernels_read_it(monkeypatch):
    """On an H100/H200 a float32 model's pool is bfloat16 (what the kernels multiply); elsewhere,
    and for bf16/f16 models, the model's dtype."""
    config = get_preset("tiny-llama")
    assert kv_cache.allocate(config, 3, 16, jnp.float32)[0][0].dtype == jnp.float32
    monkeypatch.setattr(ops, "is_sm90_gpu", lambda: True)
    [(k, v), *_] = kv_cache.allocate(config, 3, 16, jnp.float32)
    assert k.dtype == v.dtype == BF16 and kv_cache.pool_dtype(jnp.float16) == jnp.float16
    assert kv_cache.bytes_per_page(config, 16, jnp.float32) == kv_cache.bytes_per_page(config, 16, BF16)


F32 = jnp.float32


@pytest.mark.parametrize("name", list(PAGED_SHAPES))
def test_paged_attention_lowers_for_h100(name):
    """One launch over (sequence, KV head, row tile, KV split): q as [B, Hkv, rows, D] tiles, the
    pool arrays themselves (read in place), the KV splits that fill the H100's 132 SMs, f32
    partials and log-sum-exps out."""
    batch, q_len, hq, hkv, d, page_size, context, window, with_sinks = PAGED_SHAPES[name]
    args = paged_args(batch, q_len, hq, hkv, d, page_size, context)
    sinks = sds((hq,), jnp.float32) if with_sinks else None
    f = lambda *a: pa.paged_attention_kernel(*a[:5], sliding_window=window, sinks=a[5])  # noqa: E731
    [call] = mosaic_calls(f, *args, sinks)
    rows, block_kv = hopper.round_up(q_len * hq // hkv, 64), max(128, page_size)
    blocks = -(-(context // page_size) // (block_kv // page_size))
    splits = pa.num_kv_splits(batch * hkv * rows // 64, blocks, 132, 16)
    pool = tensor_type(args[1].shape)
    assert call.name == f"paged_attention_r64_kv{block_kv}_s{splits}"
    assert call.operands[:3] == (tensor_type((batch, hkv, rows, d)), pool, pool)
    assert call.results == (tensor_type((batch, hkv, splits, rows, d), F32),
                            tensor_type((batch, hkv, splits, rows), F32))
    assert np.prod(call.grid) == batch * hkv * rows // 64 * splits and call.threads == 128


# name: (M rows = tokens x top-k, K, N, experts, tiles): gpt-oss-120b (hidden = intermediate = 2880,
# gate and up fused; N = 2880 is 45 column tiles of 64) and DeepSeek-V3 (hidden 7168, moe
# intermediate 2048) expert GEMMs; tiles: the persistent kernel's config (prefill tiles for
# thousands of rows per expert, wgmma's smallest M and a deeper ring for decode's few).
GROUPED_SHAPES = {
    "gpt_oss_120b_gate_up": (4096 * 4, 2880, 2 * 2880, 128, "m128_n64_k64_st3"),
    "gpt_oss_120b_down": (4096 * 4, 2880, 2880, 128, "m128_n64_k64_st3"),
    "gpt_oss_120b_down_decode": (64 * 4, 2880, 2880, 128, "m64_n64_k64_st6"),
    "deepseek_v3_gate_up": (4096 * 8, 7168, 2 * 2048, 256, "m128_n128_k64_st3"),
    "deepseek_v3_down_decode": (64 * 8, 2048, 7168, 256, "m64_n64_k64_st6"),
}


def grouped_args(m: int, k: int, n: int, experts: int, local_experts: int | None = None) -> tuple:
    return sds((m, k)), sds((local_experts or experts, k, n)), sds((experts,), jnp.int32)


@pytest.mark.parametrize("name", list(GROUPED_SHAPES))
def test_grouped_matmul_lowers_for_h100(name):
    """The persistent warp-specialized kernel, one program (a producer and two consumer
    warpgroups) per SM, takes lhs and the expert weights as they are (no pad to whole tiles, no
    cast) and writes [M, N]."""
    m, k, n, experts, tiles = GROUPED_SHAPES[name]
    [call] = mosaic_calls(gmm.grouped_matmul_kernel, *grouped_args(m, k, n, experts))
    assert call.name == f"grouped_matmul_{tiles}_persistent"
    assert call.operands[4:] == (tensor_type((m, k)), tensor_type((experts, k, n)))
    assert call.results == (tensor_type((m, n)),)
    assert call.grid == (132, 1, 1) and call.threads == 3 * 128


def test_grouped_matmul_expert_shard_lowers_for_h100():
    """Expert parallelism: the shard's 16 of 128 experts' weights in place, every row out."""
    m, k, n, experts, _ = GROUPED_SHAPES["gpt_oss_120b_down"]
    f = lambda lhs, rhs, sizes, offset: gmm.grouped_matmul_kernel(lhs, rhs, sizes, group_offset=offset)  # noqa: E731
    [call] = mosaic_calls(f, *grouped_args(m, k, n, experts, experts // 8), sds((), jnp.int32))
    assert call.operands[4:] == (tensor_type((m, k)), tensor_type((experts // 8, k, n)))
    assert call.results == (tensor_type((m, n)),)


def test_grouped_matmul_compiled_refuses_weights_it_would_copy():
    """Compiled, the grouped GEMM multiplies the expert weights in place: float32 ones (a cast of
    every expert per call) are a ValueError naming the dtype; interpret mode takes them."""
    with pytest.raises(ValueError, match=r"in place.*got float32\[4, 256, 256\]"):
        lower_for_cuda(gmm.grouped_matmul_kernel, sds((512, 256), F32), sds((4, 256, 256), F32),
                       sds((4,), jnp.int32))


H100_PCIE = AbstractDevice(device_kind="NVIDIA H100 PCIe", platform="gpu", num_cores=114)


def test_programs_follow_the_target_devices_sm_count():
    """The SM count comes from the device the kernels are built for (hopper.target_num_sms): the
    persistent grouped GEMM runs one program per SM, 114 on an H100 PCIe and 132 on an SXM, and
    the KV splits of one long decode fill those SMs (8 programs x 15 splits on 114, x 16 on 132)."""
    gmm_args = grouped_args(*GROUPED_SHAPES["gpt_oss_120b_down"][:4])
    decode_32k = paged_args(batch=1, q_len=1, hq=32, hkv=8, d=128, page_size=16, context=32768)
    for device, sms, splits in ((H100, 132, 16), (H100_PCIE, 114, 15)):
        [call] = mosaic_calls(gmm.grouped_matmul_kernel, *gmm_args, device=device)
        assert call.grid == (sms, 1, 1)
        [call] = mosaic_calls(pa.paged_attention_kernel, *decode_32k, device=device)
        assert call.name.endswith(f"_s{splits}")


def mma_to_release(module: str, release: str) -> list[str]:
    """The wgmma waits a kernel's pipeline body issues between its first wgmma commit and its first
    `release` op after that (the TMA refilling the operand slots, or the arrival freeing them)."""
    body = module[module.index("wgmma.commit_group"):]
    return re.findall(r"wgmma\.wait_group\.sync\.aligned (\d)", body[:body.index(release)])


def test_grouped_matmul_pipelines_release_slots_only_after_their_wgmmas():
    """What _gmm_body's and _persistent_gmm_body's comments argue, checked in the kernels' own
    modules (interpret mode runs wgmma synchronously and cannot see an operand slot overwritten
    under a wgmma in flight). The grid kernel's body waits until only its own wgmma is in flight
    (wait 1) before the pipeline refills the previous step's slots. The persistent kernel's
    consumers wait 1 and, at the last K step, for all (wait 0: the drain) before the arrival that
    lets the producer move on to the next work item; with one K step they wait for all (no delay)."""
    grid = functools.partial(gmm.grouped_matmul_kernel, config=gmm.GroupedMatmulConfig(block_m=64, block_n=64))
    [call] = mosaic_calls(grid, *grouped_args(512, 256, 256, 4))
    assert mma_to_release(call.module, "cp.async.bulk.tensor.shared") == ["1"]
    for k, waits in ((256, ["1", "0"]), (64, ["0"])):
        [call] = mosaic_calls(gmm.grouped_matmul_kernel, *grouped_args(512, k, 256, 4))
        assert call.name.endswith("_persistent")
        assert mma_to_release(call.module, "mbarrier.arrive.release") == waits, k


def gpt_oss_steps(batch: int = 64, context: int = 4096, tokens: int = 512, page_size: int = 16) -> dict:
    """gpt-oss-120b's engine steps (decode loop and mixed step) with the Pallas kernels, as
    scripts/check_lowering.py builds them (that script defines absl flags at import, which other
    scripts' tests define too): {step: (jitted function, abstract arguments)}, two layers (sliding
    window and full) at the real widths, the bf16 pool the GPU engine stores, its experts dense bf16
    (the bf16 grouped GEMM kernel; the packed MXFP4 experts run their own kernel)."""
    config = get_preset("gpt-oss-120b")
    config = dataclasses.replace(config, num_layers=2, layer_types=config.layer_types[:2])
    pages = context // page_size
    engine = EngineConfig(max_model_len=context, page_size=page_size, num_pages=batch * pages + 1, max_num_seqs=batch,
                          prefill_chunk=tokens, max_num_batched_tokens=tokens, attention_impl="pallas")
    graphdef, state = nnx.split(abstract_model(config, BF16, weights="bfloat16"))
    pool = sds(kv_cache.page_shape(config, engine.num_pages, page_size))
    cache = [(pool, pool) for _ in range(config.num_layers)]
    abstract = lambda x: sds(x.shape, x.dtype) if hasattr(x, "dtype") else x  # noqa: E731
    decode = jax.tree.map(abstract, padding_decode(engine, batch, pages))
    mixed = jax.tree.map(abstract, padding_mixed(engine, tokens, pages))
    mixed_fn, decode_fn = jitted_steps(graphdef, "pallas", "pallas", page_size, engine.decode_steps)
    return dict(decode=(decode_fn, (state, cache, *decode)), mixed=(mixed_fn, (state, cache, mixed)))


@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_gpt_oss_steps_never_copy_the_pool_or_the_weights(step):
    """A whole gpt-oss-120b step lowered for the H100 has no pad and no convert of the KV pool or of
    any weight of 2^20 elements or more (the experts' [128, 2880, 5760] and [128, 2880, 2880], the
    embedding, the projections): the kernels read them in place. Before, every step padded the
    down projection's experts to 2944 columns and put a (no-op) pad over each pool."""
    fn, args = gpt_oss_steps()[step]
    pool, down = tensor_type(args[1][0][0].shape), tensor_type((128, 2880, 2880))
    big = {tensor_type(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(args[0]) if leaf.size >= 1 << 20}
    assert down in big
    with abstract_h100():
        module = fn.trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    copies = [f"{name} of {op.operands[0].type}" for name in ("stablehlo.pad", "stablehlo.convert")
              for op in ops_named(module, name) if str(op.operands[0].type) in big | {pool}]
    assert not copies
    calls = module_mosaic_calls(module)
    # Per layer: the query-tile and decode-tile launches each take both pools, the down projection its experts.
    assert sum(c.operands.count(pool) for c in calls) == 2 * 2 * 2
    assert sum(down in c.operands for c in calls) == 2


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
    """The FA3-style warp-specialized body (a producer and two 64-row consumers per program): q as
    [B, Hkv, rows, D] tiles of 128 rows, K/V zero-padded to whole KV blocks, one split."""
    batch, t, s, hq, hkv, d, window, with_sinks = FLASH_SHAPES[name]
    args = (
        sds((batch, t, hq, d)),
        sds((batch, s, hkv, d)),
        sds((batch, s, hkv, d)),
        sds((hq,), jnp.float32) if with_sinks else None,
    )
    f = lambda q, k, v, sinks: fa.flash_attention_kernel(q, k, v, sliding_window=window, sinks=sinks)  # noqa: E731
    [call] = mosaic_calls(f, *args)
    config, rows = fa.flash_attention_config(H100.device_kind, d), hopper.round_up(t * hq // hkv, ws.PROGRAM_ROWS)
    assert re.fullmatch(rf"flash_attention_ws_kv{config.block_kv}_st[23]_s1", call.name)
    kv = tensor_type((batch, hopper.round_up(s, config.block_kv), hkv, d))
    assert call.operands == (tensor_type((batch, hkv, rows, d)), kv, kv)
    assert call.results == (tensor_type((batch, hkv, 1, rows, d)), tensor_type((batch, hkv, 1, rows), F32))
    assert call.threads == 3 * 128


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
    """MLA decode launches its own kernels, each reading the bf16 latent pool in place."""
    batch, q_len, context, page_size = MLA_SHAPES[name]
    q, latent, _, tables, lens = paged_args(batch, q_len, 128, 1, 576, page_size, context)
    f = lambda *a: mla.mla_decode_kernel(*a, kv_lora_rank=512, scale=0.1352)  # noqa: E731
    calls = mosaic_calls(f, q, latent, tables, lens)
    assert calls and all(c.name.startswith("mla_") and tensor_type(latent.shape) in c.operands for c in calls)
