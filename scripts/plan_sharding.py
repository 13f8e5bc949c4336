"""Ahead-of-time memory plan of a full-size model on a mesh of simulated devices (JSON out).

Lowers and compiles the engine's prefill and decode steps from abstract shapes
(jax.ShapeDtypeStruct with shardings; nothing is allocated) and reports per device: parameter
bytes, KV-cache bytes at --batch x --context, XLA's temporary bytes (compiled.memory_analysis())
and every collective of each step with its bytes (parsed from the partitioned HLO).

  python scripts/plan_sharding.py --model=gpt-oss-120b --expert=8 --rules=expert_dp \\
      --batch=256 --context=8192 --hbm_gib=80

Quantized presets (gpt-oss: MXFP4 experts, DeepSeek-V3: block FP8) count their packed bytes
(--weights=native, the default; --weights=bfloat16 plans the dequantized model). The KV cache is
held in the pool dtype the engine stores (bf16 for bf16 models; float8_e4m3fn, half the bytes, with
--kv_cache_dtype=fp8_e4m3); kv_capacity_tokens says how many
tokens of it one device could hold beside its weights (kv_token_bytes each).

Caveat: on CPU the attention runs as the XLA reference, which gathers each sequence's pages into
a temporary (the Pallas kernels on sm_90 do not), so temp bytes are an upper bound there.
"""

from __future__ import annotations

import json
import math

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "gpt-oss-120b", "A preset of models/config.py.")
flags.DEFINE_integer("data", 1, "Mesh data axis.")
flags.DEFINE_integer("tensor", 1, "Mesh tensor axis.")
flags.DEFINE_integer("expert", 1, "Mesh expert axis.")
flags.DEFINE_string("rules", "default", "Rule table of sharding/rules.py (default, expert_dp, tensor_experts).")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices (must equal data x tensor x expert).")
flags.DEFINE_integer("batch", 256, "Decode batch (sequences in flight).")
flags.DEFINE_integer("context", 8192, "Tokens of context per sequence held in the KV cache.")
flags.DEFINE_integer("prefill_rows", 4, "Prefill chunks of one mixed step (engine: max_num_batched_tokens / chunk).")
flags.DEFINE_integer("prefill_chunk", 512, "Tokens per row of one prefill step (engine: prefill_chunk).")
flags.DEFINE_integer("page_size", 16, "KV-cache page size.")
flags.DEFINE_string("dtype", "bfloat16", "Parameter, activation and KV-cache dtype.")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"],
                  "KV pool storage (EngineConfig.kv_cache_dtype): --dtype's, or FP8 e4m3 (1 byte an element).")
flags.DEFINE_string("weights", "native", "A quantized preset's weights: native (packed) or a dtype (dequantized).")
flags.DEFINE_float("hbm_gib", 80.0, "Device memory to check the plan against (H100 80, H200 141).")

def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def batch_input(shape, dtype, mesh, rules):
    """A ShapeDtypeStruct split over the batch axes when they divide its rows, else replicated."""
    import jax
    from sharding.rules import batch_sharding
    shards = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))
    sharding = (batch_sharding(shape, mesh, rules) if shape[0] % shards == 0
                else jax.NamedSharding(mesh, jax.P()))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_cache(model, config, num_pages: int, dtype, mesh, rules):
    """The paged cache as sharded ShapeDtypeStructs (MLA models: their latent pages)."""
    import jax
    from engine import kv_cache
    from sharding.rules import cache_sharding
    shapes = jax.eval_shape(lambda: kv_cache.allocate(config, num_pages, FLAGS.page_size, dtype,
                                                      kv_cache_dtype=FLAGS.kv_cache_dtype))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_sharding(x.shape, mesh, rules)),
                        shapes)


def decode_inputs(rows: int, pages: int, mesh, rules) -> dict:
    """Abstract decode-call inputs: tokens/positions [rows], block tables, sampling."""
    import jax
    import jax.numpy as jnp
    from engine.sampler import SamplingTensors
    sampling = jax.tree.map(lambda x: batch_input(x.shape, x.dtype, mesh, rules),
                            SamplingTensors.build([], [], rows))
    return {"rows": batch_input((rows,), jnp.int32, mesh, rules), "fed": batch_input((rows, 1), jnp.int32, mesh, rules),
            "active": batch_input((rows,), jnp.bool_, mesh, rules),
            "tables": batch_input((rows, pages), jnp.int32, mesh, rules), "sampling": sampling}


