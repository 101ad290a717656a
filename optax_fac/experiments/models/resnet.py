"""ResNet v1.5 (Flax linen), as in the flax ImageNet example and torchvision.

``resnet50`` has 25,557,032 parameters with 1000 classes (torchvision's
count). ``small`` is a CIFAR-style ResNet (3x3 stem, no max-pool, basic
blocks) for the MNIST / digits demos. BatchNorm statistics live in the
``batch_stats`` collection (the train loop carries them as ``model_state``).
Conv kernels are (kh, kw, cin, cout): the library views them as
(kh·kw·cin, cout) matrices (docs/algorithms.md §0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from optax_fac.experiments.models import common

SIZE_FIELDS = ('stage_sizes', 'block', 'width', 'stem')
SIZES = {
    # name: SIZE_FIELDS
    '18': ((2, 2, 2, 2), 'basic', 64, 'imagenet'),
    '34': ((3, 4, 6, 3), 'basic', 64, 'imagenet'),
    '50': ((3, 4, 6, 3), 'bottleneck', 64, 'imagenet'),
    '101': ((3, 4, 23, 3), 'bottleneck', 64, 'imagenet'),
    'small': ((1, 1, 1), 'basic', 16, 'cifar'),
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = 'bottleneck'  # 'basic' | 'bottleneck'
  width: int = 64
  stem: str = 'imagenet'  # 'imagenet' (7x7/2 + max-pool) | 'cifar' (3x3/1)
  num_classes: int = 1000
  in_channels: int = 3
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @classmethod
  def from_size(cls, size: str, **overrides) -> 'ResNetConfig':
    return common.config_from_size(cls, 'ResNet', SIZES, SIZE_FIELDS, size,
                                   overrides)

  def num_params(self) -> int:
    """Trainable parameters this config implies (BN scale+bias counted)."""
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    k0 = 7 if self.stem == 'imagenet' else 3
    total = conv(k0, self.in_channels, self.width) + bn(self.width)
    expansion = 4 if self.block == 'bottleneck' else 1
    cin = self.width
    for i, n in enumerate(self.stage_sizes):
      f = self.width * 2 ** i
      for j in range(n):
        strides = 2 if (i > 0 and j == 0) else 1
        if self.block == 'bottleneck':
          total += conv(1, cin, f) + bn(f) + conv(3, f, f) + bn(f)
          total += conv(1, f, 4 * f) + bn(4 * f)
        else:
          total += conv(3, cin, f) + bn(f) + conv(3, f, f) + bn(f)
        if cin != f * expansion or strides != 1:
          total += conv(1, cin, f * expansion) + bn(f * expansion)
        cin = f * expansion
    return total + cin * self.num_classes + self.num_classes


class _ResidualBlock(nn.Module):
  """Fields and shortcut of the basic and bottleneck blocks."""

  filters: int
  conv: Any
  norm: Any
  strides: int = 1

  def add_shortcut(self, x, y):
    """relu(x + y), x projected where the block changed its shape.

    The projection is a strided 1x1 conv + BN (``proj_conv`` / ``proj_bn``).
    """
    if x.shape != y.shape:
      x = self.conv(y.shape[-1], (1, 1), (self.strides, self.strides),
                    name='proj_conv')(x)
      x = self.norm(name='proj_bn')(x)
    return nn.relu(x + y)


class BasicBlock(_ResidualBlock):

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return self.add_shortcut(x, y)


class BottleneckBlock(_ResidualBlock):

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return self.add_shortcut(x, y)


class ResNet(nn.Module):
  """images (batch, h, w, c) float -> logits (batch, num_classes)."""

  cfg: ResNetConfig

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.cfg
    conv = functools.partial(nn.Conv, use_bias=False, dtype=cfg.dtype,
                             kernel_init=nn.initializers.variance_scaling(
                                 2.0, 'fan_out', 'normal'))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=cfg.bn_momentum, epsilon=1e-5,
                             dtype=cfg.dtype)
    x = x.astype(cfg.dtype)
    if cfg.stem == 'imagenet':
      x = conv(cfg.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      x = conv(cfg.width, (3, 3), name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
    block = BottleneckBlock if cfg.block == 'bottleneck' else BasicBlock
    for i, n in enumerate(cfg.stage_sizes):
      for j in range(n):
        strides = 2 if (i > 0 and j == 0) else 1
        x = block(cfg.width * 2 ** i, conv=conv, norm=norm, strides=strides,
                  name=f'stage{i + 1}_block{j + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(cfg.num_classes, dtype=cfg.dtype, name='head')(x)
    return x.astype(jnp.float32)
