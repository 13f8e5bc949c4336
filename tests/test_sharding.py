"""Sharding on 8 simulated CPU devices: logits and engine outputs under meshes equal the unsharded
ones, both expert-parallel strategies agree with the unsharded MoE, bad layouts fail clearly.

The suite needs 8 devices, which must be requested before jax starts: in the main pytest process
(1 device) `test_sharded_suite` re-runs this file in a subprocess with XLA_FLAGS set.
"""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import load_model
from models import ModelConfig, get_preset
from models.loaded_model import LoadedModel
from models.registry import random_model
from sharding import EXPERT_DP_RULES, ShardingRules, cache_sharding, make_mesh, shard_model
from sharding import expert_parallel as ep

needs_8 = pytest.mark.eight_devices  # conftest.py runs these only in the 8-device subprocess
MESHES = {"tp2_ep4": dict(tensor=2, expert=4), "dp2_tp2_ep2": dict(data=2, tensor=2, expert=2),
          "ep8": dict(expert=8), "tp8": dict(tensor=8)}
# Shrunk presets, widened where a mesh needs it: 8 query heads for tensor=8 (kv heads stay below
# 8 and are replicated), 8 experts for expert=8.
VARIANTS = {"tiny-llama": dict(num_heads=8), "tiny-gpt-oss": dict(num_heads=8, num_experts=8),
            "tiny-deepseek-v3": dict(num_heads=8, num_kv_heads=8), "tiny-qwen3": dict(num_heads=8),
            "tiny-qwen3-moe": dict(num_heads=8)}


def variant(name: str) -> ModelConfig:
    """The preset with VARIANTS[name]'s sizes (num_experts goes to its MoE sub-config)."""
    sizes = dict(VARIANTS[name])
    experts = sizes.pop("num_experts", None)
    config = dataclasses.replace(get_preset(name), **sizes)
    return config if experts is None else dataclasses.replace(config, moe=dataclasses.replace(config.moe,
                                                                                               num_experts=experts))


@pytest.mark.launches_eight_devices
def test_sharded_suite():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def on_mesh(loaded: LoadedModel, mesh) -> LoadedModel:
    return dataclasses.replace(loaded, model=shard_model(loaded.model, mesh), mesh=mesh)


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    out = {}
    for name in VARIANTS:
        config = variant(name)
        out[name] = LoadedModel(config, random_model(config, jnp.float32), None, jnp.dtype(jnp.float32))
    return out


@needs_8
@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_unsharded(models, name, mesh_name):
    tokens = np.random.default_rng(0).integers(0, 256, (4, 16))
    reference = np.asarray(models[name].forward(tokens))
    sharded = on_mesh(models[name], make_mesh(**MESHES[mesh_name]))
    np.testing.assert_allclose(np.asarray(sharded.forward(tokens)), reference, rtol=0, atol=1e-5)


@needs_8
def test_load_model_places_params_in_shards():
    loaded = load_model("tiny-gpt-oss", mesh=make_mesh(tensor=2, expert=4))
    experts = loaded.model.layers[0].mlp.experts.gate_up_proj[...]
    q = loaded.model.layers[0].self_attn.q_proj.kernel[...]
    assert experts.sharding.spec[0] == "expert" and experts.addressable_shards[0].data.shape[0] == 1
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    tokens = np.arange(32).reshape(2, 16)
    np.testing.assert_allclose(loaded.forward(tokens), load_model("tiny-gpt-oss").forward(tokens), atol=1e-5)


@needs_8
def test_hf_checkpoint_loads_shard_by_shard(monkeypatch):
    """Sharded loading reads each device's slice of a memory-mapped safetensors tensor, never the
    whole tensor (so a host reads only the shards its devices hold), and matches transformers."""
    from models.loading import weights
    from tests.conftest import FIXTURES
    reads = []
    original = weights.read_shard
    monkeypatch.setattr(weights, "read_shard", lambda value, index, dtype: (
        reads.append((value.shape, original(value, index, dtype).shape)), original(value, index, dtype))[1])
    loaded = load_model(FIXTURES / "tiny-llama-hf", mesh=make_mesh(tensor=2, expert=4))
    q_reads = [shard for full, shard in reads if full == (64, 4, 16)]  # q_proj kernels [embed, heads, head_dim]
    assert q_reads and all(shard == (64, 2, 16) for shard in q_reads)
    reference = dict(np.load(FIXTURES / "tiny_llama_reference.npz"))
    logits = np.asarray(loaded.forward(reference["single_ids"]))
    assert np.abs(logits - reference["single_logits"]).max() < 1e-3


