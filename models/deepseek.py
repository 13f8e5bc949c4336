"""DeepSeek-V3: multi-head latent attention (MLA) and sigmoid group-routed MoE with a shared expert.

MLA compresses each token's keys and values into a latent c (kv_lora_rank values, RMS-normed)
plus one shared rotary key k_rope (qk_rope_head_dim values). Per head h:
  k_h = [c W_uk_h, k_rope],  v_h = c W_uv_h  (W_uk, W_uv: the two halves of kv_b_proj)
The no-cache forward expands k and v this way. The paged cache holds only [c, k_rope] (one "kv
head" of kv_lora_rank + qk_rope_head_dim values) and attends with absorbed projections:
  q_h . k_h = (q_nope_h W_uk_h^T) . c + q_rope_h . k_rope,   out_h = (sum_s p_s c_s) W_uv_h
so the latent serves as both key and value of a single-head paged attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from models.architecture import Architecture, CacheLayout
from models.attention import AttentionMetadata, write_pages
from models.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeScaling
from models.decoder import Decoder, DecoderBlock, feed_forward
from models.layers import Linear, RMSNorm, RotaryEmbedding
from models.loading.hf_config import HFConfig
from models.loading.weights import TensorGetter, default_param
from models.moe import load_per_expert_param
from pallas_kernels import ops

LatentCache = tuple[jax.Array]  # ([1, num_pages, page_size, kv_lora_rank + qk_rope_head_dim],)
LORA_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with their default eps


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 when that is set."""
    scale = config.head_dim ** -0.5
    s = config.rope_scaling
    if s is not None and s.kind == "yarn" and s.mscale_all_dim and s.factor > 1:
        scale *= (0.1 * s.mscale_all_dim * math.log(s.factor) + 1.0) ** 2
    return scale


class MLAttention(nnx.Module):
    """Multi-head latent attention; `__call__` picks the expanded (no cache) or the absorbed path."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        c = config.mla
        d, h, bias, head_dim = config.hidden_size, config.num_heads, config.attention_bias, config.head_dim
        kw = dict(dtype=dtype, rngs=rngs, fmt=config.packed_format("linear"))
        if c.q_lora_rank:
            self.q_a_proj = Linear((d,), (c.q_lora_rank,), ("embed", "q_lora"), bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LORA_NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear((c.q_lora_rank,), (h, head_dim), ("q_lora", "q_heads", "head_dim"), **kw)
        else:
            self.q_proj = Linear((d,), (h, head_dim), ("embed", "q_heads", "head_dim"), **kw)
        self.kv_a_proj_with_mqa = Linear((d,), (c.kv_lora_rank + c.qk_rope_head_dim,), ("embed", "kv_lora"),
                                         bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LORA_NORM_EPS, dtype=dtype)
        # Dense even from an FP8 checkpoint (dequantized at load): the absorbed path multiplies its
        # halves into the queries and the attention output (as vLLM and DeepSeek's reference do).
        self.kv_b_proj = Linear((c.kv_lora_rank,), (h, c.qk_nope_head_dim + c.v_head_dim),
                                ("kv_lora", "q_heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.o_proj = Linear((h, c.v_head_dim), (d,), ("q_heads", "head_dim", "embed"), bias=bias, **kw)
        # The rotary embedding sees only the rope dims (a plain, non-MLA config of that head size).
        self.rotary = RotaryEmbedding(dataclasses.replace(config, head_dim=c.qk_rope_head_dim, mla=None))
        self.config = c
        self.scale = softmax_scale(config)

    def _rope(self, x_btnr: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """Rotary on the rope dims; DeepSeek's interleaved pairs (x0, x1), (x2, x3) become halves first."""
        if self.config.rope_interleave:
            x_btnr = jnp.concatenate([x_btnr[..., 0::2], x_btnr[..., 1::2]], axis=-1)
        return self.rotary(x_btnr, positions_bt)

    def _queries(self, x_btd: jax.Array, positions_bt: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
        """q_nope [B, T, H, nope] and rotated q_rope [B, T, H, rope]."""
        if self.config.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_btd, impl)), impl)
        else:
            q = self.q_proj(x_btd, impl)
        q_nope, q_rope = jnp.split(q, [self.config.qk_nope_head_dim], axis=-1)
        return q_nope, self._rope(q_rope, positions_bt)

    def _latent(self, x_btd: jax.Array, positions_bt: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
        """Normed latent c [B, T, L] and rotated shared key k_rope [B, T, 1, rope]."""
        c_kv, k_rope = jnp.split(self.kv_a_proj_with_mqa(x_btd, impl), [self.config.kv_lora_rank], axis=-1)
        return self.kv_a_layernorm(c_kv), self._rope(k_rope[:, :, None, :], positions_bt)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, cache: LatentCache | None,
                 metadata: AttentionMetadata | None, attention_impl: str) -> tuple[jax.Array, LatentCache | None]:
        whole = None if cache is None else metadata.layer_per_shard(self, x_btd, positions_bt, cache, attention_impl)
        if whole is not None:
            return whole
        q_nope, q_rope = self._queries(x_btd, positions_bt, attention_impl)
        c_btl, k_rope = self._latent(x_btd, positions_bt, attention_impl)
        if cache is None:
            out = self._expanded(q_nope, q_rope, c_btl, k_rope, attention_impl)
        else:
            out, cache = self._absorbed(q_nope, q_rope, c_btl, k_rope, cache, metadata, attention_impl)
        return self.o_proj(out.astype(x_btd.dtype), attention_impl), cache

    def _expanded(self, q_nope: jax.Array, q_rope: jax.Array, c_btl: jax.Array, k_rope: jax.Array,
                  impl: str) -> jax.Array:
        """Per-head K [B, T, H, nope + rope] and V from the latent; causal flash attention."""
        c = self.config
        k_nope, v = jnp.split(self.kv_b_proj(c_btl), [c.qk_nope_head_dim], axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], c.qk_rope_head_dim))], axis=-1)
        head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        v_padded = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, head_dim - c.v_head_dim)))  # ops want one D
        out = ops.flash_attention(q, k, v_padded, causal=True, scale=self.scale, impl=impl)
        return out[..., :c.v_head_dim]

    def _absorbed(self, q_nope: jax.Array, q_rope: jax.Array, c_btl: jax.Array, k_rope: jax.Array,
                  cache: LatentCache, metadata: AttentionMetadata, impl: str) -> tuple[jax.Array, LatentCache]:
        """Write [c, k_rope] into the latent pages; single-kv-head paged attention in latent space."""
        nope = self.config.qk_nope_head_dim
        w_kv = self.kv_b_proj.kernel[...]  # [L, H, nope + v]
        w_uk, w_uv = w_kv[..., :nope], w_kv[..., nope:]
        q_latent = jnp.einsum("bthn,lhn->bthl", q_nope, w_uk)
        q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)  # [B, T, H, L + rope]
        latent = jnp.concatenate([c_btl[:, :, None, :], k_rope.astype(c_btl.dtype)], axis=-1)  # [B, T, 1, L + rope]

        def run(tokens, pages, _, metadata):  # per DP attention shard (AttentionMetadata.per_shard)
            q, latent = tokens
            pages = (write_pages(pages[0], latent, metadata.slot_mapping),)
            return metadata.attend_latent(q, pages[0], self.config.kv_lora_rank, impl, self.scale), pages

        out_latent, cache = metadata.per_shard(run, (q, latent), tuple(cache))
        return jnp.einsum("bthl,lhv->bthv", out_latent, w_uv), cache


