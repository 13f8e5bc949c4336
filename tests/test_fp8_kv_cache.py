"""FP8 KV cache (kv_cache_dtype="fp8_e4m3"): greedy agreement and logprob error against the model-dtype
pool on tiny-llama and tiny-deepseek-v3 (MLA latent pool), the write clip and the per-tensor scale,
pool sizing, and the errors for bad values and the Pallas kernels."""

import jax.numpy as jnp
import numpy as np
import pytest

from engine import SamplingParams, kv_cache
from engine.config import EngineConfig
from models import attention, load_model
from models.attention import AttentionMetadata, quantize_kv, write_pages
from pallas_kernels import ops
from engine.testing import random_prompts
from tests.engine_helpers import tiny_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1, logprobs=0)
FP8 = jnp.float8_e4m3fn


def compare(model, **engine_args) -> dict:
    """An f32 pool vs an FP8 pool on the same prompts: teacher-forced greedy agreement (the argmax
    at every prompt position, from prompt_logprobs' top-1), free-running greedy agreement (generated
    tokens position by position: one near-tie flip changes the rest of a random-weight model's
    output) and max |Δ logprob| of the prompt tokens (Δlogit less the log-normalizer's change)."""
    prompts = random_prompts(3, 6, model.config.vocab_size, 8, 40)
    outs = {}
    for kv in ("auto", "fp8_e4m3"):
        llm = tiny_llm(model, kv_cache_dtype=kv, **engine_args)
        assert llm.runner.cache[0][0].dtype == (FP8 if kv != "auto" else jnp.float32)
        outs[kv] = llm.generate(prompts, PARAMS, use_tqdm=False)
    same = total = forced_same = forced = 0
    delta = 0.0
    for prompt, ref, got in zip(prompts, outs["auto"], outs["fp8_e4m3"]):
        same += sum(a == b for a, b in zip(ref.token_ids, got.token_ids))
        total += len(ref.token_ids)
        for tok, r, g in zip(prompt[1:], ref.prompt_logprobs[1:], got.prompt_logprobs[1:]):
            delta = max(delta, abs(r[tok] - g[tok]))
            forced_same += max(r, key=r.get) == max(g, key=g.get)
            forced += 1
    return {"teacher_forced_agreement": forced_same / forced, "positions": forced,
            "free_running_agreement": same / total, "generated_tokens": total, "max_abs_delta_logprob": delta}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-deepseek-v3"])
def test_fp8_greedy_agreement(preset):
    result = compare(load_model(preset))
    print(preset, result)
    assert result["teacher_forced_agreement"] >= 0.9, result
    assert result["free_running_agreement"] >= 0.75, result
    assert 0.0 < result["max_abs_delta_logprob"] < 0.1, result


def test_write_clips_before_cast():
    x = jnp.array([500.0, -1000.0, 3.3, 448.0], jnp.float32)
    q = quantize_kv(x, FP8).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(q), [448.0, -448.0, 3.25, 448.0])
    # The wrong variant, a bare cast, turns the large values into NaN on CPU: the check above fails it.
    assert np.isnan(np.asarray(x.astype(FP8).astype(jnp.float32))[:2]).all()
    assert quantize_kv(x, jnp.float32).dtype == jnp.float32  # non-FP8 pools: a plain cast


def _attend_error(monkeypatch, kv_scale: float, read_scale=None) -> float:
    """Max |fp8 - f32| / max |f32| of one ragged step attending over pages written by write_pages, with
    KV_SCALE = kv_scale; read_scale replaces the read factor (a wrong variant)."""
    monkeypatch.setattr(attention, "KV_SCALE", kv_scale)
    if read_scale is not None:
        monkeypatch.setattr(attention, "pool_scale", lambda pages: read_scale)
    rng = np.random.default_rng(0)
    hkv, hq, d, page, pages, t = 2, 4, 32, 8, 6, 20
    k = jnp.asarray(rng.normal(size=(1, t, hkv, d)) * 3, jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, t, hkv, d)) * 3, jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, t, hq, d)), jnp.float32)
    meta = AttentionMetadata(jnp.arange(page, page + t, dtype=jnp.int32), jnp.array([0, t], jnp.int32),
                             jnp.array([t], jnp.int32), jnp.array([[1, 2, 3, 4]], jnp.int32), max_query_len=t)
    outs = []
    for dtype in (jnp.float32, FP8):
        zeros = jnp.zeros((hkv, pages, page, d), dtype)
        kp, vp = write_pages(zeros, k, meta.slot_mapping), write_pages(zeros, v, meta.slot_mapping)
        outs.append(np.asarray(meta.attend(q, kp, vp, impl="cpu")))
    return float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max())