def moe_inputs(config, n: int):
    """A MoE layer of `config` and routed tokens: x [N, D], routing weights and ids [N, k]."""
    first_moe_layer = next(i for i in range(config.num_layers) if config.is_moe_layer(i))
    moe = random_model(config, jnp.float32).layers[first_moe_layer].mlp
    x = jax.random.normal(jax.random.key(1), (n, config.hidden_size), jnp.float32)
    weights, ids = moe.router(x)
    return moe, x, weights, ids


@needs_8
@pytest.mark.parametrize("name", ["tiny-gpt-oss", "tiny-deepseek-v3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("mesh_shape", [dict(data=2, expert=4), dict(expert=8), dict(tensor=2, expert=4)])
def test_expert_parallel_strategies_match_unsharded(name, mesh_shape):
    config = variant(name)
    moe, x, weights, ids = moe_inputs(config, 60)  # 60: not a multiple of 8, all_to_all pads
    reference = moe.experts.grouped(x, weights, ids, "xla")
    mesh = make_mesh(**mesh_shape)
    e = moe.experts
    w = ep.ExpertWeights(*(None if p is None else jax.device_put(p[...], jax.NamedSharding(mesh, jax.P("expert")))
                           for p in (e.gate_up_proj, e.down_proj, e.gate_up_proj_bias, e.down_proj_bias)))
    from models.moe import expert_activation
    outs = {s: np.asarray(jax.jit(lambda *a, s=s: ep.moe_experts(
        *a, mesh=mesh, axis="expert", activation=lambda h: expert_activation(h, config.moe), impl="xla",
        strategy=s))(x, weights, ids, w)) for s in ep.STRATEGIES}
    for strategy, out in outs.items():
        np.testing.assert_allclose(out, reference, atol=1e-5, err_msg=strategy)
    np.testing.assert_allclose(outs["replicated"], outs["all_to_all"], atol=1e-5)


@needs_8
@pytest.mark.parametrize("name,mesh_shape", [("tiny-deepseek-v3", dict(expert=8)),
                                             ("tiny-gpt-oss", dict(tensor=2, expert=4))])
def test_expert_parallel_sends_padding_nowhere(name, mesh_shape):
    """Pairs routed to no expert (a step's padding: id E, weight 0) give zeros in both strategies,
    expert biases (gpt-oss) included, and leave the other rows as they were."""
    config = variant(name)
    moe, x, weights, ids = moe_inputs(config, 64)
    padding = (jnp.arange(64) % 5 == 0)[:, None]
    weights, ids = jnp.where(padding, 0.0, weights), jnp.where(padding, config.moe.num_experts, ids)
    mesh = make_mesh(**mesh_shape)
    e = moe.experts
    w = ep.ExpertWeights(*(None if p is None else jax.device_put(p[...], jax.NamedSharding(mesh, jax.P("expert")))
                           for p in (e.gate_up_proj, e.down_proj, e.gate_up_proj_bias, e.down_proj_bias)))
    from models.moe import expert_activation
    reference = np.asarray(moe.experts.grouped(x, weights, ids, "xla"))
    assert np.all(reference[np.asarray(padding[:, 0])] == 0) and np.abs(reference).max() > 1e-3
    for s in ep.STRATEGIES:
        out = jax.jit(lambda *a, s=s: ep.moe_experts(*a, mesh=mesh, axis="expert", impl="xla", strategy=s,
                                                     activation=lambda h: expert_activation(h, config.moe)))
        np.testing.assert_allclose(np.asarray(out(x, weights, ids, w)), reference, atol=1e-5, err_msg=s)


@needs_8
def test_strategy_collectives():
    """replicated combines with an all-reduce, all_to_all with all-to-alls (read from the HLO)."""
    config = variant("tiny-gpt-oss")
    moe, x, weights, ids = moe_inputs(config, 64)
    mesh = make_mesh(expert=8)
    e = moe.experts
    w = ep.ExpertWeights(e.gate_up_proj[...], e.down_proj[...], e.gate_up_proj_bias[...], e.down_proj_bias[...])
    from models.moe import expert_activation

    def hlo(strategy: str) -> str:
        f = jax.jit(lambda *a: ep.moe_experts(*a, mesh=mesh, axis="expert", impl="xla", strategy=strategy,
                                              activation=lambda h: expert_activation(h, config.moe)))
        return f.lower(x, weights, ids, w).compile().as_text()

    assert "all-reduce" in hlo("replicated") and "all-to-all" not in hlo("replicated")
    assert hlo("all_to_all").count("all-to-all") >= 2
    # The dispatch buffers [ep, N_local * k, D] are gathered, never a zeros broadcast scattered into:
    # XLA hoisted the broadcasts of every MoE layer to the start of a step (39 GiB for DeepSeek-R1).
    buffer = rf"\[8,{64 // 8 * config.moe.num_experts_per_tok},{config.hidden_size}\]"
    assert not re.findall(rf"= \w+{buffer}[^\n]*broadcast\(", hlo("all_to_all"))


@needs_8
def test_expert_dp_rules_logits(models):
    """Data-parallel attention over the expert groups (a different rule table, same model code)."""
    tokens = np.random.default_rng(1).integers(0, 256, (8, 16))
    loaded = models["tiny-gpt-oss"]
    mesh = make_mesh(tensor=2, expert=4)
    sharded = dataclasses.replace(loaded, model=shard_model(loaded.model, mesh, EXPERT_DP_RULES), mesh=mesh,
                                  rules=EXPERT_DP_RULES)
    np.testing.assert_allclose(sharded.forward(tokens), loaded.forward(tokens), atol=1e-5)


@needs_8
def test_engine_greedy_identical_under_mesh():
    from engine import LLM, SamplingParams
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 256, rng.integers(1, 60))] for _ in range(5)]
    kwargs = dict(page_size=8, max_model_len=128, max_num_seqs=8, prefill_chunk=32, max_num_batched_tokens=64)
    reference = LLM(load_model("tiny-gpt-oss"), **kwargs).generate(prompts, greedy, use_tqdm=False)
    llm = LLM("tiny-gpt-oss", mesh=make_mesh(tensor=2, expert=4), **kwargs)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert llm.runner.cache[0][0].sharding.spec[0] == "tensor"
    assert llm.attention.decode == llm.attention.mixed == "xla"  # not the C++ kernel, which GSPMD would run replicated


