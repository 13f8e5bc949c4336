"""MLA attention (DeepSeek-V3) over the paged latent cache, FlashMLA-style, ragged or padded.

In latent space (models/deepseek.py) every query head attends to one shared "KV head": the latent
[c, k_rope] of each token (D = kv_lora_rank + rope, 576 for DeepSeek-V3) is the key, and its first
kv_lora_rank columns (512) are the value. Paged attention with K = V = latent would read it twice,
keep two 576-wide SMEM rings (811 KiB of SMEM) and run a PV wgmma with N = 576 (Mosaic allows
N <= 256). This kernel reads each latent block once into one SMEM ring; the query heads are the
wgmma's M rows (row = token * Hq + head, 64 rows per program: no padding at Hq = 128).

A program owns 64 rows of one query tile, one KV split, and W consumer warpgroups, one per value
chunk of C = value_chunk columns (DeepSeek-V3: W = 2 of C = 256, as FlashMLA). Warpgroup 0 runs QK
over all D columns and the online softmax, and hands P (bf16) and the rows' rescale alpha to the
others through SMEM (barrier "p_ready"); every warpgroup then rescales its own 64 x C f32
accumulator and adds P @ latent[:, its chunk]; the others arrive on "p_free" when done, which
frees P and the ring slot they read. So QK runs once per block (the old one-warpgroup kernel ran it
once per value chunk: 1.5x the MMA work) and no thread holds more than one 64 x 256 accumulator.
On the GPU PV accumulates in place (plgpu.ACC.init; warpgroup 0's P straight from registers):
`acc * alpha + pv` beside a fresh 64 x 256 result needed 2 x 128 registers per thread and spilled.
Interpret mode cannot run pl.run_state: there P goes through SMEM into a fresh accumulator (the
same arithmetic; interpret mode checks numbers and races, compiling checks the hardware path).

Ragged (mla_ragged_kernel, ops.ragged_paged_attention's metadata): each sequence's new tokens are
cut into query tiles of block_q tokens (rpa.query_tiles, right-aligned on the sequence's last
token), rows = token * Hq + head, and every row is masked causally at its own token's position.
block_q = 64 / gcd(Hq, 64) tokens fill whole 64-row programs (1 at Hq = 128: each token's 128 rows
are two programs), capped by max_query_len. The padded contract (mla_decode_kernel, q [B, Q, ...])
is the same launch with one tile per row. KV splits (flash-decoding) are chosen by SM waves over
the static program count; a short sequence's spare splits exit at once; partials merge by
log-sum-exp in jnp.

SMEM per program (bf16, DeepSeek-V3: D = 576, W x C = 2 x 256, block_kv 64; smem_bytes), every
buffer starting on 1 KiB: q 64 x 576 x 2 = 73,728; one RefUnion of the loop's 2-slot latent ring
2 x 64 x 576 x 2 = 147,456 + P 64 x 64 x 2 = 8,192 + alpha 64 x 4 = 256 (155,904, rounded up to
156,672) and the epilogue's f32 output 64 x 512 x 4 = 131,072 + lse and normaliser 2 x 256, which
fit inside: 230,400 bytes, + 5 barriers x 8 = 230,440 of the 232,448. Mosaic GPU's default 2 KiB
of cross-warp reduction scratch would not fit beside them; the softmax's row reductions stay within
a warp (lowering refuses one that does not), so the kernel reserves none.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import blocked_attention as ba

from pallas_kernels import hopper
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention as rpa

BLOCK_ROWS = 64  # rows (tokens x heads) per program: one warpgroup's wgmma M
MAX_WARPGROUPS = 4  # value chunks per program (threads: 128 each, registers: 65,536 / threads)
SMEM_ALIGNMENT = 1024  # Mosaic GPU starts every SMEM buffer (and a RefUnion's members) on 1 KiB
NUM_BARRIERS = 5  # 8 bytes each, counted against the limit beside the buffers


@dataclasses.dataclass(frozen=True)
class MLADecodeConfig:
    """Block sizes of the MLA kernel.

    block_kv: latent tokens per step, whole pages (bf16 PV: a multiple of 64); value_chunk: value
    columns per consumer warpgroup (wgmma N <= 256, a 64 x value_chunk f32 accumulator each);
    num_sms (None: the target device's, hopper.target_num_sms()) / max_splits: how far to split the KV
    range to fill the GPU at small batch.
    """

    block_kv: int = 64
    value_chunk: int = 256
    num_sms: int | None = None
    max_splits: int = 16

    def __post_init__(self):
        if self.block_kv % 64 or self.value_chunk % 64 or not 0 < self.value_chunk <= 256:
            raise ValueError(f"block_kv and value_chunk must be multiples of 64, value_chunk <= 256: {self}")
        if (self.num_sms is not None and self.num_sms < 1) or self.max_splits < 1:
            raise ValueError(f"num_sms (or None) and max_splits must be positive: {self}")


def value_chunks(kv_lora_rank: int, value_chunk: int) -> tuple[int, int]:
    """(columns per warpgroup C, warpgroups W): W = ceil(rank / value_chunk) equal chunks of a
    multiple of 64 columns covering the rank (C x W may pass it; the extra columns are dropped)."""
    num = -(-kv_lora_rank // value_chunk)
    return -(-kv_lora_rank // (num * 64)) * 64, num


def smem_bytes(head_dim: int, block_kv: int, chunk: int, num_chunks: int, itemsize: int,
               fp8: bool = False) -> int:
    """Shared memory of one program as Mosaic GPU allocates it (each buffer on 1 KiB): q, then one
    RefUnion of the loop's (latent ring, P, alpha) and the epilogue's (f32 output, lse, normaliser).
    fp8: the ring holds e4m3 pages (1 byte) and the loop adds the block dequantized in the mma dtype.
    The softmax's row reductions stay within a warp, so the kernel reserves no reduction scratch."""
    align = lambda n: -(-n // SMEM_ALIGNMENT) * SMEM_ALIGNMENT  # noqa: E731
    group = lambda *sizes: align(sum(align(n) for n in sizes[:-1]) + sizes[-1])  # noqa: E731
    row = 4 * BLOCK_ROWS
    ring = (1 if fp8 else itemsize) * 2 * block_kv * head_dim
    tile = (itemsize * block_kv * head_dim,) if fp8 else ()
    loop = group(ring, *tile, itemsize * BLOCK_ROWS * block_kv, row)
    out = group(4 * BLOCK_ROWS * chunk * num_chunks, row, row)
    return align(itemsize * BLOCK_ROWS * head_dim) + max(loop, out)


def mla_attention_reference(q: jax.Array, latent_pages: jax.Array, block_tables: jax.Array,
                            context_lens: jax.Array, *, kv_lora_rank: int, scale: float | None = None) -> jax.Array:
    """Plain jnp: paged attention with the latent as K and its first kv_lora_rank columns as V.

    q [B, Q, Hq, D]; latent_pages [1, num_pages, page_size, D]. Returns [B, Q, Hq, kv_lora_rank].
    """
    out = pa.paged_attention_reference(q, latent_pages, latent_pages, block_tables, context_lens, scale=scale)
    return out[..., :kv_lora_rank]


def _accumulate(acc: jax.Array, alpha: jax.Array, p, value_smem, hardware: bool) -> jax.Array:
    """acc * alpha + p @ value: in place on the GPU (p in registers or SMEM), into a fresh
    accumulator when interpreting (p in SMEM; the interpreter cannot run pl.run_state)."""
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    if hardware:
        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, value_smem)
        return pl.run_state(pv)(plgpu.ACC.init(acc))
    return acc + hopper.wgmma_f32(p, value_smem, acc.shape)


def _mla_body(q_ref, latent_ref, tables_ref, lens_ref, o_ref, lse_ref, q_smem, union, q_bar, kv_bars, p_ready,
              p_free, *, st: ba.BlockedAttention, page_size: int, chunk: int, num_chunks: int,
              hardware: bool):
    """Program (tile, row tile, split) on warpgroup wg: warpgroup 0 loads, runs QK and the softmax
    and accumulates value chunk 0; warpgroup k > 0 accumulates chunk k from the P it hands over."""
    (kv_smem, *upcast, p_smem, alpha_smem), (o_smem, lse_smem, norm_smem) = union
    upcast = upcast[0] if upcast else None  # an FP8 ring's block, dequantized by warpgroup 0 (ba.dequantize_block)
    n, tile, split, wg = (lax.axis_index(a) for a in ("tile", "row_tile", "split", "wg"))
    length = lens_ref[n]  # position of the tile's last token + 1 (0: a spare tile of the static bound)
    first, last = ba.kv_block_range(length, tile, split, st)
    row0 = tile * BLOCK_ROWS
    rows = pl.ds(row0, BLOCK_ROWS)
    pages_per_block = st.block_kv // page_size
    last_entry = tables_ref.shape[1] - 1
    others = num_chunks > 1

    def value(slot, k):  # chunk k of the value: static columns of the latent block in the slot (or tile)
        block = kv_smem.at[slot] if upcast is None else upcast
        return block.at[:, pl.ds(k * chunk, chunk)]

    def finish(k, acc, l_i, lse):
        o_smem.at[k][...] = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
        if lse is not None:
            lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[k], o_ref.at[n, 0, split, rows, pl.ds(k * chunk, chunk)])
        if lse is not None:
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[n, 0, split, rows])
        plgpu.wait_smem_to_gmem(0)

    def softmax_warpgroup():
        def load(blk, slot):
            for i in range(pages_per_block):
                page = tables_ref[n, jnp.minimum(blk * pages_per_block + i, last_entry)]
                dst = kv_smem.at[slot, pl.ds(i * page_size, page_size)]
                plgpu.copy_gmem_to_smem(latent_ref.at[0, page], dst, kv_bars.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[n, 0, rows], q_smem, q_bar)
        pl.when(first < last)(lambda: load(first, 0))
        plgpu.barrier_wait(q_bar)

        def step(i, carry):
            acc, m_i, l_i = carry
            blk, slot = first + i, lax.rem(i, 2)
            if others:  # they are done with P and with the other slot (block blk - 1)
                pl.when(i > 0)(lambda: plgpu.barrier_wait(p_free))
            # The other slot was last read by the previous step's (completed) wgmmas: refill it now.
            pl.when(blk + 1 < last)(lambda: load(blk + 1, 1 - slot))
            plgpu.barrier_wait(kv_bars.at[slot])
            block = ba.dequantize_block(kv_smem.at[slot], upcast)  # free: p_free above
            s = hopper.wgmma_f32(q_smem, block.T, (BLOCK_ROWS, st.block_kv)) * st.scale
            mask = ba.block_mask(length, row0, BLOCK_ROWS, blk, st)
            p, alpha, m_i, l_i = ba.softmax_update(jnp.where(mask, s, -jnp.inf), m_i, l_i)
            p = p.astype(st.dtype)
            if others or not hardware:
                p_smem[...] = p
                if others:
                    alpha_smem[...] = alpha
                plgpu.commit_smem()  # P reaches the other warpgroups' wgmmas (the async proxy)
                if others:
                    plgpu.barrier_arrive(p_ready)
            acc = _accumulate(acc, alpha, p if hardware else p_smem, value(slot, 0), hardware)
            return acc, m_i, l_i

        acc, m_i, l_i = lax.fori_loop(0, last - first, step, ba.softmax_init(BLOCK_ROWS, chunk))
        o_l = jnp.maximum(l_i, 1.0)  # >= 1 once any key was seen; 0: none (ba.softmax_finish)
        if others:  # the last p_free: the loop's SMEM is idle; then the others' normaliser
            pl.when(first < last)(lambda: plgpu.barrier_wait(p_free))
            norm_smem[...] = o_l
            plgpu.barrier_arrive(p_ready)
        finish(0, acc, o_l, m_i + jnp.log(o_l))

    def value_warpgroup(k):
        def step(i, acc):
            plgpu.barrier_wait(p_ready)
            alpha = plgpu.load(alpha_smem, layout=plgpu.Layout.WGMMA.reduce(1)) if hardware else alpha_smem[...]
            acc = _accumulate(acc, alpha, p_smem, value(lax.rem(i, 2), k), hardware)
            plgpu.barrier_arrive(p_free)
            return acc

        acc, _, _ = ba.softmax_init(BLOCK_ROWS, chunk)
        acc = lax.fori_loop(0, last - first, step, acc)
        plgpu.barrier_wait(p_ready)  # the loop is over everywhere: norm_smem holds the normaliser
        o_l = plgpu.load(norm_smem, layout=plgpu.Layout.WGMMA.reduce(1)) if hardware else norm_smem[...]
        finish(k, acc, o_l, None)

    @pl.when(length > 0)
    def _():
        pl.when(wg == 0)(softmax_warpgroup)
        for k in range(1, num_chunks):
            pl.when(wg == k)(functools.partial(value_warpgroup, k))


