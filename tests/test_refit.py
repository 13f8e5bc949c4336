"""RL hooks (issue #33, item 5): weight updates in place (a params pytree, an HF or orbax directory),
sleep / wake_up, and the server's /update_weights, /sleep, /wake_up and return_token_ids.

An engine refit to weights B must give bitwise what a fresh engine on B gives (greedy and seeded
sampling, token ids and logprobs) without compiling anything; A and B give different tokens, so a
refit that did nothing fails. Every engine runs the tiny-llama HF fixture's graph (nnx.clone: its
steps compile once); weights B are its parameters (pytree tests) or its checkpoint's tensors (HF
and orbax directories) scaled by fixed random factors, and "a fresh engine on B" runs what
load_model gives for B.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import shutil
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams
from engine.request import Status
from engine.sleep_mode import EngineAsleepError
from engine_helpers import tiny_llm
from models import LoadedModel, load_model
from models.loading import orbax_io
from server.app import create_app, serving
from server.engine_loop import EngineLoop

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-llama-hf"
PROMPTS = [list(range(3, 40)), [5, 6, 7], [9, 200, 31, 4, 4, 17]]  # the first fills 4 full pages
PARAMS = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0),
          SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=11, ignore_eos=True, logprobs=0)]
KEY = "secret"


def params_of(model: LoadedModel) -> dict:
    """The model's parameters as a nested dict of host arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.model)))


def model_with(base: LoadedModel, params: dict) -> LoadedModel:
    """`base`'s graph (so engines on it share compiled steps) holding its own device copies of `params`
    (a refit sets a model's Variables in place, and sleep deletes their buffers)."""
    model = nnx.clone(base.model)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.array, params))
    nnx.update(model, state)
    return dataclasses.replace(base, model=model)


def engine(model: LoadedModel) -> LLM:
    """A tiny engine whose prefix cache stays on (the refit must empty it)."""
    return tiny_llm(model, attention_impl="xla")


def outputs(llm: LLM) -> list[tuple[list[int], list]]:
    """Token ids and logprobs of PROMPTS under greedy and seeded sampling."""
    return [(o.token_ids, o.logprobs) for p in PARAMS for o in llm.generate(PROMPTS, p, use_tqdm=False)]


def tokens(outs: list[tuple[list[int], list]]) -> list[list[int]]:
    return [t for t, _ in outs]


@pytest.fixture(scope="module")
def base() -> LoadedModel:
    """The HF fixture: every engine of this file runs its graph (compiled once)."""
    return load_model(FIXTURE)


@pytest.fixture(scope="module")
def weights(base) -> dict[str, dict]:
    """Weights A (the fixture's) and B (A's scaled by a fixed random factor in [0.7, 1.3])."""
    a, rng = params_of(base), np.random.default_rng(0)
    return {"a": a, "b": jax.tree.map(lambda x: (x * rng.uniform(0.7, 1.3, x.shape)).astype(x.dtype), a)}


@pytest.fixture(scope="module")
def want(base, weights) -> dict[str, list]:
    """What fresh engines on A and on B give."""
    return {name: outputs(engine(model_with(base, w))) for name, w in weights.items()}


