"""Mixture of experts: a router picks k experts per token, the experts run as grouped GEMMs.

Two routing rules (config.moe.router):
  softmax_topk     (gpt-oss, Qwen3-MoE)  softmax over the experts, the top k; with norm_topk_prob
                                  those k renormalized (= a softmax over the k largest logits);
  sigmoid_grouped  (DeepSeek-V3)  sigmoid scores; choose with scores + a correction bias, first
                                  the top `topk_group` of `n_group` groups (each scored by its two
                                  best experts), then the top k experts inside them; weights are the
                                  uncorrected scores, normalized, times `routed_scaling_factor`.
The expert MLPs run on tokens sorted by expert through `ops.grouped_matmul`; impl="dense" runs
every expert on every token and masks (the reference backend the tests compare against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, MoEConfig
from models.layers import MLP, _normal, weight
from models.loading import quantized as packed
from models.loading.weights import TensorGetter
from pallas_kernels import ops
from pallas_kernels import quantized as qz
from sharding import expert_parallel

DENSE = "dense"  # the reference backend's impl name, beside ops.IMPLS


def softmax_topk(logits_ne: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Weights [N, k] and expert ids [N, k]: the k largest of softmax(logits), renormalized to sum
    to 1 when `normalize` (then equal to a softmax over the k largest logits, gpt-oss' form)."""
    top_nk, ids_nk = jax.lax.top_k(logits_ne, k)
    if normalize:
        return jax.nn.softmax(top_nk, axis=-1), ids_nk
    return jnp.exp(top_nk - jax.nn.logsumexp(logits_ne, axis=-1, keepdims=True)), ids_nk


