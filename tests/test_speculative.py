"""Speculative decoding: the rejection rule is lossless (and a wrong rule fails the same test),
greedy output with each proposer equals greedy output without, token for token, rollback frees
exactly the pages past the accepted tokens, and nothing recompiles after warm-up."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams, runner
from engine.request import Status
from engine.sampler import SamplingTensors
from engine.speculative import ngram, rejection
from engine.speculative import verify as spec_verify
from models import load_model
from tests.conftest import FIXTURES
from tests.engine_helpers import tiny_llm

SIGNIFICANCE = 1e-3  # a correct rule fails a test 1 time in 1000; the wrong rules give p < 1e-30
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def other_tiny():
    """tiny-llama with other random weights: a draft that the target often rejects."""
    return load_model("tiny-llama", seed=1)


def repetitive_prompts(seed: int, vocab: int, n: int) -> list[list[int]]:
    """Prompts with a repeated phrase (n-gram lookup finds drafts) and random tails (it may not)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        phrase = rng.integers(0, vocab, 6).tolist()
        out.append(phrase * (1 + i % 3) + rng.integers(0, vocab, 1 + 3 * i).tolist())
    return out


def outputs(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_pages_exact(llm: LLM) -> None:
    """Every page is free or held by one request; a running request holds the pages of its computed
    tokens and none wholly past its tokens (a rejected draft's page is freed)."""
    held = [p for r in llm.scheduler.running + list(llm.scheduler.waiting) for p in r.pages]
    assert len(held) == len(set(held)) and 0 not in held
    assert llm.allocator.num_free + len(held) == llm.config.num_pages - 1
    size = llm.config.page_size
    for r in llm.scheduler.running:
        assert -(-r.num_computed // size) <= len(r.pages) <= -(-len(r.tokens) // size), r.request_id


# ---- the rejection rule, directly --------------------------------------------------------------
def _first_tokens(p: np.ndarray, q: np.ndarray, n: int, rule) -> np.ndarray:
    """The token emitted at one position over n seeds: x ~ q drafted, then `rule` applied."""
    vocab = p.shape[0]
    rng = np.random.default_rng(0)
    drafts = rng.choice(vocab, size=n, p=q).astype(np.int32)
    s = SamplingTensors(np.ones(n, np.float32), np.full(n, -1, np.int32), np.ones(n, np.float32),
                        np.zeros(n, np.float32), np.arange(n, dtype=np.uint32))
    logits = np.broadcast_to(np.log(p), (n, vocab)).astype(np.float32)
    accepted, drawn = rule(logits, s, np.full(n, 7, np.int32), drafts, np.broadcast_to(q, (n, vocab)))
    return np.where(np.asarray(accepted), drafts, np.asarray(drawn))


def _accept_always(logits, s, positions, drafts, q):
    _, drawn = rejection.verify_rows(logits, s, positions, drafts, q)
    return np.ones(len(drafts), bool), drawn


def _chi_square_pvalue(tokens: np.ndarray, p: np.ndarray) -> float:
    observed = np.bincount(tokens, minlength=len(p))
    return stats.chisquare(observed, p * len(tokens)).pvalue


@pytest.mark.parametrize("case", range(3))
def test_rejection_sampling_emits_p_and_accept_always_fails(case):
    """20000 seeds, random p and q over 8 tokens: the emitted token is distributed as p (chi-square
    at 1e-3), and the wrong rule "accept every draft" (it emits q) fails the same test."""
    rng = np.random.default_rng(case)
    p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
    assert _chi_square_pvalue(_first_tokens(p, q, 20_000, rejection.verify_rows), p) > SIGNIFICANCE
    assert _chi_square_pvalue(_first_tokens(p, q, 20_000, _accept_always), p) < 1e-30


def test_one_hot_drafts_and_greedy_rows():
    """q None (n-gram) is a one-hot q: a draft with p(x) = 0 is never accepted; greedy rows accept
    exactly an argmax match and otherwise emit the argmax."""
    logits = np.log(np.array([[0.5, 0.5, 0.0, 1e-9]] * 4, np.float32) + 1e-30)
    s = SamplingTensors(np.array([1, 1, 0, 0], np.float32), np.full(4, -1, np.int32), np.ones(4, np.float32),
                        np.zeros(4, np.float32), np.arange(4, dtype=np.uint32))
    accepted, drawn = rejection.verify_rows(logits, s, np.zeros(4, np.int32), np.array([2, 2, 0, 1], np.int32), None)
    assert np.asarray(accepted).tolist() == [False, False, True, False]
    assert np.asarray(drawn)[2:].tolist() == [0, 0]


def test_accepted_tokens_takes_the_prefix_then_the_drawn_token():
    """Row acceptances [T, F, T | T, T, - | -]: 1 accepted then the drawn token; 2 (all) then the
    bonus; a sequence without drafts emits its drawn token."""
    accepted = np.array([1, 0, 1, 0, 1, 1, 0, 0], bool)
    drawn = np.arange(100, 108, dtype=np.int32)
    drafts = np.array([5, 6, 7, -1, 8, 9, -1, -1], np.int32)
    seq_rows = np.array([[0, 1, 2, 3], [4, 5, 6, 6], [7, 7, 7, 7]], np.int32)
    tokens, counts = rejection.accepted_tokens(accepted, drawn, drafts, seq_rows, np.array([3, 2, 0], np.int32),
                                               np.zeros(3, np.int32))
    assert np.asarray(counts).tolist() == [2, 3, 1]
    assert np.asarray(tokens).tolist() == [[5, 101, 0, 0], [8, 9, 106, 0], [107, 0, 0, 0]]


# ---- the proposers -----------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3])
    assert ngram.propose(tokens, 3, 4, 1) == [4, 5, 1]  # "1 2 3" last followed by 4 5 1
    assert ngram.propose(np.array([7, 8, 9]), 3, 4, 1) == []
    assert ngram.propose(np.array([5, 6, 5]), 4, 4, 1) == [6, 5]  # longest n first, then shorter


@pytest.mark.parametrize("spec,problem", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
    ({"method": "synthetic", "num_speculative_tokens": 2}, "acceptance_length"),
    ({"method": "mtp", "num_speculative_tokens": 2}, "MTP weights"),
    ({"model": "wider-vocabulary", "num_speculative_tokens": 2}, "vocabulary"),
])
def test_bad_speculative_configs_raise_naming_the_problem(tiny, spec, problem):
    if spec.get("model") == "wider-vocabulary":
        spec = {**spec, "model": dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, vocab_size=300))}
    with pytest.raises(ValueError, match=problem):
        tiny_llm(tiny, speculative_config=spec)


