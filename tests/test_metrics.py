"""Serving metrics on synthetic timestamps with hand-computed answers."""

import math

import pytest

from benchmarks.metrics import (RequestTiming, Stats, cost_per_million_tokens, interactivity, pareto_frontier,
                            point_metrics)

# Request a: steady 0.5 s tokens. Request b: a multi-step burst of 4 tokens at one stamp, then one more.
A = RequestTiming(arrival=0.0, token_times=(1.0, 1.5, 2.0, 2.5), num_prompt_tokens=10)
B = RequestTiming(arrival=1.0, token_times=(1.5, 1.5, 1.5, 1.5, 3.5), num_prompt_tokens=20)


def test_request_latencies():
    assert A.ttft == 1.0 and A.e2e == 2.5 and A.tpot == 0.5 and A.itls == [0.5, 0.5, 0.5]
    assert B.ttft == 0.5 and B.e2e == 2.5 and B.tpot == 0.5 and B.itls == [0.0, 0.0, 0.0, 2.0]
    assert RequestTiming(0.0, (0.2,), 5).tpot is None


def test_request_timing_rejects_bad_stamps():
    with pytest.raises(ValueError):
        RequestTiming(0.0, (), 1)
    with pytest.raises(ValueError):
        RequestTiming(0.0, (2.0, 1.0), 1)
    with pytest.raises(ValueError):
        RequestTiming(1.0, (0.5,), 1)


def test_stats_in_milliseconds():
    s = Stats.of_seconds([0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 2.0])
    assert s.mean == pytest.approx(500.0) and s.median == pytest.approx(500.0)
    assert s.p99 == pytest.approx(500 + 0.94 * 1500)  # linear interpolation at rank 0.99 * 6
    assert math.isnan(Stats.of_seconds([]).median)


def test_point_metrics():
    m = point_metrics([A, B], concurrency=2)
    assert m.duration_s == 3.5  # first arrival 0.0 .. last token 3.5
    assert (m.input_tokens, m.output_tokens, m.num_requests) == (30, 9, 2)
    assert m.output_tok_s == pytest.approx(9 / 3.5) and m.total_tok_s == pytest.approx(39 / 3.5)
    assert m.ttft_ms.mean == pytest.approx(750.0) and m.ttft_ms.median == pytest.approx(750.0)
    assert m.tpot_ms.median == pytest.approx(500.0) and m.interactivity == pytest.approx(2.0)
    assert m.itl_ms.mean == pytest.approx(500.0) and m.e2e_ms.median == pytest.approx(2500.0)


def test_point_metrics_per_device_and_explicit_duration():
    m = point_metrics([A, B], concurrency=2, num_devices=3, duration_s=4.5)
    assert m.output_tok_s == pytest.approx(9 / 4.5 / 3) and m.total_tok_s == pytest.approx(39 / 4.5 / 3)


def test_interactivity():
    assert interactivity(20.0) == 50.0
    assert math.isnan(interactivity(0.0))


def test_pareto_frontier():
    points = [(1, 5), (2, 4), (3, 1), (1.5, 3.9), (2, 4), (0.5, 5)]
    # (1.5, 3.9) loses to (2, 4); (0.5, 5) to (1, 5); the duplicate (2, 4) pair both stay.
    assert pareto_frontier(points) == [2, 1, 4, 0]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1, 1)]) == [0]


def test_cost_per_million_tokens():
    # H100 at 1.30 $/h and 1000 tok/s: 3.6 M tokens an hour.
    assert cost_per_million_tokens(1.30, 1000.0) == pytest.approx(1.30 / 3.6)
    assert cost_per_million_tokens(1.41, 3600.0) == pytest.approx(1.41 / 12.96)
    assert cost_per_million_tokens(1.0, 0.0) == math.inf
