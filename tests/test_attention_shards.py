"""Data-parallel attention's host side, without devices: the page pool split into per-shard
ranges, the config's per-shard limits and buckets, and the scheduler assigning each request to a
shard (cached prefix first, then free pages) with per-shard slots, budgets and preemption. The
8-device equality of whole engines is in test_sharding.py."""

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.page_allocator import PageAllocator
from engine.prefix_cache import PrefixCache
from engine.request import Request, SamplingParams, Status
from engine.runner import Placement, StepResult
from engine.scheduler import Scheduler


def make(shards: int, num_pages: int = 64, **kwargs) -> Scheduler:
    cfg = EngineConfig(**{"max_model_len": 24, "page_size": 4, "num_pages": num_pages, "max_num_seqs": 4,
                          "prefill_chunk": 8, "max_num_batched_tokens": 16, "decode_steps": 1,
                          "attention_shards": shards, **kwargs})
    allocator = PageAllocator(num_pages, shards)
    return Scheduler(cfg, allocator, PrefixCache(allocator, cfg.page_size, True))


def request(i: int, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(i, prompt, SamplingParams(max_tokens=max_tokens), 0, max_total_len=len(prompt) + max_tokens)


def test_pool_splits_into_shard_ranges_each_with_its_null_page():
    a = PageAllocator(16, shards=4)
    assert a.capacity == 12 and a.num_free == 12 and [a.num_free_in(s) for s in range(4)] == [3] * 4
    pages = a.allocate(3, shard=2)
    assert pages == [9, 10, 11] and [a.local(p) for p in pages] == [1, 2, 3] and a.shard_of(9) == 2
    assert not a.can_allocate(1, shard=2) and a.can_allocate(3, shard=1)
    with pytest.raises(RuntimeError, match="asked for 1, 0 free on attention shard 2"):
        a.allocate(1, shard=2)
    a.register(9, b"key")
    assert a.cached(b"key", 2) == 9 and a.cached(b"key", 0) is None  # a prefix is found on its own shard only
    a.check([pages])
    a.free(pages)
    assert a.num_free_in(2) == 3 and a.cached(b"key", 2) == 9
    a.check([])
    with pytest.raises(ValueError, match="18 KV pages cannot be split into 4"):
        PageAllocator(18, shards=4)


def test_config_splits_limits_and_buckets_per_shard():
    cfg = EngineConfig(max_model_len=32, page_size=4, num_pages=64, max_num_seqs=8, prefill_chunk=8,
                       max_num_batched_tokens=32, attention_shards=4)
    assert (cfg.seqs_per_shard, cfg.tokens_per_shard) == (2, 8)
    assert cfg.batch_buckets == (4, 8) and cfg.token_buckets == (32,)  # 4 equal segments of 1-2 rows / 8 tokens
    with pytest.raises(ValueError, match="max_num_seqs=6 does not split into 4"):
        EngineConfig(max_model_len=64, max_num_seqs=6, attention_shards=4)
    with pytest.raises(ValueError, match=r"prefill_chunk=16 exceeds .* 1/4 of it"):
        EngineConfig(max_model_len=64, max_num_seqs=8, prefill_chunk=16, max_num_batched_tokens=32, attention_shards=4)


def test_requests_spread_over_shards_with_per_shard_slots_and_budget():
    s = make(shards=2)
    for i in range(5):
        s.add(request(i, list(range(100 * i, 100 * i + 6))))
    out = s.schedule()
    shards = [x.request.shard for x in out.scheduled]
    assert shards == [0, 1, 0, 1]  # the most free pages next: alternating; 2 slots a shard, the 5th waits
    assert all(sum(x.num_tokens for x in out.scheduled if x.request.shard == d) <= 8 for d in (0, 1))
    assert all(s.allocator.shard_of(p) == x.request.shard for x in out.scheduled for p in x.request.pages)
    assert len(s.waiting) == 1
    s.allocator.check([r.pages for r in s.running])


def test_admission_prefers_the_shard_holding_the_cached_prefix():
    s = make(shards=2)
    first = request(0, list(range(12)))
    s.add(first)
    while first.is_prefilling:  # its prompt computed on shard 0: the pages of tokens 0..11 become cached
        for x in s.schedule().scheduled:
            x.request.num_computed = x.start + x.num_tokens
            s.prefix_cache.commit(x.request, x.start)
    assert first.shard == 0
    s.add(request(1, list(range(200, 203))))  # unrelated: the shard with more free pages (1), after it still more
    s.add(request(2, list(range(12)) + [99, 98]))  # shares 3 full pages with `first`: shard 0
    out = s.schedule()
    placed = {x.request.request_id: (x.request.shard, x.start) for x in out.scheduled}
    assert placed[1][0] == 1 and placed[2] == (0, 12)
    assert s.prefix_cache.stats.hits == 12


def test_preemption_takes_a_victim_from_the_same_shard():
    s = make(shards=2, num_pages=16, max_num_seqs=4)  # 7 usable pages a shard
    rs = [request(i, list(range(100 * i, 100 * i + 12)), max_tokens=20) for i in range(4)]
    for r in rs:
        s.add(r)
    for _ in range(12):
        out = s.schedule()
        for x in out.scheduled:
            x.request.num_computed = x.start + x.num_tokens
            if x.samples:
                x.request.output_token_ids.append(0)
        if any(r.status is Status.WAITING for r in rs[:2]):
            break
    preempted = [r for r in rs if r.status is Status.WAITING]
    assert preempted, "the pool never ran out"
    # each victim was the newest running request of the shard that needed its pages
    for v in preempted:
        assert all(r.shard != v.shard or r.status is Status.RUNNING for r in rs if r.request_id < v.request_id)
    s.allocator.check([r.pages for r in s.running])


def test_placement_fills_each_shards_group_and_gathers_back_in_order():
    class R:
        def __init__(self, shard): self.shard = shard
    reqs = [R(1), R(0), R(1)]
    p = Placement.of(reqs, [3, 2, 1], shards=2, rows=4, tokens=8)
    assert list(p.rows) == [2, 0, 3] and list(p.starts) == [4, 0, 7]
    tokens = np.arange(4)[:, None] * 10
    flat = np.arange(8, dtype=np.float32)
    got = p.gather(StepResult(tokens, tokens.astype(np.float32), prompt_logprobs=flat))
    assert got.tokens[:, 0].tolist() == [20, 0, 30] and got.prompt_logprobs.tolist() == [4, 5, 6, 0, 1, 7]


def test_mesh_flag_parses_axis_sizes_and_names_a_bad_one():
    from sharding.mesh import parse_mesh
    assert parse_mesh(None) is None and parse_mesh("") is None
    assert dict(parse_mesh("tensor=1,expert=1").shape) == {"data": 1, "tensor": 1, "expert": 1}
    with pytest.raises(ValueError, match=r"mesh 'model=2': expected axis=size entries"):
        parse_mesh("model=2")


def test_rules_for_a_model_placed_under_other_rules_are_refused():
    from engine import LLM
    from models import load_model
    from sharding import make_mesh
    placed = load_model("tiny-llama", mesh=make_mesh())
    with pytest.raises(ValueError, match="rules 'expert_dp' given for a model already placed under rules 'default'"):
        LLM(placed, rules="expert_dp", max_model_len=64)
