"""Penalties, biases, min_tokens, allowed ids, bad words and host constraints (engine/penalties.py,
engine/bad_words.py, engine/constrained_step.py): the device math against NumPy's float64
formulas, and greedy generation on tiny-llama against a reference loop applying them to the
no-cache forward's logits, across multi-step decode, chunked prefill, preemption and speculation."""

import dataclasses

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from benchmarks.compilations import count_compilations
from engine import SamplingParams
from engine import penalties
from engine.bad_words import BadWordsConstraint
from engine.constrained_step import constrain
from engine.constraints import ConstraintError, TokenConstraint, is_allowed
from engine.penalties import PROMPT, STOP, PenaltyTables
from engine.request import Request
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.testing import penalised_greedy_reference, penalised_logits, random_prompts
from models import load_model
from models.loading.tokenizer import Tokenizer
from tests.engine_helpers import tiny_llm

VOCAB = 256
MAX_TOKENS = 12
PENALTIES = {  # each alone, then together (float32 on device, float64 in the reference)
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "repetition": dict(repetition_penalty=1.8),
    "all": dict(presence_penalty=-0.5, frequency_penalty=1.1, repetition_penalty=1.3,
                logit_bias={3: 2.0, 7: -1.0}),
}


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama with a word-level tokenizer ("t0".."t255": one token each, space separated)."""
    backend = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, eos_token_ids=[2], bos_token_id=None, add_bos=False, chat_template=None)
    return dataclasses.replace(load_model("tiny-llama"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def llm(tiny):
    """The shared engine: 4-step decode calls, 32-token prefill chunks, and a pool of 16 pages (one
    max_model_len request), so that a batch of long requests preempts some."""
    return tiny_llm(tiny, num_pages=17)


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=kwargs.pop("max_tokens", MAX_TOKENS), ignore_eos=True, **kwargs)


# ---- the device math -------------------------------------------------------------------------
def test_penalty_math_matches_numpy():
    """Random logits, counts and prompts in 5 slots (row 0 null) and 8 rows, each row's params
    random: penalties.apply equals the float64 formulas, with earlier drafts counted and stop ids
    banned only before min_tokens. Counting the prompt for the frequency penalty (a wrong rule)
    is caught by the same comparison."""
    rng = np.random.default_rng(0)
    vocab, rows = 64, 8
    params = [SamplingParams(presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)),
                             repetition_penalty=float(rng.uniform(0.5, 2)), max_tokens=20, min_tokens=4,
                             stop_token_ids=(5, 9), logit_bias={int(rng.integers(vocab)): float(rng.uniform(-5, 5))})
              for _ in range(4)]
    prompts = [rng.integers(0, vocab, 10).tolist() for _ in params]
    outputs = [rng.integers(0, vocab, int(rng.integers(0, 8))).tolist() for _ in params]
    rows_of = [p.logits_row((11,), ()).values(pr, out, vocab)
               for p, pr, out in zip(params, prompts, outputs)]
    tables = jax.tree.map(lambda null, *r: np.stack([null, *r]), PenaltyTables.null(vocab), *rows_of)
    slots = np.array([1, 2, 3, 4, 0, 2, 4, 0], np.int32)
    earlier = np.full((rows, 3), -1, np.int32)
    earlier[5, :2] = [4, 4]  # row 5: slot 2 two drafts later
    positions = np.array([len(prompts[s - 1]) + len(outputs[s - 1]) if s else 0 for s in slots], np.int32)
    positions[5] += 2
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    got = np.asarray(jax.jit(penalties.apply)(logits, slots, positions, tables, earlier))
    for row, slot in enumerate(slots):
        if not slot:
            np.testing.assert_array_equal(got[row], logits[row])
            continue
        output = outputs[slot - 1] + [t for t in earlier[row] if t >= 0]
        want = penalised_logits(logits[row], prompts[slot - 1], output, params[slot - 1], (11,), (5, 9))
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-4)
        wrong = want - params[slot - 1].frequency_penalty * np.bincount(prompts[slot - 1], minlength=vocab)
        assert not np.allclose(got[row], wrong, rtol=1e-5, atol=1e-4)


def test_record_counts_kept_tokens_in_their_slots():
    """record adds each kept token to its row's slot; the null slot and dropped tokens count nowhere."""
    tables = PenaltyTables.allocate(3, 8)
    tokens = np.array([[1, 2], [3, 3], [4, 5]], np.int32)
    kept = np.array([[True, False], [True, True], [True, True]])
    counts = np.asarray(penalties.record(tables, np.array([1, 2, 0], np.int32), tokens, kept).counts)
    want = np.zeros((3, 8), np.int32)
    want[1, 1], want[2, 3] = 1, 2
    np.testing.assert_array_equal(counts, want)


