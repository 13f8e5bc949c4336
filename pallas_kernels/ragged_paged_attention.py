"""Ragged paged attention: one flat batch of tokens from many sequences against their KV pages.

Contract (ops.ragged_paged_attention): q [T, Hq, D] holds the new tokens of S sequences back to
back; sequence s owns rows query_start_loc[s] : query_start_loc[s+1] (query_start_loc [S+1] int32,
non-decreasing, starting at 0), which are its LAST q_len_s tokens: row query_start_loc[s] + i sits
at position context_lens[s] - q_len_s + i, where context_lens [S] counts every token of the
sequence in the cache including the new ones (already written into the pages). k/v pages
[Hkv, num_pages, page_size, D]; block_tables [S, P] int32, padded with the null page 0. Rows at
or past query_start_loc[S] (padding) and rows that see no key give zeros.

The C++ kernel (cpu_paged_attention.ragged_paged_attention_cpu) takes this contract natively.
For the others, two exact reductions onto the padded contract of paged_attention.py (q [B, Q, Hq,
D], the last Q tokens of each row), so every padded implementation serves the ragged batch:
  per token  every token is its own Q=1 row (its sequence's block table, context = position + 1):
             the Mosaic kernel's path and XLA's decode path, no tiling overhead;
  tiled      each sequence's rows cut into tiles of block_q rows, one padded row per tile: a
             prefill chunk gathers its context once per tile instead of once per token.
On a 2-core CPU at SmolLM2 shapes (benchmarks/results/cpu-ragged-attention.json) tiling cut the
jnp path's prefill time 3-5x against per token, yet stayed 2.5-5x slower than the padded call: the
static tile count (T / block_q + S) and a context gather per tile are the price of static shapes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.blocked_attention import check_attention_args, masked_softmax_ref, visible_mask

# paged_attention_reference's contract: (q, k_pages, v_pages, block_tables, context_lens, *,
# sliding_window, sinks, scale) -> [B, Q, Hq, D].
PagedAttention = Callable[..., jax.Array]

BLOCK_Q = 32  # query rows per tile of the tiled reduction (scripts/bench_ragged_attention.py)


class TokenRows(NamedTuple):
    """Where each of the T rows of q belongs (all [T] int32 / bool)."""

    seq: jax.Array  # its sequence (clipped into range for padding rows)
    pos: jax.Array  # its position in the sequence
    valid: jax.Array  # False for padding rows (at or past query_start_loc[S])


def token_rows(query_start_loc: jax.Array, context_lens: jax.Array, num_tokens: int) -> TokenRows:
    """Sequence and position of every row, from the cumulative query lengths (on device, jit-safe).

    searchsorted(side="right") - 1 picks the last sequence starting at or before the row, which
    skips the zero-length sequences that share its start.
    """
    starts = query_start_loc.astype(jnp.int32)  # [S+1]
    num_seqs = context_lens.shape[0]
    rows = jnp.arange(num_tokens, dtype=jnp.int32)  # [T]
    seq = jnp.clip(jnp.searchsorted(starts, rows, side="right") - 1, 0, num_seqs - 1).astype(jnp.int32)
    q_lens = starts[1:] - starts[:-1]  # [S]
    pos = context_lens.astype(jnp.int32)[seq] - q_lens[seq] + rows - starts[seq]
    return TokenRows(seq, pos, rows < starts[num_seqs])


def ragged_paged_attention_reference(
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
) -> jax.Array:
    """Plain jnp: every row gathers all pages of its sequence and attends with a position mask.

    The obviously correct version (memory O(T x P x page_size)), the oracle beside float64 NumPy.
    Returns [T, Hq, D] in q.dtype.
    """
    t, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    check_attention_args(hq, hkv, sliding_window, sinks)
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    rows = token_rows(query_start_loc, context_lens, t)
    s_len = block_tables.shape[1] * page_size
    tables = block_tables.astype(jnp.int32)[rows.seq]  # [T, P]
    k = k_pages[:, tables].reshape(hkv, t, s_len, d)  # [Hkv, T, S, D]
    v = v_pages[:, tables].reshape(hkv, t, s_len, d)
    q_tkgd = q.reshape(t, hkv, g, d)
    s = jnp.einsum("tkgd,ktsd->tkgs", q_tkgd, k, preferred_element_type=jnp.float32) * scale  # [T, Hkv, G, S]
    k_pos = jnp.arange(s_len)[None, :]  # [1, S]
    mask = visible_mask(rows.pos[:, None], k_pos, True, sliding_window) & rows.valid[:, None]  # [T, S]
    sinks_kg = None if sinks is None else sinks.astype(jnp.float32).reshape(hkv, g)
    # masked_softmax_ref works on [B, Hkv, G, Q, S]: the rows are its batch, each a single query.
    p = masked_softmax_ref(s[:, :, :, None], mask[:, None, None, None], sinks_kg)[:, :, :, 0]  # [T, Hkv, G, S]
    o = jnp.einsum("tkgs,ktsd->tkgd", p, v.astype(jnp.float32))
    return o.reshape(t, hq, d).astype(q.dtype)


def ragged_paged_attention_per_token(
    paged: PagedAttention,
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    block_tables: jax.Array,
    **kwargs,
) -> jax.Array:
    """Every row as its own Q=1 padded row: its sequence's block table, context = position + 1.

    Exact for causal attention (a query sees the keys up to its own position, which is what a
    sequence of length position + 1 shows its last token); padding rows get context 0 (zeros).
    kwargs (sliding_window, sinks, scale) go to `paged`. Returns [T, Hq, D].
    """
    rows = token_rows(query_start_loc, context_lens, q.shape[0])
    tables = block_tables.astype(jnp.int32)[rows.seq]  # [T, P]
    lens = jnp.where(rows.valid, jnp.maximum(rows.pos + 1, 0), 0)  # [T]
    return paged(q[:, None], k_pages, v_pages, tables, lens, **kwargs)[:, 0]


class QueryTiles(NamedTuple):
    """The tiled layout: num_tiles padded rows of block_q queries, and each token's place in it."""

    rows: jax.Array  # [N, block_q] the row of q in each slot (clipped; slots before a tile's first row are filler)
    tables: jax.Array  # [N, P] the block table of the tile's sequence
    lens: jax.Array  # [N] position of the tile's last query + 1; 0 for unused tiles
    token_tile: jax.Array  # [T] the tile holding each row (clipped into range for padding rows)
    token_slot: jax.Array  # [T] its slot in that tile (likewise)
    token_valid: jax.Array  # [T] False for padding rows


