"""Stream a completion (or a chat answer) to stdout, then one line of timings, saying how many
compilations (or loads from the persistent compilation cache) fell inside them.

  python scripts/generate.py --model=smollm2-135m-instruct --chat --prompt="What is the capital of France?"
"""

import contextlib
import json
import time
from pathlib import Path

from absl import app, flags

from benchmarks.compilations import count_cache_hits, count_compilations
from engine import LLM, SamplingParams
from pallas_kernels.ops import IMPLS
from sharding import RULES
from sharding.mesh import parse_mesh

MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "preset, .gguf file, HF dir or orbax dir")
PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "the prompt (a user message with --chat)")
CHAT = flags.DEFINE_bool("chat", False, "wrap the prompt in the checkpoint's chat template")
DTYPE = flags.DEFINE_string("dtype", "float32", "parameter and cache dtype")
WEIGHTS = flags.DEFINE_string("weights", "native", "a quantized checkpoint's weights: native (packed as shipped) "
                              "or a dtype to dequantize them to at load (docs/quantization.md)")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "most tokens to generate")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy")
TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
TOP_K = flags.DEFINE_integer("top_k", -1, "-1 disables top-k")
MIN_P = flags.DEFINE_float("min_p", 0.0, "min-p filter")
SEED = flags.DEFINE_integer("seed", None, "per-request sampling seed")
PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "tokens per KV page")
NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages (default: sized from the memory budget)")
MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 8, "most concurrent sequences")
MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", 2048, "longest prompt + output")
DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "decode steps per jitted call")
MAX_BATCHED = flags.DEFINE_integer("max_num_batched_tokens", 2048, "token budget per step (fewer shape buckets)")
WARMUP = flags.DEFINE_bool("warmup", False, "compile every shape bucket first (minutes), so the timings exclude compilation")
KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"],
                                   "KV pool storage: model dtype, or FP8 e4m3 (half the bytes; jnp attention path)")
ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", list(IMPLS), "attention ops (pallas_kernels/ops.py)")
MESH = flags.DEFINE_string("mesh", None, "shard over a device mesh, e.g. expert=8 or tensor=2,expert=4 "
                           "(sharding/mesh.py parse_mesh)")
RULES = flags.DEFINE_enum("rules", None, list(RULES), "sharding rules on --mesh (sharding/rules.py; expert_dp: "
                          "data-parallel attention + expert parallelism; default: the model's)")
JSON_OUT = flags.DEFINE_string("json_out", None, "also write the timings here as JSON")


@contextlib.contextmanager
def timed(record: dict, name: str):
    """Seconds, compilations and persistent-cache loads inside the block, into record[name + ...]."""
    start = time.perf_counter()
    with count_compilations() as compiles, count_cache_hits() as hits:
        yield
    record |= {f"{name}_s": time.perf_counter() - start, f"{name}_compilations": compiles[0],
               f"{name}_cache_hits": hits[0]}


def compilation_note(compiles: int, hits: int) -> str:
    """What the timings include: compiling, loading from the persistent cache, or neither."""
    if not compiles:
        return "no compilation in these timings"
    return (f"these timings include {compiles - hits} compilations and {hits} loads from the persistent "
            f"compilation cache (--warmup excludes them)")


def main(argv: list[str]) -> None:
    del argv
    record = {"model": MODEL.value, "warmup": WARMUP.value}
    with timed(record, "load"):
        llm = LLM(MODEL.value, dtype=DTYPE.value, weights=WEIGHTS.value, mesh=parse_mesh(MESH.value), rules=RULES.value,
                  page_size=PAGE_SIZE.value, num_pages=NUM_PAGES.value, max_num_seqs=MAX_NUM_SEQS.value,
                  max_model_len=MAX_MODEL_LEN.value, decode_steps=DECODE_STEPS.value, attention_impl=ATTENTION_IMPL.value,
                  kv_cache_dtype=KV_CACHE_DTYPE.value, max_num_batched_tokens=MAX_BATCHED.value)
    params = SamplingParams(temperature=TEMPERATURE.value, top_p=TOP_P.value, top_k=TOP_K.value,
                            min_p=MIN_P.value, seed=SEED.value, max_tokens=MAX_TOKENS.value)
    prompt = PROMPT.value
    if CHAT.value:
        prompt = llm.model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    if WARMUP.value:
        with timed(record, "warmup"):
            llm.warmup()
    with timed(record, "generate"):
        request = llm.add_request(prompt, params)
        for delta in llm.stream_request(request):
            print(delta, end="", flush=True)
    n = len(request.output_token_ids)
    decode_s = request.metrics.token_times[-1] - request.metrics.token_times[0]
    record |= {"ttft_s": request.metrics.ttft, "tokens": n, "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else None}
    warmup = f"warmup {record['warmup_s']:.2f} s | " if WARMUP.value else ""
    print(f"\n[{warmup}TTFT {request.metrics.ttft * 1e3:.0f} ms | {n} tokens in {record['generate_s']:.2f} s | "
          f"decode {(n - 1) / decode_s if decode_s > 0 else float('nan'):.1f} tok/s | finish: {request.finish_reason}] "
          f"({compilation_note(record['generate_compilations'], record['generate_cache_hits'])})")
    if JSON_OUT.value:
        Path(JSON_OUT.value).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