def _launch(q_rows: jax.Array, latent: jax.Array, tables: jax.Array, lens: jax.Array, *, q_len: int, group: int,
            kv_lora_rank: int, scale: float, page_size: int, config: MLADecodeConfig,
            interpret: Any) -> jax.Array:
    """One launch over N query tiles: q_rows [N, 1, R, D] (row = token * group + head, R a multiple
    of 64; the tile's tokens are the last q_len of a sequence of lens[n] tokens), tables [N, P]
    -> merged f32 output [N, 1, R, C x W] (rows of a tile with lens 0 unwritten)."""
    num_tiles, _, num_rows, d_pad = q_rows.shape
    chunk, num_chunks = value_chunks(kv_lora_rank, config.value_chunk)
    if num_chunks > MAX_WARPGROUPS:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} needs {num_chunks} value chunks of {config.value_chunk} "
                         f"columns: at most {MAX_WARPGROUPS}")
    dtype = q_rows.dtype
    fp8 = latent.dtype != dtype  # an FP8 pool: q (and the dequantized block) in f16, hopper.mma_dtype
    if dtype == jnp.bfloat16 or dtype == jnp.float16:
        need = smem_bytes(d_pad, config.block_kv, chunk, num_chunks, 2, fp8)
        if need + 8 * NUM_BARRIERS > hopper.SMEM_BYTES:
            raise ValueError(f"MLA kernel: {need} bytes of SMEM at head dim {d_pad}, block_kv {config.block_kv}, "
                             f"{num_chunks} x {chunk} value columns (limit {hopper.SMEM_BYTES - 8 * NUM_BARRIERS})")
    pages_per_block = config.block_kv // page_size
    max_blocks = pl.cdiv(tables.shape[1], pages_per_block)
    row_tiles = num_rows // BLOCK_ROWS
    splits = pa.num_kv_splits(num_tiles * row_tiles, max_blocks, config.num_sms or hopper.target_num_sms(),
                              config.max_splits)
    st = ba.BlockedAttention(q_len=q_len, group=group, block_rows=BLOCK_ROWS, block_kv=config.block_kv,
                             num_splits=splits, scale=scale, window=None, causal=True, dtype=dtype)
    smem = lambda shape: hopper.swizzled_smem(shape, dtype)  # noqa: E731
    row_f32 = plgpu.SMEM((BLOCK_ROWS,), jnp.float32)
    ring = (hopper.swizzled_smem((2, config.block_kv, d_pad), latent.dtype, ba.DEQUANT_COLS),
            smem((config.block_kv, d_pad))) if fp8 else (smem((2, config.block_kv, d_pad)),)
    union = plgpu.RefUnion(
        (*ring, smem((BLOCK_ROWS, config.block_kv)), row_f32),  # ring (+ dequantized block), P, alpha
        (plgpu.SMEM((num_chunks, BLOCK_ROWS, chunk), jnp.float32), row_f32, row_f32),  # output, lse, normaliser
    )
    hardware = interpret is None
    kernel = plgpu.kernel(
        functools.partial(_mla_body, st=st, page_size=page_size, chunk=chunk, num_chunks=num_chunks,
                          hardware=hardware),
        out_type=(jax.ShapeDtypeStruct((num_tiles, 1, splits, num_rows, chunk * num_chunks), jnp.float32),
                  jax.ShapeDtypeStruct((num_tiles, 1, splits, num_rows), jnp.float32)),
        scratch_types=[
            smem((BLOCK_ROWS, d_pad)),  # q
            union,  # after q: a 1 KiB-aligned f32 row of its own would push DeepSeek-V3 past the limit
            plgpu.Barrier(),  # q loaded
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=2),  # ring slot loaded
            plgpu.Barrier(),  # P and alpha ready (warpgroup 0 arrives)
            plgpu.Barrier(num_arrivals=max(num_chunks - 1, 1)),  # P and the slot free (the others arrive)
        ],
        grid=(num_tiles, row_tiles, splits),
        grid_names=("tile", "row_tile", "split"),
        num_threads=num_chunks,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=0) if hardware else None,
        kernel_name=f"mla_attention_q{q_len}_kv{config.block_kv}_wg{num_chunks}x{chunk}_s{splits}",
        interpret=interpret,
    )
    o_part, lse = kernel(q_rows, latent, tables, lens)
    if splits == 1:  # already normalised by its own sum (zeros where no key was seen)
        return o_part[:, :, 0]
    return ba.merge_partials(o_part, lse, None)