def deepseek_block(config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> DecoderBlock:
    """MLA + a dense MLP in the first layers, MLA + MoE after."""
    return DecoderBlock(config, MLAttention(config, dtype=dtype, rngs=rngs),
                        feed_forward(config, layer, dtype=dtype, rngs=rngs), dtype=dtype)


class MultiTokenPredictor(nnx.Module):
    """One multi-token-prediction module (DeepSeek-V3 paper, section 2.2): the main model's hidden
    state at t (hnorm) and the embedding of token t+1 (enorm), concatenated and projected
    (eh_proj), go through one more block; shared_head_norm, then the shared LM head, predict token
    t+2. Its weights load now; speculative decoding will run it (embeddings and head are shared)."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(d, eps, dtype=dtype)
        self.hnorm = RMSNorm(d, eps, dtype=dtype)
        self.eh_proj = Linear((2 * d,), (d,), ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.block = deepseek_block(config, layer, dtype=dtype, rngs=rngs)
        self.shared_head_norm = RMSNorm(d, eps, dtype=dtype)


class DeepseekV3(Decoder):
    """The DeepSeek-V3 assembly, plus the MTP modules (engine/speculative/mtp.py drafts with them)."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, lambda layer: deepseek_block(config, layer, dtype=dtype, rngs=rngs),
                         dtype=dtype, rngs=rngs)
        num_mtp = config.mtp.num_layers if config.mtp else 0
        self.mtp = nnx.List([MultiTokenPredictor(config, config.num_layers + i, dtype=dtype, rngs=rngs)
                             for i in range(num_mtp)])


def _mtp_hf_path(config: ModelConfig, path: tuple[str, ...]) -> tuple[str, ...]:
    """mtp.{i}.X -> layers.{num_layers + i}.X, the MTP module's place in the released checkpoints."""
    rest = path[2:]
    if rest[0] == "block":
        rest = rest[1:]
    elif rest[0] == "shared_head_norm":
        rest = ("shared_head", "norm", *rest[1:])
    return ("layers", str(config.num_layers + int(path[1])), *rest)


def load_hf_param(config: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...],
                  get_tensor: TensorGetter) -> np.ndarray | None:
    """Our parameter at `path` from DeepSeek-V3 HF tensors, for the names the Llama mapping lacks:
    the router (HF `mlp.gate`), the per-expert weights and the MTP modules. None: default mapping."""
    if path[0] == "mtp":
        hf_path = _mtp_hf_path(config, path)
        special = load_hf_param(config, hf_path, shape, get_tensor)
        return default_param(hf_path, shape, get_tensor) if special is None else special
    return load_per_expert_param(config, path, shape, get_tensor)


