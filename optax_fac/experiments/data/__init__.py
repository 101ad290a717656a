"""Offline data readers for the experiments (docs/data.md).

:func:`make_data` turns a config's ``data`` section into a :class:`Data`:
a resumable training iterator (``get_state`` / ``set_state``, stored in
checkpoints), a fixed list of evaluation batches and a description of the
task. Text: ``shakespeare``, ``stdlib`` (shipped, tokenized in memory) and
``c4`` (json.gz shards). Images: ``imagenet`` (folder of JPEGs or TFDS),
``mnist5k`` and ``digits`` (shipped).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

from optax_fac.experiments.data import c4
from optax_fac.experiments.data import prefetch
from optax_fac.experiments.data import text

# Image readers need PIL; imported on first use so text-only runs (e.g. on a
# machine with only jax, flax, optax) do not need it.

TEXT = ('shakespeare', 'stdlib', 'c4')
IMAGES = ('imagenet', 'mnist5k', 'digits')


@dataclasses.dataclass
class Data:
  train: Any                      # iterator with get_state() / set_state()
  eval_batches: Callable[[], list]  # the fixed validation batches
  task: str                       # 'lm' | 'classification'
  vocab_size: int = 0             # lm
  num_classes: int = 0            # classification
  example_shape: tuple = ()       # one input example's shape
  units_per_example: int = 1      # tokens (lm) or 1 (images), for throughput
  num_train_examples: int = 0     # classification: epoch length


def _required(cfg: Mapping[str, Any], key: str, what: str):
  """``cfg[key]``; raises 'data.<key> must name <what>' where it is unset."""
  value = cfg.get(key)
  if not value:
    raise ValueError(f'data.{key} must name {what}')
  return value


def make_data(cfg: Mapping[str, Any], batch_size: int, eval_batch_size: int,
              seed: int) -> Data:
  """Builds the data of a config's ``data`` section (see module docstring)."""
  name = cfg['name']
  get = lambda k, d=None: cfg.get(k, d)  # noqa: E731
  if name in TEXT:
    tok = text.make_tokenizer(get('tokenizer', 'bytes'))
    seq_len = int(get('seq_len', 256))
    n_eval = get('eval_batches', 8)
    if name == 'c4':
      data_dir = _required(cfg, 'data_dir', 'the folder of c4-*.json.gz '
                           'shards for data.name="c4".')
      train_files = c4.shard_files(data_dir, get('train_pattern',
                                                 'c4-train.*.json.gz'))
      valid_files = c4.shard_files(data_dir, get('validation_pattern',
                                                 'c4-validation.*.json.gz'))
      train = c4.PackedC4(train_files, tok, seq_len, batch_size, seed=seed)
      if get('prefetch', 2):
        train = prefetch.Prefetch(train, get('prefetch', 2))
      eval_batches = functools.cache(lambda: c4.eval_batches(  # read once
          valid_files, tok, seq_len, eval_batch_size, n_eval))
    else:
      if name == 'shakespeare':
        tr, va = text.shakespeare_split(get('validation_play', 'hamlet'),
                                        get('text_dir') or None)
      else:
        tr, va = text.stdlib_split(int(get('max_bytes', 8_000_000)))
      train_tokens = text.encode_documents(tok, tr)
      valid_tokens = text.encode_documents(tok, va)
      train = text.WindowIterator(train_tokens, seq_len, batch_size, seed)
      batches = text.eval_windows(valid_tokens, seq_len, eval_batch_size,
                                  n_eval)
      eval_batches = lambda: batches  # noqa: E731
    return Data(train=train, eval_batches=eval_batches, task='lm',
                vocab_size=tok.vocab_size, example_shape=(seq_len,),
                units_per_example=seq_len)

  if name in IMAGES:
    from optax_fac.experiments.data import images  # pylint: disable=g-import-not-at-top
    if name == 'imagenet':
      if get('source', 'folder') == 'folder':
        root = _required(cfg, 'data_dir', 'the ImageNet folder '
                         '(<dir>/<split>/<class>/*.JPEG).')
        train_src = images.FolderSource(os.path.join(root, get('train_split',
                                                               'train')))
        eval_src = images.FolderSource(os.path.join(root, get('eval_split',
                                                              'validation')))
      elif get('source') == 'tfds':
        train_src = images.TfdsSource(get('tfds_name', 'imagenet2012'),
                                      get('train_split', 'train'),
                                      get('data_dir') or None)
        eval_src = images.TfdsSource(get('tfds_name', 'imagenet2012'),
                                     get('eval_split', 'validation'),
                                     get('data_dir') or None)
      else:
        raise ValueError(f"data.source={get('source')!r}: use 'folder' or "
                         "'tfds'.")
    else:
      loader = images.mnist5k if name == 'mnist5k' else images.digits
      train_src, eval_src = loader(get('test_fraction', 0.2), seed=0)
    size = get('image_size')
    common = dict(image_size=size, crop=get('crop', 'inception'),
                  normalize=get('normalize', 'imagenet'),
                  num_workers=get('num_workers', 8), seed=seed)
    train = images.ImageIterator(
        train_src, batch_size, train=True, flip=get('flip', True),
        randaugment=get('randaugment'), mixup_alpha=get('mixup_alpha', 0.0),
        **common)
    if get('prefetch', 0):
      train = prefetch.Prefetch(train, get('prefetch'))
    evaluator = images.ImageIterator(eval_src, eval_batch_size, train=False,
                                     **common)
    eval_batches = functools.cache(  # decoded once
        lambda: evaluator.eval_batches(get('eval_batches')))
    first, _ = train_src[0]
    if size is None:
      size = (first.size[0] if hasattr(first, 'size') and
              not hasattr(first, 'shape') else first.shape[0])
    channels = (len(first.getbands()) if hasattr(first, 'getbands')
                else first.shape[-1])
    return Data(train=train, eval_batches=eval_batches,
                task='classification', num_classes=train_src.num_classes,
                example_shape=(size, size, channels), units_per_example=1,
                num_train_examples=len(train_src))

  raise ValueError(f'Unknown data.name {name!r}; known: {TEXT + IMAGES}.')


__all__ = ['Data', 'make_data', 'c4', 'text']
