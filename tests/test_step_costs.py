"""The measured step costs (engine/step_costs.py) and the two adaptive policies that read them: the
prefill tokens a step may carry beside decodes, and one-step vs multi-step decode calls."""

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.page_allocator import PageAllocator
from engine.request import Request, SamplingParams
from engine.scheduler import Scheduler
from engine.step_costs import MIN_OBSERVATIONS, StepCosts


def costs_of(fixed: float, per_token: float, tokens: list[int], host: float = 0.0) -> StepCosts:
    """StepCosts that saw one-step calls of `tokens` costing fixed + per_token * tokens (+ host)."""
    costs = StepCosts()
    for t in tokens:
        device = fixed + per_token * t
        costs.observe(t, device + host, device, 1, decode_only=True)
    return costs


def test_line_recovers_fixed_and_per_token_cost():
    rng = np.random.default_rng(0)
    costs = costs_of(0.02, 0.0007, [int(t) for t in rng.integers(1, 512, 40)])
    fixed, per_token = costs.line()
    assert fixed == pytest.approx(0.02, rel=1e-6) and per_token == pytest.approx(0.0007, rel=1e-6)
    most = costs.max_tokens(8, 3.0)  # (ratio - 1) * fixed / per_token + ratio * 8: 3 steps of 8 tokens
    assert most == pytest.approx(2 * 0.02 / 0.0007 + 3 * 8)
    assert 0.02 + 0.0007 * most == pytest.approx(3 * (0.02 + 0.0007 * 8))


