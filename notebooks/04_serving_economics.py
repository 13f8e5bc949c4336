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
# # Serving economics: throughput, interactivity, cost and the roofline
#
# The experiment (InferenceMAX's method, scaled down to a CPU): a small concurrency sweep of
# SmolLM2-135M on random-token prompts, each point scored as output tok/s per device against
# interactivity (tok/s per user = 1000 / median TPOT ms), its cost per million tokens at an hourly
# price, and the fraction of the roofline (bytes and FLOPs from the config over the device's peaks)
# it reached; beside it the committed full CPU sweep (`benchmarks/results/cpu-smollm2-float32.json`).
# The sweep uses `scripts/benchmark_serving.py`'s own library (`benchmarks/serving_sweep.py`).

# %%
import json
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
from IPython.display import Image, display

import engine
from benchmarks import plots, roofline
from benchmarks.metrics import HOURLY_RATES_USD, cost_per_million_tokens, hourly_rate
from benchmarks.serving_report import format_table, mark_frontier
from benchmarks.serving_sweep import Settings, engine_points
from engine import LLM

ROOT = Path(engine.__file__).resolve().parents[1]

COMMITTED = ROOT / "benchmarks" / "results" / "cpu-smollm2-float32.json"
committed = json.loads(COMMITTED.read_text())
device = committed["device"]
# The committed run's probed peaks: the same roofline for both sweeps (a fresh probe: roofline.device_peaks()).
peaks = roofline.DevicePeaks("cpu (committed probe)", device["peak_bandwidth_gb_s"] * 1e9,
                             device["peak_tflop_s"] * 1e12, source="probe")
print(f"committed sweep: ISL/OSL {committed['workload']['isl']}/{committed['workload']['osl']}, "
      f"peaks {device['peak_bandwidth_gb_s']:.0f} GB/s, {device['peak_tflop_s']:.2f} TFLOP/s")

# %% [markdown]
# ## The sweep
# Every shape bucket is compiled first, each point gets an unscored warm-up wave, and each point
# records the compilations it saw (0: nothing compiled inside the scored loop).

# %%
ISL, OSL, CONCURRENCY = 64, 16, [1, 2, 4]
llm = LLM("smollm2-135m-instruct", max_num_seqs=max(CONCURRENCY), max_model_len=ISL + OSL, max_num_batched_tokens=128)
settings = Settings(isl=ISL, osl=OSL, range_ratio=0.8, seed=0, temperature=0.0,
                    hourly_rate=hourly_rate(jax.devices()[0].device_kind, None, 0.10), num_devices=1,
                    peaks=peaks, warmup=True)
points = engine_points(llm, settings, CONCURRENCY, [2 * c for c in CONCURRENCY], "float32")
mark_frontier(points)
print(format_table(points))
assert all(p["compilations"] == 0 for p in points)

# %% [markdown]
# ## Cost per million tokens, and what the roofline allows
# Measured: $ per device-hour over output tokens per hour, at this CPU's price ($0.10/h, a small
# cloud VM). The roofline column is the physical limit of a decode step at the same concurrency and
# context on each GPU (bandwidth and peak from benchmarks/roofline.py, prices from the benchmark's
# table): the best any engine could do there, so a GPU run reads as a fraction of it.

# %%
config = llm.model.config
context = ISL + OSL // 2
for p in points:
    print(f"c={p['concurrency']}: {p['output_tok_s']:6.1f} output tok/s, ${p['cost_per_million_output_tokens_usd']:.2f} "
          f"per M output tokens on this CPU, {100 * p['roofline']['fraction']:.0f}% of its roofline")
for name, gpu in roofline.GPU_PEAKS.items():
    bound = [c / gpu.seconds(roofline.decode_step_cost(config, [context] * c, 2, 2)) for c in CONCURRENCY]  # bf16
    costs = [cost_per_million_tokens(HOURLY_RATES_USD[name], b) for b in bound]
    print(f"{gpu.name:9} roofline (bf16): " + ", ".join(f"c={c} {b:,.0f} tok/s ${x:.4f}/M" for c, b, x in
                                                        zip(CONCURRENCY, bound, costs)))

# %%
out = Path(tempfile.mkdtemp())
mine = [{**p, "series": f"this sweep (ISL/OSL {ISL}/{OSL})", "device": "cpu"} for p in points]
both = plots.load_points([COMMITTED], ["committed ISL/OSL 256/256"]) + mine
display(Image(filename=plots.plot_pareto(both, out / "pareto.png")))

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
for series in (plots.load_points([COMMITTED]), points):
    cs = [p["concurrency"] for p in series]
    label = "committed" if series is not points else "this sweep"
    left.plot(cs, [100 * p["roofline"]["fraction"] for p in series], "o-", label=label)
    right.plot(cs, [p["cost_per_million_output_tokens_usd"] for p in series], "o-", label=label)
left.set(xscale="log", xlabel="concurrency", ylabel="% of roofline", title="Fraction of the physical limit")
right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="$ per M output tokens", title="Cost on this CPU")
for ax in (left, right):
    ax.legend()
fig.tight_layout()
fig.savefig(out / "economics.png", dpi=100)
plt.close(fig)
display(Image(filename=out / "economics.png"))