def test_row_values():
    """A LogitsRow's flags and bias row: prompt bits, stop bits only with min_tokens, -inf outside
    allowed ids and at banned ones, biases clamped to [-100, 100]."""
    p = SamplingParams(logit_bias={1: 500.0, 2: -3.0}, allowed_token_ids=(1, 2, 3), min_tokens=2, stop_token_ids=(3,))
    row = p.logits_row((2,), ()).values([0, 1], [1, 1, 4], 6)
    np.testing.assert_array_equal(row.counts, [0, 2, 0, 0, 1, 0])
    np.testing.assert_array_equal(row.flags, [PROMPT, PROMPT, 0, STOP, 0, 0])
    np.testing.assert_array_equal(row.bias, [-np.inf, 100.0, -np.inf, 0.0, -np.inf, -np.inf])
    assert int(row.min_end) == 4
    assert SamplingParams(min_tokens=2, ignore_eos=True).logits_row((), (7,)) is None
    assert SamplingParams(min_tokens=2).logits_row((), (7,)).stop_ids == (7,)


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                                 dict(logit_bias={"a": 1}), dict(logit_bias={1: "x"}), dict(logit_bias={-1: 1}),
                                 dict(min_tokens=-1), dict(min_tokens=17), dict(bad_words=[""]),
                                 dict(bad_words=[3]), dict(allowed_token_ids=[]), dict(allowed_token_ids=[-2])])
def test_params_refuse_bad_values_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_engine_refuses_ids_outside_the_vocabulary(llm):
    for bad in (dict(logit_bias={VOCAB: 1.0}), dict(allowed_token_ids=(1, VOCAB))):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}: token id {VOCAB} is outside"):
            llm.add_request([1, 2, 3], greedy(**bad))
    assert not llm.has_unfinished()


# ---- generation against the reference loop -----------------------------------------------------
def test_greedy_penalties_match_the_reference_loop(tiny, llm):
    """Each penalty (and all at once) on 8 requests at once, prompts from 5 to 80 tokens (chunked
    prefill at 32), decoded 4 steps per call beside unpenalised ones, some preempted after tokens
    were counted (they recompute, their counts rebuilt from the host's tokens, never counted
    twice): every request's tokens are the reference loop's, whatever runs beside it."""
    prompts = random_prompts(11, 8, VOCAB, 5, 80)
    params = [greedy(max_tokens=20, **PENALTIES[name]) for name in PENALTIES] * 2
    params[3] = params[6] = greedy(max_tokens=20)  # unpenalised neighbours (the null slot)
    preempted = []
    original = llm.scheduler._preempt
    llm.scheduler._preempt = lambda r: (preempted.append(len(r.output_token_ids)), original(r))
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.scheduler._preempt = original
    assert max(preempted) > 4  # a request preempted after decode calls counted its tokens
    assert [o.token_ids for o in outs] == penalised_greedy_reference(tiny, prompts, params, pad_to=128)
    alone = llm.generate(prompts[:1], params[:1], use_tqdm=False)[0]
    assert alone.token_ids == outs[0].token_ids
    assert len(llm.scheduler.slots._free) == llm.config.sampling_slots - 1  # every slot given back


