"""Property-based fuzzing of the door: random SamplingParams keywords and prompts (valid and invalid
values and types) against one live tiny-llama engine. Every case is refused with ValueError or runs
to completion with well-typed parameters, and the engine then still gives a known request its
known greedy tokens."""

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from engine.request import MAX_LOGPROBS
from models import load_model
from tests.engine_helpers import tiny_llm

VOCAB, MAX_MODEL_LEN = 256, 32
KNOWN_PROMPT = [5, 6, 7, 8, 9]
KNOWN = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
INT_FIELDS = ("top_k", "max_tokens", "seed", "logprobs", "prompt_logprobs")
OPTIONAL_FIELDS = ("seed", "logprobs", "prompt_logprobs")  # None, or an int
FLOAT_FIELDS = ("temperature", "top_p", "min_p")
BOOL_FIELDS = ("ignore_eos",)

# Values that look like a field's type but are not, and anything else a user might pass.
TRICKY = st.one_of(st.sampled_from([True, False, np.bool_(True), None, 2.0, 1.5, math.nan, math.inf, -math.inf,
                                    10**400, -2, 2**31, 2**32, "", "3", [], [None], [""], [1.0], (1, "a"),
                                    np.float32(1.0), np.int64(2), np.array([1, 2])]),
                   st.floats(allow_nan=True, allow_infinity=True))
ANY = st.one_of(TRICKY, st.integers(-3, 300), st.integers(), st.text(max_size=3),
                st.lists(st.integers(-2, 300), max_size=3), st.lists(st.text(max_size=2), max_size=2))
VALID = {  # each field's valid values, edges included
    "temperature": st.one_of(st.floats(0, 2), st.integers(0, 2), st.just(np.float32(0.5))),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.just(1)),
    "top_k": st.one_of(st.integers(-1, VOCAB + 1), st.just(np.int64(3))),
    "min_p": st.floats(0, 1),
    "seed": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    "max_tokens": st.one_of(st.integers(1, 4), st.just(10**9)),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3),
                      st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), max_size=3), st.just(np.array([7]))),
    "ignore_eos": st.one_of(st.booleans(), st.just(np.bool_(True))),
    "logprobs": st.one_of(st.none(), st.integers(0, MAX_LOGPROBS)),
    "prompt_logprobs": st.one_of(st.none(), st.integers(0, MAX_LOGPROBS)),
}
VALID_KWARGS = st.fixed_dictionaries({}, optional=VALID)
ONE_WILD = st.tuples(VALID_KWARGS, st.sampled_from(sorted(VALID)), TRICKY).map(lambda t: {**t[0], t[1]: t[2]})
ALL_WILD = st.fixed_dictionaries({}, optional={name: ANY for name in VALID})
VALID_PROMPT = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
ARRAY_PROMPT = st.tuples(VALID_PROMPT, st.sampled_from([np.int32, np.int64, np.uint8, np.float32, np.bool_])).map(
    lambda ids_dtype: np.array(ids_dtype[0]).astype(ids_dtype[1]))
ONE_WILD_ID = st.tuples(VALID_PROMPT, st.integers(0, 8), TRICKY).map(lambda t: t[0][:t[1]] + [t[2]] + t[0][t[1]:])
WILD_PROMPT = st.one_of(
    ONE_WILD_ID,
    st.lists(st.integers(-2, VOCAB + 2), max_size=8),  # empty, negative and out-of-vocabulary ids too
    st.lists(st.integers(0, VOCAB - 1), min_size=MAX_MODEL_LEN - 2, max_size=MAX_MODEL_LEN + 2),  # near the limit
    ARRAY_PROMPT,
    ANY,
)
# Mostly one thing wrong at a time, so that a refusal that is missing shows up as a case served.
CASES = st.one_of(st.tuples(VALID_KWARGS, VALID_PROMPT), st.tuples(ONE_WILD, VALID_PROMPT),
                  st.tuples(VALID_KWARGS, WILD_PROMPT), st.tuples(ALL_WILD, st.one_of(VALID_PROMPT, WILD_PROMPT)))


@pytest.fixture(scope="module")
def engine():
    """One engine for every case, and the known request's greedy tokens from a fresh one."""
    model = load_model("tiny-llama")
    known = tiny_llm(model, max_model_len=MAX_MODEL_LEN).generate([KNOWN_PROMPT], KNOWN, use_tqdm=False)[0]
    llm = tiny_llm(model, max_model_len=MAX_MODEL_LEN, max_num_seqs=4)
    return llm, known.token_ids


def assert_well_typed(kwargs: dict, params: SamplingParams) -> None:
    """Accepted parameters hold Python values of their fields' types, and no bool passed as a number."""
    assert all(type(getattr(params, f)) is int for f in INT_FIELDS
               if f not in OPTIONAL_FIELDS or getattr(params, f) is not None)
    assert all(type(getattr(params, f)) is float and math.isfinite(getattr(params, f)) for f in FLOAT_FIELDS)
    assert all(type(getattr(params, f)) is bool for f in BOOL_FIELDS)
    assert all(type(s) is str and s for s in params.stop)
    assert all(type(t) is int and 0 <= t < VOCAB for t in params.stop_token_ids)
    assert not any(isinstance(kwargs.get(f), (bool, np.bool_)) for f in INT_FIELDS + FLOAT_FIELDS)


def assert_int_ids(prompt: object, prompt_token_ids: list[int]) -> None:
    """An accepted prompt was a sequence of (Python or NumPy) ints, not bools or floats, kept as given."""
    assert all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)
    assert prompt_token_ids == [int(t) for t in prompt]


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(case=CASES)
def test_bad_input_is_refused_or_served(engine, case):
    llm, known_tokens = engine
    kwargs, prompt = case
    try:
        params = SamplingParams(**kwargs)
        request = llm.add_request(prompt, params)
    except ValueError as e:
        event(f"refused: {str(e).split(',')[0]}")
    else:
        event("served")
        while llm.has_unfinished():
            llm.step()
        out = request.output()
        assert_well_typed(kwargs, params)
        assert_int_ids(prompt, out.prompt_token_ids)
        assert out.finish_reason in ("stop", "length"), out.error
        assert 1 <= len(out.token_ids) <= params.max_tokens and all(0 <= t < VOCAB for t in out.token_ids)
    assert not llm.has_unfinished() and llm.allocator.num_free == llm.config.num_pages - 1
    assert llm.generate([KNOWN_PROMPT], KNOWN, use_tqdm=False)[0].token_ids == known_tokens
