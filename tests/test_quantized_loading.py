"""Quantized checkpoints served as they ship (weights="native"): packed weights where the checkpoint
has them, the W4A16 / W8A8 numerics against the same checkpoint dequantized at load, the engine on
them, their memory, sharding, and bad inputs named at load. Fixtures: scripts/make_quantized_fixtures.py."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from benchmarks.quantized_accuracy import compare, state_bytes
from models import load_model
from models.layers import PackedWeight
from models.loading.hf_safetensors import SafetensorsCheckpoint
from models.registry import abstract_model
from pallas_kernels import ops
from pallas_kernels import quantized as qz
from tests.conftest import FIXTURES
from tests.test_gpt_oss import engine_greedy_matches_forward

MXFP4, FP8 = FIXTURES / "quantized-gpt-oss-mxfp4-hf", FIXTURES / "quantized-deepseek-v3-fp8-hf"
needs_8 = pytest.mark.eight_devices


@pytest.fixture(scope="module")
def native() -> dict:
    return {path.name: load_model(path) for path in (MXFP4, FP8)}


def packed_paths(model: nnx.Module) -> set[str]:
    """Dotted paths of the model's packed weights."""
    return {".".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, PackedWeight)}


def test_packed_where_the_checkpoint_quantizes(native):
    """gpt-oss: only the experts; DeepSeek-V3: every block projection (MTP's block too) but kv_b_proj,
    which MLA's absorbed path multiplies dense; eh_proj, router, embeddings and head stay dense."""
    gpt_oss = packed_paths(native[MXFP4.name].model)
    assert gpt_oss == {f"layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")}
    deepseek = packed_paths(native[FP8.name].model)
    attention = {f"self_attn.{p}.kernel" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")}
    moe = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} | {f"mlp.shared_experts.{p}.kernel"
                                                                   for p in ("gate_proj", "up_proj", "down_proj")}
    want = ({f"layers.0.{p}" for p in attention | {f"mlp.{q}.kernel" for q in ("gate_proj", "up_proj", "down_proj")}}
            | {f"layers.1.{p}" for p in attention | moe} | {f"mtp.0.block.{p}" for p in attention | moe})
    assert deepseek == want
    w = native[FP8.name].model.layers[1].mlp.experts.gate_up_proj[...]
    assert w.fmt == "fp8_block" and w.values.dtype == jnp.float8_e4m3fn and w.shape == (4, 192, 256)


