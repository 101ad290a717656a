"""C4 from local ``c4-*.json.gz`` shards (allenai/c4 layout), packed.

Layout: ``DIR/c4-train.00000-of-01024.json.gz`` ..., ``DIR/c4-validation.
00000-of-00008.json.gz`` ...; one JSON object per line with a ``"text"``
field (``timestamp``/``url`` ignored). Read with stdlib gzip + json, no
network. Documents are tokenized, each followed by EOS, concatenated, and cut
into windows of ``seq_len + 1`` tokens at a stride of ``seq_len`` (inputs =
window[:-1], targets = window[1:]): packed sequences, no padding.

Order [decided]: shards in a seeded permutation per epoch, documents in file
order (GaLore streams C4 through a shuffle buffer; a permutation of shards
keeps the stream resumable exactly). The iterator's state — epoch, shard,
line, and the leftover tokens of the current document — is a small JSON
object stored in every checkpoint; restoring it skips lines without
tokenizing them.

Single process: with several hosts, give each its own shard subset.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator, Optional

import numpy as np

from optax_fac.experiments.data.prefetch import Prefetch  # noqa: F401  (re-export)


def shard_files(data_dir: str, pattern: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(data_dir, pattern)))
  if not files:
    raise FileNotFoundError(
        f'No C4 shards matching {pattern!r} in {data_dir!r} (expected the '
        'allenai/c4 layout, e.g. c4-train.00000-of-01024.json.gz).')
  return files


class PackedC4:
  """A resumable stream of packed token windows from C4 json.gz shards.

  Args:
    files: shard paths.
    tokenizer: an object with ``encode`` (and optionally ``encode_batch``)
      and ``eos_id``.
    seq_len: tokens per training sequence (the window has ``seq_len + 1``).
    batch_size: sequences per batch.
    seed: shard-order seed; ``shuffle=False`` keeps the sorted order.
    repeat: start a new epoch after the last shard (False: stop).
    docs_per_chunk: documents tokenized together (``encode_batch``).
  """

  def __init__(self, files, tokenizer, seq_len: int, batch_size: int,
               seed: int = 0, shuffle: bool = True, repeat: bool = True,
               docs_per_chunk: int = 64):
    self.files = list(files)
    self.tokenizer = tokenizer
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.repeat = repeat
    self.docs_per_chunk = docs_per_chunk
    self._state = {'epoch': 0, 'shard': 0, 'line': 0, 'buffer': []}
    self._gen = None

  # -- state ---------------------------------------------------------------

  def get_state(self) -> dict:
    """State after the last batch returned (JSON-serialisable)."""
    return json.loads(json.dumps(self._state))

  def set_state(self, state: dict) -> None:
    self._state = {'epoch': int(state['epoch']), 'shard': int(state['shard']),
                   'line': int(state['line']),
                   'buffer': [int(t) for t in state['buffer']]}
    self._gen = None

  # -- reading -------------------------------------------------------------

  def _order(self, epoch: int) -> list[str]:
    if not self.shuffle:
      return self.files
    perm = np.random.default_rng([self.seed, epoch]).permutation(
        len(self.files))
    return [self.files[i] for i in perm]

  def _encode(self, texts):
    tok = self.tokenizer
    if hasattr(tok, 'encode_batch'):
      return tok.encode_batch(texts)
    return [tok.encode(t) for t in texts]

  def _windows(self) -> Iterator[tuple[np.ndarray, dict]]:
    """Yields (window, state after this window)."""
    st = dict(self._state)
    buf = np.asarray(st['buffer'], np.int32)
    eos = np.asarray([self.tokenizer.eos_id], np.int32)
    n = self.seq_len
    epoch, shard, line = st['epoch'], st['shard'], st['line']
    while True:
      order = self._order(epoch)
      while shard < len(order):
        with gzip.open(order[shard], 'rt', encoding='utf-8') as f:
          for _ in range(line):
            next(f)
          done = False
          while not done:
            texts = []
            for raw in f:
              texts.append(json.loads(raw)['text'])
              if len(texts) == self.docs_per_chunk:
                break
            else:
              done = True
            for ids in self._encode(texts):
              line += 1
              buf = np.concatenate([buf, ids, eos])
              while len(buf) >= n + 1:
                window, buf = buf[:n + 1], buf[n:]
                # ``line`` = the next document not yet in ``buf``: the rest
                # of this chunk is read again on resume.
                yield window, {'epoch': epoch, 'shard': shard,
                               'line': line, 'buffer': buf.tolist()}
        shard, line = shard + 1, 0
      if not self.repeat:
        return
      epoch, shard = epoch + 1, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._gen is None:
      self._gen = self._windows()
    windows = []
    state = None
    for _ in range(self.batch_size):
      try:
        w, state = next(self._gen)
      except StopIteration:
        raise StopIteration from None
      windows.append(w)
    self._state = state
    batch = np.stack(windows)
    return {'inputs': batch[:, :-1], 'targets': batch[:, 1:]}


def eval_batches(files, tokenizer, seq_len: int, batch_size: int,
                 num_batches: Optional[int]) -> list[dict]:
  """The first ``num_batches`` packed batches of the validation shards."""
  stream = PackedC4(files, tokenizer, seq_len, batch_size, shuffle=False,
                    repeat=False)
  out = []
  for batch in stream:
    out.append(batch)
    if num_batches and len(out) >= num_batches:
      break
  if not out:
    raise ValueError('The C4 validation shards hold less than one batch.')
  return out
