"""Serve a model over the OpenAI API (completions and chat, streamed or not) until Ctrl-C.

  python scripts/serve.py --model=smollm2-135m-instruct --port=8000 [--warmup] [--api_key=KEY]
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 16}'

Binds to 127.0.0.1 unless --host says otherwise. The routes and error bodies are in server/app.py.
Ctrl-C gives open streams --graceful_shutdown_s to finish, then ends each with an "abort" chunk and
[DONE].
"""

from __future__ import annotations

import asyncio
import json

import jax.numpy as jnp
import uvicorn
from absl import app, flags, logging
from jax.sharding import Mesh

from benchmarks.compilations import on_compilation
from engine import LLM, kv_cache
from engine.config import optional_number_arg
from models.loaded_model import load_config
from pallas_kernels.ops import IMPLS
from sharding import DEFAULT_RULES, RULES
from sharding.attention_shards import data_parallel_shards
from sharding.mesh import parse_mesh
from server.app import Server, create_app
from server.engine_loop import EngineLoop
from server.metrics import ServerMetrics
from server.reasoning_parsers import FAMILY_REASONING_PARSERS, REASONING_PARSERS
from server.tool_parsers import FAMILY_TOOL_PARSERS, TOOL_PARSERS

MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "preset, .gguf file, HF dir or orbax dir")
SERVED_NAME = flags.DEFINE_string("served_model_name", None, "the model's name in the API (default: --model)")
HOST = flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
PORT = flags.DEFINE_integer("port", 8000, "port to bind (0: a free one)")
API_KEY = flags.DEFINE_string("api_key", None, "if set, every endpoint but /health needs Authorization: Bearer KEY")
WEIGHT_UPDATES = flags.DEFINE_bool("enable_weight_updates", False, "serve POST /update_weights, /sleep, /wake_up "
                                    "without --api_key (with one they are on, behind the key): anyone who "
                                    "reaches the server can then load weights from its disk "
                                    "(server/admin_routes.py)")
MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "requests that may wait beyond max_num_seqs (503 past that)")
MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "largest request body (413 past that)")
WARMUP = flags.DEFINE_bool("warmup", False, "compile every shape bucket, logprob variants included, before serving "
                           "(minutes on a CPU; lm-eval's requests ask for logprobs)")
ACCESS_LOG = flags.DEFINE_bool("access_log", False, "log every HTTP request (uvicorn's access log)")
SHUTDOWN_S = flags.DEFINE_float("graceful_shutdown_s", 5.0, "on Ctrl-C, seconds open streams get to finish")
TOOL_PARSER = flags.DEFINE_enum("tool_call_parser", None, [*TOOL_PARSERS, "none"], "how chat outputs' tool calls "
                                "are parsed (vLLM's names; default: the model family's, "
                                "server/tool_parsers.py; none: no tool_choice 'auto')")
REASONING_PARSER = flags.DEFINE_enum("reasoning_parser", None, [*REASONING_PARSERS, "none"], "how chat outputs' "
                                     "reasoning goes to reasoning_content (vLLM's names; default: none, but "
                                     "openai_gptoss for gpt-oss, as vLLM)")
# The engine's flags (engine/config.py).
DTYPE = flags.DEFINE_string("dtype", "float32", "parameter and KV cache dtype")
WEIGHTS = flags.DEFINE_string("weights", "native", "a quantized checkpoint's weights: native (packed as shipped) "
                              "or a dtype to dequantize them to at load (docs/quantization.md)")
SEED = flags.DEFINE_integer("seed", 0, "seeds of requests that give none")
MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 64, "most concurrent sequences")
MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", None, "longest prompt + output (default: the model's "
                                      "context, cut to the longest sequence the KV pool holds)")
MAX_BATCHED = flags.DEFINE_integer("max_num_batched_tokens", None, "token budget per (ragged) step "
                                   "(default: the engine's by platform, engine/config.default_token_budget)")
PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", None, "most prompt tokens of one request per step "
                                     "(default: the engine's, min(512, budget))")
PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "tokens per KV page")
NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages (default: sized from --kv_cache_bytes)")
KV_BYTES = flags.DEFINE_integer("kv_cache_bytes", 4 << 30, "KV pool budget when --num_pages is not set")
DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "decode steps per jitted call")
MIN_GAIN = flags.DEFINE_string("multi_step_min_gain", "auto", "run --decode_steps per call (tokens in bursts) only "
                               "where measured at least this much faster per token than one step (each token "
                               "streamed at once): a number, none (always bursts), or auto (0.5)")
MIXED_RATIO = flags.DEFINE_string("mixed_step_ratio", "auto", "while requests decode, cap a step's prefill tokens so it "
                                  "takes at most this many of their decode steps (their ITL): a number > 1, none, or "
                                  "auto (3 on a CPU, none elsewhere)")
ASYNC = flags.DEFINE_bool("async_scheduling", False, "dispatch a decode call's successor before its tokens")
KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"],
                                   "KV pool storage: model dtype, or FP8 e4m3 (half the bytes; jnp attention path)")
PREFIX_CACHING = flags.DEFINE_bool("enable_prefix_caching", True, "share the KV of full pages between requests "
                                   "with the same prefix (engine/prefix_cache.py)")
SPECULATIVE = flags.DEFINE_string("speculative_config", None, "speculative decoding: a JSON object of LLM's "
                                  "speculative_config (vLLM's), e.g. "
                                  "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'")
MESH = flags.DEFINE_string("mesh", None, "shard over a device mesh, e.g. expert=8 or tensor=2,expert=4 "
                           "(sharding/mesh.py parse_mesh)")
