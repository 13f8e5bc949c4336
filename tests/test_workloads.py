"""The serving benchmark's workload builders (benchmarks/workloads.py: InferenceMAX shapes, agentic
sessions), their per-turn and server-state summaries (benchmarks/metrics.py) and the /metrics
names the benchmark reads (benchmarks/http_client.py, server/metrics.py)."""

import numpy as np
import pytest

from benchmarks.http_client import parse_metrics, state_sample
from benchmarks.metrics import RequestTiming, StateSample, TurnResult, state_summary, turn_summary
from benchmarks.workloads import SHAPES, agentic_sessions, max_model_len, shape_lengths, think_times
from server.metrics import ServerMetrics


def test_shapes_scale_keeping_the_ratio():
    assert shape_lengths("8k1k") == (8192, 1024)
    assert shape_lengths("8k1k", 0.0625) == (512, 64)  # the CPU run's shape: still 8:1
    assert shape_lengths("8k1k", 1 / 256) == (32, 4)
    assert shape_lengths("1k8k", 0.5) == (512, 4096) and shape_lengths("1k1k", 1e-6) == (1, 1)
    assert set(SHAPES) == {"1k1k", "1k8k", "8k1k"}
    with pytest.raises(ValueError, match="unknown shape"):
        shape_lengths("4k1k")
    with pytest.raises(ValueError, match="scale"):
        shape_lengths("8k1k", 0)


def test_agentic_conversation_grows_by_reply_user_message_and_tool_result():
    sessions = agentic_sessions(seed=1, num_sessions=3, num_turns=4, user_len=20, tool_result_len=12, osl=6,
                                ratio=0.5, vocab_size=100, stream=2, shared_prefix_len=9)
    assert len(sessions) == 3 and all(len(s.turns) == 4 for s in sessions)
    for s in sessions:
        assert s.prompt(0) == s.system + s.turns[0].user + s.turns[0].tool_result
        assert len(s.system) == 9 and s.system == sessions[0].system  # one system prompt per seed
        for t in range(3):
            nxt = s.turns[t + 1]
            # exactly: the previous request, the reply it got, then a new user message and tool result
            assert s.prompt(t + 1) == s.prompt(t) + s.turns[t].reply + nxt.user + nxt.tool_result
            assert s.output_len(t) == len(s.turns[t].reply)
        for turn in s.turns:
            assert 10 <= len(turn.user) <= 20 and 6 <= len(turn.tool_result) <= 12 and 3 <= len(turn.reply) <= 6
        assert max(len(s.prompt(t)) + s.output_len(t) for t in range(4)) <= max_model_len(20, 6, 9, 4, 12)
    assert sessions[0].turns[0].user != sessions[1].turns[0].user  # sessions differ
    again = agentic_sessions(seed=1, num_sessions=3, num_turns=4, user_len=20, tool_result_len=12, osl=6,
                             ratio=0.5, vocab_size=100, stream=2, shared_prefix_len=9)
    assert again == sessions  # seeded: every system gets the same sessions
    none = agentic_sessions(seed=1, num_sessions=1, num_turns=2, user_len=5, tool_result_len=0, osl=3, ratio=1.0,
                            vocab_size=100)
    assert none[0].turns[0].tool_result == [] and none[0].system == [] and len(none[0].prompt(0)) == 5


def test_think_times():
    sessions = agentic_sessions(seed=0, num_sessions=2, num_turns=3, user_len=4, tool_result_len=4, osl=2, ratio=1.0,
                                vocab_size=50, think_time_s=0.5)
    assert [t.think_s for s in sessions for t in s.turns] == [0.0, 0.5, 0.5] * 2  # none before the first turn
    xs = think_times(np.random.default_rng(0), 4000, 2.0, "exponential")
    assert abs(np.mean(xs) - 2.0) < 0.15 and min(xs) >= 0 and np.std(xs) > 1.5
    assert think_times(np.random.default_rng(0), 3, 0.0, "exponential") == [0.0] * 3
    with pytest.raises(ValueError, match="fixed or exponential"):
        think_times(np.random.default_rng(0), 3, 1.0, "uniform")


