"""References for checking the engine: random prompts, and greedy continuations through the model's
no-cache forward (what the paged, batched, chunked engine steps must reproduce token for token)."""

import numpy as np

from engine.request import SamplingParams
from models import LoadedModel


def random_prompts(seed: int, n: int, vocab: int, low: int, high: int) -> list[list[int]]:
    """n prompts of random ids in [0, vocab), their lengths in [low, high)."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, rng.integers(low, high))] for _ in range(n)]


def greedy_reference(model: LoadedModel, prompts: list[list[int]], max_tokens: int, pad_to: int) -> list[list[int]]:
    """Greedy continuations through the no-cache forward; rows right-padded to one length (one compile)."""
    seqs = [list(p) for p in prompts]
    for _ in range(max_tokens):
        batch = np.zeros((len(seqs), pad_to), np.int32)
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        logits = np.asarray(model.forward(batch))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def penalised_logits(logits: np.ndarray, prompt: list[int], output: list[int], params: SamplingParams,
                     banned: tuple[int, ...] = (), stop_ids: tuple[int, ...] = ()) -> np.ndarray:
    """float64 logits [V] of the next token (at position len(prompt) + len(output)) under the
    published formulas: logit_bias added; -inf outside allowed_token_ids, at `banned` and, before
    min_tokens, at `stop_ids`; then vLLM's repetition penalty over prompt + output (divide a positive
    logit, multiply a negative one) and OpenAI's frequency and presence penalties over the output."""
    z = np.asarray(logits, np.float64).copy()
    vocab = len(z)
    for token, bias in params.logit_bias.items():
        z[token] += bias
    if params.allowed_token_ids is not None:
        z[~np.isin(np.arange(vocab), params.allowed_token_ids)] = -np.inf
    z[list(banned)] = -np.inf
    if len(output) < params.min_tokens:
        z[list(stop_ids)] = -np.inf
    counts = np.bincount(np.asarray(output, np.int64), minlength=vocab).astype(np.float64)
    seen = (counts > 0) | np.isin(np.arange(vocab), prompt)
    r = np.where(seen, params.repetition_penalty, 1.0)
    z = np.where(z > 0, z / r, z * r)
    return z - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def penalised_greedy_reference(model: LoadedModel, prompts: list[list[int]], params: list[SamplingParams],
                               pad_to: int, stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Greedy continuations with each request's penalties and biases applied (penalised_logits) to
    the no-cache forward's logits step by step, max_tokens each (ignore_eos); one compile."""
    seqs = [list(p) for p in prompts]
    for _ in range(max(p.max_tokens for p in params)):
        batch = np.zeros((len(seqs), pad_to), np.int32)
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        logits = np.asarray(model.forward(batch))
        for i, (s, prompt, p) in enumerate(zip(seqs, prompts, params)):
            if len(s) - len(prompt) < p.max_tokens:
                z = penalised_logits(logits[i, len(s) - 1], prompt, s[len(prompt):], p, stop_ids=stop_ids)
                s.append(int(z.argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]