# ---- greedy equality -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ngram", "same_draft", "other_draft"])
def test_greedy_equals_no_speculation_under_preemption(tiny, other_tiny, method):
    """Six requests (some find n-gram drafts, some do not; prefills share steps with verify steps)
    on a pool small enough to preempt: every token equals the non-speculative engine's, and after
    every step the running requests hold exactly the pages their accepted tokens need."""
    prompts = repetitive_prompts(0, 256, 6)
    want = outputs(tiny_llm(tiny, max_model_len=64), prompts, GREEDY)
    spec = {"ngram": {"method": "ngram", "num_speculative_tokens": 3},
            "same_draft": {"model": "tiny-llama", "num_speculative_tokens": 3},
            "other_draft": {"model": other_tiny, "num_speculative_tokens": 2}}[method]
    llm = tiny_llm(tiny, max_model_len=64, num_pages=12, speculative_config=spec)
    requests = [llm.add_request(p, GREEDY) for p in prompts]
    preempted = False
    while llm.has_unfinished():
        llm.step()
        preempted |= any(r.status is Status.WAITING and r.output_token_ids for r in requests)
        assert_pages_exact(llm)
    assert preempted
    assert [r.output_token_ids for r in requests] == want
    spec_metrics = [r.metrics.speculation for r in requests]
    assert sum(m.proposed for m in spec_metrics) > 0
    accepted, proposed = sum(m.accepted for m in spec_metrics), sum(m.proposed for m in spec_metrics)
    if method == "same_draft":  # a draft equal to the target is always accepted
        assert accepted == proposed
    else:  # rejections happen (n-gram also accepts; random weights of another seed rarely agree)
        assert accepted < proposed and (method == "other_draft" or accepted > 0)