def test_turn_summary():
    def result(session, turn, ttft, prompt, cached):
        return TurnResult(session, turn, RequestTiming(10.0, (10.0 + ttft, 10.5 + ttft), prompt), cached)
    rows = turn_summary([result(0, 0, 0.1, 40, 16), result(1, 0, 0.3, 60, 16), result(0, 1, 0.2, 100, 32),
                         result(1, 1, 0.2, 100, None)])
    first, second = rows
    assert first["turn"] == 1 and first["num_requests"] == 2 and first["prompt_tokens_mean"] == 50
    assert first["ttft_ms"]["median"] == pytest.approx(200) and first["ttft_ms"]["p99"] == pytest.approx(298)
    assert (first["prefix_cache_queries"], first["prefix_cache_hits"]) == (100, 32)
    assert first["prefix_cache_hit_rate"] == pytest.approx(0.32)
    assert second["turn"] == 2 and second["prefix_cache_hits"] is None and second["prefix_cache_hit_rate"] is None


def test_state_summary():
    before, after = StateSample(0.0, 0, 0, 100, 10), StateSample(0.1, 0, 0, 300, 110)
    s = state_summary(before, after, [StateSample(0.5, 2, 1), StateSample(0.3, 4, 0), StateSample(None, None, None)],
                      "metrics")
    assert s["kv_cache_usage"] == {"before": 0.0, "after": 0.1, "mean": 0.4, "max": 0.5}
    assert s["num_requests_running"] == {"mean": 3, "max": 4} and s["num_samples"] == 3
    assert s["prefix_cache"] == {"queries": 200, "hits": 100, "hit_rate": 0.5}
    empty = state_summary(StateSample(None, None, None), StateSample(None, None, None), [], "metrics")
    assert empty["prefix_cache"] == {"queries": None, "hits": None, "hit_rate": None}
    assert empty["kv_cache_usage"]["max"] is None


def test_metrics_by_vllm_names_first():
    vllm = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3 0.6B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3 0.6B"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
"""
    assert parse_metrics(vllm)["vllm:num_requests_running"] == [3.0, 2.0]
    assert state_sample(vllm) == StateSample(0.5, 5.0, 1.0, 1000.0, 600.0)  # usage averaged over engines
    old = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\nvllm:num_requests_running{model_name="m"} 1\n'
    assert state_sample(old) == StateSample(0.5, 1.0, None, None, None)
    assert state_sample("") == StateSample(None, None, None, None, None)


def test_server_metrics_export_vllm_names():
    """Ours: jaxserve_ names as before, and vLLM's beside them; the prefix-cache counters once published."""
    m = ServerMetrics("tiny", num_pages=11)
    m.engine_state(running=2, waiting=1, pages_used=5)
    assert "prefix_cache" not in m.render()  # nothing published yet: no counters that would read 0
    m.engine_state(running=2, waiting=1, pages_used=5, prefix_cache_queries=300, prefix_cache_hits=120)
    m.admitted(7)
    m.request_finished("length", 0.01, 0.5)
    text = m.render()
    values = parse_metrics(text)
    for name in ("jaxserve_num_requests_running", "jaxserve_kv_cache_usage_ratio", "jaxserve_prompt_tokens_total",
                 "jaxserve_requests_finished_total", "jaxserve_time_to_first_token_seconds_count",
                 "jaxserve_prefix_cache_queries_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:request_success_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"):
        assert name in values, name
    assert "# TYPE vllm:prefix_cache_hits_total counter" in text and "# TYPE vllm:kv_cache_usage_perc gauge" in text
    assert values["vllm:kv_cache_usage_perc"] == values["jaxserve_kv_cache_usage_ratio"] == [0.5]
    assert 'vllm:request_success_total{model_name="tiny",finished_reason="length"} 1' in text
    assert state_sample(text) == StateSample(0.5, 2.0, 1.0, 300.0, 120.0, compilations=0.0)
