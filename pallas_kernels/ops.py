"""The one entry point models call for attention and grouped GEMM.

impl chooses the implementation:
  "auto"      Pallas (Mosaic GPU) on an sm_90 GPU (H100/H200), "cpu" on a CPU, "xla" elsewhere;
  "pallas"    the Mosaic GPU kernel, compiled for the GPU;
  "interpret" the same kernel in Pallas GPU interpret mode (runs on CPU; slow, for tests);
  "xla"       plain jnp (for paged attention the blocked online-softmax version of the reference);
  "cpu"       paged attention by the C++ XLA FFI kernel (cpu_paged_attention.cc), plain jnp for the
              other ops. "auto" falls back to "xla" where that kernel cannot be built or used.
impl is a Python string, so it is static under jit.

The gate (`checked_impl`): on an H100/H200 a Pallas kernel runs only after its first-use self-check
passed (selfcheck.py: a child process per kernel, the result cached on disk). A failed check turns
"auto" into "xla" with one warning per kernel and makes an explicit "pallas" raise SelfCheckError.
It runs while tracing (impl is static), never on CPU, in interpret mode or when cross-lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import cpu_paged_attention as cpa
from pallas_kernels import flash_attention as fa
from pallas_kernels import fp8_matmul as f8
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import mla_attention as mla
from pallas_kernels import mxfp4_grouped_matmul as mx
from pallas_kernels import paged_attention as pa
from pallas_kernels import quantized as qz
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_paged_attention_mgpu as rpm
from pallas_kernels import selfcheck
from pallas_kernels.hopper import is_sm90_gpu

IMPLS = ("auto", "pallas", "interpret", "xla", "cpu")


def resolve_impl(impl: str) -> str:
    """Maps impl to "pallas", "interpret", "xla" or "cpu"; raises ValueError naming an unknown impl."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if is_sm90_gpu() else "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def checked_impl(kernel: str, impl: str) -> str:
    """resolve_impl(impl), gated on an H100/H200 by the kernel's self-check (selfcheck.KERNELS names
    it): "pallas" only if the check passed; else "xla" under "auto", SelfCheckError under "pallas"."""
    resolved = resolve_impl(impl)
    if resolved != "pallas" or not is_sm90_gpu():
        return resolved
    failure = selfcheck.result(kernel).failure
    if failure is None:
        return "pallas"
    if impl == "pallas":
        raise selfcheck.SelfCheckError(
            f"the Pallas kernel {kernel} failed its self-check on this {jax.devices()[0].device_kind} ({failure}); "
            f'impl="auto" would run the XLA path instead (docs/selfcheck.md)')
    _warn_fallback(kernel, failure)
    return "xla"


@functools.cache
def _warn_fallback(kernel: str, failure: str) -> None:
    """The one warning per kernel and process that "auto" replaced it by the XLA path."""
    logging.warning("the Pallas kernel %s failed its self-check on this GPU (%s): using the XLA path instead "
                    "(docs/selfcheck.md)", kernel, failure)


FP8_KV_DTYPE = jnp.dtype(jnp.float8_e4m3fn)


def fp8_kv_unsupported(kernel: str = "paged attention") -> str:
    """The refusal of an FP8 KV pool by a Pallas kernel that reads none (the engine and ops say it)."""
    return (f"kv_cache_dtype='fp8_e4m3' is not supported by the Pallas {kernel} kernel yet; "
            f"use attention_impl='xla' (or 'auto')")


def ragged_kernel_supported(head_dim: int, q_heads: int, kv_heads: int, page_size: int) -> bool:
    """Whether ragged_paged_attention runs the native ragged kernel (which reads FP8 pages) rather
    than the per-token paged fallback (which does not)."""
    return rpm.supported(head_dim, q_heads, kv_heads, page_size)


