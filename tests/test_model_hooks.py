"""Research hooks (models/hooks.py, engine/model_hooks.py): captured residual streams and routed
experts against transformers (tests/fixtures/hooks_reference.npz, scripts/make_reference.py
--only=hooks), interventions against the same edits done by transformers forward hooks, captures
independent of chunking, batching, preemption and n > 1, the prefix cache, expert counts, bad
input, and no recompilation in steady state."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks.compilations import count_compilations
from engine import SamplingParams
from engine.expert_counts import ExpertCounts
from engine.hook_params import Intervention
from engine.testing import random_prompts
from models import load_model
from server.metrics import ServerMetrics, parse
from tests.engine_helpers import tiny_llm

FIXTURES = Path(__file__).parent / "fixtures"
REF = dict(np.load(FIXTURES / "hooks_reference.npz"))
LAYERS = (0, 1, 2)  # every entry of the 2-layer fixtures: embeddings, after layer 1, final norm
PROMPT_LEN, NEW = 8, 6
ROWS = PROMPT_LEN + NEW - 1  # the last generated token is never fed back
GREEDY = dict(temperature=0.0, max_tokens=NEW, ignore_eos=True)
EDITS = (Intervention(1, REF["steer_vector"], scale=4.0, start=3),  # make_reference's STEER_*
         Intervention(0, REF["patch_values"], start=2, end=4, mode="replace"))  # and PATCH_*


@pytest.fixture(scope="module")
def llama():
    return load_model(str(FIXTURES / "tiny-llama-hf"))


@pytest.fixture(scope="module")
def moe():
    return load_model(str(FIXTURES / "tiny-qwen3-moe-hf"))


def _prompt(name: str) -> list[int]:
    return [int(t) for t in REF[f"{name}_ids"][:PROMPT_LEN]]


def _stacked(out) -> np.ndarray:
    """A captured output's hidden states [layers, rows, D]."""
    return np.stack([out.hidden_states[layer] for layer in LAYERS])


@pytest.mark.parametrize("name", ["llama", "moe"])
def test_captures_match_transformers_output_hidden_states(name, llama, moe):
    out = tiny_llm(llama if name == "llama" else moe).generate(
        [_prompt(name)], SamplingParams(**GREEDY, capture_layers=LAYERS), use_tqdm=False)[0]
    assert out.token_ids == list(REF[f"{name}_ids"][PROMPT_LEN:])
    assert sorted(out.hidden_states) == list(LAYERS)
    np.testing.assert_allclose(_stacked(out), REF[f"{name}_hidden"][:, :ROWS], rtol=1e-4, atol=1e-4)


def test_routed_experts_match_transformers_router_and_are_counted(moe):
    llm = tiny_llm(moe)
    out = llm.generate([_prompt("moe")], SamplingParams(**GREEDY, return_routed_experts=True), use_tqdm=False)[0]
    assert out.hidden_states is None and out.routed_experts.shape == (ROWS, 1, 2)
    np.testing.assert_array_equal(out.routed_experts, REF["moe_routed"][:ROWS])
    expected = np.bincount(REF["moe_routed"][:ROWS, 0].reshape(-1), minlength=8)[None]
    np.testing.assert_array_equal(llm.expert_counts(), expected)
    np.testing.assert_array_equal(llm.expert_counts(window=True), expected)


def test_interventions_match_transformers_forward_hooks(llama):
    out = tiny_llm(llama).generate([_prompt("llama")], SamplingParams(**GREEDY, capture_layers=LAYERS,
                                                                      interventions=EDITS), use_tqdm=False)[0]
    assert out.token_ids == list(REF["edited_ids"][PROMPT_LEN:]) != list(REF["llama_ids"][PROMPT_LEN:])
    np.testing.assert_allclose(_stacked(out), REF["edited_hidden"][:, :ROWS], rtol=1e-4, atol=1e-4)


def test_captures_independent_of_chunks_neighbours_and_preemption(llama):
    prompt = random_prompts(5, 1, 256, 40, 41)[0]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, capture_layers=LAYERS)
    alone = tiny_llm(llama).generate([prompt], params, use_tqdm=False)[0]
    assert _stacked(alone).shape == (3, 40 + 23, 64)
    neighbours = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, interventions=EDITS[:1]),
                  SamplingParams(temperature=0.8, max_tokens=24, seed=1, capture_layers=(1,)),
                  SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 3
    # 17 pages (one max_model_len request) for ~60 pages of work: the newest request, ours, is preempted.
    crowded = tiny_llm(llama, num_pages=17, prefill_chunk=5, max_num_batched_tokens=24)
    preempted = []
    original = crowded.scheduler._preempt
    crowded.scheduler._preempt = lambda r: (preempted.append(r.request_id), original(r))
    outs = crowded.generate(random_prompts(6, 9, 256, 20, 60) + [prompt], neighbours + [params], use_tqdm=False)
    assert outs[-1].request_id in preempted
    assert outs[-1].token_ids == alone.token_ids
    np.testing.assert_allclose(_stacked(outs[-1]), _stacked(alone), rtol=1e-5, atol=1e-5)
    siblings = tiny_llm(llama).generate([prompt], SamplingParams(**{**GREEDY, "max_tokens": 24}, n=2,
                                                                 capture_layers=LAYERS), use_tqdm=False)
    for out in siblings:  # the second computes only the tail past its first's full prompt pages
        np.testing.assert_allclose(_stacked(out), _stacked(alone), rtol=1e-5, atol=1e-5)