def test_packed_weights_hold_exactly_the_checkpoint_bytes(native):
    """A bf16 gpt-oss holds its checkpoint's bytes, no more; DeepSeek's packed weights hold their
    FP8 values + scales (kv_b_proj, dequantized, aside); abstract_model counts what loading holds."""
    ckpt = SafetensorsCheckpoint(MXFP4)
    file_bytes = sum(ckpt.get_raw(n).nbytes for n in ckpt.weight_map)
    assert state_bytes(load_model(MXFP4, dtype="bfloat16").model) == file_bytes
    ckpt = SafetensorsCheckpoint(FP8)
    quantized = [n for n in ckpt.weight_map if ckpt.get_raw(n).dtype.itemsize == 1 or n.endswith("_scale_inv")]
    want = sum(ckpt.get_raw(n).nbytes for n in quantized if "kv_b_proj" not in n)
    model = native[FP8.name].model
    held = sum(p.values.nbytes + p.scales.nbytes for p in (n for _, n in nnx.iter_graph(model))
               if isinstance(p, PackedWeight))
    assert held == want
    for loaded in native.values():
        abstract = jax.tree.leaves(nnx.state(abstract_model(loaded.config, jnp.float32), nnx.Param))
        assert sum(math.prod(x.shape) * x.dtype.itemsize for x in abstract) == state_bytes(loaded.model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_w4a16_matches_dequantized_at_load(dtype):
    """Exact weights (e2m1 x 2**e is exact in bf16), unquantized activations: only accumulation order
    may differ (none on the XLA path)."""
    r = compare(MXFP4, dtype)
    assert r["numerics"] == "W4A16" and r["max_abs_dlogit"] <= 1e-5 * r["logit_std"] and r["greedy_agreement"] == 1
    assert r["native_param_bytes"] < r["dequantized_param_bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_w8a8_close_to_dequantized_at_load(dtype):
    """Activations quantized per token in 128-groups (as DeepSeek trains and serves) against the same
    FP8 weights with unquantized activations: ~2.6% per GEMM (docs/quantization.md), which this random fixture's
    two-of-four routing turns into a few flipped expert choices (the max)."""
    r = compare(FP8, dtype)
    assert r["numerics"] == "W8A8"
    assert r["mean_abs_dlogit"] < 0.1 * r["logit_std"] and r["greedy_agreement"] >= 0.85


def test_w8a8_matmul_is_the_block_scaled_gemm():
    """ops.quantized_matmul = sum over 128-K blocks of (x_q . w_q) * s_x * s_w (DeepGEMM's promotion),
    in float64 from the same quantized operands; partial blocks along M, N and K."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 300)), jnp.float32)
    w = qz.quantize(jnp.asarray(rng.normal(size=(300, 200)) * 0.05), "fp8_block")
    xq, sx = (np.asarray(a, np.float64) for a in qz.quantize_activations_fp8(x))
    wq, sw = np.asarray(w.values, np.float64), np.asarray(w.scales, np.float64)  # [N, K], [2, 3]
    want = sum((xq[:, kb * 128:(kb + 1) * 128] @ wq[:, kb * 128:(kb + 1) * 128].T) * sx[:, kb:kb + 1]
               * np.repeat(sw[:, kb], 128)[None, :200] for kb in range(3))
    np.testing.assert_allclose(np.asarray(ops.quantized_matmul(x, w, impl="xla")), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8_block"])
def test_grouped_matmul_takes_packed_experts(fmt):
    """A QuantizedWeight rhs, with a group offset (expert parallelism): the dense grouped GEMM of the
    operands dense_operands gives (x as is for mxfp4, per-token FP8 activations for fp8_block)."""
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.normal(size=(12, 64)), jnp.float32)
    rhs = qz.quantize(jnp.asarray(rng.normal(size=(3, 64, 160)) * 0.1), fmt)
    sizes = jnp.asarray([2, 4, 3, 1, 2], jnp.int32)
    got = ops.grouped_matmul(lhs, rhs, sizes, group_offset=1, impl="xla")
    a = lhs if fmt == "mxfp4" else qz.dequantize_activations_fp8(*qz.quantize_activations_fp8(lhs))
    want = np.zeros((12, 160), np.float32)
    for g, (start, stop) in enumerate([(2, 6), (6, 9), (9, 10)]):
        want[start:stop] = np.asarray(a[start:stop]) @ np.asarray(rhs.dequantize(jnp.float32)[g])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_moe_dense_reference_agrees_on_packed_experts(native):
    """The MoE's every-expert reference backend runs the packed experts with the grouped path's numerics."""
    moe = native[FP8.name].model.layers[1].mlp
    x = jax.random.normal(jax.random.key(2), (1, 9, 192), jnp.float32)
    np.testing.assert_allclose(np.asarray(moe(x, "dense")), np.asarray(moe(x, "xla")), rtol=2e-5, atol=2e-5)


def test_engine_serves_mxfp4_natively(native):
    """LLM.generate on the packed model (paged cache, chunked prefill, batched decode) = greedy of its
    no-cache forward."""
    engine_greedy_matches_forward(native[MXFP4.name], (13, 21, 5), max_tokens=8)


def test_engine_serves_fp8_natively(native):
    """LLM.generate on the packed FP8 model picks its no-cache forward's greedy token, or one within
    W8A8's rounding of it: the paged path (absorbed MLA) rounds differently from the forward's
    (expanded), and an activation on an e4m3 rounding boundary can go either way (up to ~1 logit)."""
    from engine import LLM, SamplingParams
    loaded = native[FP8.name]
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (13, 21, 5)]
    llm = LLM(loaded, page_size=4, num_pages=64, max_num_seqs=4, prefill_chunk=8, max_num_batched_tokens=16,
              max_model_len=64, attention_impl="xla")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        logits = np.asarray(loaded.forward(np.asarray([prompt + out.token_ids[:-1]])))[0, len(prompt) - 1:]
        chosen = np.take_along_axis(logits, np.asarray(out.token_ids)[:, None], axis=1)[:, 0]
        assert (logits.max(-1) - chosen <= 1.0).all() and (logits.argmax(-1) == out.token_ids).mean() >= 0.75


def test_llm_weights_option():
    """weights=<dtype> dequantizes at load, rounded to that dtype (then held in the model's)."""
    from engine import LLM
    llm = LLM(str(FP8), weights="bf16", max_model_len=64, num_pages=32, max_num_seqs=2)
    assert llm.model.config.quantization is None and not packed_paths(llm.model.model)
    assert llm.model.dtype == jnp.float32
    for weights, rounded in (("bf16", True), ("float32", False)):
        kernel = np.asarray(load_model(FP8, weights=weights).model.layers[0].self_attn.q_a_proj.kernel[...])
        assert (kernel.astype(jnp.bfloat16).astype(np.float32) == kernel).all() == rounded
    with pytest.raises(ValueError, match=r"weights='int4': expected 'native' \(serve a quantized checkpoint packed"):
        load_model(MXFP4, weights="int4")


def fp8_projections(tensors: dict, config: dict) -> None:
    """Every block projection to FP8 e4m3 + weight_scale_inv per 128 x 128 block, as Qwen3's FP8
    releases ship (embeddings, norms and the head stay as they are)."""
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    for name in [n for n in tensors if re.search(r"layers\.\d+\..*_proj\.weight$", n)]:
        w = qz.quantize(jnp.asarray(tensors[name].T, jnp.float32), "fp8_block")
        tensors[name], tensors[f"{name}_scale_inv"] = np.asarray(w.values), np.asarray(w.scales)


def test_qwen3_fp8_serves_natively(tmp_path):
    """Qwen3 FP8 goes the same way (GQA attention, dense MLP): packed q/k/v/o and MLP, W8A8 close to
    the dequantized model."""
    path = rewrite(tmp_path, FIXTURES / "tiny-qwen3-hf", fp8_projections)
    loaded = load_model(path)
    assert packed_paths(loaded.model) == {f"layers.{i}.{p}.kernel" for i in range(2) for p in
                                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    r = compare(path, "float32")
    assert r["mean_abs_dlogit"] < 0.1 * r["logit_std"] and r["greedy_agreement"] >= 0.85


def test_orbax_keeps_packed_weights(tmp_path, native):
    """An orbax dir of a native model restores packed (uint8 / e4m3 leaves) and gives the same logits."""
    from models.loading import orbax_io
    loaded = native[FP8.name]
    orbax_io.save(tmp_path / "orbax", loaded.config, loaded.model, loaded.tokenizer)
    restored = load_model(tmp_path / "orbax")
    assert packed_paths(restored.model) == packed_paths(loaded.model)
    tokens = np.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(restored.forward(tokens)), np.asarray(loaded.forward(tokens)))
    with pytest.raises(ValueError, match="holds fp8_block weights packed; weights='bf16' dequantizes HF checkpoints"):
        load_model(tmp_path / "orbax", weights="bf16")


def rewrite(tmp_path: Path, src: Path, edit) -> Path:
    """A copy of a fixture whose tensors (raw dtypes) and config.json `edit(tensors, config)` changes."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    ckpt = SafetensorsCheckpoint(src)
    tensors = {n: np.ascontiguousarray(ckpt.get_raw(n)) for n in ckpt.weight_map}
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def set_scales(name: str, value):
    def edit(tensors, config):
        tensors[name] = value(tensors[name])
    return edit


GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"
Q_A = "model.layers.0.self_attn.q_a_proj.weight"
BAD_INPUTS = {
    "mxfp4 scales of the wrong shape": (MXFP4, set_scales(f"{GATE_UP}_scales", lambda s: s[..., :2]),
                                        rf"{GATE_UP}_blocks/_scales: mxfp4 scales have shape \(4, 128, 2\), but values "
                                        r"\(4, 128, 48\) need \(4, 128, 3\)"),
    "fp8 scales of the wrong dtype": (FP8, set_scales(f"{Q_A}_scale_inv", lambda s: s.astype(np.float16)),
                                      rf"{Q_A}/_scale_inv: fp8_block values/scales must be \['float8_e4m3fn', "
                                      r"'float32'\], got \['float8_e4m3fn', 'float16'\]"),
    "mxfp4 blocks not of 32 values": (MXFP4, set_scales(f"{GATE_UP}_blocks", lambda b: b.reshape(4, 128, 6, 8)),
                                      rf"{GATE_UP}_blocks/_scales: mxfp4 blocks have shape \(4, 128, 6, 8\), expected"),
    "NaN e8m0 scale": (MXFP4, set_scales(f"{GATE_UP}_scales", lambda s: np.where(np.arange(3) == 2, 255, s)),
                       rf"{GATE_UP}_blocks/_scales: 512 invalid mxfp4 scale\(s\), the first at \(0, 0, 2\)"),
    "unknown fp8 fmt": (FP8, lambda t, c: c["quantization_config"].update(fmt="e5m2"),
                        r"config.json: unsupported fp8 format 'e5m2' in quantization_config"),
    "unknown quant_method": (FP8, lambda t, c: c["quantization_config"].update(quant_method="gptq"),
                             r"config.json: unknown quant_method 'gptq' in quantization_config"),
    "fp8 blocks other than 128": (FP8, lambda t, c: c["quantization_config"].update(weight_block_size=[64, 64]),
                                  r"weight_block_size \[64, 64\]: weights='native' serves 128 x 128 blocks"),
    "fp8 experts of 136 rows": (FP8, lambda t, c: experts_of_width(t, c, 136),
                                r"model.layers.1.mlp.experts.0.gate_proj.weight: fp8_block weights of 136 output "
                                r"rows cannot be fused side by side"),
}


def experts_of_width(tensors: dict, config: dict, width: int) -> None:
    """Every expert (routed and shared) `width` wide, FP8 in 128 x 128 blocks (the last one partial)."""
    config["moe_intermediate_size"] = width
    rng = np.random.default_rng(5)
    for name in [n for n in tensors if re.search(r"mlp\.(experts\.\d+|shared_experts)\.\w+_proj\.weight$", n)]:
        n, k = (192, width) if "down_proj" in name else (width, 192)
        w = qz.quantize(jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32), "fp8_block")
        tensors[name], tensors[f"{name}_scale_inv"] = np.asarray(w.values), np.asarray(w.scales)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_at_load(tmp_path, case):
    src, edit, message = BAD_INPUTS[case]
    path = rewrite(tmp_path, src, edit)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_fp8_experts_of_any_width_dequantize_at_load(tmp_path):
    """The width native serving refuses (fused rows inside a scale block) loads with weights=<dtype>."""
    path = rewrite(tmp_path, FP8, lambda t, c: experts_of_width(t, c, 136))
    loaded = load_model(path, weights="float32")
    assert np.isfinite(np.asarray(loaded.forward(np.arange(12)[None]))).all()


# ---- 8 simulated devices (a subprocess: jax fixes the device count at start-up) -----------------


@pytest.mark.launches_eight_devices
def test_sharded_cases():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "eight_devices",
                             __file__], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@needs_8
@pytest.mark.parametrize("path,mesh", [(MXFP4, dict(expert=4, data=2)), (FP8, dict(expert=4, data=2))],
                         ids=["mxfp4-ep4", "fp8-ep4"])
def test_expert_parallel_packed_matches_unsharded(native, path, mesh):
    """Packed experts split over the expert axis go through shard_map as QuantizedWeight pytrees."""
    from sharding import make_mesh
    tokens = np.random.default_rng(3).integers(0, 256, (2, 16))
    sharded = load_model(path, mesh=make_mesh(**mesh))
    experts = sharded.model.layers[1].mlp.experts.gate_up_proj
    assert experts.values.get_metadata()["placement"].spec[0] == "expert"
    np.testing.assert_allclose(np.asarray(sharded.forward(tokens)), np.asarray(native[path.name].forward(tokens)),
                               rtol=1e-5, atol=1e-5)


@needs_8
def test_a_mesh_splitting_scale_blocks_is_named():
    """The dense MLP's 320-wide down_proj input is three 128-blocks: two tensor shards cannot split
    them (spec() on the scales); 200 rows are two blocks, but 100 rows a shard would end inside one
    (check_scale_blocks)."""
    from models.layers import Linear
    from sharding import make_mesh
    from sharding.rules import param_shardings
    with pytest.raises(ValueError, match=r"parameter layers.0.mlp.down_proj.kernel.scales: logical axis "
                                         r"'mlp' of size 3 cannot be sharded over mesh axis tensor=2"):
        load_model(FP8, mesh=make_mesh(tensor=2, data=4))
    linear = nnx.eval_shape(lambda: Linear((256,), (200,), ("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0),
                                           fmt="fp8_block"))
    with pytest.raises(ValueError, match=r"parameter kernel.values: 2 shards of axis 0 \(200 stored values, 100 per "
                                         r"shard\) would split its 128-value scale blocks"):
        param_shardings(linear, make_mesh(tensor=2, data=4))


@needs_8
def test_packed_k_proj_gives_the_kv_head_split():
    """Paged attention per head shard reads the KV heads' split off k_proj: on a packed kernel
    ([kv_heads * head_dim, embed]) that is its first axis."""
    from models.layers import Linear
    from sharding import head_parallel, make_mesh
    from sharding.rules import place_abstract
    mesh = make_mesh(tensor=2, data=4)
    k_proj = place_abstract(nnx.eval_shape(lambda: Linear((256,), (2, 128), ("embed", "kv_heads", "head_dim"),
                                                          dtype=jnp.float32, rngs=nnx.Rngs(0), fmt="fp8_block")),
                            mesh)
    assert head_parallel.kv_heads_split(k_proj.kernel) == (mesh, "tensor")