@pytest.fixture(scope="module")
def b_dir(tmp_path_factory) -> Path:
    """The HF fixture with every tensor scaled by a fixed random factor in [0.7, 1.3]."""
    out = tmp_path_factory.mktemp("weights") / "tiny-llama-b"
    shutil.copytree(FIXTURE, out)
    rng = np.random.default_rng(0)
    tensors = {name: (t * rng.uniform(0.7, 1.3, t.shape)).astype(t.dtype)
               for name, t in sorted(load_file(str(FIXTURE / "model.safetensors")).items())}
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_refit_from_a_pytree_matches_a_fresh_engine_and_compiles_nothing(base, weights, want):
    llm = engine(model_with(base, weights["a"]))
    assert outputs(llm) == want["a"]  # also compiles every shape the comparison runs
    assert tokens(want["a"]) != tokens(want["b"])
    with count_compilations() as compiles:
        llm.update_weights(weights["b"])  # a nested dict of host arrays
        assert outputs(llm) == want["b"]
        llm.update_weights(nnx.state(model_with(base, weights["a"]).model))  # an nnx.State of device arrays
        assert outputs(llm) == want["a"]
    assert compiles[0] == 0


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_refit_from_a_checkpoint_dir_matches_a_fresh_engine(fmt, base, b_dir, tmp_path):
    fresh_b = load_model(b_dir)  # what a fresh engine on B loads (run on base's graph: compiled once)
    want_b = outputs(engine(model_with(base, params_of(fresh_b))))
    source = b_dir
    if fmt == "orbax":
        source = tmp_path / "orbax"
        orbax_io.save(source, fresh_b.config, fresh_b.model, None)
    llm = engine(model_with(base, params_of(base)))
    assert tokens(outputs(llm)) != tokens(want_b)
    with count_compilations() as compiles:
        llm.update_weights(source)
        assert outputs(llm) == want_b
    assert compiles[0] == 0


def test_refit_empties_the_prefix_cache(base, weights, want):
    llm = engine(model_with(base, weights["a"]))
    llm.generate(PROMPTS[:1], PARAMS[0], use_tqdm=False)
    hits = llm.prefix_cache.stats.hits
    llm.generate(PROMPTS[:1], PARAMS[0], use_tqdm=False)
    assert llm.prefix_cache.stats.hits > hits  # without a refit the repeated prompt hits
    llm.update_weights(weights["b"])
    before = dataclasses.replace(llm.prefix_cache.stats)
    out = llm.generate(PROMPTS[:1], PARAMS[0], use_tqdm=False)[0]
    assert llm.prefix_cache.stats.since(before).hits == 0
    assert out.token_ids == want["b"][0][0]  # alone rather than in want's batch: the logprobs may round apart


def mismatched(params: dict, path: tuple, change) -> dict:
    """A copy of `params` with the leaf at `path` changed."""
    copy = jax.tree.map(np.array, params)
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = change(node[path[-1]])
    return copy


def close(got: list, want: list) -> bool:
    """The same tokens, logprobs within 1e-5 (prefix-cache hits change a prompt's chunking)."""
    return tokens(got) == tokens(want) and all(
        np.allclose([list(d.values()) for d in g], [list(d.values()) for d in w], atol=1e-5)
        for (_, g), (_, w) in zip(got, want))