def test_steered_pages_are_not_shared_and_captures_skip_the_prefix_cache(llama):
    llm, prompt = tiny_llm(llama), random_prompts(7, 1, 256, 30, 31)[0]
    plain = tiny_llm(llama).generate([prompt], SamplingParams(**GREEDY), use_tqdm=False)[0]
    steered = llm.generate([prompt], SamplingParams(**GREEDY, interventions=EDITS[:1]), use_tqdm=False)[0]
    assert steered.token_ids != plain.token_ids
    assert llm.generate([prompt], SamplingParams(**GREEDY), use_tqdm=False)[0].token_ids == plain.token_ids
    hits = llm.prefix_cache.stats.hits
    captured = llm.generate([prompt], SamplingParams(**GREEDY, capture_layers=(2,)), use_tqdm=False)[0]
    assert llm.prefix_cache.stats.hits == hits and captured.hidden_states[2].shape == (30 + NEW - 1, 64)


def test_count_experts_counts_every_step(moe):
    prompts = random_prompts(8, 3, 256, 5, 40)
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    llm = tiny_llm(moe, count_experts=True)
    llm.generate(prompts, params, use_tqdm=False)
    asked = tiny_llm(moe).generate(prompts, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True,
                                                           return_routed_experts=True), use_tqdm=False)
    routed = np.concatenate([o.routed_experts for o in asked])
    assert len(routed) == sum(len(p) + 8 for p in prompts)
    np.testing.assert_array_equal(llm.expert_counts(), np.bincount(routed[:, 0].reshape(-1), minlength=8)[None])


def test_bad_hook_input_names_the_field(llama):
    llm = tiny_llm(llama)
    for bad, field in ((dict(capture_layers=(1.5,)), "capture_layers"), (dict(capture_layers=(-1,)), "capture_layers"),
                       (dict(capture_layers=3), "capture_layers"),
                       (dict(interventions=[np.zeros(64)]), "interventions"),
                       (dict(return_routed_experts=1), "return_routed_experts")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="interventions"):
        Intervention(1, np.zeros((2, 64)))  # per-position rows need end - start = 2
    with pytest.raises(ValueError, match="interventions: mode"):
        Intervention(1, np.zeros(64), mode="multiply")
    for params, message in ((SamplingParams(capture_layers=(3,)), r"capture_layers: layer 3 is out of range \[0, 2\]"),
                            (SamplingParams(interventions=(Intervention(3, np.zeros(64)),)), "interventions: layer 3"),
                            (SamplingParams(interventions=(Intervention(1, np.zeros(63)),)),
                             "interventions: vector has size 63"),
                            (SamplingParams(return_routed_experts=True), "return_routed_experts: .* dense")):
        with pytest.raises(ValueError, match=message):
            llm.add_request([1, 2, 3], params)
    with pytest.raises(ValueError, match="expert_counts"):
        llm.expert_counts()
    with pytest.raises(ValueError, match="count_experts: .* dense"):
        tiny_llm(llama, count_experts=True)
    assert not llm.has_unfinished()
    assert llm.generate([[1, 2, 3]], SamplingParams(**GREEDY, capture_layers=(2,)), use_tqdm=False)[0].hidden_states


def test_no_recompilation_with_hooks_in_steady_state(llama):
    """Requests asking for other layers, vectors and edits run the programs compiled for the first
    ones (the hooks are arrays of the step's shapes, never static per request)."""
    llm, prompts = tiny_llm(llama), random_prompts(9, 12, 256, 1, 100)
    asks = [dict(capture_layers=(1,)), dict(interventions=EDITS[:1]), dict(capture_layers=LAYERS, interventions=EDITS)]

    def params(shift: int) -> list[SamplingParams]:
        return [SamplingParams(**GREEDY, **asks[(i + shift) % 3]) for i in range(len(prompts))]

    llm.generate(prompts, params(0), use_tqdm=False)  # compiles the hooked variant of the shapes it meets
    with count_compilations() as compiles:
        llm.generate([[(t + 1) % 256 for t in p] for p in prompts], params(1), use_tqdm=False)
    assert compiles[0] == 0


def test_expert_counts_window_and_metrics():
    counts = ExpertCounts(2, 4, window=2)
    steps = [np.array([[[0, 1], [2, 3]]]), np.array([[[0, 2], [2, 2]]] * 2), np.array([[[3, 1], [0, 0]]])]
    for ids in steps:
        counts.add(ids)
    expected = [np.bincount((np.arange(2)[None, :, None] * 4 + ids).reshape(-1), minlength=8).reshape(2, 4)
                for ids in steps]
    np.testing.assert_array_equal(counts.total, sum(expected))
    np.testing.assert_array_equal(counts.window(), expected[1] + expected[2])  # the first step left the window
    metrics = ServerMetrics("m", 10)
    metrics.expert_load(counts.summary())
    page = parse(metrics.render())
    assert page['jaxserve_moe_routed_total{model_name="m",layer="1"}'] == 8
    assert page['jaxserve_moe_expert_load_imbalance{model_name="m",layer="0"}'] == 4 / 3  # [2, 1, 2, 1]: 2 / 1.5
    assert page['jaxserve_moe_idle_experts{model_name="m",layer="1"}'] == 2
