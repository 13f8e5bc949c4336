"""Automatic prefix caching: the allocator's LRU free queue and key table, exact hit accounting on
constructed prompts, and greedy outputs identical with caching on and off over random requests
sharing prefixes (under page pressure and preemption) on a dense, an MLA and a MoE tiny model,
with the allocator's invariant and the contents of every cached page checked after every step."""

import dataclasses

import numpy as np
import pytest

from benchmarks import workloads
from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.page_allocator import PageAllocator
from engine.prefix_cache import page_key
from models import load_model
from engine.testing import greedy_reference

PAGE = 8


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def engine(model, **overrides) -> LLM:
    kwargs = dict(page_size=PAGE, max_model_len=128, max_num_seqs=6, prefill_chunk=32, max_num_batched_tokens=64,
                  decode_steps=4)
    return LLM(model, **{**kwargs, **overrides})


def check_pages(llm: LLM) -> None:
    """The allocator's invariant, and every keyed page a request holds keyed by that request's tokens."""
    requests = llm.scheduler.running + list(llm.scheduler.waiting)
    llm.allocator.check(r.pages for r in requests)
    for r in llm.scheduler.running:
        assert len(r.pages) * PAGE >= r.num_computed
        for i, page in enumerate(r.pages):
            key = llm.allocator.key_of(page)
            if key is not None:
                assert i < len(r.page_keys) and key == r.page_keys[i], f"page {page} cached under other tokens"


class PageContents:
    """Snapshots of every cached page's KV, the first time it is seen under a key: a cached page
    must never change while it keeps its key (a shared page is never written)."""

    def __init__(self):
        self.seen: dict[tuple[int, bytes], list[np.ndarray]] = {}

    def check(self, llm: LLM) -> None:
        cache = [np.asarray(t) for layer in llm.runner.cache for t in layer]
        for page in range(1, llm.config.num_pages):
            key = llm.allocator.key_of(page)
            if key is None:
                continue
            now = [t[:, page] for t in cache]
            before = self.seen.setdefault((page, key), now)
            assert all(np.array_equal(a, b) for a, b in zip(before, now)), f"cached page {page} was written"


def run_checked(llm: LLM, waves: list[list[tuple[list[int], SamplingParams]]], contents: PageContents | None = None,
                steps_per_wave: int = 3) -> list[list[int]]:
    """Add each wave of (prompt, params), step a few times, then run to the end; the page checks
    after every step; the generated ids per request in order."""
    requests = []

    def step():
        llm.step()
        check_pages(llm)
        if contents is not None:
            contents.check(llm)

    for wave in waves:
        requests += [llm.add_request(p, sp) for p, sp in wave]
        for _ in range(steps_per_wave):
            step()
    while llm.has_unfinished():
        step()
    llm.allocator.check([])
    return [r.output_token_ids for r in requests]


