"""Paged attention: the last Q tokens of each sequence against its KV pages.

Layout (DESIGN.md): k/v pages [Hkv, num_pages, page_size, D]; block_tables [B, max_pages] int32
maps a sequence's logical page i to a physical page (padding entries point at the null page 0);
context_lens [B] int32 counts every token of the sequence including the Q new ones, which are
already written into the pages. Query i of sequence b sits at position context_lens[b] - Q + i.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import check_attention_args, masked_softmax_ref, visible_mask


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, context_lens: jax.Array, *,
                              sliding_window: int | None = None,
                              sinks: jax.Array | None = None,
                              scale: float | None = None) -> jax.Array:
  """Gathers each sequence's pages and attends with a position mask (jit-friendly, static shapes).

  q [B, Q, Hq, D]; returns [B, Q, Hq, D] in q.dtype. A row with context_len 0 (or a query whose
  position is negative because context_len < Q) gives zeros.
  """
  b, q_len, hq, d = q.shape
  hkv, _, page_size, _ = k_pages.shape
  check_attention_args(hq, hkv, sliding_window, sinks)
  scale = d ** -0.5 if scale is None else scale
  s_len = block_tables.shape[1] * page_size
  k = k_pages[:, block_tables].reshape(hkv, b, s_len, d)  # [Hkv, B, S, D]
  v = v_pages[:, block_tables].reshape(hkv, b, s_len, d)
  q_bqkgd = q.reshape(b, q_len, hkv, hq // hkv, d)
  s = jnp.einsum("bqkgd,kbsd->bkgqs", q_bqkgd, k, preferred_element_type=jnp.float32) * scale
  lens = context_lens.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
  q_pos = lens - q_len + jnp.arange(q_len)[None, :, None]  # [B, Q, 1]
  k_pos = jnp.arange(s_len)[None, None, :]  # [1, 1, S]
  mask = visible_mask(q_pos, k_pos, True, sliding_window) & (k_pos < lens) & (q_pos >= 0)
  sinks_kg = None if sinks is None else sinks.astype(jnp.float32).reshape(hkv, hq // hkv)
  p = masked_softmax_ref(s, mask[:, None, None], sinks_kg)  # [B, Hkv, G, Q, S]
  o = jnp.einsum("bkgqs,kbsd->bqkgd", p, v.astype(jnp.float32))
  return o.reshape(b, q_len, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Mosaic GPU kernel (H100). One program per (sequence, KV head, row tile, KV split): its rows are
# the Q queries x G query heads of that KV head, so each KV page is read once for the whole
# group. KV steps of block_kv tokens gather several pages with one TMA per page onto a shared
# barrier, double-buffered; QK and PV run on wgmma with an online softmax in float32. Each split
# writes a normalised partial output and its log-sum-exp; a few jnp ops merge the splits and
# add the sinks (flash-decoding), so sinks are counted once however many splits there are.
# ----------------------------------------------------------------------------------------------

NO_LOGIT = -1e30  # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) NaN-free


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
  """Block sizes of the paged kernel.

  block_rows: query rows (Q x query heads per KV head) per program; wgmma wants M % 64 == 0.
  block_kv: tokens per KV step, a whole number of pages; bf16 PV wants a multiple of 64.
  num_sms: streaming multiprocessors to fill when choosing the number of KV splits.
  max_splits: upper bound on KV splits per (sequence, KV head, row tile).
  """
  block_rows: int = 64
  block_kv: int = 128
  num_sms: int = 132
  max_splits: int = 16

  def __post_init__(self):
    if self.block_rows % 64 or self.block_kv % 64:
      raise ValueError(f"block_rows and block_kv must be multiples of 64: {self}")
    if self.num_sms < 1 or self.max_splits < 1:
      raise ValueError(f"num_sms and max_splits must be positive: {self}")


def paged_attention_config(device_kind: str) -> PagedAttentionConfig:
  """The frozen block sizes per device kind (H100 and H200 share them; CPU interprets them)."""
  if "H200" in device_kind or "H100" in device_kind:
    return PagedAttentionConfig(block_rows=64, block_kv=128, num_sms=132, max_splits=16)
  return PagedAttentionConfig()


@dataclasses.dataclass(frozen=True)
class _Static:
  """Compile-time facts the kernel body needs."""
  q_len: int
  group: int  # query heads per KV head
  page_size: int
  block_rows: int
  block_kv: int
  num_splits: int
  scale: float
  window: int | None
  dtype: Any

  @property
  def pages_per_block(self) -> int:
    return self.block_kv // self.page_size


def _block_range(length: jax.Array, tile: jax.Array, split: jax.Array,
                 st: _Static) -> tuple[jax.Array, jax.Array]:
  """KV blocks [first, last) this program reads: causal end, window start, then its split."""
  qi_lo = lax.div(tile * st.block_rows, st.group)
  qi_hi = jnp.minimum(lax.div((tile + 1) * st.block_rows - 1, st.group), st.q_len - 1)
  end_pos = jnp.maximum(length - st.q_len + qi_hi + 1, 0)  # one past the last visible key
  last = lax.div(end_pos + st.block_kv - 1, st.block_kv)
  first = jnp.int32(0)
  if st.window is not None:
    start_pos = jnp.maximum(length - st.q_len + qi_lo - st.window + 1, 0)
    first = jnp.minimum(lax.div(start_pos, st.block_kv), last)
  per_split = lax.div(last - first + st.num_splits - 1, st.num_splits)
  split_last = jnp.minimum(first + (split + 1) * per_split, last)
  split_first = jnp.minimum(first + split * per_split, split_last)
  return split_first, split_last


def _mask(length: jax.Array, tile: jax.Array, blk: jax.Array, st: _Static) -> jax.Array:
  """[block_rows, block_kv] bool: key visible to the row's query (causal, length, window)."""
  shape = (st.block_rows, st.block_kv)
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  q_pos = length - st.q_len + lax.div(rows + tile * st.block_rows, st.group)
  k_pos = cols + blk * st.block_kv
  mask = (k_pos <= q_pos) & (k_pos < length)
  if st.window is not None:
    mask &= k_pos > q_pos - st.window
  return mask