@needs_8
def test_mesh_must_cover_the_devices():
    with pytest.raises(ValueError, match=r"data=3 x tensor=2 x expert=1 = 6 devices, but 8"):
        make_mesh(data=3, tensor=2)


@needs_8
def test_axis_that_does_not_divide_is_named(models):
    with pytest.raises(ValueError, match=r"'q_heads' of size 4 .* tensor=8 .* 8 does not divide 4"):
        load_model("tiny-llama", mesh=make_mesh(tensor=8))
    with pytest.raises(ValueError, match=r"'experts' of size 4 .* expert=8"):
        load_model("tiny-gpt-oss", mesh=make_mesh(expert=8))


@needs_8
def test_kv_cache_heads_over_tensor_or_replicated():
    assert cache_sharding((2, 9, 8, 16), make_mesh(tensor=2, expert=4)).spec == jax.P("tensor", None, None, None)
    assert cache_sharding((2, 9, 8, 16), make_mesh(tensor=8)).spec == jax.P(None, None, None, None)
    with pytest.raises(ValueError, match=r"KV cache: logical axis 'kv_heads' of size 6 .* tensor=4"):
        cache_sharding((6, 9, 8, 16), make_mesh(tensor=4, expert=2))


@needs_8
def test_rules_reject_two_axes_on_one_mesh_axis():
    rules = ShardingRules("bad", {"embed": ("tensor",), "mlp": ("tensor",)})
    with pytest.raises(ValueError, match=r"'embed' and 'mlp' both map to mesh axis 'tensor'"):
        rules.spec(("embed", "mlp"), (8, 8), make_mesh(tensor=8))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        ShardingRules("bad", {"embed": ("model",)})