def test_a_mismatch_names_the_first_parameter_and_changes_nothing(base, weights, want, tmp_path):
    llm = engine(model_with(base, weights["a"]))
    assert outputs(llm) == want["a"]
    b = weights["b"]
    first = ("layers", 0, "mlp", "down_proj", "kernel")
    later = ("layers", 1, "self_attn", "q_proj", "kernel")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.kernel has shape \(128, 3\), the served "
                                         r"model's is \(128, 64\)"):
        llm.update_weights(mismatched(mismatched(b, later, lambda x: x[:1]), first, lambda x: x[:, :3]))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.kernel has dtype bfloat16, the served "
                                         r"model's is float32"):
        llm.update_weights(mismatched(b, later, lambda x: x.astype(jnp.bfloat16)))
    missing = jax.tree.map(np.array, b)
    del missing["layers"][1]["post_attention_layernorm"]
    with pytest.raises(ValueError, match=r"layers\.1\.post_attention_layernorm\.weight is missing"):
        llm.update_weights(missing)
    with pytest.raises(ValueError, match=r"a parameter extra\.kernel the served model lacks"):
        llm.update_weights({**b, "extra": {"kernel": np.zeros(3, np.float32)}})
    with pytest.raises(ValueError, match="does not exist"):
        llm.update_weights(tmp_path / "nowhere")
    other = tmp_path / "other-eps"
    shutil.copytree(FIXTURE, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(ValueError, match="the checkpoint's config has rms_norm_eps=1e-06"):
        llm.update_weights(other)  # the same shapes, another model
    assert close(outputs(llm), want["a"])  # still serving A


def started(llm: LLM) -> list:
    """Two requests admitted and two steps run: both mid-generation."""
    requests = [llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
                for p in PROMPTS[1:]]
    for _ in range(2):
        llm.step()
    assert all(r.status is not Status.FINISHED and r.output_token_ids for r in requests)
    return requests


def test_running_abort_aborts_and_finish_completes_on_the_old_weights(base, weights, want):
    full_on_a = engine(model_with(base, weights["a"])).generate(
        PROMPTS[1:], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    llm = engine(model_with(base, weights["a"]))
    requests = started(llm)
    llm.update_weights(weights["b"], running="finish")
    assert [r.finish_reason for r in requests] == ["length", "length"]
    assert [r.output_token_ids for r in requests] == [o.token_ids for o in full_on_a]  # all of it on A
    assert outputs(llm) == want["b"]

    requests = started(llm)
    llm.update_weights(weights["a"], running="abort")
    assert [r.finish_reason for r in requests] == ["abort", "abort"]
    assert all(len(r.output_token_ids) < 20 for r in requests)
    assert not llm.has_unfinished() and llm.allocator.num_free == llm.allocator.capacity
    assert outputs(llm) == want["a"]
    with pytest.raises(ValueError, match="running must be"):
        llm.update_weights(weights["b"], running="pause")


def test_sleep_and_wake_up_give_the_same_outputs_without_compiling(base, weights, want):
    llm = engine(model_with(base, weights["a"]))
    assert outputs(llm) == want["a"]
    params = jax.tree.leaves(nnx.state(llm.model.model))
    cache = jax.tree.leaves(llm.runner.cache)
    with count_compilations() as compiles:
        report = llm.sleep()
        assert llm.is_sleeping and all(a.is_deleted() for a in params + cache)
        assert report.weights_bytes == sum(a.nbytes for a in params) > 0
        assert report.kv_cache_bytes == sum(a.nbytes for a in cache) > 0
        with pytest.raises(EngineAsleepError, match="asleep"):
            llm.generate(PROMPTS, PARAMS[0], use_tqdm=False)
        with pytest.raises(EngineAsleepError, match="asleep"):
            llm.update_weights(weights["b"])
        llm.wake_up()
        assert outputs(llm) == want["a"]
    assert compiles[0] == 0
    llm.sleep(level=2)  # the weights discarded: wake_up gives zeros (a fill program per shape compiles)
    llm.wake_up()
    assert not any(np.any(np.asarray(a)) for a in jax.tree.leaves(nnx.state(llm.model.model)))
    with count_compilations() as compiles:
        llm.update_weights(weights["b"])
        assert outputs(llm) == want["b"]
    assert compiles[0] == 0
    with pytest.raises(RuntimeError, match="not asleep"):
        llm.wake_up()
    with pytest.raises(ValueError, match="sleep level"):
        llm.sleep(level=3)


# ---- the server -------------------------------------------------------------------------------


@pytest.fixture
def server(request, base):
    """A served engine on the HF fixture: (url, headers, its LLM); request.param: the app's keyword arguments."""
    loop = EngineLoop(engine(model_with(base, params_of(base)))).start()
    kwargs = request.param
    app = create_app(loop, model_name="tiny", **kwargs)
    try:
        with serving(app) as url:
            yield url, {"Authorization": f"Bearer {KEY}"} if kwargs.get("api_key") else {}, loop.llm
    finally:
        loop.stop()


def complete(url: str, headers: dict, **extra) -> httpx.Response:
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("server", [{"api_key": KEY}], indirect=True)
def test_server_updates_weights_behind_the_key(server, base, b_dir):
    url, headers, _ = server
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    on_b = engine(model_with(base, params_of(load_model(b_dir)))).generate(PROMPTS[:1], greedy, use_tqdm=False)[0]
    on_a = complete(url, headers, return_token_ids=True).json()["choices"][0]
    assert on_a["token_ids"] != on_b.token_ids and on_a["prompt_token_ids"] == PROMPTS[0]
    post = lambda route, **kw: httpx.post(f"{url}{route}", timeout=60, **kw)  # noqa: E731
    assert post("/update_weights", json={"path": str(b_dir)}).status_code == 401
    bad = post("/update_weights", json={"path": str(b_dir / "nowhere")}, headers=headers)
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    assert complete(url, headers, return_token_ids=True).json()["choices"][0]["token_ids"] == on_a["token_ids"]
    done = post("/update_weights", json={"path": str(b_dir), "running": "abort"}, headers=headers)
    assert done.status_code == 200 and done.json()["time_s"] > 0
    assert complete(url, headers, return_token_ids=True).json()["choices"][0]["token_ids"] == on_b.token_ids

    assert post("/sleep?level=1", headers=headers).json()["freed_bytes"] > 0
    assert httpx.get(f"{url}/is_sleeping", headers=headers).json()["is_sleeping"] is True
    assert complete(url, headers).status_code == 503
    assert post("/wake_up", headers=headers).status_code == 200
    streamed = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60, json={
        "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True,
        "return_token_ids": True}).text
    chunks = [json.loads(line[6:])["choices"][0] for line in streamed.splitlines()
              if line.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == PROMPTS[0] and "prompt_token_ids" not in chunks[-1]
    assert [t for c in chunks for t in c["token_ids"]] == on_b.token_ids


@pytest.mark.parametrize("server, enabled", [({}, False), ({"enable_weight_updates": True}, True)],
                         indirect=["server"])
def test_server_without_a_key_needs_enable_weight_updates(server, enabled, b_dir):
    url, headers, _ = server
    response = httpx.post(f"{url}/update_weights", json={"path": str(b_dir)}, timeout=60)
    assert response.status_code == (200 if enabled else 403), response.text
    mismatch = httpx.post(f"{url}/update_weights", json={"path": str(FIXTURE.parent / "tiny-qwen3-hf")}, timeout=60)
    assert mismatch.status_code != 400 or "the checkpoint's config has" in mismatch.json()["error"]["message"]
    assert mismatch.status_code == (400 if enabled else 403)
    assert complete(url, headers).status_code == 200


@pytest.mark.parametrize("server", [{"enable_weight_updates": True}], indirect=True)
def test_server_update_with_running_finish_lets_a_stream_complete_on_the_old_weights(server, base, b_dir,
                                                                                     monkeypatch):
    url, headers, llm = server
    step = llm.step
    monkeypatch.setattr(llm, "step", lambda: (time.sleep(0.02), step())[1])  # the update arrives mid-stream
    body = {"prompt": PROMPTS[1], "max_tokens": 90, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    greedy = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    on_a = engine(model_with(base, params_of(base))).generate(PROMPTS[1:2], greedy, use_tqdm=False)[0].token_ids
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        chunks = [json.loads(next(line for line in lines if line.startswith("data: {"))[6:])["choices"][0]]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # queued while the stream runs
            update = pool.submit(httpx.post, f"{url}/update_weights", json={"path": str(b_dir), "running": "finish"},
                                 timeout=60)
            chunks += [json.loads(line[6:])["choices"][0] for line in lines if line.startswith("data: {")]
            assert update.result().status_code == 200
    assert [t for c in chunks for t in c["token_ids"]] == on_a and chunks[-1]["finish_reason"] == "length"
    greedy_b = engine(model_with(base, params_of(load_model(b_dir)))).generate(PROMPTS[:1], SamplingParams(
        temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].token_ids
    assert complete(url, headers, return_token_ids=True).json()["choices"][0]["token_ids"] == greedy_b