def test_stop_ids_cut_accepted_drafts(tiny):
    """A stop token inside an accepted run of drafts ends the output there, as without speculation."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6] * 4
    free = outputs(tiny_llm(tiny), [prompt], GREEDY)[0]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[free[5]])
    want = outputs(tiny_llm(tiny), [prompt], params)
    got = outputs(tiny_llm(tiny, speculative_config={"method": "ngram", "num_speculative_tokens": 4}), [prompt],
                  params)
    assert got == want and len(got[0]) <= 6


def test_smollm2_ngram_greedy_equals_no_speculation(smollm2):
    text = ("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
            "Repeat the sentence once more: The quick brown")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kwargs = dict(max_model_len=256, max_num_seqs=2, max_num_batched_tokens=128, prefill_chunk=128)
    want = outputs(LLM(smollm2, **kwargs), [text], params)
    llm = LLM(smollm2, **kwargs, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    out = llm.generate([text], params, use_tqdm=False)[0]
    assert out.token_ids == want[0]
    assert out.metrics.speculation.mean_acceptance_length > 1.5
    assert "".join(llm.stream(text, params)) == out.text  # streamed through verify steps, the same text


def test_deepseek_mtp_greedy_equals_no_speculation_and_drafts_match_the_reference():
    """MTP on the tiny DeepSeek-V3 fixture (random weights: few drafts are accepted): greedy output
    equals the non-speculative engine's, and the first draft equals the MTP module run without a
    cache over the prompt (target hidden states at t, embeddings of t+1)."""
    model = load_model(FIXTURES / "tiny-deepseek-v3-hf")
    prompt = repetitive_prompts(1, model.config.vocab_size, 1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = outputs(tiny_llm(model, decode_steps=1), [prompt], params)[0]
    llm = tiny_llm(model, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    request = llm.add_request(prompt, params)
    llm.step()  # prefill: first token sampled, the MTP module filled
    drafts = llm.speculator.attach(llm.scheduler.schedule()).scheduled[0].drafts
    tokens = jnp.asarray([request.tokens])
    hidden, _ = model.model(tokens, jnp.arange(len(request.tokens))[None])
    mtp = model.model.mtp[0]
    x = mtp.eh_proj(jnp.concatenate([mtp.enorm(model.model.embed_tokens(tokens[:, 1:])), mtp.hnorm(hidden[:, :-1])], -1))
    out, _ = mtp.block(x, jnp.arange(len(request.tokens) - 1)[None], None, None, "auto")
    assert drafts[0] == int(np.argmax(model.model.logits(mtp.shared_head_norm(out[0, -1]))))
    while llm.has_unfinished():
        llm.step()
    assert request.output_token_ids == want


# ---- sampled output end to end, and compilations -------------------------------------------------
def perturbed(model, scale: float):
    """The model with every weight perturbed: a draft close to the target but not equal (q != p)."""
    graphdef, state = nnx.split(model.model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return dataclasses.replace(model, model=nnx.merge(graphdef, jax.tree.unflatten(tree, noisy)))


def _joint_counts(llm: LLM, n: int) -> tuple[dict[tuple, int], int]:
    """How often each 3-token output occurs over seeds 0..n-1, and how many drafts were accepted."""
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, seed=i) for i in range(n)]
    counts: dict[tuple, int] = {}
    done = llm.generate([[5, 17, 99, 3, 5, 17, 99, 3]] * n, params, use_tqdm=False)
    for o in done:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    return counts, sum(o.metrics.speculation.accepted for o in done)


def _two_sample_pvalue(a: dict, b: dict) -> float:
    cells = sorted(set(a) | set(b))
    return stats.chi2_contingency(np.array([[a.get(c, 0) for c in cells], [b.get(c, 0) for c in cells]])).pvalue


def test_sampled_tokens_are_distributed_as_without_speculation(tiny, monkeypatch):
    """800 seeds at temperature 1 (top-k 3), a perturbed draft (k=2): the joint distribution of
    the first three tokens matches the non-speculative engine's (two-sample chi-square at 1e-3);
    the wrong rule "accept every draft" fails the same test."""
    kwargs = dict(max_model_len=32, max_num_seqs=64, max_num_batched_tokens=512, prefill_chunk=32, page_size=8)
    spec = {"model": perturbed(tiny, 0.5), "num_speculative_tokens": 2}
    want, _ = _joint_counts(LLM(tiny, **kwargs), 800)
    got, accepted = _joint_counts(LLM(tiny, **kwargs, speculative_config=spec), 800)
    assert accepted > 0  # some drafts are right (and the test above shows some are not)
    assert _two_sample_pvalue(want, got) > SIGNIFICANCE
    runner.jitted_steps.cache_clear()  # trace the verify step again, with the wrong rule
    monkeypatch.setattr(spec_verify, "verify_rows", _accept_always)
    wrong, _ = _joint_counts(LLM(tiny, **kwargs, speculative_config=spec), 800)
    runner.jitted_steps.cache_clear()
    assert _two_sample_pvalue(want, wrong) < 1e-6


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_no_recompiles_after_warmup_with_speculation(tiny, method):
    spec = ({"method": "ngram", "num_speculative_tokens": 3} if method == "ngram" else
            {"model": "tiny-llama", "num_speculative_tokens": 3})
    llm = tiny_llm(tiny, speculative_config=spec)
    llm.warmup()
    prompts = repetitive_prompts(3, 256, 8)
    params = [SamplingParams(temperature=t, max_tokens=20, ignore_eos=True, seed=1) for t in (0.0, 1.0)] * 4
    with count_compilations() as compilations:
        llm.generate(prompts, params, use_tqdm=False)
    assert compilations[0] == 0


def test_mtp_drafts_after_a_prefix_hit_equal_those_computed_without_the_cache():
    """MTP's KV at a page's last slot depends on the next page's first token (the module reads the
    embedding of token t+1), so a page is only a prefix hit for an MTP engine when that token
    matches too: B's first draft distribution after A's prefix equals an engine's without a cache."""
    model = load_model(FIXTURES / "tiny-deepseek-v3-hf")
    rng = np.random.default_rng(5)
    prefix = [int(t) for t in rng.integers(0, model.config.vocab_size, 16)]  # two full pages of 8
    a, b = prefix + [3, 4, 5], prefix + [7, 8, 9]  # they differ right after the shared pages
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=2, ignore_eos=True)  # q: a full distribution
    spec = {"method": "mtp", "num_speculative_tokens": 2}

    def first_draft_probs(llm: LLM, prompt: list[int]) -> np.ndarray:
        request = llm.add_request(prompt, params)
        llm.step()  # the prefill: the MTP module filled
        _, q = llm.speculator.proposer.propose(llm.scheduler.schedule().scheduled, [2])
        llm.abort(request.request_id)
        return np.asarray(q)[0]

    cached = tiny_llm(model, speculative_config=spec)
    cached.generate([a], params, use_tqdm=False)
    got = first_draft_probs(cached, b)
    assert cached.prefix_cache.stats.hits == 8  # page 0 (tokens 0-7, then 8 as in A); page 1 is followed by 3, not 7
    want = first_draft_probs(tiny_llm(model, speculative_config=spec, enable_prefix_caching=False), b)
    np.testing.assert_allclose(got, want, atol=1e-6)