def test_logit_bias_allowed_ids_and_min_tokens(tiny, llm):
    """+100 forces a token, -100 bans the greedy one; only allowed ids are sampled; min_tokens
    bans a stop id (and EOS) until that many tokens exist, then it may end the output."""
    prompt = random_prompts(13, 1, VOCAB, 10, 11)[0]
    free = llm.generate([prompt], greedy(), use_tqdm=False)[0].token_ids
    assert llm.generate([prompt], greedy(logit_bias={9: 100}), use_tqdm=False)[0].token_ids == [9] * MAX_TOKENS
    banned = llm.generate([prompt], greedy(logit_bias={free[0]: -100}), use_tqdm=False)[0].token_ids
    assert free[0] not in banned and banned != free
    allowed = (4, 40, 140, 240)
    assert set(llm.generate([prompt], greedy(allowed_token_ids=allowed), use_tqdm=False)[0].token_ids) <= set(allowed)
    stop = greedy(stop_token_ids=(free[0],))
    assert llm.generate([prompt], stop, use_tqdm=False)[0].token_ids == free[:1]
    eos = tiny.tokenizer.eos_token_ids[0]
    params = [greedy(stop_token_ids=(free[0],), min_tokens=5),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=5, logit_bias={eos: 100})]
    outs = llm.generate([prompt, prompt], params, use_tqdm=False)
    want = penalised_greedy_reference(tiny, [prompt], params[:1], pad_to=128, stop_ids=(free[0],))[0]
    end = next((i + 1 for i in range(5, len(want)) if want[i] == free[0]), len(want))
    assert outs[0].token_ids == want[:end]
    assert len(outs[1].token_ids) == 6 and outs[1].token_ids[5] == eos and eos not in outs[1].token_ids[:5]
    assert outs[1].finish_reason == "stop"


