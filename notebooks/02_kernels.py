# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Kernels: every implementation on the same inputs, against float64
#
# The experiment: run each attention and grouped-GEMM implementation `pallas_kernels.ops` offers on
# this machine (plain jnp "xla", the C++ CPU kernel "cpu", the Pallas Mosaic GPU kernels in
# interpret mode "interpret"; "pallas" itself needs an H100/H200) on one set of random inputs,
# measure the error against a float64 NumPy oracle and the time per call, then write a new
# paged-attention implementation and plug it into the engine behind `ops`.
# Shapes are small so interpret mode (a CPU simulation of the GPU kernel) stays quick; its times
# say nothing about the GPU.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.timing import time_ms
from engine import LLM, SamplingParams
from engine.testing import greedy_reference, random_prompts
from models import load_model
from pallas_kernels import cpu_paged_attention as cpa
from pallas_kernels import ops
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels.testing import flash_np, grouped_np, paged_np, ragged_np, random_gmm, random_paged, random_qkv, random_ragged

cpu = ["cpu"] if cpa.available() else []  # the C++ kernel needs a C++ compiler (built on first use)
print(jax.devices()[0].device_kind, "| C++ CPU kernel:", bool(cpu))

# %% [markdown]
# ## One input set per op, every implementation
# Each case: the call (impl as a keyword), its inputs, the float64 oracle, and the impls to try.

# %%
q, k, v, _ = random_qkv(0, 1, 64, 64, 4, 2, 64)
paged = random_paged(1, [40, 97, 128], 1, 4, 2, 64, 16, 8)[:5]
ragged, _ = random_ragged(2, [(40, 1), (97, 1), (64, 32)], 3, 4, 2, 64, 16, 8)
gmm = random_gmm(3, 64, 128, 128, [10, 0, 30, 24])
cases = {
    "flash_attention": (ops.flash_attention, (q, k, v), flash_np(q, k, v, True, None, None, None),
                        ["xla", "interpret"]),
    "paged_attention": (ops.paged_attention, paged, paged_np(*paged, None, None), ["xla", *cpu, "interpret"]),
    "ragged_paged_attention": (ops.ragged_paged_attention, ragged, ragged_np(*ragged, None, None),
                               ["xla", *cpu, "interpret"]),
    "grouped_matmul": (ops.grouped_matmul, gmm, grouped_np(*gmm), ["xla", "interpret"]),
}
results = {}
for name, (op, args, oracle, impls) in cases.items():
    for impl in impls:
        fn = jax.jit(lambda *a, op=op, impl=impl: op(*a, impl=impl))
        error = np.abs(np.asarray(fn(*args), np.float64) - oracle).max() / np.abs(oracle).max()
        results[name, impl] = error, time_ms(lambda: fn(*args), iters=3)
        print(f"{name:24} {impl:10} relative error {error:.1e}   {results[name, impl][1]:8.2f} ms/call")

# %% [markdown]
# ## A new implementation behind `ops`
# The simplest correct paged attention: gather every page of each sequence, one masked softmax.
# `rpa.ragged_paged_attention_per_token` turns any paged attention into the ragged op the engine
# calls (each flat token as its own one-query row), so swapping `ops.ragged_paged_attention` runs
# the whole engine on it. To keep it, add its name to `ops.IMPLS` and a branch in `ops.py`.

# %%
def gather_all_attention(q, k_pages, v_pages, block_tables, context_lens, *, sliding_window=None, sinks=None,
                         scale=None):
    """q [B, Q, Hq, D] against every page of each sequence (causal, sliding window, per-head sinks
    in the denominator); rows without keys give zeros."""
    b, q_len, hq, d = q.shape
    hkv = k_pages.shape[0]
    k_kbsd = k_pages[:, block_tables].reshape(hkv, b, -1, d).astype(jnp.float32)
    v_kbsd = v_pages[:, block_tables].reshape(hkv, b, -1, d).astype(jnp.float32)
    q_bqkgd = q.reshape(b, q_len, hkv, hq // hkv, d).astype(jnp.float32)
    s = jnp.einsum("bqkgd,kbsd->bkgqs", q_bqkgd, k_kbsd) * (d**-0.5 if scale is None else scale)
    q_pos = context_lens[:, None] - q_len + jnp.arange(q_len)  # [B, Q]
    k_pos = jnp.arange(k_kbsd.shape[2])
    visible = k_pos <= q_pos[:, :, None]  # [B, Q, S]
    if sliding_window is not None:
        visible &= k_pos > q_pos[:, :, None] - sliding_window
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    sink = jnp.full((hkv, hq // hkv), -jnp.inf) if sinks is None else sinks.astype(jnp.float32).reshape(hkv, -1)
    m = jnp.maximum(s.max(axis=-1), sink[None, :, :, None])  # [B, Hkv, G, Q]
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row that sees nothing and has no sink: zeros, not NaN
    e = jnp.exp(s - m[..., None])
    denom = e.sum(axis=-1) + jnp.exp(sink[None, :, :, None] - m)
    p = e / jnp.where(denom > 0, denom, 1.0)[..., None]
    return jnp.einsum("bkgqs,kbsd->bqkgd", p, v_kbsd).reshape(b, q_len, hq, d).astype(q.dtype)


mine = jax.jit(gather_all_attention)
error = np.abs(np.asarray(mine(*paged), np.float64) - cases["paged_attention"][2]).max()
results["paged_attention", "gather_all"] = error / np.abs(cases["paged_attention"][2]).max(), time_ms(
    lambda: mine(*paged), iters=3)
print(f"gather_all: relative error {results['paged_attention', 'gather_all'][0]:.1e}")
sinks = jnp.linspace(-1.0, 1.0, paged[0].shape[2])  # per query head
windowed = jax.jit(lambda *a: gather_all_attention(*a, sliding_window=20, sinks=sinks))(*paged)
want = paged_np(*paged, 20, sinks)
print(f"gather_all with a window and sinks: relative error {np.abs(np.asarray(windowed) - want).max() / np.abs(want).max():.1e}")
assert np.abs(np.asarray(windowed, np.float64) - want).max() <= 1e-4 * np.abs(want).max()

original = ops.ragged_paged_attention
ops.ragged_paged_attention = lambda q, *args, impl, max_query_len=None, **kwargs: (
    rpa.ragged_paged_attention_per_token(gather_all_attention, q, *args, **kwargs))
try:
    tiny = load_model("tiny-llama")
    prompts = random_prompts(0, 4, tiny.config.vocab_size, 5, 60)
    llm = LLM(tiny, attention_impl="xla", page_size=8, max_model_len=128, max_num_seqs=4, prefill_chunk=32,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
finally:
    ops.ragged_paged_attention = original
same = [o.token_ids for o in outs] == greedy_reference(tiny, prompts, 8, pad_to=72)
print("engine on gather_all_attention: greedy tokens equal the no-cache forward's:", same)
assert same

# %%
names = [f"{op}\n{impl}" for op, impl in results]
errors, times = zip(*results.values())
fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
top.bar(names, np.maximum(errors, 1e-17))
top.set(yscale="log", ylabel="max error / max |float64|", title="Error against float64 NumPy")
bottom.bar(names, times, color="tab:orange")
bottom.set(yscale="log", ylabel="ms per call (this CPU)", title="Time per call (interpret mode simulates the GPU)")
plt.xticks(rotation=60, fontsize=8)
plt.tight_layout()
plt.show()
