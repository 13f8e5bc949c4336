"""MoE: routers vs NumPy, the grouped-GEMM expert path vs the dense reference backend, config errors."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ModelConfig, get_preset
from models.moe import MoE, sigmoid_grouped_topk, softmax_topk


def randomize(module: nnx.Module, seed: int, scale: float = 0.3) -> None:
    """Give every parameter (biases included) random values, so nothing stays at its zero init."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))


@partial(jax.jit, static_argnums=(0, 3))
def _apply(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, impl: str) -> jax.Array:
    return nnx.merge(graphdef, state)(x, impl=impl)


def apply(moe: MoE, x: jax.Array, impl: str) -> np.ndarray:
    """The MoE under jit (eager dispatch of its many small ops is slow)."""
    graphdef, state = nnx.split(moe)
    return np.asarray(_apply(graphdef, state, x, impl), np.float32)


def sigmoid_grouped_np(logits, bias, k, n_group, topk_group, normalize, scale):
    """DeepSeek-V3 routing token by token in float64, written as the paper describes it."""
    weights, ids = [], []
    for row in np.asarray(logits, np.float64):
        scores = 1 / (1 + np.exp(-row))
        choice = scores + bias
        groups = choice.reshape(n_group, -1)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
        keep = np.argsort(-group_score)[:topk_group]
        masked = np.full_like(choice, -np.inf).reshape(n_group, -1)
        masked[keep] = groups[keep]
        top = np.argsort(-masked.reshape(-1))[:k]
        w = scores[top] / (scores[top].sum() if normalize else 1.0)
        weights.append(w * scale)
        ids.append(top)
    return np.array(weights), np.array(ids)


def with_moe(preset: str, **overrides) -> ModelConfig:
    """A preset with some of its MoE sub-config replaced."""
    config = get_preset(preset)
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **overrides))


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_matches_numpy(normalize):
    """Top k of the softmax over all experts (Qwen3-MoE), renormalized over the k when asked (gpt-oss)."""
    logits = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    weights, ids = softmax_topk(jnp.asarray(logits), 3, normalize)
    want_ids = np.argsort(-logits, axis=1)[:, :3]
    probs = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(1, keepdims=True)
    top = np.take_along_axis(probs, want_ids, 1)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    want = top / top.sum(1, keepdims=True) if normalize else top
    np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_grouped_topk_matches_numpy(normalize):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 16)).astype(np.float32)
    bias = rng.normal(scale=0.5, size=16).astype(np.float32)
    args = dict(k=3, n_group=4, topk_group=2, normalize=normalize, scale=2.5)
    weights, ids = sigmoid_grouped_topk(jnp.asarray(logits), jnp.asarray(bias), **args)
    want_w, want_ids = sigmoid_grouped_np(logits, bias, **args)
    order = np.argsort(np.asarray(ids), axis=1)  # compare as sets: top_k order may differ on ties
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order, 1), np.sort(want_ids, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, 1),
                               np.take_along_axis(want_w, np.argsort(want_ids, 1), 1), rtol=1e-5)


def test_sigmoid_grouped_never_picks_outside_the_chosen_groups():
    """A dominant expert in a weak group loses to the group-limited choice."""
    logits = jnp.asarray([[9.0, -9, -9, -9, 1, 1, 2, 2]])  # groups of 2: {0,1} scores 9-9, {6,7} wins
    _, ids = sigmoid_grouped_topk(logits, jnp.zeros(8), k=2, n_group=4, topk_group=1, normalize=True, scale=1.0)
    assert sorted(np.asarray(ids)[0].tolist()) == [6, 7]


MOE_CASES = [("tiny-gpt-oss", 1, 7), ("tiny-gpt-oss", 3, 16), ("tiny-deepseek-v3", 2, 9), ("tiny-deepseek-v3", 1, 1),
             ("tiny-qwen3-moe", 2, 9)]


@pytest.mark.parametrize("preset,batch,seq", MOE_CASES)
def test_grouped_path_matches_dense_backend(preset, batch, seq):
    config = get_preset(preset)
    moe = MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomize(moe, seed=batch * 100 + seq)
    x = jax.random.normal(jax.random.key(seq), (batch, seq, config.hidden_size))
    dense = apply(moe, x, "dense")
    grouped = apply(moe, x, "xla")
    assert np.abs(dense).max() > 0.1  # a real signal, not all-zero experts
    np.testing.assert_allclose(grouped, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-gpt-oss"])
@pytest.mark.parametrize("impl", ["dense", "xla"])
def test_padding_tokens_route_to_no_expert(preset, impl):
    """A step's padding (real=False) gets no routed expert: the real tokens' outputs equal a batch
    of them alone, and a padding row holds only the shared experts' output (zero without)."""
    config = get_preset(preset)
    moe = MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomize(moe, seed=3)
    x = jax.random.normal(jax.random.key(4), (1, 12, config.hidden_size))
    real = jnp.arange(12)[None] % 3 != 2
    got = np.asarray(jax.jit(lambda x, r: moe(x, impl, r))(x, real))
    keep = np.asarray(real[0])
    np.testing.assert_allclose(got[:, keep], apply(moe, x[:, keep], impl), atol=1e-5)
    shared = np.zeros_like(got) if moe.shared_experts is None else np.asarray(moe.shared_experts(x, "xla"))
    np.testing.assert_allclose(got[:, ~keep], shared[:, ~keep], atol=1e-6)
    assert np.abs(got).max() > 0.1


def test_grouped_path_uses_every_selected_expert_once():
    """With 8 experts of which 8 are chosen, every expert contributes: the result is the dense sum."""
    config = with_moe("tiny-gpt-oss", num_experts=8, num_experts_per_tok=8)
    moe = MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(1))
    randomize(moe, seed=3)
    x = jax.random.normal(jax.random.key(2), (2, 5, config.hidden_size))
    np.testing.assert_allclose(apply(moe, x, "xla"), apply(moe, x, "dense"), atol=1e-5)


def test_grouped_path_in_bfloat16_close_to_dense():
    config = get_preset("tiny-deepseek-v3")
    moe = MoE(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    randomize(moe, seed=5)
    x = jax.random.normal(jax.random.key(5), (2, 8, config.hidden_size), jnp.bfloat16)
    dense = apply(moe, x, "dense")
    grouped = apply(moe, x, "xla")
    assert np.abs(grouped - dense).max() <= 0.02 * np.abs(dense).max()


@pytest.mark.parametrize("overrides,match", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 must be in 1..num_experts=4"),
    (dict(router="hash"), "unknown router 'hash'"),
    (dict(n_group=3), "n_group | num_experts"),
    (dict(activation="gelu"), "unknown expert activation"),
    (dict(dense_layers=(5,)), r"moe.dense_layers \(5,\) name layers outside 0..1"),
])
def test_bad_moe_config_is_a_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        with_moe("tiny-gpt-oss", **overrides)


def test_grouped_path_through_the_pallas_kernel_in_interpret_mode():
    """The same MoE through the Mosaic GPU grouped-GEMM kernel (interpret mode on CPU)."""
    config = get_preset("tiny-gpt-oss")
    moe = MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomize(moe, seed=1)
    x = jax.random.normal(jax.random.key(0), (2, 9, config.hidden_size))
    np.testing.assert_allclose(apply(moe, x, "interpret"), apply(moe, x, "dense"), atol=1e-4)