def test_stop_strings_wait_for_min_tokens(llm):
    """A stop string completed within the first min_tokens tokens does not end the output."""
    prompt = random_prompts(14, 1, VOCAB, 10, 11)[0]
    free = llm.generate([prompt], greedy(), use_tqdm=False)[0]
    words = " ".join(f"t{t}" for t in free.token_ids[:2])  # the text of the first two tokens
    cut = llm.generate([prompt], greedy(stop=[words]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) == 2
    waited = llm.generate([prompt], greedy(stop=[words], min_tokens=3), use_tqdm=False)[0]
    assert len(waited.token_ids) > 2 and waited.token_ids[:2] == free.token_ids[:2]


def test_bad_words_one_and_several_tokens(llm):
    """A one-token bad word never appears; a two-token one never appears whole, though its first
    token still may (the unconstrained greedy output held both)."""
    prompt = random_prompts(15, 1, VOCAB, 10, 11)[0]
    free = llm.generate([prompt], greedy(max_tokens=24), use_tqdm=False)[0].token_ids
    one = llm.generate([prompt], greedy(max_tokens=24, bad_words=[f"t{free[0]}"]), use_tqdm=False)[0].token_ids
    assert free[0] not in one
    pair = tuple(free[:2])
    two = llm.generate([prompt], greedy(max_tokens=24, bad_words=[f"t{pair[0]} t{pair[1]}"]), use_tqdm=False)[0]
    assert pair not in set(zip(two.token_ids, two.token_ids[1:])) and len(two.token_ids) == 24
    assert two.token_ids[0] == free[0] and two.token_ids[1] != free[1]  # the first token stays, the word cannot


class _FailsAfter(TokenConstraint):
    """Allows everything for `n` tokens, then raises."""

    def __init__(self, n: int):
        self.n = n

    def fill_mask(self, words) -> None:
        if self.n == 0:
            raise ConstraintError("injected")

    def accept(self, token: int) -> None:
        self.n -= 1

    def rollback(self, num_tokens: int) -> None:
        self.n += num_tokens


def test_a_failing_constraint_ends_only_its_request(llm):
    """A constraint raising ConstraintError after 3 tokens ends its request with "error" and those
    3 tokens; the others finish as without it; nothing leaks (pages, slots)."""
    prompts = random_prompts(16, 3, VOCAB, 5, 40)
    want = [o.token_ids for o in llm.generate(prompts, greedy(frequency_penalty=0.5), use_tqdm=False)]
    requests = [llm.add_request(p, greedy(frequency_penalty=0.5)) for p in prompts]
    requests[1].constraint = _FailsAfter(3)
    while llm.has_unfinished():
        llm.step()
    outs = [r.output() for r in requests]
    assert (outs[1].finish_reason, outs[1].error) == ("error", "ConstraintError: injected")
    assert outs[1].token_ids == want[1][:3]
    assert [outs[0].token_ids, outs[2].token_ids] == [want[0], want[2]]
    assert llm.allocator.num_free == llm.config.num_pages - 1
    assert len(llm.scheduler.slots._free) == llm.config.sampling_slots - 1


def test_drafts_walk_through_the_constraint():
    """constrain(): a speculative decode's drafts are walked through its constraint (one mask per
    verified position), cut before the first refused one, and the constraint rolled back; a
    constraint that raises fails its request alone, which keeps its place in the step."""
    def scheduled(drafts: tuple[int, ...], constraint: TokenConstraint) -> ScheduledRequest:
        request = Request(0, [1, 2, 3], greedy(), 0, 64, output_token_ids=[5], num_computed=3, constraint=constraint)
        return ScheduledRequest(request, 3, 1 + len(drafts), drafts)
    words = BadWordsConstraint([(5, 6), (7, 8, 9)])
    words.accept(5)
    plain = ScheduledRequest(Request(1, [4], greedy(), 0, 64), 0, 1)
    step = constrain(SchedulerOutput([scheduled((7, 8, 9, 4), words), plain, scheduled((1,), _FailsAfter(0))], 1), 16)
    cut, _, failed = step.output.scheduled
    assert (cut.drafts, cut.num_tokens) == ((7, 8), 3) and step.masks[1] is None and step.masks[2] is None
    assert [[is_allowed(m, t) for t in (6, 9)] for m in step.masks[0]] == [[False, True], [True, True], [True, False]]
    assert words._output == [5] and failed.drafts == (1,)
    assert [(r.request_id, message) for r, message in step.failed] == [(0, "ConstraintError: injected")]


def test_speculation_applies_penalties_at_every_verified_position(tiny, llm):
    """n-gram drafts verified with penalties (a negative presence penalty makes the output repeat,
    so drafts are right often, a frequency penalty then breaks each run: a draft's counts must hold
    the drafts before it): the reference loop's tokens. A two-token bad word cuts the drafts: the
    same tokens as without speculation."""
    spec = tiny_llm(tiny, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8], [1, 2, 3, 4, 1, 2, 3, 4, 1]]
    params = [greedy(max_tokens=20, presence_penalty=-1.0, frequency_penalty=0.4)] * 2
    outs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == penalised_greedy_reference(tiny, prompts, params, pad_to=128)
    assert sum(o.metrics.speculation.accepted for o in outs) > 4
    free = llm.generate(prompts[:1], greedy(), use_tqdm=False)[0].token_ids
    bad = greedy(bad_words=[f"t{free[2]} t{free[3]}"])
    assert (spec.generate(prompts[:1], bad, use_tqdm=False)[0].token_ids
            == llm.generate(prompts[:1], bad, use_tqdm=False)[0].token_ids != free)


def test_penalties_compile_nothing_after_warmup(llm):
    """Penalties, biases and allowed ids ride in the warmed-up steps (one program each): no compile."""
    llm.warmup()
    prompts = random_prompts(17, 12, VOCAB, 1, 90)
    params = [greedy(max_tokens=int(n), **PENALTIES[name]) for n, name in zip(range(3, 15), list(PENALTIES) * 3)]
    params[5] = greedy(allowed_token_ids=(1, 2, 3), min_tokens=2, max_tokens=5)
    with count_compilations() as compiles:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert compiles[0] == 0
    assert set(outs[5].token_ids) <= {1, 2, 3}