def _matmul(a_smem, b_smem, shape: tuple[int, int]) -> jax.Array:
  """a @ b on wgmma into a fresh float32 accumulator; returns it in registers."""
  def scope(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    return acc_ref[...]
  return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def _paged_body(q_ref, k_ref, v_ref, tables_ref, lens_ref, o_ref, lse_ref,
                q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bars, v_bars,
                *, st: _Static):
  """One (sequence, KV head, row tile, split) program; see the section comment."""
  b, h = lax.axis_index("batch"), lax.axis_index("kv_head")
  tile, split = lax.axis_index("tile"), lax.axis_index("split")
  length = lens_ref[b]
  first, last = _block_range(length, tile, split, st)
  rows = pl.ds(tile * st.block_rows, st.block_rows)
  plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar)

  def load(blk, slot):
    for i in range(st.pages_per_block):
      page = tables_ref[b, blk * st.pages_per_block + i]
      dst = pl.ds(i * st.page_size, st.page_size)
      plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_smem.at[slot, dst], k_bars.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_smem.at[slot, dst], v_bars.at[slot])

  pl.when(first < last)(lambda: load(first, 0))
  plgpu.barrier_wait(q_bar)

  def step(i, carry):
    acc, m_i, l_i = carry
    blk, slot = first + i, lax.rem(i, 2)
    # The other slot was last read by the previous step's (completed) wgmma: refill it now.
    pl.when(blk + 1 < last)(lambda: load(blk + 1, 1 - slot))
    plgpu.barrier_wait(k_bars.at[slot])
    s = _matmul(q_smem, k_smem.at[slot].T, (st.block_rows, st.block_kv)) * st.scale
    s = jnp.where(_mask(length, tile, blk, st), s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp(m_i - m_new)
    p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    p_smem[...] = p.astype(st.dtype)  # interpret mode takes wgmma operands from SMEM only
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bars.at[slot])
    pv = _matmul(p_smem, v_smem.at[slot], acc.shape)
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l_i

  head_dim = q_smem.shape[-1]
  acc = plgpu.layout_cast(jnp.zeros((st.block_rows, head_dim), jnp.float32), plgpu.Layout.WGMMA)
  reduced = plgpu.Layout.WGMMA.reduce(1)
  m_i = plgpu.layout_cast(jnp.full((st.block_rows,), NO_LOGIT, jnp.float32), reduced)
  l_i = plgpu.layout_cast(jnp.zeros((st.block_rows,), jnp.float32), reduced)
  acc, m_i, l_i = lax.fori_loop(0, last - first, step, (acc, m_i, l_i))
  # l_i >= 1 once any key was seen (the running maximum contributes exp(0)); 0 means none.
  l_i = jnp.maximum(l_i, 1.0)
  o_smem[...] = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
  lse_smem[...] = m_i + jnp.log(l_i)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split, rows])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split, rows])
  plgpu.wait_smem_to_gmem(0)