SHARDING_RULES = flags.DEFINE_enum("rules", None, list(RULES), "sharding rules on --mesh (sharding/rules.py; "
                                   "expert_dp: data-parallel attention + expert parallelism; default: the model's)")
ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", list(IMPLS), "attention ops (pallas_kernels/ops.py)")
STOP_S = 10.0  # after the grace period: for the engine's current step to end and the aborted streams' last chunks


class GracefulServer(Server):
    """uvicorn's Server whose shutdown gives open streams `grace_s` to finish and then stops the engine,
    so each stream still open ends with an "abort" chunk and [DONE] instead of a cut connection
    (uvicorn cancels what is left at its config's timeout_graceful_shutdown)."""

    def __init__(self, config: uvicorn.Config, engine: EngineLoop, grace_s: float, **kwargs):
        super().__init__(config, **kwargs)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets: list | None = None) -> None:
        stopping = asyncio.create_task(self._stop_engine())
        try:
            await super().shutdown(sockets)
        finally:
            stopping.cancel()

    async def _stop_engine(self) -> None:
        """After the grace period, stop the engine off the event loop, which sends the streams' last chunks."""
        await asyncio.sleep(self.grace_s)
        await asyncio.to_thread(self.engine.stop)


def speculative_config() -> dict | None:
    """--speculative_config as LLM's dict (None: no speculation)."""
    if SPECULATIVE.value is None:
        return None
    try:
        spec = json.loads(SPECULATIVE.value)
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--speculative_config is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise app.UsageError(f"--speculative_config must be a JSON object, got {SPECULATIVE.value!r}")
    return spec


def max_model_len(mesh: Mesh | None) -> int:
    """--max_model_len, else vLLM's `--max-model-len auto`: the model's context, cut to the longest
    sequence the KV pool (--num_pages, or --kv_cache_bytes) holds. The engine's own default, the
    model's context, refuses a pool too small for it."""
    if MAX_MODEL_LEN.value is not None:
        return MAX_MODEL_LEN.value
    config, page_size = load_config(MODEL.value), PAGE_SIZE.value
    pages = NUM_PAGES.value or KV_BYTES.value // kv_cache.bytes_per_page(config, page_size, jnp.dtype(DTYPE.value),
                                                                         KV_CACHE_DTYPE.value)
    shards = data_parallel_shards(mesh, RULES[SHARDING_RULES.value] if SHARDING_RULES.value else DEFAULT_RULES)
    fits = (pages // (1 if shards is None else shards.size) - 1) * page_size  # each shard's page 0 is reserved
    context = config.max_position_embeddings
    if not 0 < fits < context:
        return context  # all of it fits, or not one page: the engine says what is wrong
    logging.warning("max_model_len=%d: the KV pool holds %d tokens per sequence, fewer than the model's context "
                    "(%d); a larger --kv_cache_bytes or --num_pages holds more", fits, fits, context)
    return fits


def main(argv: list[str]) -> None:
    del argv
    mesh = parse_mesh(MESH.value)
    llm = LLM(MODEL.value, dtype=DTYPE.value, weights=WEIGHTS.value, mesh=mesh, rules=SHARDING_RULES.value,
              seed=SEED.value, speculative_config=speculative_config(), max_num_seqs=MAX_NUM_SEQS.value,
              max_model_len=max_model_len(mesh), max_num_batched_tokens=MAX_BATCHED.value,
              prefill_chunk=PREFILL_CHUNK.value, page_size=PAGE_SIZE.value, num_pages=NUM_PAGES.value,
              kv_cache_bytes=KV_BYTES.value, decode_steps=DECODE_STEPS.value, async_scheduling=ASYNC.value,
              **optional_number_arg("multi_step_min_gain", MIN_GAIN.value),
              **optional_number_arg("mixed_step_ratio", MIXED_RATIO.value),
              attention_impl=ATTENTION_IMPL.value, kv_cache_dtype=KV_CACHE_DTYPE.value,
              enable_prefix_caching=PREFIX_CACHING.value)
    if WARMUP.value:
        logging.info("compiling every shape bucket ...")
        logging.info("compiled %d programs", llm.warmup(logprobs=True))
    name = SERVED_NAME.value or MODEL.value
    family = llm.model.config.architecture
    metrics = ServerMetrics(name, llm.config.num_pages)
    on_compilation(metrics.xla_compiled)  # after the warm-up: what serving compiles (a benchmark point's misses)
    engine = EngineLoop(llm, metrics).start()
    api = create_app(engine, model_name=name, api_key=API_KEY.value, max_queue=MAX_QUEUE.value,
                     max_body_bytes=MAX_BODY.value, enable_weight_updates=WEIGHT_UPDATES.value,
                     tool_call_parser=TOOL_PARSER.value or FAMILY_TOOL_PARSERS.get(family),
                     reasoning_parser=REASONING_PARSER.value or FAMILY_REASONING_PARSERS.get(family))
    config = uvicorn.Config(api, host=HOST.value, port=PORT.value, log_level="info", lifespan="off",
                            access_log=ACCESS_LOG.value, timeout_graceful_shutdown=SHUTDOWN_S.value + STOP_S)
    server = GracefulServer(config, engine, SHUTDOWN_S.value,
                            on_ready=lambda url: print(f"jaxserve: serving {name!r} at {url}/v1 (health: "
                                                       f"{url}/health, metrics: {url}/metrics)", flush=True))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        engine.stop()


if __name__ == "__main__":
    app.run(main)