def mixed_inputs(tokens: int, seqs: int, pages: int, mesh, rules):
    """An abstract mixed (ragged) step: `tokens` flat tokens over `seqs` sequence slots."""
    import jax
    import jax.numpy as jnp
    from engine.runner import MixedBatch
    from engine.sampler import SamplingTensors
    from models.attention import AttentionMetadata
    flat = batch_input((tokens,), jnp.int32, mesh, rules)
    per_seq = batch_input((seqs,), jnp.int32, mesh, rules)
    replicated = jax.NamedSharding(mesh, jax.P())
    metadata = AttentionMetadata(flat, jax.ShapeDtypeStruct((seqs + 1,), jnp.int32, sharding=replicated), per_seq,
                                 batch_input((seqs, pages), jnp.int32, mesh, rules), max_query_len=FLAGS.prefill_chunk)
    sampling = jax.tree.map(lambda x: batch_input(x.shape, x.dtype, mesh, rules), SamplingTensors.build([], [], seqs))
    return MixedBatch(flat, flat, metadata, per_seq, sampling)


def compile_steps(graphdef, state, cache, mesh, rules) -> dict[str, object]:
    """Compiled mixed step (--prefill_rows x --prefill_chunk new tokens over --batch sequence
    slots, attending over --context) and decode (--batch rows, one step)."""
    from engine.runner import jitted_steps
    mixed_fn, decode_fn = jitted_steps(graphdef, "auto", "auto", FLAGS.page_size, 1)
    pages_per_seq = -(-FLAGS.context // FLAGS.page_size)
    batch = mixed_inputs(FLAGS.prefill_rows * FLAGS.prefill_chunk, FLAGS.batch, pages_per_seq, mesh, rules)
    prefill = mixed_fn.lower(state, cache, batch).compile()
    dec = decode_inputs(FLAGS.batch, pages_per_seq, mesh, rules)
    decode = decode_fn.lower(state, cache, dec["fed"], dec["rows"], dec["tables"], dec["active"],
                             dec["sampling"]).compile()
    return {"prefill": prefill, "decode": decode}


def plan() -> dict:
    """The whole report for the flags."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from models import get_preset, param_counts
    from models.registry import abstract_model
    from sharding import RULES, make_mesh
    from sharding.hlo import collectives, memory
    from sharding.rules import place_abstract

    config, dtype, rules = get_preset(FLAGS.model), jnp.dtype(FLAGS.dtype), RULES[FLAGS.rules]
    mesh = make_mesh(FLAGS.data, FLAGS.tensor, FLAGS.expert)
    model = place_abstract(abstract_model(config, dtype, FLAGS.weights), mesh, rules)
    graphdef, state = nnx.split(model)
    shards = math.prod(mesh.shape[a] for a in rules.mesh_axes("pages"))
    num_pages = -(-(FLAGS.batch * -(-FLAGS.context // FLAGS.page_size) + 1) // shards) * shards
    cache = abstract_cache(model, config, num_pages, dtype, mesh, rules)
    counts = param_counts(config)
    report = {
        "model": FLAGS.model, "mesh": dict(mesh.shape), "rules": rules.name, "dtype": dtype.name,
        "weights": FLAGS.weights, "quantization": model.config.quantization,
        "devices": jax.device_count(), "batch": FLAGS.batch, "context": FLAGS.context,
        "prefill": {"rows": FLAGS.prefill_rows, "chunk": FLAGS.prefill_chunk}, "param_count": counts.total,
        "active_param_count": counts.active, "mtp_param_count": counts.mtp,
        "per_device": {"param_bytes": per_device_bytes(state), "kv_cache_bytes": per_device_bytes(cache),
                       "kv_cache_pages": num_pages, "kv_dtype": jax.tree.leaves(cache)[0].dtype.name,
                       "kv_token_bytes": per_device_bytes(cache) // (num_pages // shards * FLAGS.page_size)},
    }
    for name, compiled in compile_steps(graphdef, state, cache, mesh, rules).items():
        report[name] = {**report.get(name, {}), "memory": memory(compiled), "collectives": collectives(compiled.as_text())}
    return _fit(report)


def _fit(report: dict) -> dict:
    """Adds the peak per device (params + cache + the larger step temporary), the verdict, and the
    KV tokens one device could hold beside its weights (before step temporaries, which the CPU's
    XLA reference paths overstate: module doc)."""
    temp = max(report[s]["memory"]["temp_bytes"] for s in ("prefill", "decode"))
    per_device = report["per_device"]
    peak = per_device["param_bytes"] + per_device["kv_cache_bytes"] + temp
    per_device["peak_bytes"] = peak
    per_device["peak_gib"] = round(peak / 2**30, 2)
    per_device["param_gib"] = round(per_device["param_bytes"] / 2**30, 2)
    free = FLAGS.hbm_gib * 2**30 - per_device["param_bytes"]
    per_device["kv_capacity_tokens"] = max(0, int(free // per_device["kv_token_bytes"]))
    report["hbm_gib"] = FLAGS.hbm_gib
    report["fits"] = peak <= FLAGS.hbm_gib * 2**30
    return report


def main(argv: list[str]) -> None:
    del argv
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    print(json.dumps(plan(), indent=2))


if __name__ == "__main__":
    app.run(main)
