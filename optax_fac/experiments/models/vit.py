"""Vision Transformer (Flax linen), timm / AugReg layout.

Class token, learned position embedding, pre-norm blocks with a fused ``qkv``
(d, 3d) projection as in timm's ``VisionTransformer`` (the PyTorch codebases
the papers train with), GELU MLP, final LayerNorm, linear head (zero init, as
big_vision). Counts with 1000 classes at 224²: ViT-S/16 22,050,664,
ViT-B/32 88,224,232 (timm's numbers). ``tiny`` is for the MNIST demo.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_fac.experiments.models import common

SIZE_FIELDS = ('patch', 'width', 'depth', 'heads', 'mlp_dim')
SIZES = {
    # name: SIZE_FIELDS
    'ti16': (16, 192, 12, 3, 768),
    's16': (16, 384, 12, 6, 1536),
    'b16': (16, 768, 12, 12, 3072),
    'b32': (32, 768, 12, 12, 3072),
    'tiny': (4, 64, 4, 4, 128),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  patch: int = 16
  width: int = 384
  depth: int = 12
  heads: int = 6
  mlp_dim: int = 1536
  image_size: int = 224
  in_channels: int = 3
  num_classes: int = 1000
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @classmethod
  def from_size(cls, size: str, **overrides) -> 'ViTConfig':
    return common.config_from_size(cls, 'ViT', SIZES, SIZE_FIELDS, size,
                                   overrides)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch) ** 2

  def num_params(self) -> int:
    d, m = self.width, self.mlp_dim
    total = self.patch ** 2 * self.in_channels * d + d        # patch embedding
    total += d + (self.num_patches + 1) * d                   # cls + posemb
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    total += self.depth * block + 2 * d                       # blocks + norm
    return total + d * self.num_classes + self.num_classes    # head


class Block(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.cfg
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=cfg.dtype, kernel_init=nn.initializers.truncated_normal(0.02),
        name=name)
    b, s, d = x.shape
    hd = d // cfg.heads
    y = nn.LayerNorm(epsilon=1e-6, dtype=cfg.dtype, name='norm1')(x)
    qkv = dense(3 * d, 'qkv')(y).reshape(b, s, 3, cfg.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, s, d)
    y = dense(d, 'proj')(y)
    y = nn.Dropout(cfg.dropout, deterministic=not train)(y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=cfg.dtype, name='norm2')(x)
    y = nn.gelu(dense(cfg.mlp_dim, 'fc1')(y), approximate=False)
    y = nn.Dropout(cfg.dropout, deterministic=not train)(y)
    y = dense(d, 'fc2')(y)
    y = nn.Dropout(cfg.dropout, deterministic=not train)(y)
    return x + y


class ViT(nn.Module):
  """images (batch, h, w, c) float -> logits (batch, num_classes)."""

  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.cfg
    x = nn.Conv(cfg.width, (cfg.patch, cfg.patch), strides=(cfg.patch,) * 2,
                padding='VALID', dtype=cfg.dtype, name='patch_embed')(
                    x.astype(cfg.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embed', nn.initializers.truncated_normal(0.02),
                     (1, h * w + 1, d))
    x = x + pos.astype(x.dtype)
    for i in range(cfg.depth):
      x = Block(cfg, name=f'blocks_{i}')(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=cfg.dtype, name='norm')(x)
    x = nn.Dense(cfg.num_classes, dtype=cfg.dtype,
                 kernel_init=nn.initializers.zeros, name='head')(x[:, 0])
    return x.astype(jnp.float32)