def test_scale_applied_once(monkeypatch):
    err_1, err_4 = _attend_error(monkeypatch, 1.0), _attend_error(monkeypatch, 4.0)
    assert err_1 < 0.1 and err_4 < 0.1, (err_1, err_4)
    # The wrong variant: the scale applied twice on read (x4 K logits, x16 V) fails the bound.
    assert _attend_error(monkeypatch, 4.0, read_scale=16.0) > 0.5


def test_fp8_pool_has_twice_the_pages():
    model = load_model("tiny-llama")
    cfg, budget, big = model.config, 1 << 20, 1 << 30
    bf16 = kv_cache.pages_for_budget(cfg, 16, jnp.bfloat16, budget, big)
    fp8 = kv_cache.pages_for_budget(cfg, 16, jnp.bfloat16, budget, big, "fp8_e4m3")
    assert fp8 == 2 * bf16
    assert kv_cache.bytes_per_token(cfg, 1) * 2 == kv_cache.bytes_per_token(cfg, 2)
    assert "float8_e4m3fn" in kv_cache.summary(cfg, fp8, 16, jnp.bfloat16, "fp8_e4m3")
    f32 = tiny_llm(model, num_pages=None, kv_cache_bytes=budget, max_num_seqs=64)
    f8 = tiny_llm(model, num_pages=None, kv_cache_bytes=budget, max_num_seqs=64, kv_cache_dtype="fp8_e4m3")
    assert f8.config.num_pages == 4 * f32.config.num_pages  # f32 pool: 4 bytes an element, fp8: 1


def test_bad_kv_cache_dtype():
    with pytest.raises(ValueError, match=r"unknown kv_cache_dtype 'int8'.*'auto', 'fp8', 'fp8_e4m3'"):
        EngineConfig(max_model_len=64, kv_cache_dtype="int8")


@pytest.mark.parametrize("impl", ["pallas", "interpret"])
def test_paged_fallback_refuses_fp8(impl):
    """The ragged and MLA kernels read FP8 pages (their tests); the per-token paged fallback, for
    shapes the ragged kernel refuses (4-token pages), does not: a clear error at engine creation
    and in ops."""
    msg = "kv_cache_dtype='fp8_e4m3' is not supported by the Pallas paged attention kernel yet; " \
          "use attention_impl='xla' (or 'auto') (the ragged kernel, which reads FP8 pages, refuses page_size 4"
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        tiny_llm(load_model("tiny-llama"), kv_cache_dtype="fp8_e4m3", attention_impl=impl, page_size=4)
    pages = jnp.zeros((1, 4, 4, 32), FP8)
    args = (jnp.zeros((2, 2, 32)), jnp.array([0, 2], jnp.int32), jnp.array([2], jnp.int32),
            jnp.array([[1]], jnp.int32))
    with pytest.raises(ValueError, match="not supported by the Pallas paged attention kernel"):
        ops.ragged_paged_attention(args[0], pages, pages, *args[1:], impl=impl)
    assert ops.ragged_paged_attention(args[0], pages, pages, *args[1:], impl="auto").shape == (2, 2, 32)


@pytest.mark.slow
@pytest.mark.interpret_only
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-deepseek-v3"])
def test_engine_serves_fp8_pool_on_the_mosaic_kernels(preset):
    """attention_impl="interpret": the engine's FP8 pool goes through the Mosaic ragged (GQA) or MLA
    kernel (f16 multiplies of the e4m3 pages) and gives the jnp path's prompt logprobs and tokens."""
    model = load_model(preset)
    prompts = random_prompts(5, 2, model.config.vocab_size, 10, 30)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    outs = {impl: tiny_llm(model, kv_cache_dtype="fp8_e4m3", attention_impl=impl).generate(prompts, params,
                                                                                            use_tqdm=False)
            for impl in ("xla", "interpret")}
    for prompt, ref, got in zip(prompts, outs["xla"], outs["interpret"]):
        assert got.token_ids == ref.token_ids
        deltas = [abs(r[t] - g[t]) for t, r, g in zip(prompt[1:], ref.prompt_logprobs[1:], got.prompt_logprobs[1:])]
        assert max(deltas) < 1e-2, deltas
