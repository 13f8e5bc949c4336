"""Expert parallelism: the MoE expert MLPs inside a `jax.shard_map`, experts split over a mesh axis.

Two strategies (`choose_strategy` picks by the number of tokens in the step):
  "replicated"  every expert shard sees the same tokens (split only over the other mesh axes),
                runs only its own experts (a grouped GEMM over all E groups with a group offset:
                rows routed elsewhere give zeros) and a psum over the expert axis combines. One
                all-reduce of [N, D]; best for small decode batches.
  "all_to_all"  tokens are split over the expert axis too; each shard sends every (token, expert)
                pair to the shard owning that expert in per-destination buffers, one all_to_all
                there and one back, then a weighted sum. Best for large prefill batches.
No token is ever dropped: each per-destination buffer holds all N_local * k pairs of its source
(the worst case, every pair routed to one shard), so the buffers cost ep x the dispatched rows.
`jax.lax.all_to_all` is the tested path (ragged_all_to_all does not run on CPU).

Buffers are filled by gathers (each place reads the pair it holds), never by scattering into a
zeros buffer: a zeros broadcast depends on nothing, so XLA fused those of every MoE layer into
one op at the start of the step and kept them all alive, 39 GiB per device for DeepSeek-R1's 58
MoE layers at 2,048 tokens on 8 H200s (the deviceless compile gate, docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import ops
from pallas_kernels.quantized import QuantizedWeight

STRATEGIES = ("replicated", "all_to_all")
ALL_TO_ALL_MIN_TOKENS = 128  # a step with at least this many tokens (prefill) dispatches all-to-all
Activation = Callable[[jax.Array], jax.Array]  # [M, 2I] ([gate | up]) -> [M, I]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """gate_up [E, D, 2I], down [E, I, D] (dense, or packed QuantizedWeights: their values and
    scales split along E like any leaf) and the optional biases [E, 2I], [E, D]."""

    gate_up: jax.Array | QuantizedWeight
    down: jax.Array | QuantizedWeight
    gate_up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None


def expert_axis(sharding: NamedSharding | None) -> str | None:
    """The mesh axis that splits the experts (axis 0 of the expert weights), if it has size > 1."""
    if sharding is None or not sharding.spec or sharding.spec[0] is None:
        return None
    axis = sharding.spec[0]
    if not isinstance(axis, str):
        raise ValueError(f"experts must be split over one mesh axis, got {axis}")
    return axis if sharding.mesh.shape[axis] > 1 else None


def choose_strategy(num_tokens: int) -> str:
    """"replicated" for decode-sized steps, "all_to_all" for prefill-sized ones."""
    return "all_to_all" if num_tokens >= ALL_TO_ALL_MIN_TOKENS else "replicated"


def moe_experts(x_nd: jax.Array, weights_nk: jax.Array, ids_nk: jax.Array, w: ExpertWeights, *,
                mesh: Mesh, axis: str, activation: Activation, impl: str = "auto",
                strategy: str | None = None) -> jax.Array:
    """sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) -> [N, D], experts split over mesh `axis`."""
    strategy = strategy or choose_strategy(x_nd.shape[0])
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown expert-parallel strategy {strategy!r} (known: {STRATEGIES})")
    ep = mesh.shape[axis]
    if w.gate_up.shape[0] % ep:
        raise ValueError(f"{w.gate_up.shape[0]} experts cannot be split over mesh axis {axis}={ep}")
    token_axes = _token_axes(mesh, axis, x_nd.shape[0], with_expert=strategy == "all_to_all")
    tokens = (x_nd, weights_nk, ids_nk)
    pad = -x_nd.shape[0] % math.prod(mesh.shape[a] for a in token_axes)
    if pad:  # padded pairs carry weight 0 (all_to_all needs a multiple of the shard count)
        tokens = tuple(jnp.pad(t, ((0, pad), (0, 0))) for t in tokens)
    body = _replicated if strategy == "replicated" else _all_to_all
    w_spec = jax.tree.map(lambda _: P(axis), w)
    run = jax.shard_map(partial(body, axis=axis, activation=activation, impl=impl), mesh=mesh,
                        in_specs=(P(token_axes),) * 3 + (w_spec,), out_specs=P(token_axes), check_vma=False)
    return run(*tokens, w)[:x_nd.shape[0]]


def _token_axes(mesh: Mesh, axis: str, num_tokens: int, with_expert: bool) -> tuple[str, ...]:
    """Mesh axes that split the tokens: the non-expert axes whose shard count divides N (plus the
    expert axis for all_to_all, which pads N instead)."""
    out: list[str] = []
    for name in mesh.axis_names:
        if name != axis and mesh.shape[name] > 1 and num_tokens % (math.prod(mesh.shape[a] for a in out)
                                                                   * mesh.shape[name]) == 0:
            out.append(name)
    return (*out, axis) if with_expert else tuple(out)


def _expert_mlp(rows_md: jax.Array, local_ids_m: jax.Array, group_sizes: jax.Array, group_offset: jax.Array | int,
                w: ExpertWeights, activation: Activation, impl: str) -> jax.Array:
    """Rows sorted by expert through this shard's experts; rows of other experts give zeros (float32)."""
    num_local = w.gate_up.shape[0]
    valid = (local_ids_m >= 0) & (local_ids_m < num_local)
    safe = jnp.clip(local_ids_m, 0, num_local - 1)

    def bias(b: jax.Array | None) -> jax.Array | float:
        return 0.0 if b is None else jnp.where(valid[:, None], jnp.take(b, safe, axis=0), 0)

    h = ops.grouped_matmul(rows_md, w.gate_up, group_sizes, group_offset=group_offset, impl=impl)
    h = activation(h + bias(w.gate_up_bias))
    y = ops.grouped_matmul(h.astype(rows_md.dtype), w.down, group_sizes, group_offset=group_offset, impl=impl)
    return jnp.where(valid[:, None], (y + bias(w.down_bias)).astype(jnp.float32), 0.0)


