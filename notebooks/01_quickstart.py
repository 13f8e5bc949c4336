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
# # Quickstart: SmolLM2-135M through the engine
#
# The experiment: load a real checkpoint, chat with it, stream, vary the sampling parameters, read
# per-token log-probabilities (vLLM's `logprobs=k` / `prompt_logprobs=k`), check the engine's numbers
# against Hugging Face transformers (a stored fixture), and measure tokens/s as the batch grows.
# Everything runs on a CPU in about a minute; the first call of each new shape compiles.

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import engine
from engine import LLM, SamplingParams
from models import load_model

ROOT = Path(engine.__file__).resolve().parents[1]
model = load_model("smollm2-135m-instruct")
llm = LLM(model, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256)
cfg = model.config
print(f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")

# %% [markdown]
# ## Chat and stream
# `chat` applies the checkpoint's chat template; `stream` yields text as tokens arrive.

# %%
greedy = SamplingParams(temperature=0.0, max_tokens=32)
answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)
print(repr(answer.text), answer.finish_reason, f"TTFT {answer.metrics.ttft:.2f} s (the first call compiles)")

prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])
for delta in llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=24)):
    print(delta, end="", flush=True)

# %% [markdown]
# ## Sampling parameters
# Temperature 0 is greedy; a fixed `seed` makes a sampled answer reproducible whatever else is in the
# batch (each request's randomness is its own key folded with the token position).

# %%
params = [SamplingParams(temperature=t, top_p=0.9, seed=s, max_tokens=12) for t in (0.0, 0.8, 1.5) for s in (0, 1)]
for p, out in zip(params, llm.generate([prompt] * len(params), params, use_tqdm=False)):
    print(f"T={p.temperature:<4} seed={p.seed}: {out.text!r}")

# %% [markdown]
# ## Log-probabilities
# `logprobs=k`: per generated token a dict {token id: logprob} of the chosen token and the k most
# likely alternatives, under the model's unfiltered distribution. `prompt_logprobs=k`: the same for
# every prompt token after the first (the first has no context: None).

# %%
out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
decode = lambda t: repr(model.tokenizer.decode([t]))
for token, entry in zip(out.token_ids, out.logprobs):
    print(f"{decode(token):>12} <- " + ", ".join(f"{decode(t)} {lp:.2f}" for t, lp in entry.items()))

# %% [markdown]
# ## The engine against transformers
# The fixture holds transformers' float32 logits for a 37-token prompt. The no-cache forward should
# match them to float32 rounding, and the engine's prompt logprobs (paged cache, ragged chunks) should
# equal transformers' log-softmax.

# %%
reference = np.load(ROOT / "tests" / "fixtures" / "smollm2_reference.npz")
ids, hf_logits = reference["prompt2_ids"], reference["prompt2_logits"].astype(np.float64)
hf_logprobs = hf_logits - hf_logits.max(-1, keepdims=True)
hf_logprobs -= np.log(np.exp(hf_logprobs).sum(-1, keepdims=True))
forward_error = np.abs(np.asarray(model.forward(ids[None]))[0] - hf_logits).max()
scored = llm.generate([ids.tolist()], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                      use_tqdm=False)[0]
ours = np.array([entry[int(t)] for t, entry in zip(ids[1:], scored.prompt_logprobs[1:])])
theirs = hf_logprobs[np.arange(len(ids) - 1), ids[1:]]
print(f"forward logits vs transformers: max |diff| {forward_error:.2e}")
print(f"engine prompt logprobs vs transformers: max |diff| {np.abs(ours - theirs).max():.2e}")
assert forward_error < 1e-3 and np.abs(ours - theirs).max() < 1e-3

# %% [markdown]
# ## Tokens/s as the batch grows
# Decode is memory-bound: one pass over the weights serves every row, so throughput grows with the
# batch until compute (or the attention over each row's context) takes over. A warm-up call per
# batch size keeps compilation out of the timings.

# %%
rng = np.random.default_rng(0)
batches, rates = [1, 2, 4, 8], []
for batch in batches:
    prompts = [rng.integers(0, cfg.vocab_size, 16).tolist() for _ in range(batch)]
    run = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm.generate(prompts, run, use_tqdm=False)  # compiles this batch's shapes
    start = time.perf_counter()
    outs = llm.generate(prompts, run, use_tqdm=False)
    rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    print(f"batch {batch}: {rates[-1]:.0f} output tok/s")

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
left.bar(np.arange(1, len(ids)), -ours, label="engine")
left.plot(np.arange(1, len(ids)), -theirs, "k.", label="transformers")
left.set(xlabel="prompt position", ylabel="surprisal (-logprob, nats)", title="Prompt logprobs")
left.legend()
right.plot(batches, rates, "o-")
right.set(xlabel="batch (concurrent requests)", ylabel="output tok/s", xscale="log", title="Throughput on this CPU")
right.set_xticks(batches, [str(b) for b in batches])
plt.tight_layout()
plt.show()
