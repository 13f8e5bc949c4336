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
# # Reading and steering the model while it serves
#
# The experiment: ask the engine for a request's residual stream at every layer
# (`SamplingParams(capture_layers=...)`, transformers' `output_hidden_states` numbering: 0 the
# embeddings, i the residual after decoder layer i, the last entry after the final norm), read it
# through the LM head layer by layer (a logit lens), build a steering vector from two contrasting
# prompts and add it at a middle layer while the engine generates (`interventions=`), and look at
# which experts a MoE model routes each token to (`return_routed_experts=True`,
# `LLM.expert_counts()`). Requests with and without hooks share the same batches; runs on a CPU in
# about a minute.

# %%
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import engine
from engine import LLM, SamplingParams
from engine.hook_params import Intervention
from models import load_model

ROOT = Path(engine.__file__).resolve().parents[1]
model = load_model("smollm2-135m-instruct")
llm = LLM(model, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=128)
cfg = model.config
every_layer = tuple(range(cfg.num_layers + 1))
print(f"{cfg.num_layers} layers: captures 0..{cfg.num_layers}, hidden size {cfg.hidden_size}")

# %% [markdown]
# ## A logit lens
# Each captured residual (but the last, already normed) goes through the final RMSNorm and the LM
# head: what would the model say if it stopped after layer i? The last row is the model's answer.

# %%
prompt = "The capital of France is"
out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, capture_layers=every_layer),
                   use_tqdm=False)[0]
stack = np.stack([out.hidden_states[layer] for layer in every_layer])  # [layers + 1, tokens, D]
normed = np.concatenate([np.asarray(model.model.norm(jnp.asarray(stack[:-1]))), stack[-1:]])
probs = np.asarray(jax.nn.softmax(model.model.logits(jnp.asarray(normed)), axis=-1))  # [layers + 1, tokens, V]
last = len(out.prompt_token_ids) - 1  # the position that predicts the first generated token
answer = out.token_ids[0]
print(f"generated: {out.text!r}")
for layer in range(0, cfg.num_layers + 1, 5):
    top = int(probs[layer, last].argmax())
    print(f"layer {layer:2d}: top {model.tokenizer.decode([top])!r:>12}  p(answer) = {probs[layer, last, answer]:.3f}")

# %% [markdown]
# ## A steering vector
# The difference of the mean residuals of two contrasting sets of prompts at a middle layer, added
# (times a scale) to every position of a neutral prompt at that layer. The engine applies it inside
# the batched, paged steps; the same request without it runs beside it.

# %%
steer_layer = cfg.num_layers // 2
positive = ["I love this, it is wonderful and makes me so happy.", "What a fantastic, joyful, beautiful day!"]
negative = ["I hate this, it is awful and makes me so sad.", "What a terrible, miserable, horrible day!"]
captured = llm.generate(positive + negative, SamplingParams(temperature=0.0, max_tokens=1,
                                                            capture_layers=(steer_layer,)), use_tqdm=False)
means = [np.mean([o.hidden_states[steer_layer].mean(0) for o in group], axis=0)
         for group in (captured[:2], captured[2:])]
direction = means[0] - means[1]
neutral = model.tokenizer.apply_chat_template([{"role": "user", "content": "Describe your weekend in one sentence."}])
scales = (0.0, -2.0, 2.0)  # stronger pushes (|scale| >= 3 here) break the text
runs = [SamplingParams(temperature=0.0, max_tokens=24, interventions=(Intervention(steer_layer, direction, scale=s),))
        for s in scales]
steered = llm.generate([neutral] * len(scales), runs, use_tqdm=False)
for s, o in zip(scales, steered):
    print(f"scale {s:+.0f}: {o.text!r}")

# %% [markdown]
# ## Routing in a MoE model
# The tiny gpt-oss fixture (random weights, 2 layers of 4 experts, top-2): which experts each
# token of one request went to, and the engine's per-(layer, expert) token counts over a batch
# (`count_experts=True` counts every step; without it only steps holding a request that asks).

# %%
moe = LLM(str(ROOT / "tests" / "fixtures" / "tiny-gpt-oss-hf"), max_model_len=128, max_num_seqs=4,
          count_experts=True)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(8, 40, 6)]
outs = moe.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, return_routed_experts=True),
                    use_tqdm=False)
routed = outs[0].routed_experts  # [tokens, moe layers, k]
counts = moe.expert_counts()
print(f"request 0: {routed.shape[0]} tokens x {routed.shape[1]} MoE layers x top-{routed.shape[2]}; "
      f"counted {counts.sum()} (token, expert) pairs")

fig, (lens, route, load) = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 3, 2]})
shown = range(max(0, last - 4), last + 1)  # the prompt's last tokens
lens.imshow(probs[:, shown, answer].T, aspect="auto", cmap="viridis")
lens.set(xlabel="layer", ylabel="prompt position", title=f"logit lens: p({model.tokenizer.decode([answer])!r})",
         yticks=range(len(shown)), yticklabels=[model.tokenizer.decode([out.prompt_token_ids[i]]) for i in shown])
one_hot = np.zeros((routed.shape[0], routed.shape[1] * 4))
for layer in range(routed.shape[1]):
    one_hot[np.arange(routed.shape[0])[:, None], layer * 4 + routed[:, layer]] = 1
route.imshow(one_hot.T, aspect="auto", cmap="Greys", interpolation="nearest")
route.set(xlabel="token position", ylabel="layer x expert", title="experts chosen per token (request 0)")
image = load.imshow(counts, cmap="magma")
load.set(xlabel="expert", ylabel="MoE layer", title="tokens per expert (all requests)")
fig.colorbar(image, ax=load)
plt.tight_layout()
plt.show()
