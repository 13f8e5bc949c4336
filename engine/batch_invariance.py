"""Batch-invariant mode (EngineConfig.batch_invariant): a request's tokens and logprobs are bitwise
the same whatever else runs in its steps, however its prompt is chunked, after preemption, with
multi-step decode or not.

Measured on XLA:CPU (/tmp/notes/batch_invariance.md): a row's bits depend on the SHAPE of the
arrays it is computed in, not on its position among them or on its neighbours' values. A [M, 576]
x [576, 1536] matmul gives row 0 different bits at M = 1 and M = 2 (a GEMV against a GEMM) and at
M = 8 and M = 64 (another blocking); an RMSNorm over 64 features vectorizes its reduction
differently from M = 64 rows on; at one M, every row position gives the same bits, inside a loop
body too. So the mode fixes the shapes instead of rewriting every op (Thinking Machines' and vLLM's
route on a GPU: kernels whose reduction order ignores M):

- every model call runs at one token count, the budget: a mixed step pads its flat tokens to it
  (EngineConfig.token_buckets), a decode call pads its rows to it inside each step (pad_rows);
- the LM head, the sampler and the logprobs see max_num_seqs rows in both kinds of step (the
  decode call's rows are max_num_seqs, a mixed step samples every slot: no SAMPLE_ROW_TIERS);
- one block-table width (EngineConfig.page_buckets): one program per kind of step;
- one attention implementation for decode and prefill rows whose rows are computed alone
  (attention): the C++ CPU kernel (each query row walks its pages in order with its own online
  softmax, whatever tile it shares) or the jnp path per token (max_query_len 1: no query tiles).

The price is a full-budget forward for every decode step: choose a small max_num_batched_tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.attention_choice import AttentionChoice
from engine.config import EngineConfig
from models.config import ModelConfig
from pallas_kernels import cpu_paged_attention as cpa
from pallas_kernels import ops


def check_model(config: EngineConfig, model: ModelConfig) -> None:
    """ValueError for a MoE model in the mode: the experts' grouped matmul sizes each expert's rows
    by the whole batch's routing, so a token's bits would depend on its neighbours."""
    if config.batch_invariant and model.moe is not None:
        raise ValueError("batch_invariant=True does not support MoE models yet: each expert's grouped "
                         "matmul sees as many rows as the batch routes to it")


def attention(impl: str, head_dim: int, on_mesh: bool, fp8_kv: bool) -> AttentionChoice:
    """One impl for decode and mixed steps, never measured (a measurement may pick two): the C++
    kernel where "auto" would time it or it is asked for, else the jnp path (also "auto" on a GPU,
    whose Pallas kernel is not row-local)."""
    usable = not on_mesh and not fp8_kv and cpa.supported(head_dim)
    row_local = "cpu" if impl == "cpu" or (impl == "auto" and ops.resolve_impl(impl) == "cpu" and usable) else "xla"
    return AttentionChoice(row_local, row_local)


def model_rows(config: EngineConfig) -> int | None:
    """The rows every model call of the mode runs (the budget); None when the mode is off."""
    return config.max_num_batched_tokens if config.batch_invariant else None


def pad_rows(arrays: tuple[jax.Array, ...], rows: int | None) -> tuple[jax.Array, ...]:
    """Each [B, ...] array zero-padded to `rows` rows (unchanged when rows is None): padding rows are
    inactive decode rows, which write the null page and attend to nothing."""
    if rows is None:
        return arrays
    return tuple(jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)) for x in arrays)