def _fp8_pool_impl(impl: str, resolved: str, kernel: str) -> str:
    """The impl an FP8 pool runs on where the Pallas kernel reads none (the per-token paged
    fallback): the jnp path ("xla") for the C++ "cpu" kernel and "auto"'s Pallas choice; a
    ValueError for an explicit Pallas impl."""
    if resolved in ("pallas", "interpret"):
        if impl != "auto":
            raise ValueError(fp8_kv_unsupported(kernel))
        return "xla"
    return "xla" if resolved == "cpu" else resolved


def _interpret_params(impl: str) -> plgpu.InterpretGPUParams | None:
    """Interpret-mode parameters for impl "interpret"; None compiles the kernel for the GPU."""
    return plgpu.InterpretGPUParams() if impl == "interpret" else None


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Prefill attention. q [B,T,Hq,D], k/v [B,S,Hkv,D], T <= S; query i sits at position S-T+i.

    sliding_window=w: a query at position p sees keys p-w+1 .. p. sinks [Hq]: one logit per head
    joins the softmax denominator. scale None means 1/sqrt(D). Returns [B,T,Hq,D] in q.dtype.
    """
    kwargs = dict(causal=causal, sliding_window=sliding_window, sinks=sinks, scale=scale)
    impl = checked_impl("flash_attention", impl)
    if impl in ("xla", "cpu"):
        return fa.flash_attention_reference(q, k, v, **kwargs)
    return fa.flash_attention_kernel(q, k, v, **kwargs, interpret=_interpret_params(impl))


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """The last Q tokens of each sequence attend (causally) to the sequence's KV pages.

    q [B,Q,Hq,D]; k/v_pages [Hkv, num_pages, page_size, D]; block_tables [B, max_pages] int32
    (padded with the null page 0); context_lens [B] int32 counts all tokens including the Q new
    ones. A row with context_len 0 gives zeros. Returns [B,Q,Hq,D] in q.dtype.
    """
    kwargs = dict(sliding_window=sliding_window, sinks=sinks, scale=scale)
    args = (q, k_pages, v_pages, block_tables, context_lens)
    resolved = checked_impl("paged_attention", impl)
    if resolved == "cpu" and (impl == "cpu" or cpa.supported(q.shape[-1])):
        return cpa.paged_attention_cpu(*args, **kwargs)
    if resolved in ("xla", "cpu"):
        # One sequence: gathering all its pages at once costs about what the page loop does; a
        # batch: the loop wins by 1.6-5x (SmolLM2 shapes, batch 32, context 300, 30 layers: 94 vs
        # 162-516 ms on this 2-core CPU, the higher figure with pages scattered in the pool).
        reference = pa.paged_attention_reference if q.shape[0] == 1 else pa.paged_attention_blocked
        return reference(*args, **kwargs)
    return pa.paged_attention_kernel(*args, **kwargs, interpret=_interpret_params(resolved))


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    block_tables: jax.Array,
    *,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
    max_query_len: int | None = None,
) -> jax.Array:
    """One flat batch of new tokens from many sequences attends (causally) to their KV pages.

    q [T,Hq,D]; sequence s owns rows query_start_loc[s]:query_start_loc[s+1] (query_start_loc
    [S+1] int32, cumulative query lengths from 0), its last tokens: row query_start_loc[s]+i sits at
    position context_lens[s] - q_len_s + i. context_lens [S] counts all tokens including the new
    ones; block_tables [S, max_pages] int32. Rows past query_start_loc[S] give zeros. Returns
    [T,Hq,D] in q.dtype. max_query_len: a static upper bound on any q_len_s (1 for decode-only
    steps), or None.

    "cpu" runs the C++ kernel's ragged mode (tiles of 32 rows sharing each page); "pallas" /
    "interpret" the native ragged Mosaic kernel (ragged_paged_attention_mgpu.py), or where it
    refuses the shapes (rpm.supported) every token as a Q=1 row of the paged kernel; "xla" per
    token when max_query_len == 1, else tiles of min(rpa.BLOCK_Q, max_query_len) rows per padded row.

    An FP8 (float8_e4m3fn) pool runs the native kernel, which dequantizes each block in SMEM
    (self-checked apart: "ragged_paged_attention_fp8"), or the jnp path, which casts the pages it
    gathers: "cpu" goes to "xla"; where the native kernel refuses the shapes, "auto" goes to "xla"
    and "pallas"/"interpret" raise ValueError. Its scale (models/attention.py KV_SCALE) is the
    caller's: folded into `scale` and the output.
    """
    kwargs = dict(sliding_window=sliding_window, sinks=sinks, scale=scale)
    args = (q, k_pages, v_pages, query_start_loc, context_lens, block_tables)
    hkv, _, page_size, _ = k_pages.shape
    native = ragged_kernel_supported(q.shape[-1], q.shape[1], hkv, page_size)
    fp8 = k_pages.dtype == FP8_KV_DTYPE
    if fp8 and not native:
        impl = _fp8_pool_impl(impl, resolve_impl(impl), "paged attention")
    elif fp8 and resolve_impl(impl) == "cpu":
        impl = "xla"  # the C++ kernel reads no fp8
    kernel = "ragged_paged_attention_fp8" if fp8 else "ragged_paged_attention" if native else "paged_attention"
    resolved = checked_impl(kernel, impl)
    if resolved == "cpu":
        if impl == "cpu" or cpa.supported(q.shape[-1]):
            return cpa.ragged_paged_attention_cpu(*args, **kwargs)
        resolved = "xla"  # "auto" where the kernel cannot run (no compiler, or an odd head_dim)
    if resolved == "xla" and max_query_len != 1:
        block_q = min(rpa.BLOCK_Q, max_query_len or rpa.BLOCK_Q)
        return rpa.ragged_paged_attention_tiled(pa.paged_attention_blocked, *args, block_q=block_q, **kwargs)
    if resolved in ("pallas", "interpret") and native:
        return rpm.ragged_paged_attention_kernel(*args, **kwargs, interpret=_interpret_params(resolved))
    paged = functools.partial(paged_attention, impl=resolved)
    return rpa.ragged_paged_attention_per_token(paged, *args, **kwargs)


def mla_attention(
    q: jax.Array,
    latent_pages: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    block_tables: jax.Array,
    *,
    kv_lora_rank: int,
    scale: float | None = None,
    impl: str = "auto",
    max_query_len: int | None = None,
) -> jax.Array:
    """Multi-head latent attention (DeepSeek-V3) of a ragged flat batch in latent space.

    q [T, Hq, D] (absorbed queries) against latent_pages [1, num_pages, page_size, D]: the latent
    is every head's key and its first kv_lora_rank columns the value. Ragged metadata as in
    ragged_paged_attention. Returns [T, Hq, kv_lora_rank] in q.dtype. "pallas"/"interpret" run
    the ragged MLA kernel (mla_attention.mla_ragged_kernel); the others are ragged_paged_attention
    with K = V. An FP8 latent pool runs the kernel's FP8 path (each block dequantized to f16 in
    SMEM; self-checked apart: "mla_attention_fp8") or the jnp path ("cpu" goes there); its scale is
    the caller's, as in ragged_paged_attention.
    """
    if latent_pages.dtype == FP8_KV_DTYPE and resolve_impl(impl) == "cpu":
        impl = "xla"  # the C++ kernel reads no fp8
    resolved = checked_impl("mla_attention_fp8" if latent_pages.dtype == FP8_KV_DTYPE else "mla_attention", impl)
    if resolved not in ("pallas", "interpret"):
        args = (q, latent_pages, latent_pages, query_start_loc, context_lens, block_tables)
        out = ragged_paged_attention(*args, scale=scale, impl="xla" if resolved == "xla" else impl,
                                     max_query_len=max_query_len)
        return out[..., :kv_lora_rank]
    return mla.mla_ragged_kernel(q, latent_pages, query_start_loc, context_lens, block_tables, kv_lora_rank=kv_lora_rank,
                                 scale=scale, max_query_len=max_query_len, interpret=_interpret_params(resolved))


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array | qz.QuantizedWeight, group_sizes: jax.Array, *, group_offset: jax.Array | int = 0,
    impl: str = "auto"
) -> jax.Array:
    """MoE grouped GEMM: lhs [M,K] rows sorted by group, rhs [G,K,N], group_sizes [G] -> [M,N].

    Rows past sum(group_sizes) give zeros; float32 accumulation, output in lhs.dtype. With
    group_offset, group_sizes may list more groups than rhs holds: rhs holds groups
    group_offset .. group_offset+G-1 and rows of other groups give zeros (expert parallelism).
    "auto" on a GPU runs float32 weights on the XLA path: the kernel reads them in place and takes
    bf16/f16 only (a per-call cast would copy every expert). A QuantizedWeight rhs (packed MXFP4 /
    block-FP8 experts) goes to quantized_grouped_matmul.
    """
    if isinstance(rhs, qz.QuantizedWeight):
        return quantized_grouped_matmul(lhs, rhs, group_sizes, group_offset=group_offset, impl=impl)
    if impl == "auto" and rhs.dtype not in (jnp.bfloat16, jnp.float16):
        impl = "xla" if resolve_impl(impl) == "pallas" else impl
    impl = checked_impl("grouped_matmul", impl)
    if impl in ("xla", "cpu"):
        return gmm.grouped_matmul_reference(lhs, rhs, group_sizes, group_offset=group_offset)
    return gmm.grouped_matmul_kernel(
        lhs, rhs, group_sizes, group_offset=group_offset, interpret=_interpret_params(impl)
    )


def quantized_matmul(x: jax.Array, w: qz.QuantizedWeight, *, impl: str = "auto") -> jax.Array:
    """x [M, K] @ w (packed [K, N]: pallas_kernels/quantized.py) -> [M, N] in x.dtype, f32 accumulation.

    mxfp4 runs W4A16, fp8_block W8A8 (activations quantized per token in groups of 128 along K).
    "pallas"/"interpret" run fp8_matmul.fp8_block_matmul_kernel for fp8_block (mxfp4 ships only in
    experts: grouped); everything else dequantizes the weight inside the step (qz.matmul_reference).
    """
    if w.fmt == "fp8_block":
        impl = checked_impl("fp8_block_matmul", impl)
        if impl in ("pallas", "interpret"):
            return f8.fp8_block_matmul_kernel(x, w, interpret=_interpret_params(impl)).astype(x.dtype)
    else:
        resolve_impl(impl)  # a ValueError names an unknown impl
    return qz.matmul_reference(x, w)


def quantized_grouped_matmul(lhs: jax.Array, rhs: qz.QuantizedWeight, group_sizes: jax.Array, *,
                             group_offset: jax.Array | int = 0, impl: str = "auto") -> jax.Array:
    """grouped_matmul (same contract) with packed expert weights rhs [G, K, N] (W4A16 / W8A8 as
    quantized_matmul). "pallas"/"interpret" run the format's kernel (mxfp4_grouped_matmul.py,
    fp8_matmul.py), which reads the packed weights in place; "xla"/"cpu" dequantize one layer's
    experts inside the step."""
    mxfp4 = rhs.fmt == "mxfp4"
    impl = checked_impl("mxfp4_grouped_matmul" if mxfp4 else "fp8_block_grouped_matmul", impl)
    if impl in ("pallas", "interpret"):
        kernel = mx.mxfp4_grouped_matmul_kernel if mxfp4 else f8.fp8_block_grouped_matmul_kernel
        return kernel(lhs, rhs, group_sizes, group_offset=group_offset, interpret=_interpret_params(impl)).astype(lhs.dtype)
    a, b = qz.dense_operands(lhs, rhs)
    return gmm.grouped_matmul_reference(a, b, group_sizes, group_offset=group_offset).astype(lhs.dtype)
