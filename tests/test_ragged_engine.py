"""The ragged step end to end on tiny-llama: prefill chunks ride along with decodes without changing
their tokens, abort and interrupts leave the engine consistent, no recompiles on a mixed workload,
and "auto" attention keeps the faster measured path."""

import gc
import json

import numpy as np
import pytest

from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams, attention_choice, kv_cache
from engine.request import Status
from models import load_model
from pallas_kernels import ops
from engine.testing import greedy_reference

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def small_llm(model, **overrides) -> LLM:
    kwargs = dict(page_size=8, max_model_len=192, max_num_seqs=12, prefill_chunk=32,
                  max_num_batched_tokens=64, decode_steps=4, multi_step_min_gain=None)
    return LLM(model, **{**kwargs, **overrides})


def prompts_of(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


def assert_pages_consistent(llm: LLM) -> None:
    """Every page but the null page is free or held by exactly one unfinished request."""
    held = [p for r in llm.scheduler.running + list(llm.scheduler.waiting) for p in r.pages]
    assert len(held) == len(set(held)) and 0 not in held
    assert llm.allocator.num_free + len(held) == llm.config.num_pages - 1


def test_long_prompt_arriving_while_8_decode_changes_none_of_their_tokens(tiny):
    """Eight requests decode; a 150-token prompt arrives and is prefilled in 32-token chunks in the
    same steps as their decodes: each decoder still gets a token every step, and all tokens equal
    the no-cache forward's greedy tokens (as if each ran alone)."""
    llm = small_llm(tiny)
    decoders = [llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
                for p in prompts_of(0, [5, 9, 17, 3, 30, 12, 8, 21])]
    while any(r.is_prefilling or not r.output_token_ids for r in decoders):
        llm.step()
    long = llm.add_request(prompts_of(1, [150])[0], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    mixed_steps = 0
    while long.is_prefilling:
        before = [len(r.output_token_ids) for r in decoders]
        llm.step()
        mixed_steps += 1
        assert all(len(r.output_token_ids) == n + 1 for r, n in zip(decoders, before))  # never stalled
    assert mixed_steps == 5  # 150 tokens in chunks of at most 32 beside the 8 decodes
    while llm.has_unfinished():
        llm.step()
    everyone = decoders + [long]
    want = greedy_reference(tiny, [r.prompt_token_ids for r in everyone], 40, pad_to=192)
    assert [r.output_token_ids for r in decoders] == want[:8]
    assert long.output_token_ids == want[8][:6]
    assert_pages_consistent(llm)


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_abort_frees_pages_at_once_and_the_others_run_on(tiny, where):
    llm = small_llm(tiny)
    prompts = prompts_of(2, [70, 20, 33])
    requests = [llm.add_request(p, GREEDY) for p in prompts]
    victim = requests[0]
    llm.step()
    if where == "decode":
        while victim.is_prefilling:
            llm.step()
    assert victim.status is Status.RUNNING and victim.pages and victim.is_prefilling == (where == "prefill")
    free_before, held = llm.allocator.num_free, len(victim.pages)
    assert llm.abort(victim.request_id) is True
    assert llm.allocator.num_free == free_before + held and not victim.pages
    assert victim.finish_reason == "abort" and victim.output().finish_reason == "abort"
    assert_pages_consistent(llm)
    assert llm.abort(victim.request_id) is False and llm.abort(12345) is False
    while llm.has_unfinished():
        llm.step()
        assert_pages_consistent(llm)
    assert [r.output_token_ids for r in requests[1:]] == greedy_reference(tiny, prompts[1:], 12, pad_to=64)
    assert llm.abort(requests[1].request_id) is False  # finished
    assert llm.allocator.num_free == llm.config.num_pages - 1


def test_interrupt_inside_generate_keeps_the_engine(tiny, monkeypatch):
    """A KeyboardInterrupt from inside a step (as a notebook user's) aborts generate's requests and
    leaves the LLM working; the interrupted call had consumed the cache, which is rebuilt."""
    llm = small_llm(tiny)
    prompts = prompts_of(3, [40, 7, 19])
    original, calls = llm.runner.run_decode_arrays, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            original(*args)  # the call ran and consumed the donated cache; the result is lost
            for x in llm.runner.cache:
                x[0].delete()
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(llm.runner, "run_decode_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.has_unfinished() and llm.allocator.num_free == llm.config.num_pages - 1
    assert kv_cache.is_intact(llm.runner.cache)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == greedy_reference(tiny, prompts, 12, pad_to=64)


class LetterTokenizer:
    """Token t decodes to one letter, so streams yield text on tiny-llama (which has no tokenizer)."""

    eos_token_ids: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_closed_or_dropped_stream_aborts_its_request(tiny):
    llm = small_llm(tiny)
    llm.processor.tokenizer = LetterTokenizer()
    other = llm.add_request(prompts_of(4, [11])[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    closed, dropped = (llm.add_request(p, GREEDY) for p in prompts_of(5, [13, 9]))
    streams = [llm.stream_request(closed), llm.stream_request(dropped)]
    first = [next(s) for s in streams]
    assert all(f and LetterTokenizer().decode(r.output_token_ids).startswith(f) for f, r in zip(first, (closed, dropped)))
    streams[0].close()
    assert closed.finish_reason == "abort" and not closed.pages
    del streams[1]
    gc.collect()
    assert dropped.finish_reason == "abort" and llm.scheduler.running == [other]
    assert_pages_consistent(llm)
    while llm.has_unfinished():
        llm.step()
    assert other.output_token_ids == greedy_reference(tiny, [other.prompt_token_ids], 30, pad_to=64)[0]


def test_no_recompilation_with_staggered_arrivals(tiny):
    """Requests arriving every step: decode-only calls and mixed ragged steps of every size."""
    llm = small_llm(tiny)
    llm.warmup()
    rng = np.random.default_rng(7)
    prompts = prompts_of(8, [int(n) for n in rng.integers(1, 150, 60)])
    with count_compilations() as compiles:
        requests = []
        for p in prompts:
            requests.append(llm.add_request(p, SamplingParams(temperature=0.8, max_tokens=int(rng.integers(1, 20)),
                                                              seed=len(requests))))
            llm.step()
        while llm.has_unfinished():
            llm.step()
    assert compiles[0] == 0
    assert all(r.status is Status.FINISHED and r.finish_reason == "length" for r in requests)


def test_no_recompilation_with_prefix_hits_and_adaptive_steps(tiny):
    """Prompts that hit the prefix cache at every offset within a page, while the engine measures its
    steps and its adaptive policies (engine/step_costs.py) pick prefill caps and one-step decodes."""
    llm = small_llm(tiny, mixed_step_ratio=1.5, multi_step_min_gain=1.0)
    llm.warmup()
    base, extra = prompts_of(9, [50, 30])
    with count_compilations() as compiles:
        for i in range(10):
            llm.add_request(base + extra[:3 * i + 1], SamplingParams(max_tokens=12, ignore_eos=True))
            llm.step()
        while llm.has_unfinished():
            llm.step()
    assert compiles[0] == 0
    assert llm.prefix_cache.stats.hits > 0 and llm.costs.observations > 10


def _slowed(impl_to_slow: str):
    """ops.ragged_paged_attention with `impl_to_slow` made ~20x slower (extra matmuls folded in)."""
    import jax.numpy as jnp
    fast = ops.ragged_paged_attention

    def attention(q, *args, impl, **kwargs):
        out = fast(q, *args, impl=impl, **kwargs)
        if impl != impl_to_slow:
            return out
        m = jnp.ones((512, 512), jnp.float32) * out.reshape(-1)[0]
        for _ in range(30):
            m = m @ m * 1e-3
        return out + 0 * m[0, 0]
    return attention


@pytest.mark.parametrize("slow", ["cpu", "xla"])
def test_auto_attention_keeps_the_faster_path(monkeypatch, slow):
    shapes = attention_choice.AttentionShapes(num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32", page_size=8,
                                              decode_rows=8, decode_context=64, mixed_tokens=64, chunk=32)
    monkeypatch.setattr(ops, "ragged_paged_attention", _slowed(slow))
    choice = attention_choice.measured_choice.__wrapped__(shapes, ("cpu", "xla"), repeats=3)
    fast = "xla" if slow == "cpu" else "cpu"
    assert choice.decode == choice.mixed == fast
    assert choice.timings_ms["decode"][slow] > choice.timings_ms["decode"][fast]


def test_decode_calls_run_ahead_and_an_abort_between_them_is_safe(tiny, monkeypatch):
    """Decode-only calls are dispatched one ahead (fed their tokens on device); a request aborted
    while its next call is in flight loses its pages at once, the others' tokens stay exact."""
    llm = small_llm(tiny, async_scheduling=True)
    ahead = []
    original = llm.scheduler.run_ahead
    monkeypatch.setattr(llm.scheduler, "run_ahead", lambda output: ahead.append(original(output)) or ahead[-1])
    prompts = prompts_of(9, [6, 14, 25, 9])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    requests = [llm.add_request(p, params) for p in prompts]
    while not all(len(r.output_token_ids) > 5 for r in requests):
        llm.step()
    assert llm._inflight is not None and any(a is not None for a in ahead)
    assert llm.abort(requests[1].request_id) and not requests[1].pages
    assert_pages_consistent(llm)
    while llm.has_unfinished():
        llm.step()
    kept = [0, 2, 3]
    want = greedy_reference(tiny, [prompts[i] for i in kept], 30, pad_to=64)
    assert [requests[i].output_token_ids for i in kept] == want
    assert requests[1].output_token_ids == greedy_reference(tiny, [prompts[1]], 30, pad_to=64)[0][
        :len(requests[1].output_token_ids)]


def test_a_measured_choice_is_stored_beside_the_compilation_cache(monkeypatch, tmp_path):
    """A later process reuses the stored choice (so it compiles the same programs); an unreadable
    file is measured afresh and rewritten; no file at all when the compilation cache is off."""
    shapes = attention_choice.AttentionShapes(num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32", page_size=8,
                                              decode_rows=8, decode_context=64, mixed_tokens=64, chunk=32)
    measured = attention_choice.AttentionChoice("cpu", "xla", {"decode": {"cpu": 1.0}})
    monkeypatch.setattr(attention_choice, "_measure", lambda *args: measured)
    monkeypatch.setenv("JAXSERVE_XLA_CACHE", str(tmp_path))
    choose = attention_choice.measured_choice.__wrapped__
    assert choose(shapes, ("cpu", "xla")) == measured
    monkeypatch.setattr(attention_choice, "_measure", lambda *args: pytest.fail("measured again"))
    assert choose(shapes, ("cpu", "xla")) == measured
    stored = tmp_path / attention_choice.CHOICES_FILE
    stored.write_text("{not json")
    monkeypatch.setattr(attention_choice, "_measure", lambda *args: measured)
    assert choose(shapes, ("cpu", "xla")) == measured and len(json.loads(stored.read_text())) == 1
    monkeypatch.setenv("JAXSERVE_XLA_CACHE", "off")
    stored.unlink()
    assert choose(shapes, ("cpu", "xla")) == measured and not stored.exists()


def test_a_call_run_ahead_near_max_model_len_gets_a_block_table_bucket(tiny):
    """A decode call dispatched ahead reaches decode_steps past the call in flight, so its block table
    can reach max_model_len - 2 + 2 x decode_steps tokens: the widest page bucket covers it (here
    66 tokens of 8-token pages against max_model_len 60, whose own span ends at 64)."""
    llm = small_llm(tiny, max_model_len=60, min_context_bucket=8, async_scheduling=True)
    request = llm.add_request(prompts_of(3, [59])[0], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    inputs = llm.runner.decode_inputs([request], steps_ahead=llm.config.decode_steps)
    assert inputs.block_tables.shape[1] * 8 >= 59 - 1 + 2 * llm.config.decode_steps