def _prepare(q: jax.Array, latent_pages: jax.Array, kv_lora_rank: int, interpret: Any,
             config: MLADecodeConfig) -> tuple[jax.Array, jax.Array]:
    """Checks the shapes; the latent pool as stored (ba.kv_pool: compiled, bf16/f16 with D a multiple
    of 64, read in place; interpreted, f32 too and D zero-padded), q cast to its dtype. Zero columns
    leave the logits unchanged; a rank whose value chunks pass D (not DeepSeek-V3's) pads both."""
    d = q.shape[-1]
    page_size = latent_pages.shape[2]
    if latent_pages.ndim != 4 or latent_pages.shape[0] != 1 or latent_pages.shape[3] != d:
        raise ValueError(f"latent_pages must be [1, pages, page_size, {d}], got {latent_pages.shape}")
    if not 0 < kv_lora_rank <= d:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must be in 1..head dim {d}")
    if config.block_kv % page_size or page_size % 8:  # a page lands on whole (8, 64) SMEM tiles
        raise ValueError(f"page_size {page_size} must be a multiple of 8 dividing block_kv {config.block_kv}")
    latent = ba.kv_pool(latent_pages, interpret, fp8=True)
    chunk, num_chunks = value_chunks(kv_lora_rank, config.value_chunk)
    width = max(latent.shape[-1], chunk * num_chunks)
    latent = hopper.pad_to(latent, (*latent.shape[:-1], width))
    return hopper.pad_to(q.astype(hopper.mma_dtype(latent.dtype, interpret)), (*q.shape[:-1], width)), latent


