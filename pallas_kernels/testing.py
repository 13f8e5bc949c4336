"""Float64 NumPy oracles and random inputs for the kernels: what the tests and notebook 02 check
every implementation (jnp reference, XLA, C++, Pallas interpret and compiled) against. Plain loops
over sequences and heads, so they share no code with what they check."""

import jax
import jax.numpy as jnp
import numpy as np



def attention_np(q, k, v, q_pos, causal, window, sinks, scale):
    """Float64 attention of one sequence, one head and one query at a time.

    q [T, Hq, D]; k, v [S, Hkv, D] (keys at positions 0..S-1); q_pos [T].
    """
    t_len, hq, d = q.shape
    s_len, hkv, _ = k.shape
    out = np.zeros((t_len, hq, d))
    k_pos = np.arange(s_len)
    for h in range(hq):
        kh = h // (hq // hkv)
        for t in range(t_len):
            vis = np.ones(s_len, bool)
            if causal:
                vis &= k_pos <= q_pos[t]
            if window is not None:
                vis &= k_pos > q_pos[t] - window
            logits = (k[vis, kh] @ q[t, h]) * scale
            all_logits = logits if sinks is None else np.append(logits, sinks[h])
            if all_logits.size == 0:
                continue
            m = all_logits.max()
            out[t, h] = np.exp(logits - m) @ v[vis, kh] / np.exp(all_logits - m).sum()
    return out


def flash_np(q, k, v, causal, window, sinks, scale):
    """Float64 flash_attention over a batch: query i sits at position S - T + i."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    sinks = None if sinks is None else np.asarray(sinks, np.float64)
    t_len, s_len = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_pos = np.arange(t_len) + s_len - t_len
    return np.stack([attention_np(q[b], k[b], v[b], q_pos, causal, window, sinks, scale) for b in range(q.shape[0])])


def random_qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32, with_sinks=False):
    """Normal q/k/v (and sinks when asked) from a seed."""
    kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, hq, d), dtype)
    k = jax.random.normal(kk, (b, s, hkv, d), dtype)
    v = jax.random.normal(kv, (b, s, hkv, d), dtype)
    sinks = jax.random.normal(ks, (hq,), jnp.float32) * 2 if with_sinks else None
    return q, k, v, sinks


NULL_PAGE_VALUE = 50.0  # page 0 holds finite garbage: reading it unmasked shows up at once


def random_paged(seed, context_lens, q_len, hq, hkv, d, page_size, max_pages, dtype=jnp.float32, with_sinks=False):
    """Random q, pages and shuffled block tables (padded with the null page 0) for the lengths."""
    rng = np.random.default_rng(seed)
    b = len(context_lens)
    num_pages = 1 + b * max_pages + 3
    k_pages = rng.normal(size=(hkv, num_pages, page_size, d))
    v_pages = rng.normal(size=(hkv, num_pages, page_size, d))
    k_pages[:, 0] = v_pages[:, 0] = NULL_PAGE_VALUE
    free = list(rng.permutation(np.arange(1, num_pages)))
    block_tables = np.zeros((b, max_pages), np.int32)
    for i, n in enumerate(context_lens):
        used = -(-n // page_size)
        assert used <= max_pages
        block_tables[i, :used] = [free.pop() for _ in range(used)]
    q = rng.normal(size=(b, q_len, hq, d))
    sinks = jnp.asarray(rng.normal(size=(hq,)) * 2, jnp.float32) if with_sinks else None
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(block_tables),
        jnp.asarray(context_lens, jnp.int32),
        sinks,
    )


def paged_np(q, k_pages, v_pages, block_tables, context_lens, window, sinks, scale=None):
    """Float64 paged attention, one sequence at a time from its own pages."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    sinks = None if sinks is None else np.asarray(sinks, np.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    page_size = k_pages.shape[2]
    out = np.zeros_like(q)
    for b, n in enumerate(np.asarray(context_lens)):
        pages = np.asarray(block_tables)[b, : -(-n // page_size)]
        k = k_pages[:, pages].reshape(k_pages.shape[0], -1, q.shape[-1])[:, :n].transpose(1, 0, 2)
        v = v_pages[:, pages].reshape(v_pages.shape[0], -1, q.shape[-1])[:, :n].transpose(1, 0, 2)
        q_pos = n - q.shape[1] + np.arange(q.shape[1])
        out[b] = attention_np(q[b], k, v, q_pos, True, window, sinks, scale)
    return out


def random_ragged(seed, seqs, pad_rows, hq, hkv, d, page_size, max_pages, dtype=jnp.float32, with_sinks=False,
                  pad_seqs=0):
    """Random ragged batch: seqs [(context_len, q_len)], then pad_seqs zero-length sequences and
    pad_rows padding rows. Returns (q [T,Hq,D], k_pages, v_pages, query_start_loc, context_lens,
    block_tables) and sinks; pages as random_paged (shuffled, NULL_PAGE_VALUE in page 0)."""
    seqs = list(seqs) + [(0, 0)] * pad_seqs
    lens = [n for n, _ in seqs]
    _, k_pages, v_pages, tables, context_lens, sinks = random_paged(
        seed, lens, 1, hq, hkv, d, page_size, max_pages, dtype, with_sinks)
    query_start_loc = np.concatenate([[0], np.cumsum([q_len for _, q_len in seqs])]).astype(np.int32)
    q = np.random.default_rng(seed + 1000).normal(size=(query_start_loc[-1] + pad_rows, hq, d))
    args = (jnp.asarray(q, dtype), k_pages, v_pages, jnp.asarray(query_start_loc), context_lens, tables)
    return args, sinks


def ragged_np(q, k_pages, v_pages, query_start_loc, context_lens, block_tables, window, sinks, scale=None):
    """Float64 ragged attention: each sequence's rows as one padded paged_np row."""
    q = np.asarray(q, np.float64)
    out = np.zeros_like(q)
    starts = np.asarray(query_start_loc)
    for s in range(len(starts) - 1):
        lo, hi = starts[s], starts[s + 1]
        if hi > lo:
            out[lo:hi] = paged_np(q[None, lo:hi], k_pages, v_pages, np.asarray(block_tables)[s : s + 1],
                                  np.asarray(context_lens)[s : s + 1], window, sinks, scale)[0]
    return out


def grouped_np(lhs, rhs, group_sizes, group_offset=0):
    """Float64 grouped matmul, one group at a time; rows of other groups stay zero."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    ends = np.cumsum(group_sizes)
    for g in range(rhs.shape[0]):
        end = ends[group_offset + g]
        start = end - group_sizes[group_offset + g]
        out[start:end] = lhs[start:end] @ rhs[g]
    return out


def random_gmm(seed, m, k, n, group_sizes, num_rhs=None, dtype=jnp.float32):
    """Random lhs [M,K], rhs [G,K,N] and group sizes as an int32 array."""
    kl, kr = jax.random.split(jax.random.key(seed))
    num_rhs = len(group_sizes) if num_rhs is None else num_rhs
    lhs = jax.random.normal(kl, (m, k), dtype)
    rhs = jax.random.normal(kr, (num_rhs, k, n), dtype)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)
