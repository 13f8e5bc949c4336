"""EngineConfig: every engine knob in one frozen, self-validating object, plus its shape buckets."""

from __future__ import annotations

import dataclasses

import jax

from engine.kv_cache import check_kv_cache_dtype


def powers_of_two_upto(limit: int, start: int = 1) -> tuple[int, ...]:
    """start, 2*start, ... below limit, then limit itself: every size <= limit has a bucket, and the
    largest is no bigger than needed (516 tokens of 16-token pages: 33 pages, not 64)."""
    out = [start]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return tuple(out) + ((limit,) if out[-1] < limit else ())


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest shape bucket {buckets[-1]}")


def default_token_budget(platform: str) -> int:
    """max_num_batched_tokens when none is given. A CPU is compute-bound: a step's time grows with
    its tokens, and 512 keeps a mixed step (32 decodes + a prefill chunk) within 1.5 decode calls
    of 4 steps, the ITL p99 target (docs/benchmark_results.md); elsewhere vLLM's V1 default, 2048."""
    return 512 if platform == "cpu" else 2048


def default_mixed_step_ratio(platform: str) -> float | None:
    """mixed_step_ratio when none is given. A CPU is compute-bound: a 256-token prefill chunk beside
    8 decodes took 6x a decode step there, the decodes' ITL p99; 3 keeps ITL p99 within 3x p50 for
    8-12% of output tok/s (served, docs/benchmark_results.md). Elsewhere none: vLLM's budget-only policy."""
    return 3.0 if platform == "cpu" else None


