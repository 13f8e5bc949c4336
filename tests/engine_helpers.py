"""The engine the tests share: small enough for CPU tests."""

from engine import LLM
from models import LoadedModel


def tiny_llm(model: LoadedModel, **overrides) -> LLM:
    """An engine small enough for CPU tests: 8-token pages, 128-token context, concurrency 8."""
    kwargs = dict(page_size=8, max_model_len=128, max_num_seqs=8, prefill_chunk=32,
                  max_num_batched_tokens=64, decode_steps=4, multi_step_min_gain=None)
    return LLM(model, **{**kwargs, **overrides})
