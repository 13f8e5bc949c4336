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

--target=h100|h200 compiles for the GPU instead (deviceless, `.venv-gpu`'s jax[cuda13], and
JAX_PLATFORMS=cpu): the same full-size steps on the target's topology with the Pallas kernels the
GPU engine runs, every layer, the memory checked against the target's HBM times --headroom, and
each step's compile seconds. --concurrency/--isl/--osl size the KV pool for a serving workload
(InferenceX 8k1k: --concurrency=64 --isl=8192 --osl=1024; max length ISL + OSL + 256):

  JAX_PLATFORMS=cpu .venv-gpu/bin/python scripts/plan_sharding.py --target=h200 --devices=1 \
      --model=gpt-oss-120b --concurrency=64 --isl=8192 --osl=1024
"""

from __future__ import annotations

import json
import math
import time

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
flags.DEFINE_float("hbm_gib", 80.0, "Device memory to check the plan against (H100 80, H200 141); "
                   "--target uses the target's.")
flags.DEFINE_enum("target", None, ["h100", "h200"], "Compile for this GPU (deviceless) instead of CPU devices.")
flags.DEFINE_integer("concurrency", None, "Sequences in flight (sets --batch) of a serving workload.")
flags.DEFINE_integer("isl", None, "Input tokens per request (with --osl sets --context = isl + osl + 256).")
flags.DEFINE_integer("osl", None, "Output tokens per request.")
flags.DEFINE_float("headroom", 0.9, "Share of the device memory the plan may use to fit.")

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


def mixed_inputs(tokens: int, seqs: int, pages: int, mesh, rules, shards):
    """An abstract mixed (ragged) step: `tokens` flat tokens over `seqs` sequence slots; with DP
    attention (`shards`) in the engine's layout: D segments of tokens / D, each shard's own
    query_start_loc (seqs / D + 1 entries), a chunk of at most tokens / D per sequence."""
    import jax
    import jax.numpy as jnp
    from engine.runner import MixedBatch
    from engine.sampler import SamplingTensors
    from models.attention import AttentionMetadata
    flat = batch_input((tokens,), jnp.int32, mesh, rules)
    per_seq = batch_input((seqs,), jnp.int32, mesh, rules)
    d = 1 if shards is None else shards.size
    offsets = (jax.ShapeDtypeStruct((seqs + 1,), jnp.int32, sharding=jax.NamedSharding(mesh, jax.P())) if d == 1
               else batch_input((seqs + d,), jnp.int32, mesh, rules))
    metadata = AttentionMetadata(flat, offsets, per_seq, batch_input((seqs, pages), jnp.int32, mesh, rules),
                                 max_query_len=min(FLAGS.prefill_chunk, tokens // d), shards=shards)
    sampling = jax.tree.map(lambda x: batch_input(x.shape, x.dtype, mesh, rules), SamplingTensors.build([], [], seqs))
    return MixedBatch(flat, flat, metadata, per_seq, sampling)


def batch_and_context() -> tuple[int, int]:
    """(sequences, tokens of context) the KV pool holds: --concurrency and --isl + --osl + 256 where
    given (a serving workload), else --batch and --context."""
    if (FLAGS.isl is None) != (FLAGS.osl is None):
        raise app.UsageError("--isl and --osl go together")
    batch = FLAGS.concurrency or FLAGS.batch
    context = FLAGS.isl + FLAGS.osl + 256 if FLAGS.isl is not None else FLAGS.context
    return batch, context


def compile_steps(graphdef, state, cache, mesh, rules) -> dict[str, tuple[object, float]]:
    """(compiled, seconds) of the mixed step (--prefill_rows x --prefill_chunk new tokens over the
    batch's sequence slots, attending over its context) and of decode (the batch's rows, one step);
    Pallas kernels with --target, the CPU's choice otherwise."""
    import jax
    from engine.runner import jitted_steps
    from sharding.attention_shards import data_parallel_shards
    impl = "pallas" if FLAGS.target else "auto"
    shards = data_parallel_shards(mesh, rules)
    mixed_fn, decode_fn = jitted_steps(graphdef, impl, impl, FLAGS.page_size, 1, shards=shards)
    batch_size, context = batch_and_context()
    pages_per_seq = -(-context // FLAGS.page_size)
    batch = mixed_inputs(FLAGS.prefill_rows * FLAGS.prefill_chunk, batch_size, pages_per_seq, mesh, rules, shards)
    dec = decode_inputs(batch_size, pages_per_seq, mesh, rules)
    steps = {"prefill": lambda: mixed_fn.lower(state, cache, batch),
             "decode": lambda: decode_fn.lower(state, cache, dec["fed"], dec["rows"], dec["tables"], dec["active"],
                                               dec["sampling"])}
    out = {}
    with jax.set_mesh(mesh):  # deviceless GPU steps need the mesh to place the Pallas calls
        for name, lower in steps.items():
            start = time.perf_counter()
            out[name] = (lower().compile(), time.perf_counter() - start)
    return out


def plan() -> dict:
    """The whole report for the flags."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from models import get_preset, param_counts
    from models.registry import abstract_model
    from sharding import RULES, gpu_target, make_mesh
    from sharding.hlo import collectives, memory
    from sharding.rules import place_abstract

    config, dtype, rules = get_preset(FLAGS.model), jnp.dtype(FLAGS.dtype), RULES[FLAGS.rules]
    target = gpu_target.load(FLAGS.target) if FLAGS.target else None
    mesh = make_mesh(FLAGS.data, FLAGS.tensor, FLAGS.expert,
                     devices=gpu_target.devices(target, FLAGS.devices) if target else None)
    model = place_abstract(abstract_model(config, dtype, FLAGS.weights), mesh, rules)
    graphdef, state = nnx.split(model)
    shards = math.prod(mesh.shape[a] for a in rules.mesh_axes("pages"))
    batch, context = batch_and_context()
    num_pages = -(-(batch * -(-context // FLAGS.page_size) + 1) // shards) * shards
    cache = abstract_cache(model, config, num_pages, dtype, mesh, rules)
    counts = param_counts(config)
    report = {
        "model": FLAGS.model, "mesh": dict(mesh.shape), "rules": rules.name, "dtype": dtype.name,
        "weights": FLAGS.weights, "quantization": model.config.quantization,
        "target": FLAGS.target, "devices": mesh.size, "batch": batch, "context": context,
        "workload": {"concurrency": FLAGS.concurrency, "isl": FLAGS.isl, "osl": FLAGS.osl},
        "prefill": {"rows": FLAGS.prefill_rows, "chunk": FLAGS.prefill_chunk}, "param_count": counts.total,
        "active_param_count": counts.active, "mtp_param_count": counts.mtp,
        "per_device": {"param_bytes": per_device_bytes(state), "kv_cache_bytes": per_device_bytes(cache),
                       "kv_cache_pages": num_pages, "kv_dtype": jax.tree.leaves(cache)[0].dtype.name,
                       "kv_token_bytes": per_device_bytes(cache) // (num_pages // shards * FLAGS.page_size)},
    }
    hbm_gib = target.memory_bytes / 2**30 if target else FLAGS.hbm_gib
    per_device = report["per_device"]
    if per_device["param_bytes"] + per_device["kv_cache_bytes"] <= FLAGS.headroom * hbm_gib * 2**30:
        for name, (compiled, seconds) in compile_steps(graphdef, state, cache, mesh, rules).items():
            report[name] = {"compile_seconds": round(seconds, 1), "memory": memory(compiled),
                            "collectives": collectives(compiled.as_text())}
    # else: weights and KV alone do not fit; compiling (minutes to half an hour) would not change that
    if target and FLAGS.isl is not None:
        model_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
        report["roofline_estimate"] = estimate(config, model_bytes, jax.tree.leaves(cache)[0].dtype.itemsize,
                                               mesh.size, FLAGS.target, batch)
    return _fit(report, hbm_gib)


def estimate(config, model_bytes: int, kv_bytes: int, devices: int, target: str, concurrency: int) -> dict:
    """benchmarks/roofline.serving_estimate of the workload on the target (an estimate from bytes
    and FLOPs, not a measurement): bf16 wgmma peak, FP8's for block-FP8 models; weights at the
    model's packed bytes per parameter."""
    from benchmarks import roofline
    from models import param_counts
    peaks = roofline.GPU_PEAKS[target]
    if config.quantization == "fp8_block":
        peaks = roofline.DevicePeaks(peaks.name, peaks.bandwidth, 2 * peaks.flops)
    out = roofline.serving_estimate(config, FLAGS.isl, FLAGS.osl, concurrency, devices, peaks,
                                    model_bytes / param_counts(config).total, kv_bytes, FLAGS.prefill_chunk)
    return {"note": "roofline estimate from analytic bytes and FLOPs at the target's peaks, not a measurement",
            "peak_tflop_s": peaks.flops / 1e12, "hbm_tb_s": peaks.bandwidth / 1e12,
            **{k: round(v, 3) for k, v in out.items()}}


def _fit(report: dict, hbm_gib: float) -> dict:
    """Adds the peak per device (params + cache + the larger step temporary; none when the steps
    were not compiled because weights and KV alone do not fit), the verdict against --headroom x
    hbm_gib, and the KV tokens one device could hold beside its weights (before step temporaries,
    which the CPU's XLA reference paths overstate: module doc)."""
    compiled = "decode" in report
    temp = max(report[s]["memory"]["temp_bytes"] for s in ("prefill", "decode")) if compiled else 0
    per_device = report["per_device"]
    peak = per_device["param_bytes"] + per_device["kv_cache_bytes"] + temp
    per_device["peak_bytes"] = peak
    per_device["peak_gib"] = round(peak / 2**30, 2)
    per_device["param_gib"] = round(per_device["param_bytes"] / 2**30, 2)
    per_device["kv_gib"] = round(per_device["kv_cache_bytes"] / 2**30, 2)
    per_device["workspace_gib"] = round(temp / 2**30, 2)
    limit = FLAGS.headroom * hbm_gib * 2**30
    per_device["kv_capacity_tokens"] = max(0, int((limit - per_device["param_bytes"]) // per_device["kv_token_bytes"]))
    report.update(hbm_gib=round(hbm_gib, 2), headroom=FLAGS.headroom, fits=peak <= limit)
    if not report["fits"]:
        workspace = f"workspace {per_device['workspace_gib']}" if compiled else "steps not compiled"
        report["does_not_fit"] = (f"{peak / 2**30:.1f} GiB per device needed (weights {per_device['param_gib']}, "
                                  f"KV {per_device['kv_gib']}, {workspace}), "
                                  f"{limit / 2**30:.1f} GiB available ({FLAGS.headroom:.0%} of {hbm_gib:.1f})")
    return report


def main(argv: list[str]) -> None:
    del argv
    import jax
    jax.config.update("jax_platforms", "cpu")
    if not FLAGS.target:  # deviceless GPU devices come from the target's topology instead
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    print(json.dumps(plan(), indent=2))


if __name__ == "__main__":
    app.run(main)