def optional_number_arg(name: str, text: str) -> dict[str, float | None]:
    """A flag for an EngineConfig number that may be None, as LLM keyword arguments: "auto" none (the
    field's default), "none" None, else the number."""
    if text == "auto":
        return {}
    if text == "none":
        return {name: None}
    try:
        return {name: float(text)}
    except ValueError:
        raise ValueError(f"{name} must be a number, 'none' or 'auto', got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Cache geometry, batching limits and step shapes (the one source of the engine's defaults).

    A step is one ragged batch of at most max_num_batched_tokens tokens: every running decode's next
    token plus prefill chunks of at most prefill_chunk tokens per request. A step with no prefill
    work runs decode_steps decode steps (sampling included) inside one jitted call between host
    checks of the stop conditions. max_num_batched_tokens defaults by platform
    (default_token_budget), prefill_chunk to min(512, max_num_batched_tokens / attention_shards).
    """

    max_model_len: int
    page_size: int = 16
    num_pages: int | None = None
    max_num_seqs: int = 64
    prefill_chunk: int | None = None
    max_num_batched_tokens: int | None = None
    decode_steps: int = 4
    # A decode-only call runs decode_steps steps (each client gets its tokens in bursts of that many)
    # only where the engine measured that at least this much faster per token than one step (each
    # token streamed as soon as it is sampled), per batch bucket (engine/step_costs.py). 0.5: a burst
    # of 4 must cost at most 2/3 of 4 single steps (served on CPU, concurrency 1: 16.5 vs 27 ms per
    # token, bursts; 8: an estimated ~31 vs ~39 ms from the step profile, one by one). None: always decode_steps; decode_steps=1: never.
    multi_step_min_gain: float | None = 0.5
    # While requests decode, a step's prefill tokens are capped so that the step takes at most this
    # many decode steps of its decodes (their inter-token latency), by the step-cost line the engine
    # measures as it runs (engine/step_costs.py). None: the token budget alone; default by platform.
    mixed_step_ratio: float | None = dataclasses.field(default_factory=lambda: default_mixed_step_ratio(
        jax.default_backend()))
    # Dispatch a decode-only call's successor before waiting for its tokens (vLLM's async
    # scheduling). Off by default: on a CPU the "device" is the host's own cores, so nothing
    # overlaps, and an arrival waits for the call run ahead (TTFT p50 +56% at c=4, +121% at c=16:
    # docs/benchmark_results.md).
    async_scheduling: bool = False
    attention_impl: str = "auto"
    # KV pool storage (engine/kv_cache.py KV_CACHE_DTYPES): "auto" the model's dtype; "fp8_e4m3"
    # (or vLLM's "fp8") float8_e4m3fn with the per-tensor scale models.attention.KV_SCALE: half
    # the bytes, twice the pages per kv_cache_bytes; read by the jnp path and the ragged and MLA kernels
    # (pallas_kernels/ops.py; the padded paged kernel refuses it).
    kv_cache_dtype: str = "auto"
    # Share the KV of full pages between requests with the same prefix (engine/prefix_cache.py).
    enable_prefix_caching: bool = True
    kv_cache_bytes: int = 4 << 30  # pool budget when num_pages is None
    min_context_bucket: int = 256  # smallest block-table width, in tokens
    # Count the tokens routed to each (MoE layer, expert) on every step (engine/expert_counts.py,
    # LLM.expert_counts): every step of a MoE model runs the hooked variant (models/hooks.py) and
    # decodes one token per call. Off: only steps holding a request that asks for routing count.
    count_experts: bool = False
    # Drafts a speculative decode verifies at most (K); set by LLM from its speculative_config.
    num_speculative_tokens: int = 0
    # Data-parallel attention (sharding/attention_shards.py): the requests, the page pool,
    # max_num_seqs and the token budget split into this many equal shards, each attended on its
    # own devices. Set by LLM from the mesh and the rules' "pages" axes; 1: one shared pool.
    attention_shards: int = 1
    # A request's tokens and logprobs bitwise the same whatever runs beside it (engine/batch_invariance.py):
    # every step at one token shape (the budget), one attention kernel for every row, every LM head and
    # sampler over max_num_seqs rows. Costs a full-budget forward per decode step.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens", default_token_budget(jax.default_backend()))
        self._check_shards()
        _check_batch_invariant(self)
        if self.prefill_chunk is None:
            object.__setattr__(self, "prefill_chunk", min(512, self.tokens_per_shard))
        for name in ("max_model_len", "page_size", "max_num_seqs", "prefill_chunk",
                     "max_num_batched_tokens", "decode_steps", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_kv_cache_dtype(self.kv_cache_dtype)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.multi_step_min_gain is not None and not self.multi_step_min_gain >= 0.0:
            raise ValueError(f"multi_step_min_gain must be >= 0 or None, got {self.multi_step_min_gain}")
        if self.mixed_step_ratio is not None and not self.mixed_step_ratio > 1.0:
            raise ValueError(f"mixed_step_ratio must be > 1 (a mixed step takes longer than a decode step) or "
                             f"None, got {self.mixed_step_ratio}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.prefill_chunk > self.tokens_per_shard:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} exceeds "
                             f"max_num_batched_tokens={self.max_num_batched_tokens}" + self._per_shard)
        if self.num_pages is not None and self.num_pages // self.attention_shards - 1 < self.pages_per_seq:
            raise ValueError(f"num_pages={self.num_pages} is too small to hold even one request of "
                             f"max_model_len={self.max_model_len} tokens: it needs {self.pages_per_seq} pages "
                             f"of {self.page_size} tokens plus the reserved null page" + self._per_shard)

    def _check_shards(self) -> None:
        """Each of attention_shards shards gets an equal share of the sequences, tokens and pages."""
        d = self.attention_shards
        if d < 1:
            raise ValueError(f"attention_shards must be >= 1, got {d}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_pages"):
            value = getattr(self, name)
            if value is not None and value % d:
                raise ValueError(f"{name}={value} does not split into {d} data-parallel attention shards")

    @property
    def _per_shard(self) -> str:
        d = self.attention_shards
        return f" (per data-parallel attention shard: 1/{d} of it)" if d > 1 else ""

    @property
    def seqs_per_shard(self) -> int:
        return self.max_num_seqs // self.attention_shards

    @property
    def sampling_slots(self) -> int:
        """Rows of the device penalty tables (engine/penalties.py): the null row and one per running request."""
        return self.max_num_seqs + 1

    @property
    def tokens_per_shard(self) -> int:
        """Each shard's token budget: its segment of a step's flat batch."""
        return self.max_num_batched_tokens // self.attention_shards

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Rows of a decode-only call (attention_shards equal groups of rows: multiples of it); batch
        invariant: max_num_seqs only (its LM head and sampler then see the mixed step's row count)."""
        if self.batch_invariant:
            return (self.max_num_seqs,)
        return tuple(self.attention_shards * b for b in powers_of_two_upto(self.seqs_per_shard))

    @property
    def token_buckets(self) -> tuple[int, ...]:
        """Flat token counts of a mixed (ragged) step: powers of two up to 128, then every multiple
        of 128 (a 256-token chunk beside 32 decodes pads to 384, not 512), as vLLM's graph sizes;
        per shard, times attention_shards (every shard's segment has one length). Batch invariant:
        the budget only, so every matmul and reduction sees one shape."""
        most = self.tokens_per_shard
        if self.batch_invariant:
            return (most,)
        small = powers_of_two_upto(min(128, most), start=min(8, most))
        shard = small + tuple(range(256, most, 128)) + ((most,) if most > small[-1] else ())
        return tuple(self.attention_shards * b for b in shard)

    @property
    def page_buckets(self) -> tuple[int, ...]:
        """Block-table widths: powers of two from min_context_bucket tokens, then the widest a call can
        reach (table_reach). Short contexts share one bucket: a few padded pages cost less than a compile."""
        most = -(-self.table_reach // self.page_size)
        if self.batch_invariant:  # one table width: one program per kind of step
            return (most,)
        return powers_of_two_upto(most, start=min(most, max(1, self.min_context_bucket // self.page_size)))

    @property
    def table_reach(self) -> int:
        """Token positions a call's block table can span: max_model_len plus what a call runs past a
        request's last token: decode_steps, twice that for a call dispatched ahead of one in flight
        (async_scheduling), or K drafts."""
        ahead = self.decode_steps * (2 if self.async_scheduling else 1)
        return self.max_model_len + max(ahead, self.num_speculative_tokens)

    def table_width(self, num_tokens: int) -> int:
        """The block-table width (a page bucket) of a call whose longest sequence spans num_tokens
        positions: the one place a table's width is decided (runner, draft model, MTP)."""
        return bucket(-(-num_tokens // self.page_size), self.page_buckets)


_NOT_ROW_LOCAL = ("pallas", "interpret")  # decode tiles vs query tiles, KV splits by SM waves


def _check_batch_invariant(config: EngineConfig) -> None:
    """ValueError for what the mode cannot serve: a flag that is not a bool, data-parallel attention,
    speculation, an attention kernel whose rows are not computed alone, a budget below max_num_seqs."""
    if not isinstance(config.batch_invariant, bool):
        raise ValueError(f"batch_invariant must be a bool, got {config.batch_invariant!r}")
    if not config.batch_invariant:
        return
    if config.attention_shards != 1:
        raise ValueError("batch_invariant=True does not support data-parallel attention (attention_shards > 1)")
    if config.num_speculative_tokens:
        raise ValueError("batch_invariant=True does not support speculative decoding")
    if config.attention_impl in _NOT_ROW_LOCAL:
        raise ValueError(f"batch_invariant=True needs attention_impl 'auto', 'cpu' or 'xla', not "
                         f"{config.attention_impl!r}: the Pallas ragged kernel computes decode rows and "
                         f"prefill rows in different tiles")
    if config.max_num_batched_tokens < config.max_num_seqs:
        raise ValueError(f"batch_invariant=True pads every decode to max_num_batched_tokens="
                         f"{config.max_num_batched_tokens} rows, below max_num_seqs={config.max_num_seqs}")
