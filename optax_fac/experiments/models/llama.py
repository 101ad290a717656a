"""LLaMA decoder (RMSNorm, SwiGLU, rotary embeddings, untied LM head), Flax linen.

The architecture and the size table follow GaLore's LLaMA configs
(github.com/jiaweizzhao/GaLore ``configs/llama_*.json``), which the H-Fac,
AdaDiag and Subset-Norm papers reuse (docs/algorithms.md §6):

  =====  ======  =====  ======  =====  =====================
  name   d       ffn    layers  heads  params (vocab 32000)
  =====  ======  =====  ======  =====  =====================
  60m    512     1376   8       8      58.1 M
  130m   768     2048   12      12     134.1 M
  350m   1024    2736   24      16     367.8 M
  1b     2048    5461   24      32     1339.1 M
  3b     2560    6848   32      32     2685.8 M
  7b     4096    11008  32      32     6738.4 M
  =====  ======  =====  ======  =====  =====================

Parameter names (used by the configs' ``method_exclude`` patterns):
``embed/embedding`` (vocab, d), ``layers_i/attn/{q,k,v,o}/kernel``,
``layers_i/mlp/{gate,up,down}/kernel``, ``layers_i/{attn_norm,mlp_norm}/scale``,
``final_norm/scale``, ``lm_head/kernel`` (d, vocab). No biases. Every weight
is initialised N(0, 0.02²) as in HF ``LlamaForCausalLM``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_fac.experiments.models import common

SIZE_FIELDS = ('d_model', 'ffn_dim', 'num_layers', 'num_heads')
SIZES = {
    # name: SIZE_FIELDS
    '60m': (512, 1376, 8, 8),
    '130m': (768, 2048, 12, 12),
    '350m': (1024, 2736, 24, 16),
    '1b': (2048, 5461, 24, 32),
    '3b': (2560, 6848, 32, 32),
    '7b': (4096, 11008, 32, 32),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  d_model: int = 512
  ffn_dim: int = 1376
  num_layers: int = 8
  num_heads: int = 8
  max_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @classmethod
  def from_size(cls, size: str, **overrides) -> 'LlamaConfig':
    return common.config_from_size(cls, 'LLaMA', SIZES, SIZE_FIELDS, size,
                                   overrides)

  def num_params(self) -> int:
    """The parameter count this config implies (checked against the model)."""
    d, f = self.d_model, self.ffn_dim
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + self.num_layers * per_layer + d


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF "rotate half" layout; x is (batch, seq, heads, dim)."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions[:, None].astype(jnp.float32) * inv_freq[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)  # (seq, dim)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def dense(cfg: LlamaConfig, features: int, name: str) -> nn.Dense:
  """A LLaMA projection: no bias, kernel N(0, init_std²)."""
  return nn.Dense(features, use_bias=False, dtype=cfg.dtype,
                  kernel_init=nn.initializers.normal(cfg.init_std), name=name)


def rms_norm(cfg: LlamaConfig, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, name=name)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    head_dim = cfg.d_model // cfg.num_heads
    b, s, _ = x.shape
    q, k, v = (dense(cfg, cfg.d_model, name)(x).reshape(
        b, s, cfg.num_heads, head_dim) for name in ('q', 'k', 'v'))
    positions = jnp.arange(s)
    q = rotary(q, positions, cfg.rope_theta)
    k = rotary(k, positions, cfg.rope_theta)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return dense(cfg, cfg.d_model, 'o')(out.reshape(b, s, cfg.d_model))


class SwiGLU(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = dense(cfg, cfg.ffn_dim, 'gate')(x)
    up = dense(cfg, cfg.ffn_dim, 'up')(x)
    return dense(cfg, cfg.d_model, 'down')(nn.silu(gate) * up)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = x + Attention(cfg, name='attn')(rms_norm(cfg, 'attn_norm')(x))
    return x + SwiGLU(cfg, name='mlp')(rms_norm(cfg, 'mlp_norm')(x))


class Llama(nn.Module):
  """LLaMA language model: tokens (batch, seq) int32 -> logits (batch, seq, vocab)."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train  # no dropout (GaLore recipe)
    cfg = self.cfg
    x = nn.Embed(cfg.vocab_size, cfg.d_model,
                 embedding_init=nn.initializers.normal(cfg.init_std),
                 dtype=cfg.dtype, name='embed')(tokens)
    for i in range(cfg.num_layers):
      x = Block(cfg, name=f'layers_{i}')(x)
    x = rms_norm(cfg, 'final_norm')(x)
    logits = dense(cfg, cfg.vocab_size, 'lm_head')(x)
    return logits.astype(jnp.float32)
