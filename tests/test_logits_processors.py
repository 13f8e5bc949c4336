"""Logits processors (engine/logits_processor.py, engine/example_processors.py) on tiny-llama: the
re-implemented logit_bias gives the built-in's tokens and logprobs (greedy and seeded), ban_until
equals a NumPy reference loop over the no-cache forward, rows without arguments equal a batch
using no processor, nothing compiles after warmup, multi-step decode (decode_steps=4) and n-gram
speculation apply them, and bad arguments are refused by name for that request only."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.compilations import count_compilations
from engine import SamplingParams
from engine.example_processors import ban_until, logit_bias, occurrence_penalties
from engine.logits_processor import Arg, LogitsProcessor, checked_processors
from engine.testing import random_prompts
from models import load_model
from server import protocol
from tests.engine_helpers import tiny_llm

K = 4  # token slots per row of both example processors
VOCAB = 256
REPEATING = [[7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8], [1, 2, 3, 4, 1, 2, 3, 4, 1]]  # n-gram drafts get accepted


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


# A processor that changes every row it is given (its argument only turns it on): rows that do not
# use it must still come out untouched.
BAN_EVERYWHERE = LogitsProcessor("ban_111", lambda logits, args, rows: logits.at[:, 111].set(-jnp.inf),
                                 {"on": Arg((), "bool", False)})


@pytest.fixture(scope="module")
def llm(tiny):
    """4-step decode calls, 32-token prefill chunks, the example processors and BAN_EVERYWHERE
    registered; warmed up (every test after runs compiled programs)."""
    engine = tiny_llm(tiny, logits_processors=[logit_bias(K), ban_until(K), BAN_EVERYWHERE, occurrence_penalties()])
    engine.warmup()
    return engine


def sampling(seed: int | None = None, max_tokens: int = 12, **kwargs) -> SamplingParams:
    """max_tokens past EOS with the chosen tokens' logprobs: greedy, or seeded at temperature 0.8 (a
    processor's change is then scaled like the built-ins')."""
    return SamplingParams(temperature=0.0 if seed is None else 0.8, seed=seed, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=0, **kwargs)


def biased(bias: dict[int, float], seed: int | None) -> tuple[SamplingParams, SamplingParams]:
    """The same bias through the built-in field and through the logit_bias processor."""
    args = {"logit_bias": {"token_ids": list(bias), "bias": list(bias.values())}}
    return sampling(seed, logit_bias=bias), sampling(seed, logits_processor_args=args)


def assert_same_outputs(got, want) -> None:
    """Equal tokens, and logprobs equal up to float32 rounding (the same position's logits differ in
    the last bits between a decode call and a mixed step, or batch buckets)."""
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    logprobs = [[[lp for entry in o.logprobs for lp in entry.values()] for o in outs] for outs in (got, want)]
    np.testing.assert_allclose(*logprobs, rtol=1e-5, atol=1e-5)


def ban_reference(model, prompts: list[list[int]], bans: list[tuple[list[int], int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of the no-cache forward with each prompt's (token ids, until) ban: the
    ids get -inf while fewer than `until` tokens were generated."""
    seqs = [list(p) for p in prompts]
    for step in range(max_tokens):
        batch = np.zeros((len(seqs), 128), np.int32)
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        logits = np.asarray(model.forward(batch), np.float64)
        for i, (s, (ids, until)) in enumerate(zip(seqs, bans)):
            z = logits[i, len(s) - 1].copy()
            if step < until:
                z[ids] = -np.inf
            s.append(int(z.argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_processors_compile_nothing_after_warmup(llm):
    """Requests with and without arguments, greedy and seeded, ride the programs warmup compiled
    (the first test: no other ran a program warmup might have missed)."""
    prompts = random_prompts(6, 10, VOCAB, 1, 90)
    args = [{}, {"logit_bias": {"token_ids": [5], "bias": [3.0]}}, {"ban_until": {"token_ids": [1, 2, 3, 4], "until": 2}},
            {"logit_bias": {"token_ids": [9, 10, 11]}, "ban_until": {"until": 4, "token_ids": [6]}}]
    params = [sampling(i % 3 or None, logits_processor_args=args[i % 4]) for i in range(len(prompts))]
    with count_compilations() as compiles:
        llm.generate(prompts, params, use_tqdm=False)
    assert compiles[0] == 0


def test_logit_bias_processor_equals_builtin(llm):
    """Greedy and seeded: the processor's tokens and (raw) logprobs equal the built-in's, in one
    batch with unbiased requests, whose tokens the biases change (biases beyond 100 are clamped)."""
    prompts = random_prompts(3, 3, VOCAB, 5, 40)
    rng = np.random.default_rng(0)
    biases = [{int(t): float(b) for t, b in zip(rng.choice(VOCAB, 3, replace=False), rng.uniform(4, 9, 3))} | {111: -500.0}
              for _ in prompts]
    for seed in (None, 5):
        pairs = [biased(b, seed) for b in biases]
        params = [p for pair in pairs for p in pair] + [sampling(seed)] * len(prompts)
        outs = llm.generate([p for p in prompts for _ in (0, 1)] + prompts, params, use_tqdm=False)
        builtin, processor = outs[0:2 * len(prompts):2], outs[1:2 * len(prompts):2]
        assert_same_outputs(processor, builtin)
        assert [o.token_ids for o in builtin] != [o.token_ids for o in outs[2 * len(prompts):]]


def test_a_processor_reading_the_requests_counts_equals_the_builtin_penalties(llm, tiny):
    """Per-request device state: occurrence_penalties reads the request's token counts (kept on
    the device across 4-step decode calls) and gives the built-in presence/frequency penalties'
    tokens, greedy and seeded, beside unpenalised requests; with n-gram speculation too (counts
    plus the earlier drafts at each verified position)."""
    prompts = random_prompts(6, 3, VOCAB, 5, 40)
    for seed in (None, 5):
        builtin = [sampling(seed, max_tokens=16, presence_penalty=p, frequency_penalty=f)
                   for p, f in ((0.8, 0.0), (0.0, 1.5), (1.0, 1.0))]
        processor = [sampling(seed, max_tokens=16, logits_processor_args={"occurrence_penalties": {
            "presence": b.presence_penalty, "frequency": b.frequency_penalty}}) for b in builtin]
        outs = llm.generate(prompts * 3, builtin + processor + [sampling(seed, max_tokens=16)] * 3, use_tqdm=False)
        assert_same_outputs(outs[3:6], outs[:3])
        assert [o.token_ids for o in outs[:3]] != [o.token_ids for o in outs[6:]]
    spec = tiny_llm(tiny, speculative_config={"method": "ngram", "num_speculative_tokens": 3},
                    logits_processors=[occurrence_penalties()])
    params = [sampling(max_tokens=24, frequency_penalty=0.5),
              sampling(max_tokens=24, logits_processor_args={"occurrence_penalties": {"frequency": 0.5}})]
    outs = spec.generate([REPEATING[0]] * 2, params, use_tqdm=False)
    assert outs[0].token_ids == outs[1].token_ids


def test_ban_until_matches_numpy_reference(llm, tiny):
    """Each prompt bans the first tokens its free continuation picks (padded to K by -1) until a
    few tokens exist: the engine equals the reference loop, and the bans change the output."""
    prompts = random_prompts(4, 3, VOCAB, 5, 40)
    free = ban_reference(tiny, prompts, [([], 0)] * len(prompts), 12)
    bans = [(sorted(set(f[:2])), until) for f, until in zip(free, (3, 6, 12))]
    params = [sampling(logits_processor_args={"ban_until": {"token_ids": ids, "until": until}}) for ids, until in bans]
    want = ban_reference(tiny, prompts, bans, 12)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want != free


def test_rows_without_arguments_are_untouched(llm):
    """Greedy and seeded requests without arguments, each batched beside a request using every
    processor, give the tokens and logprobs of the same batch in which no request uses one (the
    same shapes: logits do not depend on the batch's other rows)."""
    prompts = random_prompts(5, 4, VOCAB, 5, 40)
    args = {"logit_bias": {"token_ids": [3], "bias": [8.0]}, "ban_until": {"token_ids": [4], "until": 5},
            "ban_111": {"on": True}}
    plain = [sampling(seed or None) for seed in range(len(prompts))]
    used = [p for i, s in enumerate(plain) for p in (s, sampling(i or None, logits_processor_args=args))]
    outs = llm.generate([p for p in prompts for _ in (0, 1)], used, use_tqdm=False)
    unused = llm.generate([p for p in prompts for _ in (0, 1)], [s for s in plain for _ in (0, 1)], use_tqdm=False)
    assert_same_outputs(outs[::2], unused[::2])
    assert [o.token_ids for o in outs[1::2]] != [o.token_ids for o in unused[1::2]]


def test_ngram_speculation_applies_processors(tiny):
    """With n-gram drafts verified in the step: ban_until equals the reference loop, the logit_bias
    processor the built-in, and drafts were accepted."""
    spec = tiny_llm(tiny, speculative_config={"method": "ngram", "num_speculative_tokens": 3},
                    logits_processors=[logit_bias(K), ban_until(K)])
    free = ban_reference(tiny, REPEATING, [([], 0)] * 2, 24)
    bans = [([free[0][0]], 4), (sorted(set(free[1][:3])), 7)]
    params = [sampling(max_tokens=24, logits_processor_args={"ban_until": {"token_ids": ids, "until": until}})
              for ids, until in bans]
    outs = spec.generate(REPEATING, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == ban_reference(tiny, REPEATING, bans, 24) != free
    assert sum(o.metrics.speculation.accepted for o in outs) > 4
    builtin, processor = biased({free[0][1]: -100.0, 17: 3.0}, 7)
    outs = spec.generate([REPEATING[0]] * 2, [builtin, processor], use_tqdm=False)
    assert outs[0].token_ids == outs[1].token_ids


@pytest.mark.parametrize("args, message", [
    ({"nope": {}}, "no logits processor 'nope' is registered"),
    ({"ban_until": {"tokens": [1]}}, r"\['ban_until'\]: unknown argument"),
    ({"ban_until": {"token_ids": [1, 2, 3, 4, 5]}}, r"\['token_ids'\]: expected shape \(4,\)"),
    ({"ban_until": {"token_ids": [[1], [2]]}}, r"\['token_ids'\]: expected shape \(4,\)"),
    ({"ban_until": {"token_ids": ["a"]}}, r"\['token_ids'\]: expected int32"),
    ({"ban_until": {"until": 1.5}}, r"\['until'\]: expected int32"),
    ({"ban_until": {"token_ids": [VOCAB]}}, r"token ids must be in \[0, 256\)"),
    ({"logit_bias": {"bias": [float("nan")]}}, r"\['bias'\]: expected float32"),
    ({"ban_until": [1]}, "must be a dict"),
])
def test_bad_arguments_are_refused_by_name(llm, args, message):
    """A ValueError naming logits_processor_args and the argument; the engine serves on."""
    with pytest.raises(ValueError, match=r"logits_processor_args.*" + message):
        llm.add_request([1, 2, 3], sampling(logits_processor_args=args))
    assert not llm.has_unfinished()


def test_processor_names_must_be_unique():
    with pytest.raises(ValueError, match="two processors are named 'ban_until'"):
        checked_processors([ban_until(2), ban_until(3)])
    with pytest.raises(ValueError, match="LogitsProcessor instances"):
        checked_processors([lambda logits: logits])


def test_server_passes_arguments_through():
    """The server's request field reaches SamplingParams; a malformed one is a 400 naming it."""
    body = b'{"prompt": "x", "logits_processor_args": {"ban_until": {"token_ids": [3], "until": 2}}}'
    params = protocol.sampling_params(protocol.parse(protocol.CompletionRequest, body), 8)
    assert params.logits_processor_args == {"ban_until": {"token_ids": [3], "until": 2}}
    with pytest.raises(protocol.APIError) as refused:
        protocol.parse(protocol.CompletionRequest, b'{"prompt": "x", "logits_processor_args": {"ban_until": [3]}}')
    assert refused.value.body()["error"]["param"] == "logits_processor_args"