def _replicated(x_nd: jax.Array, weights_nk: jax.Array, ids_nk: jax.Array, w: ExpertWeights, *, axis: str,
                activation: Activation, impl: str) -> jax.Array:
    """All pairs sorted by global expert id; this shard's experts via the group offset; psum."""
    n, k = ids_nk.shape
    num_local = w.gate_up.shape[0]
    offset = jax.lax.axis_index(axis) * num_local
    flat_ids = ids_nk.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token = order // k
    num_experts = num_local * jax.lax.axis_size(axis)
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    y = _expert_mlp(x_nd[token], flat_ids[order] - offset, group_sizes, offset, w, activation, impl)
    y = y * weights_nk.reshape(-1)[order][:, None]
    return jax.lax.psum(sum_pairs(y, order, k), axis).astype(x_nd.dtype)


def _all_to_all(x_nd: jax.Array, weights_nk: jax.Array, ids_nk: jax.Array, w: ExpertWeights, *, axis: str,
                activation: Activation, impl: str) -> jax.Array:
    """Dispatch pairs to their expert's shard in [ep, N*k] buffers, compute, send back, combine."""
    n, k = ids_nk.shape
    ep, num_local = jax.lax.axis_size(axis), w.gate_up.shape[0]
    flat_ids = ids_nk.reshape(-1)  # [N*k]
    dest = flat_ids // num_local  # ep: a padding token's pair (id E), sent nowhere
    slot = _rank_within(dest, ep)  # position of each pair in its destination buffer
    capacity = n * k  # worst case: every pair to one shard, so nothing is dropped
    # The pair each buffer place holds (n * k: none), then the buffers by gathering from it.
    place = jnp.where(dest < ep, dest * capacity + slot, ep * capacity)  # out of range: dropped
    pair_at = jnp.full((ep * capacity,), n * k, jnp.int32).at[place].set(jnp.arange(n * k), mode="drop")
    x_rows = jnp.concatenate([x_nd, jnp.zeros((1, x_nd.shape[1]), x_nd.dtype)])  # row n: an empty place
    send_x = x_rows[pair_at // k].reshape(ep, capacity, -1)
    send_id = jnp.append(flat_ids % num_local, num_local)[pair_at].reshape(ep, capacity)  # num_local = empty
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True).reshape(ep * capacity, -1)
    recv_id = jax.lax.all_to_all(send_id, axis, 0, 0, tiled=True).reshape(-1)
    order = jnp.argsort(recv_id, stable=True)
    group_sizes = jnp.bincount(recv_id, length=num_local).astype(jnp.int32)
    y_sorted = _expert_mlp(recv_x[order], recv_id[order], group_sizes, 0, w, activation, impl)
    y = y_sorted[inverse_permutation(order)].reshape(ep, capacity, -1)
    back = jax.lax.all_to_all(y, axis, 0, 0, tiled=True)  # [ep, capacity, D]: our pairs' results
    sent = (dest < ep)[:, None]
    y_pairs = jnp.where(sent, back[jnp.minimum(dest, ep - 1), slot], 0.0) * weights_nk.reshape(-1)[:, None]
    return y_pairs.reshape(n, k, -1).sum(axis=1).astype(x_nd.dtype)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """inverse[order[i]] = i: gathering with it puts rows sorted by `order` back in place."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def sum_pairs(y_sorted: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """[N, D] float32: each token's k pair rows summed, from rows sorted by `order` [N*k]."""
    return y_sorted[inverse_permutation(order)].reshape(-1, k, y_sorted.shape[-1]).sum(axis=1, dtype=jnp.float32)


def _rank_within(groups: jax.Array, num_groups: int) -> jax.Array:
    """For each element, how many earlier elements share its group (its slot in the group's buffer)."""
    one_hot = jax.nn.one_hot(groups, num_groups, dtype=jnp.int32)  # [M, G]
    return jnp.take_along_axis(jnp.cumsum(one_hot, axis=0) - one_hot, groups[:, None], axis=1)[:, 0]


def sharded_experts(experts, x_nd: jax.Array, weights_nk: jax.Array, ids_nk: jax.Array,
                    activation: Activation, impl: str) -> jax.Array | None:
    """The MoE layer's hook: run `experts` (models.moe.Experts) expert-parallel when its weights
    were placed with the experts split over a mesh axis of size > 1; None otherwise."""
    sharding = experts.gate_up_proj.get_metadata().get("placement")
    axis = expert_axis(sharding)
    if axis is None:
        return None

    def value(param):
        return None if param is None else param[...]

    w = ExpertWeights(value(experts.gate_up_proj), value(experts.down_proj), value(experts.gate_up_proj_bias),
                      value(experts.down_proj_bias))
    return moe_experts(x_nd, weights_nk, ids_nk, w, mesh=sharding.mesh, axis=axis, activation=activation, impl=impl)