def _hf_fields(hf: HFConfig) -> dict[str, Any]:
    """DeepSeek-V3: MLA sizes (our head_dim is the q/k head, nope + rope), group-limited routing, MTP."""
    hf.require("scoring_func", ("sigmoid",), "sigmoid")
    hf.require("topk_method", ("noaux_tc",), "noaux_tc")
    nope, rope, mtp = hf.int("qk_nope_head_dim"), hf.int("qk_rope_head_dim"), hf.int("num_nextn_predict_layers", 0)
    mla = MLAConfig(kv_lora_rank=hf.int("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                    v_head_dim=hf.int("v_head_dim"), q_lora_rank=hf.int("q_lora_rank", 0),
                    rope_interleave=hf.bool("rope_interleave", True))
    moe = MoEConfig(num_experts=hf.int("n_routed_experts"), num_experts_per_tok=hf.int("num_experts_per_tok"),
                    intermediate_size=hf.int("moe_intermediate_size"),
                    dense_layers=tuple(range(hf.int("first_k_dense_replace", 0))),
                    num_shared_experts=hf.int("n_shared_experts", 0), router="sigmoid_grouped",
                    n_group=hf.int("n_group", 1), topk_group=hf.int("topk_group", 1),
                    norm_topk_prob=hf.bool("norm_topk_prob", True),
                    routed_scaling_factor=hf.float("routed_scaling_factor", 1.0))
    return dict(head_dim=nope + rope, mla=mla, moe=moe, mtp=MTPConfig(mtp) if mtp else None)


def _fit_checkpoint(config: ModelConfig, has_tensor: Callable[[str], bool]) -> ModelConfig:
    """MTP off when the checkpoint lacks its module: transformers neither implements nor saves it,
    so fine-tuned and test checkpoints say num_nextn_predict_layers=1 without the tensors."""
    if config.mtp is None or has_tensor(f"model.layers.{config.num_layers}.eh_proj.weight"):
        return config
    logging.warning("%s: config.json asks for %d MTP module(s) but the checkpoint has no "
                    "model.layers.%d.* tensors (transformers does not save them): MTP off",
                    config.name, config.mtp.num_layers, config.num_layers)
    return dataclasses.replace(config, mtp=None)


def _latent_cache(config: ModelConfig) -> CacheLayout:
    """One latent "head" per layer: the normed latent and the shared rotary key of each token."""
    return CacheLayout(tensors=1, heads=1, head_dim=config.mla.kv_lora_rank + config.mla.qk_rope_head_dim)


def _preset(name: str, *, mla: MLAConfig | None = None, moe: MoEConfig | None = None, **sizes: Any) -> ModelConfig:
    """DeepSeek-V3 at the released sizes unless told otherwise: a 512 + 64 latent, YaRN with mscale,
    256 experts in 8 groups (top 4 groups, top 8 experts), one shared expert, one MTP module, the
    block projections in 128 x 128 block FP8 (as DeepSeek ships V3 and R1)."""
    defaults: dict[str, Any] = dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61, num_heads=128,
        num_kv_heads=128, head_dim=192, max_position_embeddings=163840,
        rope_scaling=RopeScaling(kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                                 mscale=1.0, mscale_all_dim=1.0), quantization="fp8_block")
    mla = mla or MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                           q_lora_rank=1536, rope_interleave=True)
    moe = moe or MoEConfig(num_experts=256, num_experts_per_tok=8, intermediate_size=2048, dense_layers=(0, 1, 2),
                           num_shared_experts=1, router="sigmoid_grouped", n_group=8, topk_group=4,
                           routed_scaling_factor=2.5)
    return ModelConfig(name=name, architecture="deepseek_v3", rms_norm_eps=1e-6, rope_theta=10000.0,
                       mla=mla, moe=moe, mtp=MTPConfig(1), **{**defaults, **sizes})


ARCHITECTURE = Architecture(
    name="deepseek_v3", module=DeepseekV3, hf_architectures=("DeepseekV3ForCausalLM",), hf_fields=_hf_fields,
    load_hf_param=load_hf_param, fit_checkpoint=_fit_checkpoint, cache_layout=_latent_cache,
    presets=(
        _preset("deepseek-v3"),
        _preset("deepseek-r1"),  # V3's architecture and sizes (R1 is a post-trained V3), FP8 blocks, one MTP module
        _preset("tiny-deepseek-v3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=4, head_dim=24, max_position_embeddings=128,
                mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                              q_lora_rank=32, rope_interleave=True),
                moe=MoEConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=32, dense_layers=(0,),
                              num_shared_experts=1, router="sigmoid_grouped", n_group=4, topk_group=2,
                              routed_scaling_factor=2.5),
                rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32,
                                         mscale=1.0, mscale_all_dim=1.0), quantization=None),
    ))
