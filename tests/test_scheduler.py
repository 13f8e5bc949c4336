"""Scheduler policy on its own (no JAX): the token budget, chunking, decodes first, admission,
multi-step decode, preemption, page accounting."""

from engine.config import EngineConfig
from engine.page_allocator import PageAllocator
from engine.request import Request, SamplingParams, Status
from engine.scheduler import Scheduler, SchedulerOutput


def make(num_pages: int = 64, **kwargs) -> Scheduler:
    cfg = EngineConfig(**{"max_model_len": 128, "page_size": 4, "num_pages": num_pages, "max_num_seqs": 4,
                          "prefill_chunk": 16, "max_num_batched_tokens": 32, "decode_steps": 2,
                          "multi_step_min_gain": None, **kwargs})
    return Scheduler(cfg, PageAllocator(num_pages))


def request(i: int, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(i, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), 0,
                   max_total_len=prompt_len + max_tokens)


def run(out: SchedulerOutput) -> None:
    """Pretend the runner ran the step: advance, and append decode_steps tokens where it samples."""
    for s in out.scheduled:
        s.request.num_computed = s.start + s.num_tokens
        if s.samples:
            for step in range(out.decode_steps):
                s.request.num_computed += step > 0
                s.request.output_token_ids.append(0)


def test_long_prompt_is_chunked_and_chunks_attend_to_earlier_pages():
    s = make()
    r = request(0, 40)
    s.add(r)
    starts = []
    while r.is_prefilling:
        out = s.schedule()
        assert len(out.scheduled) == 1 and out.scheduled[0].num_tokens <= 16 and out.decode_steps == 1
        starts.append(out.scheduled[0].start)
        run(out)
    assert starts == [0, 16, 32]
    assert len(r.pages) == 10  # 40 tokens / 4 per page


def test_token_budget_counts_real_tokens():
    s = make()
    for i, n in enumerate((16, 10, 5, 16)):
        s.add(request(i, n))
    out = s.schedule()
    assert [x.num_tokens for x in out.scheduled] == [16, 10, 5, 1]  # 32 tokens: the last prompt gets 1


def test_decodes_first_then_prefill_chunks_in_one_step():
    """A long prompt arriving while others decode shares their step; it never stalls them."""
    s = make(max_num_seqs=8)
    decoders = [request(i, 3) for i in range(4)]
    for r in decoders:
        s.add(r)
    run(s.schedule())
    long = request(9, 100)
    s.add(long)
    for _ in range(4):
        out = s.schedule()
        by_request = {x.request: x.num_tokens for x in out.scheduled}
        assert [by_request[r] for r in decoders] == [1, 1, 1, 1]
        assert by_request[long] == 16 and sum(by_request.values()) <= 32 and out.decode_steps == 1
        assert [x.request for x in out.scheduled][:4] == decoders  # running decodes come first
        run(out)


def test_max_num_seqs_limits_admission():
    s = make(max_num_batched_tokens=64, prefill_chunk=16)
    for i in range(6):
        s.add(request(i, 4))
    out = s.schedule()
    assert len(out.scheduled) == 4 and len(s.waiting) == 2


def test_decode_only_step_runs_decode_steps_with_pages_reserved():
    s = make()
    r = request(0, 4)
    s.add(r)
    run(s.schedule())
    out = s.schedule()
    assert [x.request for x in out.scheduled] == [r] and out.is_decode_only and out.decode_steps == 2
    assert len(r.pages) * 4 >= len(r.tokens) - 1 + 2


def test_preemption_frees_newest_and_requeues_it_first():
    s = make(num_pages=12, max_model_len=40)  # 11 usable pages of 4 tokens
    old, new = request(0, 16, max_tokens=20), request(1, 16, max_tokens=20)
    s.add(old)
    s.add(new)
    run(s.schedule())
    assert s.allocator.num_free == 3
    for _ in range(3):  # decode until the pool runs dry
        run(s.schedule())
    assert new.status is Status.WAITING and s.waiting[0] is new and not new.pages
    assert new.prefill_target == len(new.tokens) and new.num_computed == 0
    assert old.status is Status.RUNNING


def test_no_admission_in_a_step_that_preempted():
    s = make(num_pages=8, max_model_len=28)  # 7 usable pages
    a, b = request(0, 12, max_tokens=16), request(1, 12, max_tokens=16)
    s.add(a)
    s.add(b)
    run(s.schedule())  # 3 + 3 pages, 1 free
    s.add(request(2, 4))
    out = s.schedule()  # a and b need a 4th page each: b goes, and the waiting one stays waiting
    assert [x.request for x in out.scheduled] == [a] and b.status is Status.WAITING and list(s.waiting)[:1] == [b]
    assert len(s.waiting) == 2 and s.allocator.num_free == 3


def test_finish_returns_pages_and_abort_of_a_waiting_request():
    s = make()
    r, waiting = request(0, 10), request(1, 10)
    s.add(r)
    run(s.schedule())
    s.add(waiting)
    s.finish(r, "stop")
    s.finish(waiting, "abort")
    assert s.allocator.num_free == 63 and not s.has_unfinished()
    assert r.finish_reason == "stop" and waiting.finish_reason == "abort" and waiting.status is Status.FINISHED


def test_draft_slots_take_only_free_pages_and_never_preempt():
    """A speculative decode's one token may preempt like any decode, but its K draft slots are
    reserved only from free pages: a tight pool shortens the drafts instead of preempting a request
    (the drafts may come back short anyway)."""
    s = make(num_pages=6, max_model_len=20, num_speculative_tokens=4, decode_steps=1)  # 5 usable pages of 4 tokens
    a, b = request(0, 7, max_tokens=10), request(1, 7, max_tokens=10)
    s.add(a)
    s.add(b)
    run(s.schedule())  # both prompts: 2 pages each (8 tokens' room), 1 page free
    out = s.schedule()
    assert [r.request_id for r in s.running] == [0, 1] and not s.waiting  # nobody preempted
    assert [x.num_tokens for x in out.scheduled] == [5, 1]  # a: 1 + 4 drafts (the free page); b: its token only
    assert s.allocator.num_free == 0


def test_token_slices_equal_slices_of_the_whole_sequence():
    """The hot paths read a request's tokens without building prompt + output (num_tokens,
    last_token, tokens_between): the same values as the full list."""
    r = request(0, 5)
    for out in ([], [9], [9, 8, 7]):
        r.output_token_ids[:] = out
        whole = r.tokens
        assert (r.num_tokens, r.last_token) == (len(whole), whole[-1])
        assert all(r.tokens_between(a, b) == whole[a:b] for a in range(len(whole) + 1) for b in range(a, len(whole) + 2))
