"""What batch-invariant mode costs (EngineConfig.batch_invariant, engine/batch_invariance.py): one
fixed offline workload through SmolLM2 with the mode off and on, side by side in one process, after
each engine's warm-up; and whether one request of it (seeded sampling, so that its logprobs are not
~0 as a greedy run's on random prompts are) is bitwise the same run alone and inside the workload,
in each mode. One JSON.

  python scripts/bench_batch_invariance.py --out=benchmarks/results/cpu-batch-invariance.json
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams
from engine.testing import random_prompts
from models import LoadedModel, load_model

OUT = flags.DEFINE_string("out", "benchmarks/results/cpu-batch-invariance.json", "where the JSON goes")
MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "model preset")
NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "requests in the workload (all admitted at once)")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 24, "output tokens per request")
BUDGET = flags.DEFINE_integer("max_num_batched_tokens", 128, "token budget (the mode's one step shape)")
TARGET = 13  # the request checked alone vs inside the workload

ENGINE = dict(max_model_len=252, max_num_seqs=32, prefill_chunk=64, decode_steps=4)  # one 16-page table width


def workload(vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """num_prompts random prompts of 16-64 tokens, sampled at temperature 1 with seed i, max_tokens
    each, the chosen token's logprob."""
    return (random_prompts(0, NUM_PROMPTS.value, vocab, 16, 64),
            [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS.value, ignore_eos=True, logprobs=0)
             for i in range(NUM_PROMPTS.value)])


def logprobs(out) -> np.ndarray:
    """The chosen tokens' logprobs of one output, float32."""
    return np.asarray([lp[t] for lp, t in zip(out.logprobs, out.token_ids)], np.float32)


def measure(model: LoadedModel, batch_invariant: bool) -> dict:
    """Warm-up, the timed workload, and the target request alone, in one mode."""
    llm = LLM(model, **ENGINE, max_num_batched_tokens=BUDGET.value, batch_invariant=batch_invariant)
    start = time.perf_counter()
    programs = llm.warmup()
    warmup_s = time.perf_counter() - start
    prompts, params = workload(model.config.vocab_size)
    with count_compilations() as compiles:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    alone = llm.generate([prompts[TARGET]], params[TARGET], use_tqdm=False)[0]
    inside = outs[TARGET]
    output_tokens = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"attention": [llm.attention.decode, llm.attention.mixed], "warmup_programs": programs,
            "warmup_s": warmup_s, "generate_s": seconds, "compilations_in_generate": compiles[0],
            "output_tokens": output_tokens, "output_tok_s": output_tokens / seconds,
            "total_tok_s": (output_tokens + prompt_tokens) / seconds,
            "target_tokens_equal": alone.token_ids == inside.token_ids,
            "target_logprobs_bitwise_equal": logprobs(alone).tobytes() == logprobs(inside).tobytes(),
            **({"target_logprobs_differing": int(np.sum(logprobs(alone) != logprobs(inside))),
                "target_logprobs_max_abs_diff": float(np.abs(logprobs(alone) - logprobs(inside)).max())}
               if alone.token_ids == inside.token_ids else {})}


def main(argv: list[str]) -> None:
    del argv
    model = load_model(MODEL.value)
    results = {"command": " ".join(sys.argv), "model": MODEL.value, "dtype": str(model.dtype),
               "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "backend": jax.default_backend(), "jax": jax.__version__},
               "load_average_at_start": os.getloadavg(),
               "engine": {**ENGINE, "max_num_batched_tokens": BUDGET.value},
               "workload": {"num_prompts": NUM_PROMPTS.value, "prompt_tokens": "16-64 random ids",
                            "max_tokens": MAX_TOKENS.value, "sampling": "temperature 1, seed i"}}
    for name, on in (("off", False), ("on", True)):
        results[name] = measure(model, on)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    results["output_tok_s_on_over_off"] = results["on"]["output_tok_s"] / results["off"]["output_tok_s"]
    results["load_average_at_end"] = os.getloadavg()  # other jobs on a shared CPU skew the seconds
    print("on / off output tok/s:", round(results["output_tok_s_on_over_off"], 3))
    Path(OUT.value).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