def sigmoid_grouped_topk(logits_ne: jax.Array, correction_bias_e: jax.Array, k: int, n_group: int,
                         topk_group: int, normalize: bool, scale: float) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3 routing: group-limited top-k on sigmoid scores + correction bias."""
    n, e = logits_ne.shape
    scores_ne = jax.nn.sigmoid(logits_ne)
    choice_ne = scores_ne + correction_bias_e
    group_scores_ng = jax.lax.top_k(choice_ne.reshape(n, n_group, e // n_group), 2)[0].sum(-1)
    _, groups_nt = jax.lax.top_k(group_scores_ng, topk_group)
    group_mask_ng = jax.nn.one_hot(groups_nt, n_group, dtype=jnp.bool_).any(axis=1)
    expert_mask_ne = jnp.repeat(group_mask_ng, e // n_group, axis=1)
    _, ids_nk = jax.lax.top_k(jnp.where(expert_mask_ne, choice_ne, -jnp.inf), k)
    weights_nk = jnp.take_along_axis(scores_ne, ids_nk, axis=1)
    if normalize:
        weights_nk = weights_nk / (weights_nk.sum(-1, keepdims=True) + 1e-20)
    return weights_nk * scale, ids_nk


class Router(nnx.Module):
    """Router logits in float32 (linear, with a bias for gpt-oss) and the config's routing rule."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        c = config.moe
        d, e = config.hidden_size, c.num_experts
        self.config = c
        grouped = c.router == "sigmoid_grouped"
        self.kernel = nnx.Param(_normal(rngs, (d, e), dtype), logical_axes=("embed", "experts"))
        self.bias = nnx.Param(jnp.zeros((e,), dtype), logical_axes=("experts",)) if c.router_bias else None
        self.e_score_correction_bias = (nnx.Param(jnp.zeros((e,), jnp.float32), logical_axes=("experts",))
                                        if grouped else None)

    def __call__(self, x_nd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Routing weights [N, k] float32 and expert ids [N, k] int32."""
        c = self.config
        logits_ne = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        if self.bias is not None:
            logits_ne = logits_ne + self.bias[...].astype(jnp.float32)
        if c.router == "softmax_topk":
            return softmax_topk(logits_ne, c.num_experts_per_tok, c.norm_topk_prob)
        return sigmoid_grouped_topk(logits_ne, self.e_score_correction_bias[...], c.num_experts_per_tok,
                                    c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)


def expert_activation(h_mf: jax.Array, config: MoEConfig) -> jax.Array:
    """[gate | up] halves -> the gated hidden [M, F/2]."""
    gate, up = jnp.split(h_mf, 2, axis=-1)
    if config.activation == "swiglu":
        return jax.nn.silu(gate) * up
    # gpt-oss: gate clamped above, up clamped both sides, sigmoid gain alpha, (up + 1) * glu.
    gate = jnp.minimum(gate, config.swiglu_limit)
    up = jnp.clip(up, -config.swiglu_limit, config.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * config.swiglu_alpha))


class Experts(nnx.Module):
    """E expert MLPs: gate_up_proj [E, D, 2I] ([gate | up] halves), down_proj [E, I, D], optional
    biases; the two weights packed (layers.PackedWeight) when the checkpoint quantizes experts."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, d, i = config.moe.num_experts, config.hidden_size, config.moe.intermediate_size
        self.config = config.moe
        fmt = config.packed_format("experts")
        self.gate_up_proj = weight((e, d, 2 * i), ("experts", "embed", "expert_mlp"), fmt, dtype=dtype, rngs=rngs)
        self.down_proj = weight((e, i, d), ("experts", "expert_mlp", "embed"), fmt, dtype=dtype, rngs=rngs)
        biased = config.moe.activation == "gpt_oss_swiglu"
        self.gate_up_proj_bias = (nnx.Param(jnp.zeros((e, 2 * i), dtype), logical_axes=("experts", "expert_mlp"))
                                  if biased else None)
        self.down_proj_bias = (nnx.Param(jnp.zeros((e, d), dtype), logical_axes=("experts", "embed"))
                               if biased else None)

    def _bias(self, bias: nnx.Param | None, expert_ids: jax.Array) -> jax.Array | float:
        return 0.0 if bias is None else jnp.take(bias[...], expert_ids, axis=0)

    def grouped(self, x_nd: jax.Array, weights_nk: jax.Array, ids_nk: jax.Array, impl: str) -> jax.Array:
        """Sort the N*k (token, expert) pairs by expert, two grouped GEMMs, weighted sum per token."""
        n, k = ids_nk.shape
        flat_ids = ids_nk.reshape(-1)
        order = jnp.argsort(flat_ids, stable=True)  # [N*k] pair index, grouped by expert
        sorted_ids = flat_ids[order]
        token = order // k
        group_sizes = jnp.bincount(flat_ids, length=self.config.num_experts).astype(jnp.int32)
        h = ops.grouped_matmul(x_nd[token], self.gate_up_proj[...], group_sizes, impl=impl)
        h = expert_activation(h + self._bias(self.gate_up_proj_bias, sorted_ids), self.config)
        y = ops.grouped_matmul(h.astype(x_nd.dtype), self.down_proj[...], group_sizes, impl=impl)
        y = (y + self._bias(self.down_proj_bias, sorted_ids)).astype(jnp.float32)
        routed = (sorted_ids < self.config.num_experts)[:, None]  # padding's pairs (id E) sort last, in no group
        y = jnp.where(routed, y * weights_nk.reshape(-1)[order][:, None], 0.0)
        return expert_parallel.sum_pairs(y, order, k).astype(x_nd.dtype)

    def dense(self, x_nd: jax.Array, weights_nk: jax.Array, ids_nk: jax.Array) -> jax.Array:
        """Reference: every expert on every token, combined with the (mostly zero) routing weights."""
        x_in, gate_up = qz.dense_operands(x_nd, self.gate_up_proj[...])  # the numerics of the grouped path
        h = jnp.einsum("nd,edf->enf", x_in, gate_up, preferred_element_type=jnp.float32)
        if self.gate_up_proj_bias is not None:
            h = h + self.gate_up_proj_bias[...][:, None, :]
        h = expert_activation(h, self.config).astype(x_nd.dtype)
        h_in, down = qz.dense_operands(h.reshape(-1, h.shape[-1]), self.down_proj[...])
        y = jnp.einsum("enf,efd->end", h_in.reshape(h.shape), down, preferred_element_type=jnp.float32)
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias[...][:, None, :]
        combine_ne = jnp.einsum("nk,nke->ne", weights_nk,
                                jax.nn.one_hot(ids_nk, self.config.num_experts, dtype=jnp.float32))
        return jnp.einsum("ne,end->nd", combine_ne, y).astype(x_nd.dtype)


class MoE(nnx.Module):
    """Routed experts plus optional always-on shared experts (DeepSeek)."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.router = Router(config, dtype=dtype, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, rngs=rngs)
        shared = config.moe.intermediate_size * config.moe.num_shared_experts
        fmt = config.packed_format("linear")
        self.shared_experts = MLP(config.hidden_size, shared, dtype=dtype, rngs=rngs, fmt=fmt) if shared else None

    def __call__(self, x_btd: jax.Array, impl: str = "auto", real: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]. impl: an `ops` impl for the grouped GEMMs, or "dense". real
        [B, T]: which tokens are not padding; padding routes to no expert (id E, weight 0: every
        path skips it, so an uneven step's padding costs no expert FLOPs or dispatched rows)."""
        return self.routed(x_btd, impl, real)[0]

    def routed(self, x_btd: jax.Array, impl: str = "auto", real: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
        """`__call__`'s output and the expert ids [B*T, k] each token was routed to (padding: E),
        for the research hooks (models/hooks.py)."""
        x_nd = x_btd.reshape(-1, x_btd.shape[-1])
        weights_nk, ids_nk = self.router(x_nd)
        if real is not None:
            keep = real.reshape(-1, 1)
            weights_nk = jnp.where(keep, weights_nk, 0.0)
            ids_nk = jnp.where(keep, ids_nk, self.experts.config.num_experts)
        if impl == DENSE:
            y_nd = self.experts.dense(x_nd, weights_nk, ids_nk)
        else:  # expert-parallel when the experts were placed split over a mesh axis (sharding/)
            y_nd = expert_parallel.sharded_experts(self.experts, x_nd, weights_nk, ids_nk,
                                                   lambda h: expert_activation(h, self.experts.config), impl)
            if y_nd is None:
                y_nd = self.experts.grouped(x_nd, weights_nk, ids_nk, impl)
        y = y_nd.reshape(x_btd.shape)
        y = y if self.shared_experts is None else y + self.shared_experts(x_btd, "xla" if impl == DENSE else impl)
        return y, ids_nk


def _stacked_experts(prefix: str, leaf: str, num_experts: int, get_tensor: TensorGetter) -> packed.HFWeight:
    """Per-expert HF tensors experts.{i}.{gate,up,down}_proj.weight ([out, in], dense or packed) ->
    our stacked [E, in, out]."""
    def expert(i: int) -> packed.HFWeight:
        if leaf == "down_proj":
            return packed.to_in_out(get_tensor(f"{prefix}.{i}.down_proj.weight"))
        gate, up = (packed.to_in_out(get_tensor(f"{prefix}.{i}.{p}_proj.weight")) for p in ("gate", "up"))
        return packed.concat_out([gate, up], f"{prefix}.{i}.gate_proj.weight")
    return packed.stack([expert(i) for i in range(num_experts)])


def load_per_expert_param(config: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...],
                          get_tensor: TensorGetter) -> packed.HFWeight | None:
    """The router (HF `mlp.gate`) and the experts of checkpoints that store one tensor per expert
    (DeepSeek-V3, Qwen3-MoE, as transformers saves them); None for every other parameter."""
    prefix = "model." + ".".join(path[:-1])
    if path[-2] == "router":
        gate = prefix[: -len("router")] + "gate"
        return get_tensor(f"{gate}.weight").T if path[-1] == "kernel" else get_tensor(f"{gate}.{path[-1]}")
    if path[-2] == "experts":
        return _stacked_experts(prefix, path[-1], config.moe.num_experts, get_tensor)
    return None