def _paged_call(q_rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                block_tables: jax.Array, context_lens: jax.Array, st: _Static,
                interpret: Any) -> tuple[jax.Array, jax.Array]:
  """Runs the kernel: q_rows [B, Hkv, R, D] -> partial out [B, Hkv, S, R, D], lse [B, Hkv, S, R]."""
  b, hkv, rows, d = q_rows.shape
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = lambda shape, dtype=st.dtype: plgpu.SMEM(shape, dtype, transforms=swizzled)
  kv_shape = (2, st.block_kv, d)
  scratch = [
      smem((st.block_rows, d)), smem(kv_shape), smem(kv_shape), smem((st.block_rows, st.block_kv)),
      plgpu.SMEM((st.block_rows, d), jnp.float32), plgpu.SMEM((st.block_rows,), jnp.float32),
      plgpu.Barrier(),
      plgpu.Barrier(num_arrivals=st.pages_per_block, num_barriers=2),
      plgpu.Barrier(num_arrivals=st.pages_per_block, num_barriers=2),
  ]
  name = f"paged_attention_r{st.block_rows}_kv{st.block_kv}_s{st.num_splits}"
  kernel = plgpu.kernel(
      functools.partial(_paged_body, st=st),
      out_type=(jax.ShapeDtypeStruct((b, hkv, st.num_splits, rows, d), jnp.float32),
                jax.ShapeDtypeStruct((b, hkv, st.num_splits, rows), jnp.float32)),
      scratch_types=scratch,
      grid=(b, hkv, rows // st.block_rows, st.num_splits),
      grid_names=("batch", "kv_head", "tile", "split"),
      kernel_name=name,
      interpret=interpret,
  )
  return kernel(q_rows, k_pages, v_pages, block_tables, context_lens)


def _num_splits(programs: int, max_blocks: int, config: PagedAttentionConfig) -> int:
  """KV splits so that programs x splits roughly fills the SMs (flash-decoding at small batch)."""
  wanted = -(-config.num_sms // programs)
  return max(1, min(wanted, config.max_splits, max_blocks))


def _merge_splits(o_part: jax.Array, lse: jax.Array, sink_rows: jax.Array) -> jax.Array:
  """Merges normalised split outputs by their log-sum-exp and adds the sink to the denominator.

  o_part [B, Hkv, S, R, D], lse [B, Hkv, S, R], sink_rows [Hkv, R] (-inf: no sink) -> [B, Hkv, R, D].
  """
  m = jnp.maximum(lse.max(axis=2), sink_rows)  # [B, Hkv, R]
  w = jnp.exp(lse - m[:, :, None])
  denom = w.sum(axis=2) + jnp.exp(sink_rows - m)
  return jnp.einsum("bksr,bksrd->bkrd", w, o_part) / denom[..., None]


def paged_attention_kernel(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           block_tables: jax.Array, context_lens: jax.Array, *,
                           sliding_window: int | None = None, sinks: jax.Array | None = None,
                           scale: float | None = None, interpret: Any = None,
                           config: PagedAttentionConfig | None = None) -> jax.Array:
  """Paged attention on the Mosaic GPU kernel (same contract as paged_attention_reference).

  interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
  The kernel computes in bf16/f16 (wgmma); other input dtypes are cast to bf16 first.
  """
  b, q_len, hq, d = q.shape
  hkv, _, page_size, _ = k_pages.shape
  check_attention_args(hq, hkv, sliding_window, sinks)
  config = config or paged_attention_config(jax.devices()[0].device_kind)
  block_kv = max(config.block_kv, page_size)
  if block_kv % page_size or d % 64:
    raise ValueError(f"page_size {page_size} must divide {block_kv}; head_dim {d} % 64 != 0")
  dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  group, rows = hq // hkv, q_len * (hq // hkv)
  tiles = -(-rows // config.block_rows)
  ppb = block_kv // page_size
  max_blocks = -(-block_tables.shape[1] // ppb)
  st = _Static(q_len=q_len, group=group, page_size=page_size, block_rows=config.block_rows,
               block_kv=block_kv, num_splits=_num_splits(b * hkv * tiles, max_blocks, config),
               scale=d ** -0.5 if scale is None else scale, window=sliding_window, dtype=dtype)
  # [B, Q, Hq, D] -> [B, Hkv, Q*G, D] (row = query * G + head in group), padded to whole tiles.
  q_rows = q.reshape(b, q_len, hkv, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, tiles * config.block_rows - rows), (0, 0)))
  tables = jnp.pad(block_tables.astype(jnp.int32),
                   ((0, 0), (0, max_blocks * ppb - block_tables.shape[1])))
  o_part, lse = _paged_call(q_rows.astype(dtype), k_pages.astype(dtype), v_pages.astype(dtype),
                            tables, context_lens.astype(jnp.int32), st, interpret)
  sink_heads = jnp.full((hq,), -jnp.inf) if sinks is None else sinks.astype(jnp.float32)
  sink_rows = sink_heads.reshape(hkv, group)[:, jnp.arange(tiles * config.block_rows) % group]
  out = _merge_splits(o_part, lse, sink_rows)[:, :, :rows]
  return out.reshape(b, hkv, q_len, group, d).transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)
