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
# # Sharding: mesh layouts for MoE models on 8 simulated devices
#
# The experiment: split the tiny MoE models (gpt-oss and DeepSeek-V3 shapes, random weights) over
# several `(data, tensor, expert)` meshes, look at how each parameter is sharded, check every layout
# gives the single-device logits, count the bytes each layout's collectives move, then plan the
# full-size models' per-device memory from abstract shapes (nothing allocated).
# The 8 devices are simulated CPU devices: jax fixes the device count when it starts, so the flag is
# set before jax is imported (restart the kernel to change it).

# %%
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import engine  # noqa: E402
from benchmarks.mesh_layouts import run_layout  # noqa: E402
from models import load_model  # noqa: E402
from sharding import RULES, make_mesh  # noqa: E402
from sharding.rules import param_shardings  # noqa: E402

ROOT = Path(engine.__file__).resolve().parents[1]
assert jax.device_count() == 8, jax.devices()
print(jax.device_count(), "devices:", jax.devices()[0].device_kind)

# %% [markdown]
# ## How a layout shards the parameters
# Parameters declare logical axes (`vocab`, `embed`, `q_heads`, `experts`, ...); a rule table maps
# them to mesh axes, so a new layout is a new table, not new model code.

# %%
gpt_oss = load_model("tiny-gpt-oss")
mesh = make_mesh(data=2, tensor=2, expert=2)
for path, sharding in list(param_shardings(gpt_oss.model, mesh, RULES["default"]).items())[:12]:
    print(f"{'.'.join(map(str, path)):55} {sharding.spec}")

# %% [markdown]
# ## Every layout against one device
# One no-cache forward of 8 rows x 32 tokens per layout: the largest logit difference from the
# single-device run, and the collectives XLA inserted (bytes per device, from the partitioned HLO).

# %%
layouts = ["data=8", "tensor=2,expert=4", "data=2,tensor=2,expert=2", "data=2,expert=4:expert_dp",
           "tensor=8:tensor_experts"]
runs = {}
for name in ("tiny-gpt-oss", "tiny-deepseek-v3"):
    base = gpt_oss if name == "tiny-gpt-oss" else load_model(name)
    tokens = np.random.default_rng(0).integers(0, base.config.vocab_size, (8, 32))
    reference = np.asarray(base.forward(tokens))
    for layout in layouts:
        try:
            run = run_layout(base, tokens, reference, layout, iters=2)
        except ValueError as e:  # e.g. 8 tensor shards of 4 kv heads: the rules refuse, naming why
            print(f"{name:17} {layout:28} refused: {str(e)[:90]}")
            continue
        runs[name, layout] = run
        moved = sum(c["bytes"] for c in run["collectives"].values())
        print(f"{name:17} {layout:28} max |diff| {run['max_abs_diff']:.1e}  collectives {moved / 1024:8.1f} KiB "
              f"{ {op: c['count'] for op, c in run['collectives'].items()} }")
        assert run["max_abs_diff"] < 1e-4

# %% [markdown]
# ## Full-size memory plan
# `scripts/plan_sharding.py` lowers and compiles the engine's prefill and decode steps of a
# full-size model from abstract shapes and reports per-device parameter, KV-cache and XLA temporary
# bytes. Each plan compiles a full-size model (a minute or more on a CPU): by default one, gpt-oss-120b
# with its experts over 8 devices at a small batch; `FULL = True` runs the README's table (batch 256
# x 8k context, both models, two rule tables).

# %%
FULL = False
plans = [("gpt-oss-120b", "--expert=8", "expert_dp")]
if FULL:
    plans += [("gpt-oss-120b", "--tensor=8", "tensor_experts"), ("deepseek-v3", "--expert=8", "expert_dp"),
              ("deepseek-v3", "--tensor=8", "tensor_experts")]
size = ["--batch=256", "--context=8192"] if FULL else ["--batch=16", "--context=1024"]
reports = {}
for model, axis, rules in plans:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_sharding.py"), f"--model={model}", axis,
                           f"--rules={rules}", *size], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    reports[f"{model}\n{rules}"] = report = json.loads(done.stdout)
    print(f"{model:13} {rules:15} peak {report['per_device']['peak_gib']:6.1f} GiB per device, fits 80 GB: {report['fits']}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
kinds = ["param_bytes", "kv_cache_bytes"]
names = list(reports)
bottom = np.zeros(len(names))
for kind in kinds:
    gib = np.array([reports[n]["per_device"][kind] / 2**30 for n in names])
    left.bar(names, gib, bottom=bottom, label=kind.replace("_bytes", ""))
    bottom += gib
temp = np.array([max(reports[n][s]["memory"]["temp_bytes"] for s in ("prefill", "decode")) / 2**30 for n in names])
left.bar(names, temp, bottom=bottom, label="XLA temp (CPU upper bound)")
left.axhline(80, color="k", ls="--", lw=1, label="H100 80 GB")
left.set(ylabel="GiB per device", title=f"Full-size plan, 8 devices ({' '.join(size)})")
left.legend(fontsize=8)
labels = [f"{m.replace('tiny-', '')}\n{l}" for m, l in runs]
moved = [sum(c["bytes"] for c in r["collectives"].values()) / 1024 for r in runs.values()]
right.barh(labels, moved)
right.set(xlabel="collective KiB per device per forward", title="Tiny MoE models: what each layout moves")
right.tick_params(axis="y", labelsize=7)
plt.tight_layout()
plt.show()