def test_no_cap_until_measured_or_without_a_slope():
    assert costs_of(0.02, 0.0007, [8, 100] * (MIN_OBSERVATIONS // 2 - 1)).max_tokens(8, 3.0) is None
    assert costs_of(0.02, 0.0007, [8] * 20).max_tokens(8, 3.0) is None  # one size: no slope
    assert costs_of(0.02, 0.0, [8, 100] * 10).max_tokens(8, 3.0) is None  # prefill is free


def test_line_follows_the_newest_steps():
    """The machine slows down (another process): the line moves to the new costs."""
    sizes = [8, 64, 200, 500] * 50
    costs = costs_of(0.01, 0.0002, sizes)
    for t in sizes:
        costs.observe(t, 0.03 + 0.001 * t, 0.0)
    assert costs.line()[1] == pytest.approx(0.001, rel=0.05)


def test_host_share_of_decode_calls():
    """Reported by scripts/profile_serving.py."""
    assert costs_of(0.02, 0.0, [8] * (MIN_OBSERVATIONS - 1), host=0.002).host_share() is None
    assert costs_of(0.02, 0.0, [8] * 30, host=0.002).host_share() == pytest.approx(0.002 / 0.022, rel=0.01)
    four = StepCosts()
    for _ in range(30):  # 4-step calls: 2 ms host per call, 20 ms device per step
        four.observe(8, 0.082, 0.080, steps=4, decode_only=True)
    assert four.host_share() == pytest.approx(0.002 / 0.022, rel=0.01)


def make(costs: StepCosts, **kwargs) -> Scheduler:
    cfg = EngineConfig(**{"max_model_len": 256, "page_size": 4, "num_pages": 512, "max_num_seqs": 8,
                          "prefill_chunk": 128, "max_num_batched_tokens": 256, "decode_steps": 4, **kwargs})
    return Scheduler(cfg, PageAllocator(512), costs=costs)


def decoding(s: Scheduler, n: int) -> list[Request]:
    """n running requests past their prompts (decodes)."""
    reqs = [Request(i, [1, 2, 3], SamplingParams(max_tokens=50), 0, max_total_len=100) for i in range(n)]
    for r in reqs:
        s.add(r)
    for x in s.schedule().scheduled:
        x.request.num_computed = x.end
        x.request.output_token_ids.append(0)
    return reqs


@pytest.mark.parametrize("ratio, expect_cap", [(3.0, True), (None, False)])
def test_prefill_beside_decodes_is_capped_by_the_ratio(ratio, expect_cap):
    # 4 decodes run in the 8-token bucket; ratio 3: at most 2 * 20 + 3 * 8 = 64 tokens, a bucket: 60 prefill
    costs = costs_of(0.02, 0.001, [4, 200] * 10)
    s = make(costs, mixed_step_ratio=ratio)
    decoding(s, 4)
    s.add(Request(9, list(range(200)), SamplingParams(max_tokens=5), 0, max_total_len=205))
    out = s.schedule()
    prefill = sum(x.num_tokens for x in out.scheduled if x.request.is_prefilling)
    assert prefill == (60 if expect_cap else 128)
    assert sum(x.num_tokens for x in out.scheduled if not x.request.is_prefilling) == 4  # every decode runs


def test_cap_fills_a_token_bucket():
    """At most 2 * 20 + 3 * 8 = 64 + 16 = 80 tokens (fixed 25 ms): the largest bucket within is 64."""
    s = make(costs_of(0.025, 0.001, [4, 200] * 10), mixed_step_ratio=3.0)
    decoding(s, 4)
    s.add(Request(9, list(range(200)), SamplingParams(max_tokens=5), 0, max_total_len=205))
    assert sum(x.num_tokens for x in s.schedule().scheduled) == 64


def test_prefill_alone_takes_the_whole_chunk():
    s = make(costs_of(0.02, 0.001, [4, 200] * 10), mixed_step_ratio=3.0)
    s.add(Request(9, list(range(200)), SamplingParams(max_tokens=5), 0, max_total_len=205))
    assert s.schedule().scheduled[0].num_tokens == 128


def timed(one: float, many: float, calls: int = 10, rows: int = 4, most: int = 4) -> StepCosts:
    """StepCosts whose decode cycles over `rows` cost `one` s per token in one-step calls and `many` in
    `most`-step calls, `calls` of each."""
    costs = StepCosts()
    for _ in range(calls):
        costs.observe_cycle(rows, 1, one)
        costs.observe_cycle(rows, most, many * most)
    return costs


@pytest.mark.parametrize("one, many, gain, steps", [(0.027, 0.018, 0.1, 4), (0.030, 0.029, 0.1, 1),
                                                    (0.030, 0.029, 0.0, 4), (0.030, 0.028, 0.1, 1)])
def test_multi_step_only_where_measured_faster_per_token(one, many, gain, steps):
    """Bursts only where they pay by min_gain: 27 vs 18 ms per token (served, concurrency 1): 4 steps;
    30 vs 29 ms (concurrency 8): one step, each token streamed alone."""
    s = make(timed(one, many, calls=11), multi_step_min_gain=gain)  # 22 calls: not a re-timing call
    decoding(s, 4)
    assert s.schedule().decode_steps == steps


def test_each_kind_is_timed_first_then_retimed():
    costs = StepCosts()
    assert costs.decode_steps(4, 4, 0.1) == 1  # one step first
    costs.observe_cycle(4, 1, 5.0)  # the first call of a kind compiled: counted, not averaged
    for _ in range(2):
        costs.observe_cycle(4, 1, 0.03)
    assert costs.decode_steps(4, 4, 0.1) == 4  # then decode_steps
    for _ in range(3):
        costs.observe_cycle(4, 4, 0.04)  # 10 ms per token: far faster
    assert costs._cycles[4, 1][0] == pytest.approx(0.03)
    assert costs.decode_steps(4, 4, 0.1) == 4 and costs.decode_steps(8, 4, 0.1) == 1  # per batch bucket
    choices = []
    for _ in range(64):
        choices.append(costs.decode_steps(4, 4, 0.1))
        costs.observe_cycle(4, choices[-1], 0.03 if choices[-1] == 1 else 0.04)
    assert choices.count(1) == 2 and choices.count(4) == 62  # the slower kind, once every 32 calls


def test_decode_steps_unmeasured_when_min_gain_is_none():
    s = make(timed(0.02, 0.03), multi_step_min_gain=None)  # bursts measured slower, but not asked
    decoding(s, 4)
    assert s.schedule().decode_steps == 4


def test_engine_times_its_whole_cycle():
    """LLM.step times a decode-only call to the next step's start (the caller's part included)."""
    import time
    from engine.llm import LLM
    llm = LLM("tiny-llama", max_model_len=64, max_num_seqs=4, decode_steps=4, multi_step_min_gain=0.1)
    llm.add_request([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
    while llm.has_unfinished():
        llm.step()
        time.sleep(0.01)  # a caller that takes 10 ms per step: bursts pay 4x less of it per token
    cycles = llm.costs._cycles
    assert {steps for _, steps in cycles} == {1, 4}
    assert cycles[1, 1][0] > 0.01 and cycles[1, 4][0] < cycles[1, 1][0]
    assert cycles[1, 4][1] >= 2 and cycles[1, 4][0] > 0  # an averaged 4-step cycle, not the first (compiling) one


def test_config_refuses_bad_ratios():
    with pytest.raises(ValueError, match="mixed_step_ratio"):
        EngineConfig(max_model_len=64, mixed_step_ratio=1.0)
    with pytest.raises(ValueError, match="multi_step_min_gain"):
        EngineConfig(max_model_len=64, multi_step_min_gain=-0.5)


def test_optional_number_flags():
    from engine.config import optional_number_arg
    assert optional_number_arg("mixed_step_ratio", "auto") == {}
    assert optional_number_arg("mixed_step_ratio", "none") == {"mixed_step_ratio": None}
    assert optional_number_arg("multi_step_min_gain", "0.25") == {"multi_step_min_gain": 0.25}
    with pytest.raises(ValueError, match="mixed_step_ratio"):
        optional_number_arg("mixed_step_ratio", "fast")