@needs_8
def test_attention_runs_per_head_shard_for_kernels_gspmd_cannot_split(monkeypatch):
    """Under tensor parallelism a Mosaic kernel (a custom call GSPMD cannot partition) runs inside
    shard_map on each device's KV heads, sinks and pages (sharding/head_parallel.py). The Mosaic
    interpreter cannot run on several devices at once, so the jnp path stands in for the kernel:
    forced through the same shard_map it must equal the unsharded layer, sliding window and sinks
    included (gpt-oss), and gather no pages. (The compile gate shows the gather it removes: 1.7 GB
    per step for Llama-3.3-70B on 2 H200s, docs/gpu.md.)"""
    from models.attention import Attention, AttentionMetadata
    from sharding import head_parallel
    config = variant("tiny-gpt-oss")  # 8 q heads, 2 kv heads: split over tensor=2; window 8, sinks
    mesh = make_mesh(tensor=2, expert=4)
    layer = Attention(config, dtype=jnp.float32, rngs=nnx.Rngs(0), layer=0)
    layer.sinks[...] = jnp.asarray(np.random.default_rng(1).normal(size=config.num_heads), jnp.float32)
    rng = np.random.default_rng(0)
    lens, new, page_size, pages = [5, 0, 12], [2, 0, 12], 8, 7  # a decode-ish tail, an empty row, a prefill
    tables = jnp.asarray([[1, 2], [0, 0], [3, 4]], jnp.int32)
    positions = [p for s, n in enumerate(new) for p in range(lens[s] - n, lens[s])]
    seq_of = [s for s, n in enumerate(new) for _ in range(n)]
    slots = [int(tables[s, p // page_size]) * page_size + p % page_size for s, p in zip(seq_of, positions)]
    metadata = AttentionMetadata(jnp.asarray(slots, jnp.int32), jnp.asarray(np.cumsum([0] + new), jnp.int32),
                                 jnp.asarray(lens, jnp.int32), tables, max_query_len=12)
    x = jnp.asarray(rng.normal(size=(1, len(slots), config.hidden_size)), jnp.float32)
    shape = (config.num_kv_heads, pages, page_size, config.head_dim)
    cache = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    reference, _ = layer(x, jnp.asarray([positions]), cache, metadata, "xla")

    calls = []
    monkeypatch.setattr(head_parallel, "needs_shard_map", lambda impl: calls.append(impl) or True)
    sharded = shard_model(layer, mesh)
    placed = tuple(jax.device_put(c, cache_sharding(shape, mesh)) for c in cache)
    step = jax.jit(lambda x, p, c, m: sharded(x, p, c, m, "xla"))
    out, _ = step(x, jnp.asarray([positions]), placed, metadata)
    assert calls  # the shard_map path ran
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=2e-5)
    hlo = step.lower(x, jnp.asarray([positions]), placed, metadata).compile().as_text()
    gathered = re.findall(r"=\s*(\S+)\s+all-gather", hlo)
    assert not [g for g in gathered if g.startswith(f"f32[{config.num_kv_heads},{pages},")], gathered


# Data-parallel attention beside the TP layout, one flag (the rules) apart (sharding/attention_shards.py).
ATTENTION_LAYOUTS = {
    "deepseek-dp8-ep8": ("tiny-deepseek-v3", dict(expert=8), "expert_dp"),
    "deepseek-tp8": ("tiny-deepseek-v3", dict(tensor=8), "tensor_experts"),
    "gpt-oss-dp4-tp2-ep4": ("tiny-gpt-oss", dict(tensor=2, expert=4), "expert_dp"),
    "gpt-oss-dp8-ep8": ("tiny-gpt-oss", dict(expert=8), "expert_dp"),
}
ENGINE = dict(page_size=8, max_model_len=96, max_num_seqs=16, prefill_chunk=16, max_num_batched_tokens=128,
              num_pages=128)


def uneven_run(llm) -> list:
    """Ten requests of random lengths arriving between steps (three at a time) and finishing
    unevenly, greedy with top-2 logprobs (one with prompt logprobs); their outputs in order."""
    from engine import SamplingParams
    rng = np.random.default_rng(0)
    requests = []
    for i in range(10):
        prompt = [int(t) for t in rng.integers(0, 256, rng.integers(3, 40))]
        params = SamplingParams(temperature=0.0, max_tokens=int(rng.integers(2, 12)), ignore_eos=True, logprobs=2,
                                prompt_logprobs=1 if i == 4 else None)
        requests.append(llm.add_request(prompt, params))
        if i % 3 == 2:
            llm.step()
    while llm.has_unfinished():
        llm.step()
    return [r.output() for r in requests]


@pytest.fixture(scope="module")
def single_device_outputs(models) -> dict[str, list]:
    from engine import LLM
    return {name: uneven_run(LLM(models[name], **ENGINE)) for name in {m for m, _, _ in ATTENTION_LAYOUTS.values()}}


def assert_logprobs_close(got: list, want: list) -> None:
    """Per position {token id: logprob} (None where a prompt's first token has none): same ids, close values."""
    assert [None if e is None else sorted(e) for e in got] == [None if e is None else sorted(e) for e in want]
    values = lambda entries: np.asarray([v for e in entries if e for _, v in sorted(e.items())])  # noqa: E731
    np.testing.assert_allclose(values(got), values(want), atol=2e-5)


@needs_8
@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_attention_layouts_match_one_device(models, single_device_outputs, layout):
    """DP attention (each request on one shard, with its own pages, slots and budget) and TP
    attention give one device's tokens, top-2 logprobs and prompt logprobs to float32 rounding,
    with requests arriving and finishing unevenly across the shards."""
    from engine import LLM
    name, mesh_shape, rules = ATTENTION_LAYOUTS[layout]
    llm = LLM(models[name], mesh=make_mesh(**mesh_shape), rules=rules, **ENGINE)
    outputs = uneven_run(llm)
    for got, want in zip(outputs, single_device_outputs[name]):
        assert got.token_ids == want.token_ids
        assert_logprobs_close(got.logprobs, want.logprobs)
        if want.prompt_logprobs is not None:
            assert_logprobs_close(got.prompt_logprobs, want.prompt_logprobs)
    shards = llm.config.attention_shards
    assert shards == (1 if rules == "tensor_experts" else 8 // mesh_shape.get("tensor", 1))
    assert llm.allocator.num_free == llm.allocator.capacity  # every shard's pages came back
    if shards > 1:
        assert llm.runner.cache[0][0].sharding.spec[1] == "expert"  # each shard holds its own pages


@needs_8
def test_data_parallel_attention_gathers_no_pages(models):
    """The DP decode step runs the cache write and attention inside shard_map: no all-gather of
    the page pool (GSPMD around an unpartitionable kernel gathered 48.7 GB per step for R1)."""
    from engine import LLM
    from engine.runner import padding_decode
    llm = LLM(models["tiny-deepseek-v3"], mesh=make_mesh(expert=8), rules="expert_dp", **ENGINE)
    pool = llm.runner.cache[0][0]
    hlo = llm.runner.decode_fn.lower(llm.runner.state, llm.runner.cache,
                                     *padding_decode(llm.config, 8, 16)).compile().as_text()
    gathered = re.findall(r"=\s*(\S+)\s+all-gather", hlo)
    assert not [g for g in gathered if g.startswith(f"f32[{pool.shape[0]},{pool.shape[1]},")], gathered


@needs_8
def test_data_parallel_attention_refuses_what_it_cannot_do(models):
    from engine import LLM
    with pytest.raises(ValueError, match=r"max_num_seqs=12 does not split into 8 data-parallel attention shards"):
        LLM(models["tiny-deepseek-v3"], mesh=make_mesh(expert=8), rules="expert_dp", **{**ENGINE, "max_num_seqs": 12})
    with pytest.raises(ValueError, match="speculative decoding is not supported with data-parallel attention"):
        LLM(models["tiny-deepseek-v3"], mesh=make_mesh(expert=8), rules="expert_dp",
            speculative_config={"method": "ngram", "num_speculative_tokens": 2}, **ENGINE)
    with pytest.raises(ValueError, match="unknown sharding rules 'dp'"):
        LLM(models["tiny-deepseek-v3"], mesh=make_mesh(expert=8), rules="dp", **ENGINE)
