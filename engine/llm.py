"""LLM: the engine's public API (generate, stream, chat, abort) over its step loop.

A step: the scheduler picks every running request's next tokens and admits new ones under one
token budget, the runner runs one jitted call (a ragged mixed batch, or several decode steps when
no prompt is being prefilled), and the output processor applies what it sampled.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from engine import batch_invariance
from engine import (attention_choice, bad_words, compilation_cache, kv_cache, sleep_mode, structured_output,
                    weight_updates)
from engine.config import EngineConfig, bucket
from engine.hook_params import check_against_model
from engine.constrained_step import constrain
from engine.logits_processor import LogitsProcessor, checked_args, checked_processors
from engine.output_processor import OutputProcessor
from engine.parallel_sampling import num_sequences, outputs, sequence_params, sequence_seed
from engine.page_allocator import PageAllocator
from engine.penalties import LogitsRow
from engine.prefix_cache import PrefixCache
from engine.request import Request, RequestOutput, SamplingParams, Status, is_int, is_sequence
from engine.request_constraint import constraint_for
from engine.runner import ModelRunner, StepResult, fetch
from engine.scheduler import Scheduler, SchedulerOutput
from engine.step_costs import StepCosts
from engine.speculative.config import SpeculativeConfig
from engine.speculative.draft_model import DraftModelProposer
from engine.speculative.speculator import Speculator, make_speculator
from models import LoadedModel, load_model
from pallas_kernels import ops
from sharding.attention_shards import data_parallel_shards
from sharding.rules import RULES, ShardingRules, cache_sharding, shard_model

Prompt = str | Sequence[int]
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """Paged-KV, continuously batched generation over one model."""

    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct", *, dtype: str = "float32",
                 weights: str = "native", seed: int = 0, mesh: Mesh | None = None,
                 rules: str | ShardingRules | None = None, speculative_config: dict | None = None,
                 logits_processors: Sequence[LogitsProcessor] = (), **engine_args):
        """engine_args: EngineConfig's fields (page_size, num_pages, max_num_seqs, max_model_len,
        attention_impl, kv_cache_dtype, decode_steps, prefill_chunk, max_num_batched_tokens, kv_cache_bytes,
        enable_prefix_caching); its defaults are the engine's. max_model_len defaults to the model's
        context.

        weights: how a quantized checkpoint's weights are held (models.load_model): "native" packed
        as they ship, or a dtype name to dequantize them at load. Ignored for a LoadedModel.

        mesh: shard the parameters (sharding/rules.py, the model's rules) and the KV cache over it.
        The cache splits its kv heads over "tensor"; with fewer kv heads than the tensor size every
        device holds all of them (replicated), and the page pool is replicated over "data" and
        "expert" (pages are shared by all sequences of the batch).
        rules: the sharding rules on `mesh` (sharding/rules.py RULES: "default", "expert_dp",
        "tensor_experts"; None: the model's). Rules that split the page pool ("expert_dp") run
        data-parallel attention (sharding/attention_shards.py): each request is assigned to one
        of the shards the "pages" axes make, each with its own pages, sequence slots and token
        budget (max_num_seqs, max_num_batched_tokens and num_pages are split evenly).

        speculative_config: vLLM's dict (engine/speculative/config.py): {"method": "ngram" | "mtp" |
        "synthetic", or "model": a draft, "num_speculative_tokens": k, ...}; None: no speculation.

        logits_processors: extra logits transforms compiled into every step, each request turning
        them on by name with its own arguments (engine/logits_processor.py).

        Compiled steps persist on disk (engine/compilation_cache.py) for the next process.
        """
        spec = SpeculativeConfig.from_dict(speculative_config)
        self.logits_processors = checked_processors(logits_processors)
        compilation_cache.enable()
        self.model = _placed_model(model, dtype, mesh, weights, rules)
        shards = data_parallel_shards(self.model.mesh, self.model.rules)
        if shards is not None:
            if spec is not None:
                raise ValueError(f"speculative decoding is not supported with data-parallel attention (rules "
                                 f"{self.model.rules.name!r} split the page pool over {shards.axes})")
            engine_args["attention_shards"] = shards.size
        self.config = _engine_config(self.model, engine_args, spec)
        batch_invariance.check_model(self.config, self.model.config)
        self.allocator = PageAllocator(self.config.num_pages, self.config.attention_shards)
        self.prefix_cache = PrefixCache(self.allocator, self.config.page_size, self.config.enable_prefix_caching,
                                        identity=(self.model.config, np.dtype(self.model.dtype).name),
                                        lookahead=int(spec is not None and spec.method == "mtp"))
        self.costs = StepCosts()  # what steps cost as they run: the scheduler's adaptive policies read it
        self.scheduler = Scheduler(self.config, self.allocator, self.prefix_cache, self.costs)
        on_mesh, fp8_kv, shapes = self.model.mesh is not None, self.config.kv_cache_dtype != "auto", \
            _attention_shapes(self.model, self.config)
        self.attention = (batch_invariance.attention(self.config.attention_impl, shapes.head_dim, on_mesh, fp8_kv)
                          if self.config.batch_invariant else
                          attention_choice.choose(self.config.attention_impl, shapes, on_mesh=on_mesh, fp8_kv=fp8_kv))
        self.speculator: Speculator | None = (None if spec is None else
                                              make_speculator(spec, self.model, self.config, self.attention, dtype))
        accepts, q = (None, None) if spec is None else (self.speculator.synthetic_accepts,
                                                        self.speculator.padding_draft_probs)
        self.runner = ModelRunner(self.model.model, _allocate_cache(self.model, self.config), self.config,
                                  self.attention.decode, self.attention.mixed, accepts, q, shards,
                                  self.logits_processors)
        self.processor = OutputProcessor(self.scheduler, self.model.tokenizer)
        self._requests: dict[int, Request] = {}
        self._groups: dict[int, list[Request]] = {}  # a prompt's first sequence's id -> its n > 1 sequences
        self._inflight: _InFlight | None = None  # a decode call dispatched before the last one was applied
        self._cycle: tuple[float, int, int] | None = None  # the last decode-only call's (start, rows, steps)
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self._asleep: sleep_mode.Asleep | None = None  # set by sleep(): what wake_up() restores

    # ---- requests -------------------------------------------------------------------------
    def _prompt_ids(self, prompt: object) -> list[int]:
        """A str prompt through the tokenizer, else the ids of a list (or 1-D array) of int ids."""
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.model.tokenizer.encode(prompt)
        if not is_sequence(prompt):
            raise ValueError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        bad = next((i for i, t in enumerate(prompt) if not is_int(t)), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is {prompt[bad]!r} ({type(prompt[bad]).__name__}), "
                             f"not an int token id")
        return [int(t) for t in prompt]

    def _validate(self, ids: list[int]) -> None:
        vocab, limit = self.model.config.vocab_size, self.config.max_model_len
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {limit} "
                             f"(the prompt plus at least one output token must fit)")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    def _checked(self, prompt: object, params: object) -> tuple[list[int], SamplingParams]:
        """The prompt's ids and its params, or a ValueError naming what is wrong; admits nothing."""
        if self._asleep is not None:
            raise sleep_mode.EngineAsleepError("the engine is asleep (sleep() was called): wake_up() before "
                                               "adding requests")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {params!r} ({type(params).__name__})")
        if self.speculator is not None and ((params.logprobs or 0) > 0 or params.prompt_logprobs is not None):
            raise ValueError("logprobs > 0 and prompt_logprobs are not supported with speculative decoding "
                             "(the verify step returns the chosen tokens' logprobs only: logprobs=0)")
        ids = self._prompt_ids(prompt)
        self._validate(ids)
        vocab = self.model.config.vocab_size
        for name, tokens in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
                             ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = next((t for t in tokens if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")
        bad_words.token_sequences(params.bad_words, self.model.tokenizer, vocab)  # they need a tokenizer
        structured_output.compile_spec(params.structured_outputs, self.model.tokenizer, vocab)  # cached for admission
        self._check_hooks(params)
        if params.logits_processor_args:  # as arrays of the registered shapes and dtypes
            params = dataclasses.replace(params, logits_processor_args=checked_args(
                self.logits_processors, params.logits_processor_args, vocab))
        return ids, params

    def _check_hooks(self, params: SamplingParams) -> None:
        """The research hooks' layers and vectors against the model (engine/hook_params.py); none
        with speculative decoding (a verify step runs no hooks)."""
        if params.hooked and self.speculator is not None:
            raise ValueError("capture_layers, interventions and return_routed_experts are not supported with "
                             "speculative decoding")
        check_against_model(params.capture_layers, params.interventions, params.return_routed_experts,
                            self.model.config)

    def expert_counts(self, window: bool = False) -> np.ndarray:
        """Tokens routed to each (MoE layer, expert) [num_moe_layers, num_experts]: since the start,
        or over the last steps that computed routing (window=True). Every step counts with
        LLM(count_experts=True); else only steps holding a request asking for return_routed_experts."""
        counts = self.runner.expert_counts
        if counts is None:
            raise ValueError(f"expert_counts: {self.model.config.name} is a dense model (no MoE layers)")
        return counts.window() if window else counts.total.copy()

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """Validate and enqueue one sequence; a bad request raises ValueError and leaves the others
        untouched. Params asking for more (n or best_of > 1) go to add_sequences."""
        ids, params = self._checked(prompt, params)
        if num_sequences(params) > 1:
            raise ValueError(f"add_request runs one sequence, the params ask for {num_sequences(params)} "
                             f"(n={params.n}, best_of={params.best_of}): use add_sequences")
        return self._enqueue(ids, params)[0]

    def add_sequences(self, prompt: Prompt, params: SamplingParams | None = None) -> list[Request]:
        """Validate and enqueue a prompt's best_of (default n) sequences in index order, with one
        prefill (engine/parallel_sampling.py); aborting the first one's id aborts them all."""
        return self._enqueue(*self._checked(prompt, params))

    def _enqueue(self, ids: list[int], params: SamplingParams) -> list[Request]:
        """Queue a validated prompt's sequences: sequence i seeded seed + i, or each drawing its
        own seed when the params fix none."""
        engine_params, sequences = sequence_params(params), []
        for i in range(num_sequences(params)):
            seed = sequence_seed(params.seed, i) if params.seed is not None else int(self._seeds.integers(2**32))
            request = Request(next(self._ids), ids, engine_params, seed,
                              max_total_len=min(len(ids) + params.max_tokens, self.config.max_model_len),
                              index=i, parent=sequences[0] if sequences else None,
                              constraint=constraint_for(engine_params, self.model.tokenizer,
                                                        self.model.config.vocab_size),
                              logits_row=self._logits_row(engine_params))
            self.scheduler.add(request)
            self._requests[request.request_id] = request
            sequences.append(request)
        if len(sequences) > 1:
            self._groups[sequences[0].request_id] = sequences
        return sequences

    def _logits_row(self, params: SamplingParams) -> LogitsRow | None:
        """The request's penalties and biases for its device row (None: it asks for none)."""
        tokenizer, vocab = self.model.tokenizer, self.model.config.vocab_size
        counted = any(p.reads_counts and p.name in params.logits_processor_args for p in self.logits_processors)
        return params.logits_row(bad_words.banned_tokens(params.bad_words, tokenizer, vocab),
                                 tuple(tokenizer.eos_token_ids) if tokenizer else (), counted)

    def abort(self, request_id: int, *, siblings: bool = True) -> bool:
        """Stop a request now and free its pages; False if the id is unknown or already finished.
        The id of a prompt's first of n > 1 sequences is its request's: it aborts all of them still
        running (also once the first finished), unless siblings=False (that sequence alone)."""
        group = self._groups.get(request_id) if siblings else None
        return any([self._abort_one(r.request_id) for r in group] if group else [self._abort_one(request_id)])

    def _abort_one(self, request_id: int) -> bool:
        """Abort one sequence, if it is known and unfinished."""
        request = self._requests.get(request_id)
        if request is None or request.status is Status.FINISHED:
            return False
        self.scheduler.finish(request, "abort")
        self._forget(request)
        return True

    def _forget(self, request: Request) -> None:
        """Drop a finished sequence from the tables, and its prompt's group once all of it finished."""
        self._requests.pop(request.request_id, None)
        first = request.parent or request
        group = self._groups.get(first.request_id)
        if group is not None and all(r.status is Status.FINISHED for r in group):
            del self._groups[first.request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine step; returns the requests that finished in it (a failed step finishes
        its requests with "error" and leaves the engine working).

        Decode-only steps overlap host and device: before waiting for a decode call's tokens the
        next call of the same requests is dispatched, fed those tokens on device, so the host's
        scheduling, input building and output processing run while the device computes.
        """
        start = time.perf_counter()
        if self._cycle is not None:  # the engine stayed busy since: its whole cycle, the caller's part too
            self.costs.observe_cycle(self._cycle[1], self._cycle[2], start - self._cycle[0])
            self._cycle = None
        if self._inflight is not None:
            output, pending = self._inflight.output, self._inflight.pending
            self._inflight = None
        else:
            output = self.scheduler.schedule()
            if not output.scheduled:
                return []
            pending = None
        try:
            if self.speculator is not None and pending is None:
                output = self.speculator.attach(output)  # the drafts ride in this step's input only
            constrained = constrain(output, self.model.config.vocab_size)
            output = constrained.output
            result = self._run(output, pending, constrained.masks)
        except Exception as e:  # noqa: BLE001 (an XLA runtime error, out of memory: contained)
            return self._fail_step(output, e)
        except BaseException:  # KeyboardInterrupt: leave the engine consistent, then let it through
            self._inflight = None
            self._recover_cache()
            raise
        failed = [self._fail(request, message) for request, message in constrained.failed]
        finished = failed + self.processor.apply(output, result)
        for request in finished:
            self._forget(request)
        self.costs.observe(_step_tokens(output, self.config), time.perf_counter() - start, result.wait_s,
                           output.decode_steps, output.is_decode_only)
        if output.is_decode_only and self.has_unfinished():
            self._cycle = (start, bucket(len(output.scheduled), self.config.batch_buckets), output.decode_steps)
        return finished

    def _run(self, output: SchedulerOutput, pending: tuple | None,
             masks: list[np.ndarray | None] | None) -> StepResult:
        """Run (or, when already dispatched, finish) `output`'s call; a decode call first dispatches
        its successor when the scheduler can run ahead. masks: the constrained requests' (a
        one-token step: engine/constrained_step.py)."""
        self.runner.write_rows(_requests_of(output))
        if output.decode_steps == 1:
            if self.speculator is not None:
                return self.speculator.verify(self.runner, output.scheduled, masks)
            return self.runner.mixed(output.scheduled, masks)
        if pending is None:
            inputs = self.runner.decode_inputs(_requests_of(output))
            pending = (self.runner.run_decode_arrays(*inputs.args()), inputs.placement)
        ahead = self.scheduler.run_ahead(output)
        if ahead is not None:
            inputs = self.runner.decode_inputs(_requests_of(ahead), steps_ahead=output.decode_steps)
            self._inflight = _InFlight(ahead, (self.runner.run_decode_arrays(*inputs.args(pending[0][0])),
                                               inputs.placement))
        outputs, placement = pending
        return placement.gather(fetch(outputs))

    def _fail_step(self, output: SchedulerOutput, error: Exception) -> list[Request]:
        """The step's requests finish with the error; a cache lost to the failed call is rebuilt."""
        logging.error("engine step failed: %r", error)
        self._inflight = None  # a call dispatched after the failed one shares its fate
        failed = [self._fail(s.request, f"{type(error).__name__}: {error}") for s in output.scheduled
                  if s.request.status is not Status.FINISHED]
        self._recover_cache()
        return failed

    def _fail(self, request: Request, error: str) -> Request:
        """Finish `request` with finish_reason "error" and this message."""
        request.error = error
        self.scheduler.finish(request, "error")
        self._forget(request)
        return request

    def _recover_cache(self) -> None:
        """If the KV cache's buffers (or the proposer's) were donated to a call that never returned
        them, allocate a fresh cache and requeue every running request to recompute its tokens
        (exact: greedy and seeded sampling only depend on the tokens and positions)."""
        self.runner.recover_penalties()
        target_lost = not kv_cache.is_intact(self.runner.cache)
        draft_lost = self.speculator is not None and self.speculator.recover()
        if target_lost or draft_lost:
            logging.warning("KV cache lost with a failed step: reallocated, running requests recompute")
            if target_lost:
                self.runner.cache = _allocate_cache(self.model, self.config)
            self.scheduler.preempt_all()
            self.allocator.forget_cached()

    # ---- weights: refit and sleep mode (engine/weight_updates.py, engine/sleep_mode.py) -------
    def update_weights(self, source: weight_updates.WeightsSource, *, running: str = "finish",
                       weights: str | None = None) -> None:
        """Replace the weights in place with `source`'s (a params pytree, an orbax or HF checkpoint
        directory) of the same shapes, dtypes and shardings: nothing recompiles. A mismatch is a
        ValueError naming the first differing parameter, raised before anything changes. Unfinished
        requests first: running="finish" runs them (and the queued ones) to completion on the old
        weights, "abort" aborts them. The prefix cache is emptied. weights: how a checkpoint is
        read (load_model's; None: "native" when served packed, else the model's dtype)."""
        _check_running(running)
        prepared = self.prepare_weights(source, weights)
        self.settle(running)
        weight_updates.apply(self.model, prepared)
        self.allocator.forget_cached()

    def prepare_weights(self, source: weight_updates.WeightsSource,
                        weights: str | None = None) -> weight_updates.PreparedWeights:
        """update_weights' first half, while requests keep running: load `source`, check it and place
        it on the device (a ValueError changes nothing); update_weights(prepared) swaps it in."""
        self._check_awake()
        return weight_updates.prepare(self.model, source, weights)

    def sleep(self, level: int = 1, *, running: str = "finish") -> sleep_mode.SleepReport:
        """Free the device memory of an idle engine (vLLM's sleep levels): level 1 moves the weights
        to host memory, level 2 discards them (reload with update_weights after wake_up); both
        discard the KV cache. Unfinished requests first, as update_weights' `running`."""
        self._check_awake()
        sleep_mode.check_level(level)
        _check_running(running)
        self.settle(running)
        proposer_cache = getattr(self.speculator and self.speculator.proposer, "cache", None)
        weights = sleep_mode.weight_variables([self.runner.state, *self._draft_state()])
        self._asleep, report = sleep_mode.sleep(weights, self.runner.cache, level,
                                                [] if proposer_cache is None else proposer_cache)
        self.runner.cache = None
        self.allocator.forget_cached()
        return report

    def wake_up(self) -> None:
        """Put back what sleep() freed, with the same shapes and shardings (nothing recompiles)."""
        if self._asleep is None:
            raise RuntimeError("wake_up() called on an engine that is not asleep")
        self.runner.cache = sleep_mode.wake_up(self._asleep)
        if self.speculator is not None:
            self.speculator.proposer.reset_cache()
        self._asleep = None

    @property
    def is_sleeping(self) -> bool:
        """Whether sleep() was called and wake_up() not yet."""
        return self._asleep is not None

    def settle(self, running: str) -> None:
        """Leave no request unfinished: "finish" steps until every one (queued ones too) finished,
        "abort" aborts them all; no decode call is left dispatched ahead afterwards."""
        _check_running(running)
        if running == "abort":
            for request_id in list(self._requests):
                self.abort(request_id)
        while self.has_unfinished():
            self.step()
        self._inflight = None  # a decode call run ahead for requests that finished: nothing left to apply

    def _check_awake(self) -> None:
        """EngineAsleepError while asleep: the weights and KV cache are off the device."""
        if self._asleep is not None:
            raise sleep_mode.EngineAsleepError("the engine is asleep: wake_up() first")

    def _draft_state(self) -> list:
        """A draft model's parameters (its own; an MTP head's are the target's), if one proposes."""
        proposer = self.speculator and self.speculator.proposer
        return [proposer.state] if isinstance(proposer, DraftModelProposer) else []

    # ---- convenience APIs -----------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order, a prompt's n (params.n > 1) in a row,
        ordered by their `index` (engine/parallel_sampling.py). All are validated before any starts;
        an exception or interrupt while they run aborts them (the engine stays usable)."""
        prompts = [prompts] if _is_one_prompt(prompts) else prompts
        if not (isinstance(prompts, (list, tuple)) or (isinstance(prompts, np.ndarray) and prompts.ndim == 2)):
            raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        checked = []
        for i, (prompt, sp) in enumerate(zip(prompts, params_list)):
            try:
                checked.append(self._checked(prompt, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        groups = [self._enqueue(ids, sp) for ids, sp in checked]
        requests = [r for group in groups for r in group]
        with _aborted_on_exit(self, requests), tqdm(total=len(requests), disable=not use_tqdm, desc="generate") as bar:
            while any(r.status is not Status.FINISHED for r in requests):
                bar.update(sum(r in requests for r in self.step()))
        return [out for group, (_, sp) in zip(groups, checked) for out in outputs(group, sp)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive (other requests in flight keep being served)."""
        return self.stream_request(self.add_request(prompt, params))

    def stream_request(self, request: Request) -> Iterator[str]:
        """`stream` for a request already added with `add_request` (its metrics stay readable).
        Closing or dropping the generator, or an exception while it runs, aborts the request; a
        request that fails raises RuntimeError with its error after the text it produced."""
        emitted = 0
        with _aborted_on_exit(self, [request]):
            while request.status is not Status.FINISHED:
                self.step()
                text = self.processor.stream_text(request)
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
        if request.error:
            raise RuntimeError(f"request {request.request_id} failed: {request.error}")

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *,
             use_tqdm: bool = False) -> RequestOutput:
        """Apply the checkpoint's chat template and generate the assistant's reply (one: for n > 1
        replies, generate over the template's ids)."""
        if isinstance(params, SamplingParams) and num_sequences(params) > 1:
            raise ValueError("chat returns one reply: for n or best_of > 1 call generate with the chat "
                             "template's ids")
        if self.model.tokenizer is None:
            raise ValueError("this model has no tokenizer (and so no chat template)")
        return self.generate([self.model.tokenizer.apply_chat_template(messages)], params, use_tqdm=use_tqdm)[0]

    def warmup(self, logprobs: bool = False) -> int:
        """Compile every shape bucket now (with all-padding batches); returns the number of programs.
        logprobs: the logprob variants too (else they compile when a request first asks for them)."""
        return self.runner.warmup(logprobs) + (self.speculator.warmup() if self.speculator is not None else 0)


def _check_running(running: object) -> None:
    """ValueError unless `running` is one of update_weights' and sleep's modes."""
    if running not in ("finish", "abort"):
        raise ValueError(f"running must be \"finish\" or \"abort\", got {running!r}")


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A decode call dispatched ahead: its schedule, its (device) sampled tokens and logprobs, and
    where its requests sit in them."""

    output: SchedulerOutput
    pending: tuple  # ((tokens, logprobs, extras) on device, Placement)


def _step_tokens(output: SchedulerOutput, config: EngineConfig) -> int:
    """The flat tokens a step computes per decode step: its compiled shape's (padding included)."""
    if output.decode_steps > 1:
        return bucket(len(output.scheduled), config.batch_buckets)
    return bucket(sum(s.num_tokens for s in output.scheduled), config.token_buckets)


def _requests_of(output: SchedulerOutput) -> list[Request]:
    return [s.request for s in output.scheduled]


class _aborted_on_exit:
    """Aborts the given requests if the block is left by an exception, interrupt or generator close."""

    def __init__(self, llm: LLM, requests: list[Request]):
        self.llm, self.requests = llm, requests

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for request in self.requests:
                self.llm.abort(request.request_id)
        return False


def _is_one_prompt(prompts: object) -> bool:
    """Whether generate's `prompts` is one prompt (a str, or ids) rather than a list of prompts."""
    return isinstance(prompts, str) or (is_sequence(prompts) and len(prompts) > 0
                                        and not isinstance(prompts[0], (str, list, tuple, np.ndarray)))


def _attention_shapes(model: LoadedModel, config: EngineConfig) -> attention_choice.AttentionShapes:
    """The engine's attention shapes for timing the candidates: the largest decode batch at half the
    context, and the largest mixed step as prefill chunks."""
    heads, _, _, head_dim = kv_cache.page_shape(model.config, 1, config.page_size)
    return attention_choice.AttentionShapes(
        num_heads=model.config.num_heads, num_kv_heads=heads, head_dim=head_dim, dtype=np.dtype(model.dtype).name,
        page_size=config.page_size, decode_rows=config.max_num_seqs, decode_context=max(1, config.max_model_len // 2),
        mixed_tokens=config.max_num_batched_tokens, chunk=config.prefill_chunk)


def _placed_model(model: str | LoadedModel, dtype: str, mesh: Mesh | None, weights: str,
                  rules: str | ShardingRules | None) -> LoadedModel:
    """Load `model` (unless given loaded) and place its parameters on `mesh` under `rules`."""
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown sharding rules {rules!r} (known: {sorted(RULES)})")
        rules = RULES[rules]
    if isinstance(model, LoadedModel):
        if rules is not None and model.mesh is not None and rules != model.rules:
            raise ValueError(f"rules {rules.name!r} given for a model already placed under rules {model.rules.name!r}")
        loaded = model if rules is None else dataclasses.replace(model, rules=rules)
    else:
        loaded = load_model(model, dtype=dtype, mesh=mesh, weights=weights, **({} if rules is None else {"rules": rules}))
    if mesh is not None and loaded.mesh is None:
        loaded = dataclasses.replace(loaded, model=shard_model(loaded.model, mesh, loaded.rules), mesh=mesh)
    return loaded


def _engine_config(model: LoadedModel, engine_args: dict, spec: SpeculativeConfig | None = None) -> EngineConfig:
    """The EngineConfig, max_model_len defaulting to the model's context and the page pool sized
    from kv_cache_bytes when num_pages is None (never more pages than max_num_seqs can use).
    Speculation sets num_speculative_tokens; a draft model or MTP, which must see every token the
    target computes, runs one decode step per call."""
    unknown = set(engine_args) - _ENGINE_FIELDS
    if unknown:
        raise ValueError(f"unknown LLM argument(s) {sorted(unknown)}; engine arguments: {sorted(_ENGINE_FIELDS)}")
    if "num_speculative_tokens" in engine_args:
        raise ValueError("num_speculative_tokens is set through speculative_config")
    if spec is not None:
        engine_args["num_speculative_tokens"] = spec.num_speculative_tokens
        if spec.method in ("draft_model", "mtp"):
            engine_args["decode_steps"] = 1
    cfg = model.config
    max_model_len = engine_args.pop("max_model_len", None) or cfg.max_position_embeddings
    if max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context "
                         f"({cfg.max_position_embeddings} tokens)")
    config = EngineConfig(max_model_len=max_model_len, **engine_args)
    heads, _, page_size, head_dim = kv_cache.page_shape(cfg, 1, config.page_size)
    if (config.kv_cache_dtype != "auto" and config.attention_impl in ("pallas", "interpret")
            and kv_cache.layout(cfg).tensors == 2 and not ops.ragged_kernel_supported(head_dim, cfg.num_heads, heads,
                                                                                       page_size)):
        raise ValueError(ops.fp8_kv_unsupported("paged attention") + f" (the ragged kernel, which reads FP8 pages, "
                                                                    f"refuses page_size {page_size} at head_dim {head_dim})")
    if config.num_pages is None:
        useful = config.max_num_seqs * (config.pages_per_seq + 1)
        num_pages = kv_cache.pages_for_budget(cfg, config.page_size, model.dtype, config.kv_cache_bytes, useful,
                                               config.kv_cache_dtype)
        config = dataclasses.replace(config, num_pages=num_pages // config.attention_shards * config.attention_shards)
    logging.info(kv_cache.summary(cfg, config.num_pages, config.page_size, model.dtype, config.kv_cache_dtype,
                                  config.attention_shards))
    return config


def _allocate_cache(model: LoadedModel, config: EngineConfig) -> list:
    """Zeroed pages, sharded on the model's mesh: kv heads over "tensor" (sharding/rules.py)."""
    shape = kv_cache.page_shape(model.config, config.num_pages, config.page_size)
    sharding = None if model.mesh is None else cache_sharding(shape, model.mesh, model.rules)
    return kv_cache.allocate(model.config, config.num_pages, config.page_size, model.dtype, sharding,
                             config.kv_cache_dtype)