def shared_prefix_waves(seed: int, n: int, vocab: int, waves: int) -> list[list[tuple[list[int], SamplingParams]]]:
    """n requests in waves: a random one of 5 prefixes (lengths 1-60, crossing page boundaries, or
    none) + a random suffix (sometimes none: whole-prompt hits, page multiples), some duplicates."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(0, vocab, int(m)).tolist() for m in rng.integers(1, 61, 5)] + [[]]
    prefixes.append(rng.integers(0, vocab, 4 * PAGE).tolist())  # exactly a page multiple
    prompts = []
    for _ in range(n):
        if prompts and rng.random() < 0.1:
            prompts.append(list(prompts[int(rng.integers(len(prompts)))]))
            continue
        prefix = prefixes[int(rng.integers(len(prefixes)))]
        suffix = rng.integers(0, vocab, int(rng.integers(0 if prefix else 1, 20))).tolist()
        prompts.append(prefix + suffix)
    items = [(p, greedy(int(rng.integers(1, 13)))) for p in prompts]
    return [items[i::waves] for i in range(waves)]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


# ---- the allocator -----------------------------------------------------------------------------
def keyed(allocator: PageAllocator, n: int, tag: int) -> list[int]:
    """n new pages registered under keys (tag, i)."""
    pages = allocator.allocate(n)
    for i, p in enumerate(pages):
        allocator.register(p, page_key(b"", [tag, i]))
    return pages


def test_freed_cached_pages_are_evicted_least_recently_freed_first_and_plain_pages_before_them():
    a = PageAllocator(9)
    first, second = keyed(a, 2, 0), keyed(a, 3, 1)
    plain = a.allocate(2)
    a.free(first)       # queue: [1 free], tail of first, head of first
    a.free(plain)       # plain pages hold nothing: to the front
    a.free(second)      # ... then tail to head of second
    a.check([])
    assert a.num_free == 8
    order = a.allocate(8)
    assert order[:2] == plain and order[2] == 8  # never-used page 8 was already queued
    assert order[3:] == first[::-1] + second[::-1]
    assert all(a.key_of(p) is None for p in order) and a.cached(page_key(b"", [0, 0])) is None


def test_sharing_a_free_cached_page_takes_it_out_of_the_queue():
    a = PageAllocator(4)
    pages = keyed(a, 2, 0)
    a.free(pages)
    key = page_key(b"", [0, 0])
    page = a.cached(key)
    assert page == pages[0] and a.num_free_of([page]) == 1
    a.share([page])
    a.share([page])  # a second request
    a.check([[page], [page]])
    assert a.num_free == 2 and a.ref_count(page) == 2 and page not in a.allocate(2)
    a.free([page])
    a.free([page])
    with pytest.raises(RuntimeError, match="freed more often"):
        a.free([page])


def test_a_key_cached_twice_keeps_its_first_page_and_the_check_catches_a_broken_count():
    a = PageAllocator(4)
    p, q = a.allocate(2)
    a.register(p, b"k")
    a.register(q, b"k")  # the same tokens computed twice (identical prompts in one step)
    assert a.cached(b"k") == p and a.key_of(q) is None
    a.check([[p, q]])
    with pytest.raises(AssertionError, match="count"):
        a.check([[p, q], [p]])  # a page held by two requests with count 1
    with pytest.raises(AssertionError):
        a.check([[p]])  # a held page nobody accounts for
    a.free([p, q])
    with pytest.raises(RuntimeError, match="while free"):
        a.register(q, b"j")


# ---- exact hit accounting ---------------------------------------------------------------------
def admit(llm: LLM, prompt: list[int], max_tokens: int = 3):
    """Run one request to completion alone; its pages once admitted and the cache stats it added."""
    before = dataclasses.replace(llm.prefix_cache.stats)
    request = llm.add_request(prompt, greedy(max_tokens))
    llm.step()
    pages = list(request.pages)
    check_pages(llm)
    while llm.has_unfinished():
        llm.step()
    added = llm.prefix_cache.stats.since(before)
    return request, pages, (added.queries, added.hits)


def test_hits_are_exact_on_constructed_prompts(tiny):
    llm = engine(tiny)
    rng = np.random.default_rng(1)
    p = rng.integers(0, 256, 20).tolist()
    _, first, stats = admit(llm, p)
    assert stats == (20, 0)
    request, pages, stats = admit(llm, p)  # 2 full pages cached, the last 4 tokens computed
    assert stats == (20, 16) and pages[:2] == first[:2] and request.num_computed >= 20
    _, pages, stats = admit(llm, p[:16])  # a page multiple: the last page is recomputed, in a page of its own
    assert stats == (16, 8) and pages[0] == first[0] and pages[1] != first[1]
    assert admit(llm, p[:5])[2] == (5, 0)  # shorter than a page: nothing to share
    assert admit(llm, p[:12] + [7, 7, 7, 7, 7])[2] == (17, 8)  # diverges inside page 1
    outputs = [admit(llm, q)[0].output_token_ids for q in (p, p[:16], p[:5])]
    assert outputs == greedy_reference(tiny, [p, p[:16], p[:5]], 3, pad_to=32)
    off = engine(tiny, enable_prefix_caching=False)
    assert admit(off, p)[2] == (0, 0) and admit(off, p)[2] == (0, 0)


def test_identical_prompts_in_one_step_compute_twice_then_share(tiny):
    llm = engine(tiny)
    p = np.random.default_rng(2).integers(0, 256, 24).tolist()
    outs = run_checked(llm, [[(p, greedy(5)), (p, greedy(5))]])
    assert llm.prefix_cache.stats.hits == 0 and outs[0] == outs[1]
    request, _, stats = admit(llm, p, 5)
    assert stats == (24, 16) and request.output_token_ids == outs[0]


def test_a_prefix_evicted_while_waiting_is_recomputed_tail_first(tiny):
    llm = engine(tiny, num_pages=20, max_num_seqs=1)
    rng = np.random.default_rng(3)
    p, big = rng.integers(0, 256, 40).tolist(), rng.integers(0, 256, 100).tolist()
    want = admit(llm, p, 4)[0].output_token_ids  # 5 full pages cached, its 6th (partial) page not
    # while p waits, `big` takes all 16 pages of its context: the 14 uncached free pages, then p's
    # last two cached pages (the least recently freed): p still finds its first 3
    outs = run_checked(llm, [[(big, greedy(28)), (p, greedy(4))]])
    assert outs[1] == want
    assert llm.prefix_cache.stats.hits == 24 and llm.prefix_cache.stats.queries == 40 + 100 + 40


# ---- on vs off ---------------------------------------------------------------------------------
def test_tiny_llama_outputs_identical_with_caching_on_and_off_and_cached_pages_never_written(tiny):
    waves = shared_prefix_waves(seed=4, n=200, vocab=256, waves=25)
    off = run_checked(engine(tiny, enable_prefix_caching=False), waves)
    llm = engine(tiny)
    llm.warmup()
    with count_compilations() as compiles:
        on = run_checked(llm, waves, PageContents())
    assert on == off and compiles[0] == 0
    stats = llm.prefix_cache.stats
    assert stats.hit_rate > 0.3, stats


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-gpt-oss"])
def test_outputs_identical_under_page_pressure_with_shared_pages_preempted(name, tiny, monkeypatch):
    model = tiny if name == "tiny-llama" else load_model(name)
    waves = shared_prefix_waves(seed=5, n=80, vocab=model.config.vocab_size, waves=8)
    shared_victims = []
    llm = engine(model, num_pages=24)
    preempt = llm.scheduler._preempt

    def recording_preempt(request):
        shared_victims.append(any(llm.allocator.ref_count(p) > 1 for p in request.pages))
        preempt(request)

    monkeypatch.setattr(llm.scheduler, "_preempt", recording_preempt)
    on = run_checked(llm, waves, steps_per_wave=2)
    off = run_checked(engine(model, num_pages=24, enable_prefix_caching=False), waves, steps_per_wave=2)
    assert on == off
    assert any(shared_victims), "no request holding shared pages was preempted"
    assert llm.prefix_cache.stats.hits > 0


def test_multi_turn_replay_hits_the_conversation_so_far(tiny):
    rng = np.random.default_rng(6)
    users = [rng.integers(0, 256, 10).tolist() for _ in range(6)]
    replies = [rng.integers(0, 256, 6).tolist() for _ in range(6)]
    prompts, lens = workloads.multi_turn(users, replies, num_turns=3)
    assert prompts[2] == users[0] + replies[0] + users[1] and lens[2] == 6  # conversation 0, turn 2
    assert prompts[4] == users[0] + replies[0] + users[1] + replies[1] + users[2]
    llm = engine(tiny)
    outs = run_checked(llm, [[(p, greedy(n))] for p, n in zip(prompts, lens)], steps_per_wave=6)
    assert outs == greedy_reference(tiny, prompts, 6, pad_to=64)
    # turn 2 reuses turn 1's first page, turn 3 turn 2's first 3 (the next hold the engine's own reply)
    assert llm.prefix_cache.stats.hits == 2 * 8 + 2 * 24


def test_the_config_flag_is_checked():
    with pytest.raises(ValueError, match="enable_prefix_caching must be a bool"):
        EngineConfig(max_model_len=64, enable_prefix_caching="yes")
    assert EngineConfig(max_model_len=64).enable_prefix_caching


def test_smollm2_outputs_identical_with_caching_on_and_off(smollm2):
    """The real checkpoint: 24 requests over 4 shared prefixes, in waves."""
    waves = shared_prefix_waves(seed=8, n=24, vocab=smollm2.config.vocab_size, waves=4)
    kwargs = dict(page_size=PAGE, max_model_len=128, max_num_seqs=6, max_num_batched_tokens=64, prefill_chunk=32)
    off = run_checked(LLM(smollm2, enable_prefix_caching=False, **kwargs), waves)
    llm = LLM(smollm2, **kwargs)
    assert run_checked(llm, waves) == off and llm.prefix_cache.stats.hits > 0, llm.prefix_cache.stats
