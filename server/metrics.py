"""The server's Prometheus metrics (text exposition format 0.0.4), written by hand: gauges of the
engine's state, token, request, prefix-cache and XLA-compilation counters, and TTFT / TPOT / E2E
histograms.

Each has a `jaxserve_` name, and where vLLM (V1) exports the same quantity its `vllm:` name too,
with vLLM's meaning, so clients and dashboards written for vLLM read ours unchanged:
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a fraction,
as vLLM's) and its older alias `vllm:gpu_cache_usage_perc`, the counters
`vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (prompt tokens), `vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`, `vllm:request_success_total{finished_reason}`, and the histograms
`vllm:time_to_first_token_seconds` and `vllm:e2e_request_latency_seconds` (vLLM's
`time_per_output_token_seconds` is per token, ours a request's mean: no alias).

The engine thread writes them (after every step) and the HTTP handlers count their errors;
`/metrics` reads them. One lock keeps a scrape consistent.
"""

from __future__ import annotations

import collections
import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
MOE_SERIES = (  # per MoE layer (label layer: its index among the MoE layers), from ExpertCounts.summary()
    ("jaxserve_moe_routed_total", "counter", "Token-expert assignments (tokens x top-k) routed since the start."),
    ("jaxserve_moe_expert_load_imbalance", "gauge",
     "Max over mean tokens per expert over the recent steps that computed routing (1: balanced)."),
    ("jaxserve_moe_idle_experts", "gauge", "Experts given no token over the recent steps that computed routing."),
)


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus semantics: `le` is an upper bound)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str, labels: str) -> list[str]:
        lines = [f'{name}_bucket{{{labels},le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        return lines + [f"{name}_sum{{{labels}}} {_number(self.sum)}", f"{name}_count{{{labels}}} {self.count}"]


class ServerMetrics:
    """Everything /metrics shows, labelled with the served model's name."""

    def __init__(self, model_name: str, num_pages: int):
        self._lock = threading.Lock()
        self._labels = f'model_name="{_escape(model_name)}"'
        self.running = self.waiting = self.pages_used = 0
        self.pages_total = num_pages - 1  # page 0 is the reserved null page
        self.prompt_tokens = self.generation_tokens = 0
        self.prefix_cache_queries: int | None = None  # None until the engine publishes them
        self.prefix_cache_hits: int | None = None
        self.finished: collections.Counter[str] = collections.Counter()
        self.http_errors: collections.Counter[int] = collections.Counter()
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.moe_layers: list[tuple[int, float, int]] = []  # engine/expert_counts.py ExpertCounts.summary()
        self.xla_compilations = 0

    # ---- writers ----------------------------------------------------------------------------
    def engine_state(self, running: int, waiting: int, pages_used: int, prefix_cache_queries: int | None = None,
                     prefix_cache_hits: int | None = None) -> None:
        """The engine's gauges, and its prefix cache's running totals (PrefixCacheStats: prompt
        tokens looked up and found) when given; the prefix-cache counters appear once they are."""
        with self._lock:
            self.running, self.waiting, self.pages_used = running, waiting, pages_used
            if prefix_cache_queries is not None:
                self.prefix_cache_queries, self.prefix_cache_hits = prefix_cache_queries, prefix_cache_hits

    def expert_load(self, per_layer: list[tuple[int, float, int]]) -> None:
        """A MoE engine's expert counts, per MoE layer (ExpertCounts.summary): three series a layer,
        however many experts (256 experts x 60 layers would be 15360 series of their own)."""
        with self._lock:
            self.moe_layers = per_layer

    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def generated(self, tokens: int, ttft: float | None = None) -> None:
        """`tokens` more output tokens; `ttft` when the first of a request is among them."""
        with self._lock:
            self.generation_tokens += tokens
            if ttft is not None:
                self.ttft.observe(ttft)

    def request_finished(self, reason: str, tpot: float | None, e2e: float) -> None:
        with self._lock:
            self.finished[reason] += 1
            if tpot is not None:
                self.tpot.observe(tpot)
            self.e2e.observe(e2e)

    def http_error(self, status: int) -> None:
        with self._lock:
            self.http_errors[status] += 1

    def xla_compiled(self) -> None:
        """One more XLA compilation (benchmarks/compilations.py on_compilation: any thread)."""
        with self._lock:
            self.xla_compilations += 1

    # ---- the scrape -------------------------------------------------------------------------
    def render(self) -> str:
        with self._lock:
            out: list[str] = []
            lab = self._labels

            def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
                out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

            def scalar(name: str, kind: str, help_text: str, value: object) -> None:
                metric(name, kind, help_text, [f"{name}{{{lab}}} {value}"])

            usage = _number(self.pages_used / max(1, self.pages_total))
            for prefix in ("jaxserve_", "vllm:"):
                scalar(f"{prefix}num_requests_running", "gauge", "Requests in the running batch.", self.running)
                scalar(f"{prefix}num_requests_waiting", "gauge", "Requests waiting to be admitted.", self.waiting)
            scalar("jaxserve_kv_pages_used", "gauge", "KV cache pages held by requests.", self.pages_used)
            scalar("jaxserve_kv_pages_total", "gauge", "KV cache pages in the pool (without the null page).",
                   self.pages_total)
            scalar("jaxserve_kv_cache_usage_ratio", "gauge", "Fraction of KV cache pages in use.", usage)
            scalar("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage: 1 means 100 percent.", usage)
            scalar("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage: 1 means 100 percent (older name).", usage)
            if self.prefix_cache_queries is not None:
                for prefix in ("jaxserve_", "vllm:"):
                    scalar(f"{prefix}prefix_cache_queries_total", "counter",
                           "Prompt tokens admitted requests looked up in the prefix cache.", self.prefix_cache_queries)
                    scalar(f"{prefix}prefix_cache_hits_total", "counter",
                           "Prompt tokens the prefix cache had (their KV was not recomputed).", self.prefix_cache_hits)
            for prefix in ("jaxserve_", "vllm:"):
                scalar(f"{prefix}prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
                       self.prompt_tokens)
                scalar(f"{prefix}generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
            for name, label in (("jaxserve_requests_finished_total", "finish_reason"),
                                ("vllm:request_success_total", "finished_reason")):
                metric(name, "counter", "Finished requests by finish reason.",
                       [f'{name}{{{lab},{label}="{_escape(r)}"}} {n}' for r, n in sorted(self.finished.items())])
            scalar("jaxserve_xla_compilations_total", "counter", "XLA compilations since the server started "
                   "serving (after its warm-up; 0 in steady state).", self.xla_compilations)
            metric("jaxserve_http_errors_total", "counter", "Error responses by HTTP status.",
                   [f'jaxserve_http_errors_total{{{lab},status="{s}"}} {n}' for s, n in sorted(self.http_errors.items())])
            for name in ("jaxserve_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"):
                metric(name, "histogram", "Time from receiving a request to its first output token.",
                       self.ttft.samples(name, lab))
            metric("jaxserve_time_per_output_token_seconds", "histogram",
                   "A finished request's mean time per output token after the first.",
                   self.tpot.samples("jaxserve_time_per_output_token_seconds", lab))
            for name in ("jaxserve_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"):
                metric(name, "histogram", "Time from receiving a request to its last output token.",
                       self.e2e.samples(name, lab))
            for i, (name, kind, help_text) in enumerate(MOE_SERIES if self.moe_layers else ()):
                metric(name, kind, help_text, [f'{name}{{{lab},layer="{layer}"}} {_number(values[i])}'
                                               for layer, values in enumerate(self.moe_layers)])
            return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(float(x))


def parse(text: str) -> dict[str, float]:
    """{sample name with labels: value} of a Prometheus text page (for tests and clients)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
