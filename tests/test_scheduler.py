"""Scheduler policy on its own (no JAX): chunking, budgets, admission, preemption, page accounting."""

from engine.config import EngineConfig
from engine.page_allocator import PageAllocator
from engine.request import Request, SamplingParams, Status
from engine.scheduler import Scheduler


def make(num_pages: int = 64, **kwargs) -> Scheduler:
    cfg = EngineConfig(**{"max_model_len": 128, "page_size": 4, "num_pages": num_pages, "max_num_seqs": 4,
                          "prefill_chunk": 16, "max_num_batched_tokens": 32, "decode_steps": 2, **kwargs})
    return Scheduler(cfg, PageAllocator(num_pages))


def request(i: int, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(i, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), 0,
                   max_total_len=prompt_len + max_tokens)


def run_prefill(s: Scheduler, out) -> None:
    """Pretend the runner ran the chunks: advance, and sample one token where a prefill completed."""
    for c in out.prefill:
        c.request.num_computed = c.start + c.length
        if c.completes_prefill:
            c.request.output_token_ids.append(0)


def test_long_prompt_is_chunked_and_chunks_attend_to_earlier_pages():
    s = make()
    r = request(0, 40)
    s.add(r)
    starts = []
    while r.is_prefilling:
        out = s.schedule()
        assert len(out.prefill) == 1 and out.prefill[0].length <= 16
        starts.append(out.prefill[0].start)
        run_prefill(s, out)
    assert starts == [0, 16, 32]
    assert len(r.pages) == 10  # 40 tokens / 4 per page


def test_token_budget_counts_padded_tokens():
    s = make()
    for i in range(4):
        s.add(request(i, 16))
    out = s.schedule()
    assert [c.length for c in out.prefill] == [16, 16]  # 2 rows x 16 = the 32-token budget


def test_max_num_seqs_limits_admission():
    s = make(max_num_batched_tokens=64, prefill_chunk=16)
    for i in range(6):
        s.add(request(i, 4))
    out = s.schedule()
    assert len(out.prefill) == 4 and len(s.waiting) == 2


def test_decode_after_prefill_reserves_pages_for_decode_steps():
    s = make()
    r = request(0, 4)
    s.add(r)
    run_prefill(s, s.schedule())
    out = s.schedule()
    assert out.decode == [r] and not out.prefill
    assert len(r.pages) * 4 >= len(r.tokens) - 1 + 2


def test_preemption_frees_newest_and_requeues_it_first():
    s = make(num_pages=12, max_model_len=40)  # 11 usable pages of 4 tokens
    old, new = request(0, 16, max_tokens=20), request(1, 16, max_tokens=20)
    s.add(old)
    s.add(new)
    run_prefill(s, s.schedule())
    assert s.allocator.num_free == 3
    for _ in range(3):  # decode until the pool runs dry
        out = s.schedule()
        for r in out.decode:
            r.output_token_ids += [0, 0]
            r.num_computed = len(r.tokens) - 1
    assert new.status is Status.WAITING and s.waiting[0] is new and not new.pages
    assert new.prefill_target == len(new.tokens) and new.num_computed == 0
    assert old.status is Status.RUNNING


def test_finish_returns_pages():
    s = make()
    r = request(0, 10)
    s.add(r)
    run_prefill(s, s.schedule())
    s.finish(r)
    assert s.allocator.num_free == 63 and not s.has_unfinished()