def mla_ragged_kernel(q: jax.Array, latent_pages: jax.Array, query_start_loc: jax.Array, context_lens: jax.Array,
                      block_tables: jax.Array, *, kv_lora_rank: int, scale: float | None = None,
                      max_query_len: int | None = None, interpret: Any = None,
                      config: MLADecodeConfig | None = None) -> jax.Array:
    """MLA attention of a ragged flat batch (ops.ragged_paged_attention's metadata, K = V = latent).

    q [T, Hq, D]; latent_pages [1, num_pages, page_size, D]; query_start_loc [S+1], context_lens [S],
    block_tables [S, P] int32. Returns [T, Hq, kv_lora_rank] in q.dtype; padding rows are zero.
    max_query_len: a static bound on any sequence's new tokens (None: unknown), which caps the
    query tile. interpret: None compiles for the GPU, plgpu.InterpretGPUParams interprets on CPU.
    The latent pool as in mla_decode_kernel (read in place).
    """
    t, hq, d = q.shape
    config = config or MLADecodeConfig()
    q_pad, latent = _prepare(q, latent_pages, kv_lora_rank, interpret, config)
    block_q = BLOCK_ROWS // math.gcd(hq, BLOCK_ROWS)  # tokens filling whole 64-row programs
    if max_query_len is not None:
        block_q = max(1, min(block_q, max_query_len))
    tiles = rpa.query_tiles(query_start_loc, context_lens, block_tables, t, block_q)
    # One token per tile: tile n is token n (T tiles, spare ones past the last token), so q and the
    # output need no gather (at DeepSeek-V3's Hq = 128 always: 75 MB of q and 134 MB of output at
    # 512 tokens).
    q_tiles = q_pad[:, None] if block_q == 1 else q_pad[tiles.rows]
    out = _launch(ba.to_rows(q_tiles, 1, BLOCK_ROWS), latent, tiles.tables, tiles.lens, q_len=block_q, group=hq,
                  kv_lora_rank=kv_lora_rank, scale=d**-0.5 if scale is None else scale,
                  page_size=latent_pages.shape[2], config=config, interpret=interpret)
    out = ba.from_rows(out, (tiles.rows.shape[0], block_q, hq, out.shape[-1]))
    out = out[:, 0] if block_q == 1 else out[tiles.token_tile, tiles.token_slot]
    return jnp.where(tiles.token_valid[:, None, None], out[..., :kv_lora_rank], 0).astype(q.dtype)