def num_query_tiles(num_tokens: int, num_seqs: int, block_q: int, min_q: int = 1) -> int:
    """A static bound on the tiles of the sequences with >= min_q rows: sum_s ceil(q_len_s / block_q)
    <= T / block_q + (how many such sequences: <= S and <= T / min_q), and <= T."""
    return min(-(-num_tokens // block_q) + min(num_seqs, num_tokens // min_q), num_tokens)


def query_tiles(query_start_loc: jax.Array, context_lens: jax.Array, block_tables: jax.Array, num_tokens: int,
                block_q: int, min_q: int = 1) -> QueryTiles:
    """Cuts each sequence's rows into tiles of block_q from its first row; the last one may be short.

    A tile never spans two sequences. Its queries are right-aligned: its last slot holds its last
    row, so the padded contract (the last Q tokens of the row) puts every slot at the right
    position; the slots before a short tile's first row recompute earlier positions, discarded.
    Sequences with fewer than min_q rows get no tiles (another path serves them: their rows are
    invalid here), which tightens the static tile count (num_query_tiles).
    """
    starts = query_start_loc.astype(jnp.int32)  # [S+1]
    num_seqs = context_lens.shape[0]
    q_lens = starts[1:] - starts[:-1]  # [S]
    served = q_lens >= min_q  # [S]
    tile_starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(jnp.where(served, -(-q_lens // block_q), 0))])
    num_tiles = num_query_tiles(num_tokens, num_seqs, block_q, min_q)

    tile = jnp.arange(num_tiles, dtype=jnp.int32)  # [N]
    seq = jnp.clip(jnp.searchsorted(tile_starts, tile, side="right") - 1, 0, num_seqs - 1)  # [N]
    end = jnp.minimum((tile - tile_starts[seq] + 1) * block_q, q_lens[seq])  # [N] one past its last row, in-sequence
    rows = starts[seq, None] + end[:, None] - block_q + jnp.arange(block_q)  # [N, block_q]
    used = tile < tile_starts[num_seqs]
    lens = jnp.where(used, context_lens.astype(jnp.int32)[seq] - q_lens[seq] + end, 0)

    tok = token_rows(query_start_loc, context_lens, num_tokens)
    local = jnp.arange(num_tokens, dtype=jnp.int32) - starts[tok.seq]  # [T] row within its sequence
    tok_end = jnp.minimum((local // block_q + 1) * block_q, q_lens[tok.seq])
    token_tile = jnp.clip(tile_starts[tok.seq] + local // block_q, 0, num_tiles - 1)
    return QueryTiles(jnp.clip(rows, 0, num_tokens - 1), block_tables.astype(jnp.int32)[seq], lens, token_tile,
                      jnp.clip(block_q - tok_end + local, 0, block_q - 1), tok.valid & served[tok.seq])


def short_sequences(query_start_loc: jax.Array, max_q: int) -> jax.Array:
    """[S] bool: sequences with 1..max_q new rows (decode, speculative verify), one tile each."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    return (q_lens > 0) & (q_lens <= max_q)


def sequence_tiles(query_start_loc: jax.Array, context_lens: jax.Array, block_tables: jax.Array, num_tokens: int,
                   block_q: int) -> QueryTiles:
    """One right-aligned tile of block_q slots per sequence, used by the short_sequences(block_q) only
    (the others' tiles have lens 0 and their rows are invalid here): the decode-shaped work items."""
    starts = query_start_loc.astype(jnp.int32)  # [S+1]
    q_lens = starts[1:] - starts[:-1]  # [S]
    short = short_sequences(starts, block_q)
    rows = starts[1:, None] - block_q + jnp.arange(block_q)  # [S, block_q]: the last block_q rows
    lens = jnp.where(short, context_lens.astype(jnp.int32), 0)
    tok = token_rows(query_start_loc, context_lens, num_tokens)
    slot = block_q - q_lens[tok.seq] + jnp.arange(num_tokens, dtype=jnp.int32) - starts[tok.seq]
    return QueryTiles(jnp.clip(rows, 0, num_tokens - 1), block_tables.astype(jnp.int32), lens, tok.seq,
                      jnp.clip(slot, 0, block_q - 1), tok.valid & short[tok.seq])


def ragged_paged_attention_tiled(
    paged: PagedAttention,
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    block_tables: jax.Array,
    *,
    block_q: int = BLOCK_Q,
    **kwargs,
) -> jax.Array:
    """Gathers q into tiles [N, block_q, Hq, D], runs `paged` on them and gathers each row back.

    For the jnp paths with long queries (prefill chunks): per token, XLA CPU would gather a
    sequence's context once per token; here once per tile. Static shapes, no host sync.
    kwargs (sliding_window, sinks, scale) go to `paged`. Returns [T, Hq, D].
    """
    tiles = query_tiles(query_start_loc, context_lens, block_tables, q.shape[0], block_q)
    out = paged(q[tiles.rows], k_pages, v_pages, tiles.tables, tiles.lens, **kwargs)  # [N, block_q, Hq, D]
    return jnp.where(tiles.token_valid[:, None, None], out[tiles.token_tile, tiles.token_slot], 0).astype(q.dtype)
