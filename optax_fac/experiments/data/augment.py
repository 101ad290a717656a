"""Image augmentation in numpy/PIL: Inception crop, flip, RandAugment, mixup.

Every random choice comes from a ``numpy.random.Generator`` the caller seeds
from ``(seed, step, example)``, so a batch is a pure function of its step and
training resumes exactly.

* Inception-style crop (Szegedy et al. 2015; as ``tf.image.
  sample_distorted_bounding_box`` in the flax/big_vision ImageNet input
  pipelines): area in [0.08, 1], aspect ratio in [3/4, 4/3], 10 attempts,
  then a center crop; resized to the output size (bilinear).
* Evaluation: resize the shorter side to ``size / 0.875`` and center crop.
* RandAugment(N, M) (Cubuk et al. 2020, arXiv 1909.13719), the op list and
  magnitude ranges of the TF/big_vision ``autoaugment.py`` implementation
  (the AugReg ViT recipe uses N = 2, M = 15) [decided: Cutout omitted;
  Solarize gets stronger with M, as in timm].
* Mixup (Zhang et al. 2018) on a batch: λ ~ Beta(α, α), the batch mixed with
  its reverse (as big_vision ``utils.mixup``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MEAN_RGB = np.asarray([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.asarray([0.229, 0.224, 0.225], np.float32) * 255


def inception_crop(img: Image.Image, size: int, rng: np.random.Generator,
                   area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  w, h = img.size
  for _ in range(10):
    target = rng.uniform(*area) * w * h
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x = int(rng.integers(0, w - cw + 1))
      y = int(rng.integers(0, h - ch + 1))
      return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
  return center_crop(img, size, crop_fraction=1.0)


def center_crop(img: Image.Image, size: int,
                crop_fraction: float = 0.875) -> Image.Image:
  w, h = img.size
  short = min(w, h)
  scale = size / crop_fraction / short
  nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
  img = img.resize((nw, nh), Image.BILINEAR)
  x, y = (nw - size) // 2, (nh - size) // 2
  return img.crop((x, y, x + size, y + size))


# -- RandAugment ---------------------------------------------------------------

_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _signed(v, rng):
  return -v if rng.random() < 0.5 else v


def _affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.NEAREST,
                       fillcolor=_FILL[:len(img.getbands())] if
                       len(img.getbands()) > 1 else 128)


def _op(name, img, m, rng):
  level = m / _MAX_LEVEL
  if name == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if name == 'Equalize':
    return ImageOps.equalize(img)
  if name == 'Invert':
    return ImageOps.invert(img)
  if name == 'Rotate':
    return img.rotate(_signed(level * 30.0, rng), resample=Image.NEAREST,
                      fillcolor=_FILL if img.mode == 'RGB' else 128)
  if name == 'Posterize':
    return ImageOps.posterize(img, min(8, max(1, int(level * 4))))
  if name == 'Solarize':
    return ImageOps.solarize(img, 256 - int(level * 256))
  if name == 'SolarizeAdd':
    arr = np.asarray(img).astype(np.int32)
    added = np.clip(arr + int(level * 110), 0, 255)
    return Image.fromarray(np.where(arr < 128, added, arr).astype(np.uint8))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    factor = level * 1.8 + 0.1  # TF autoaugment's enhance_level_to_arg
    return getattr(ImageEnhance, name)(img).enhance(factor)
  if name == 'ShearX':
    return _affine(img, (1, _signed(level * 0.3, rng), 0, 0, 1, 0))
  if name == 'ShearY':
    return _affine(img, (1, 0, 0, _signed(level * 0.3, rng), 1, 0))
  if name == 'TranslateX':
    return _affine(img, (1, 0, _signed(level * 100 / 224 * img.size[0], rng),
                         0, 1, 0))
  if name == 'TranslateY':
    return _affine(img, (1, 0, 0, 0, 1,
                         _signed(level * 100 / 224 * img.size[1], rng)))
  raise ValueError(name)


RANDAUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
                   'Solarize', 'SolarizeAdd', 'Color', 'Contrast',
                   'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
                   'TranslateY')


def randaugment(img: Image.Image, num_layers: int, magnitude: float,
                rng: np.random.Generator) -> Image.Image:
  """Applies ``num_layers`` random ops, each with probability 0.5 [TF impl].

  ``magnitude`` is on the TF scale (max level 10; the AugReg recipe's 15
  goes beyond it, as in TF, which does not clip).
  """
  for _ in range(num_layers):
    name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
    if rng.random() < 0.5:
      img = _op(name, img, magnitude, rng)
  return img


def mixup(images: np.ndarray, labels: np.ndarray, alpha: float,
          rng: np.random.Generator):
  """Mixes a batch with its reverse: λ x + (1 − λ) x[::-1], λ ~ Beta(α, α)."""
  lam = float(rng.beta(alpha, alpha))
  images = lam * images + (1 - lam) * images[::-1]
  labels = lam * labels + (1 - lam) * labels[::-1]
  return images.astype(np.float32), labels.astype(np.float32)