def mla_decode_kernel(q: jax.Array, latent_pages: jax.Array, block_tables: jax.Array, context_lens: jax.Array,
                      *, kv_lora_rank: int, scale: float | None = None, interpret: Any = None,
                      config: MLADecodeConfig | None = None) -> jax.Array:
    """MLA attention on the Mosaic GPU kernel, padded contract (that of mla_attention_reference):
    the last Q tokens of each row, one query tile per row; rows of context 0 give zeros.

    interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
    Reads the latent pool in place (ba.kv_pool: compiled, bf16/f16 with D a multiple of 64, else a
    ValueError) and multiplies in its dtype with f32 softmax. page_size: a multiple of 8 dividing
    block_kv.
    """
    b, q_len, hq, d = q.shape
    config = config or MLADecodeConfig()
    q_pad, latent = _prepare(q, latent_pages, kv_lora_rank, interpret, config)
    lens = context_lens.astype(jnp.int32)
    out = _launch(ba.to_rows(q_pad, 1, BLOCK_ROWS), latent, block_tables.astype(jnp.int32), lens, q_len=q_len,
                  group=hq, kv_lora_rank=kv_lora_rank, scale=d**-0.5 if scale is None else scale,
                  page_size=latent_pages.shape[2], config=config, interpret=interpret)
    out = ba.from_rows(out, (b, q_len, hq, out.shape[-1]))[..., :kv_lora_rank]
    return jnp.where((lens > 0)[:, None, None, None], out, 0).astype(q.dtype)
