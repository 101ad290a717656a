"""The convergence benchmark behind ``scripts/compare.py``.

One LLaMA, one token stream, many optimizers, each at several peak learning
rates; the best rate of each optimizer is chosen by its final validation
loss, and every run is compared with adamw's best:

* **Data.** The ``.py`` files of the running Python's standard library and
  installed packages (real source text that ships with every installation:
  docs/data.md; :func:`~optax_fac.experiments.data.text.python_source_split`),
  in sorted order, exact copies skipped, every ``data.every``-th file held
  out for validation, tokenized once with the
  32000-piece SentencePiece model (``data.tokenizer``) and cached as
  ``tokens.npz``; :func:`load_corpus` also reads a carried ``tokens.npz``
  (``data.tokens_file``) so that another machine trains on the same tokens.
  Training windows of ``seq_len + 1`` tokens come in one seeded permutation
  (:class:`~optax_fac.experiments.data.text.WindowIterator`): the batch of
  step s is the same for every run. Validation: the first
  ``data.eval_batches`` batches of consecutive held-out windows.
* **Schedule.** Linear warmup (``schedule.warmup_fraction`` of the steps)
  from 0, cosine to ``schedule.final_fraction`` of the peak; gradients
  clipped to global norm ``grad_clip``; weight decay ``weight_decay``.
* **Recipes.** optax_fac optimizers leave ``method_exclude`` (embedding, LM
  head) to their Adam fallback, as the papers' LLaMA recipes do; optax's
  ``adamw`` and ``adafactor`` treat every leaf alike; ``contrib.muon`` runs
  Muon on the hidden matrices and AdamW on the embedding, head and norms
  (:func:`muon_dimension_numbers`), with ``consistent_rms`` from the config
  so that one peak rate serves both parts.
* **Loop.** ``eval_every_steps`` training steps run as one ``lax.scan``
  inside one jit, then a jitted evaluation; the peak learning rate is an
  argument of that jit, so the rates of a sweep share one compilation.
  ``step_time_s`` is the median time of a scanned chunk (after the first,
  which compiles) divided by its steps: forward, backward and update.

Each run writes ``workdir/runs/<name>__lr<lr>.json`` (config, per-step
training loss, validation loss per evaluation, step time, state bytes);
existing run files are skipped, so an interrupted sweep resumes where it
stopped. :func:`summarize` picks the best rate per optimizer and the steps to
reach adamw's final validation loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_fac import memory
from optax_fac.experiments import models
from optax_fac.experiments import optimizers
from optax_fac.experiments.data import resumable
from optax_fac.experiments.data import text

BASELINE = 'adamw'


# -- Data ------------------------------------------------------------------------


class CorpusMismatch(ValueError):
  """Runs, a tokens file and a config that do not name one corpus."""


def build_corpus(data_cfg: Mapping[str, Any]) -> dict:
  """Tokenizes the stdlib source split: ``{'train', 'valid'}`` int arrays + info.

  Args:
    data_cfg: ``tokenizer`` ('mistral', a SentencePiece path or 'bytes'),
      ``max_bytes`` (characters read, in file order), ``every`` (every
      ``every``-th file is validation), ``site_packages`` (also the
      installed packages' source, after the stdlib's; default True).

  Returns:
    ``{'train': uint16/int32 (n,), 'valid': (m,), 'info': {...}}``; info
    records the Python version, file counts, characters, tokens,
    ``packages`` (``{distribution: version}`` of every installed package
    whose source was read), the tokenizer file's digest and the
    sentencepiece version: what rebuilding the same corpus needs, with the
    same stdlib (whose ``test`` package depends on how Python was
    installed) and nothing else in site-packages before the cut-off.
  """
  tok = text.make_tokenizer(data_cfg['tokenizer'])
  train_texts, valid_texts, copies, paths = text.python_source_split(
      int(data_cfg['max_bytes']), int(data_cfg['every']),
      bool(data_cfg.get('site_packages', True)))
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
  train = text.encode_documents(tok, train_texts).astype(dtype)
  valid = text.encode_documents(tok, valid_texts).astype(dtype)
  info = dict(
      source=(f'Python {platform.python_version()} standard library'
              + (' + site-packages' if data_cfg.get('site_packages', True)
                 else '') + ' (.py files)'),
      duplicate_files_skipped=copies,
      tokenizer=os.path.basename(str(getattr(tok, 'path', 'bytes'))),
      tokenizer_sha256_16=_file_digest(getattr(tok, 'path', None)),
      vocab_size=int(tok.vocab_size),
      train_files=len(train_texts), valid_files=len(valid_texts),
      train_chars=sum(map(len, train_texts)),
      valid_chars=sum(map(len, valid_texts)),
      train_tokens=int(train.size), valid_tokens=int(valid.size),
      max_bytes=int(data_cfg['max_bytes']), every=int(data_cfg['every']),
      python=platform.python_version(),
      packages=text.package_versions(paths),
      site_packages=bool(data_cfg.get('site_packages', True)),
      sentencepiece=(text.installed_version('sentencepiece')
                     if hasattr(tok, 'path') else None))
  return {'train': train, 'valid': valid, 'info': info}


def _file_digest(path: Optional[str]) -> Optional[str]:
  if path is None:
    return None
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _digest(train: np.ndarray, valid: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(train).tobytes())
  h.update(np.ascontiguousarray(valid).tobytes())
  return h.hexdigest()[:16]


def load_corpus(data_cfg: Mapping[str, Any], workdir: str) -> dict:
  """The corpus from ``data.tokens_file`` or ``workdir/tokens.npz`` (built once).

  Raises:
    FileNotFoundError: ``data.tokens_file`` is set and missing.
    ValueError: the file's tokens do not match their digest.
    CorpusMismatch: it was built with other data settings
      (:func:`corpus_config_differences`).
  """
  path = data_cfg.get('tokens_file') or os.path.join(workdir, 'tokens.npz')
  if not os.path.exists(path):
    if data_cfg.get('tokens_file'):
      raise FileNotFoundError(
          f'data.tokens_file={path!r} does not exist (write one with '
          'scripts/compare.py --prepare_only).')
    print(f'Tokenizing {int(data_cfg["max_bytes"]) / 1e6:.0f} M characters '
          f'of Python source into {path} (once) ...', flush=True)
    t0 = time.time()
    corpus = build_corpus(data_cfg)
    corpus['info']['tokenize_s'] = round(time.time() - t0, 1)
    corpus['info']['sha256_16'] = _digest(corpus['train'], corpus['valid'])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez_compressed(tmp, train=corpus['train'], valid=corpus['valid'],
                        info=json.dumps(corpus['info']))
    os.replace(tmp, path)  # never a half-written tokens.npz
    return corpus
  with np.load(path) as f:
    corpus = {'train': f['train'], 'valid': f['valid'],
              'info': json.loads(str(f['info']))}
  if corpus['info'].get('sha256_16') != _digest(corpus['train'],
                                                corpus['valid']):
    raise ValueError(f'{path}: tokens do not match their recorded digest.')
  differ = corpus_config_differences(corpus['info'], data_cfg)
  if differ:
    raise CorpusMismatch(
        f'{path} was built with other data settings than the config: '
        f'{"; ".join(differ)}. Delete it to rebuild (a workdir holds runs '
        'on one corpus), use another workdir, or pass the settings it was '
        'built with.')
  return corpus


def corpus_config_differences(info: Mapping[str, Any],
                              data_cfg: Mapping[str, Any]) -> list[str]:
  """'field: built with X, config says Y' for each data setting that differs.

  Compares what a tokens file records (``max_bytes``, ``every``, the
  tokenizer's file name, whether site-packages were read) with the config's
  ``data``; a file carried in with ``data.tokens_file`` is checked the same
  way.
  """
  # Files written before ``site_packages`` was recorded say it in 'source'.
  site = info.get('site_packages',
                  '+ site-packages' in str(info.get('source', '')))
  pairs = (('max_bytes', info.get('max_bytes'), int(data_cfg['max_bytes'])),
           ('every', info.get('every'), int(data_cfg['every'])),
           ('tokenizer', info.get('tokenizer'),
            text.tokenizer_name(str(data_cfg['tokenizer']))),
           ('site_packages', site,
            bool(data_cfg.get('site_packages', True))))
  return [f'{name}: built with {got!r}, config says {want!r}'
          for name, got, want in pairs if got != want]


def batch_table(num_tokens: int, seq_len: int, batch_size: int, steps: int,
                seed: int) -> np.ndarray:
  """Window indices (steps, batch) of every training step (the data order)."""
  # WindowIterator's order (the same StepIterator), without its token copy.
  it = resumable.StepIterator(text.num_windows(num_tokens, seq_len),
                              batch_size, seed)
  return np.stack([it.batch_indices(s) for s in range(steps)]).astype(np.int32)


def windows(tokens: jax.Array, index: jax.Array, seq_len: int) -> dict:
  """Gathers windows ``index`` (batch,) of ``seq_len + 1`` tokens (in-jit)."""
  offsets = index[:, None] * seq_len + jnp.arange(seq_len + 1)
  w = tokens[offsets].astype(jnp.int32)
  return {'inputs': w[:, :-1], 'targets': w[:, 1:]}


# -- Optimizers ------------------------------------------------------------------


def muon_dimension_numbers(exclude: Sequence[str]):
  """``muon_weight_dimension_numbers`` for ``optax.contrib.muon``: Muon on the
  2-D leaves whose path matches none of ``exclude``, AdamW on the rest."""
  keep = optimizers.name_mask(exclude)

  def fn(params):
    return jax.tree.map(
        lambda p, k: (optax.contrib.MuonDimensionNumbers()
                      if k and np.ndim(p) == 2 else None),
        params, keep(params))
  return fn


def hidden_matrices(params, exclude: Sequence[str]) -> dict:
  """The 2-D leaves whose path matches none of ``exclude``, as a flat dict
  ``{'a/b/kernel': leaf}``: the matrices an optax_fac optimizer owns (its
  state on them, compared with adamw's on them, is the papers' memory
  claim; the excluded embedding and head are Adam's in every recipe)."""
  names = jax.tree.leaves(optimizers.path_names(params))
  keep = jax.tree.leaves(optimizers.name_mask(exclude)(params))
  return {n: p for n, k, p in zip(names, keep, jax.tree.leaves(params))
          if k and np.ndim(p) == 2}


def make_tx(config, name: str, learning_rate, kwargs: Mapping[str, Any]):
  """The optimizer ``name`` with the benchmark's recipe (module docstring)."""
  kwargs = dict(kwargs)
  if name == 'contrib.muon':
    kwargs.setdefault('muon_weight_dimension_numbers',
                      muon_dimension_numbers(tuple(config.method_exclude)))
  return optimizers.make_optimizer(
      name, learning_rate, weight_decay=float(config.weight_decay),
      method_exclude=tuple(config.method_exclude),
      grad_clip=float(config.grad_clip) or None, **kwargs)


def shape_schedule(config) -> optax.Schedule:
  """The learning-rate schedule for a peak of 1 (multiplied by the peak)."""
  steps = int(config.num_train_steps)
  return optimizers.make_schedule(
      1.0, steps,
      warmup_steps=int(round(config.schedule.warmup_fraction * steps)),
      decay=config.schedule.decay,
      final_fraction=float(config.schedule.final_fraction))


def resolve(config, label: str) -> tuple[str, dict]:
  """``(optimizer name, keyword arguments)`` of a sweep label.

  A label is an optimizer name, or a key of ``config.variants``
  (``{'optimizer': name, 'kwargs': {...}}``, e.g. adafactor_momentum with
  ``b1=None``); ``config.optimizer_kwargs[name]`` and then
  ``config.optimizer_kwargs[label]`` and the variant's kwargs are merged.
  """
  def plain(x):
    return {} if x is None else (x.to_dict() if hasattr(x, 'to_dict')
                                 else dict(x))
  variants = config.get('variants') or {}
  name, kwargs = label, {}
  if label in variants:
    name = variants[label]['optimizer']
    kwargs = plain(variants[label].get('kwargs'))
  merged = plain(config.optimizer_kwargs.get(name))
  if label != name:
    merged.update(plain(config.optimizer_kwargs.get(label)))
  merged.update(kwargs)
  return name, merged


# -- One run -----------------------------------------------------------------------


def run_name(name: str, lr: float) -> str:
  return f'{name}__lr{lr:.0e}'.replace('e-0', 'e-').replace('e+0', 'e+')


class Trainer:
  """Compiled training chunks and evaluation for one optimizer name.

  The peak learning rate, the tokens and the data order are arguments of the
  jitted chunk (not constants baked into it), so every rate of a sweep
  reuses one compilation.
  """

  def __init__(self, config, label: str, corpus: dict):
    self.config = config
    self.label = label
    self.name, self.kwargs = resolve(config, label)
    data = config.data
    self.seq_len = int(data.seq_len)
    self.steps = int(config.num_train_steps)
    self.chunk = int(config.eval_every_steps)
    if self.steps % self.chunk:
      raise ValueError(f'num_train_steps={self.steps} must be a multiple of '
                       f'eval_every_steps={self.chunk}.')
    model_cfg = config.model.to_dict()
    model_cfg.setdefault('vocab_size', corpus['info']['vocab_size'])
    model_cfg.setdefault('max_len', self.seq_len)
    self.model, self.model_cfg = models.build_model(model_cfg)
    self.tokens = jnp.asarray(corpus['train'])
    valid = corpus['valid']
    n_windows = (len(valid) - 1) // self.seq_len
    n_eval = min(int(data.eval_batches),
                 n_windows // int(config.eval_batch_size))
    if n_eval < 1:
      raise ValueError(f'Validation split ({len(valid)} tokens) is shorter '
                       f'than one batch of {config.eval_batch_size} windows.')
    self.eval_index = jnp.arange(n_eval * int(config.eval_batch_size)).reshape(
        n_eval, int(config.eval_batch_size))
    self.valid = jnp.asarray(valid)
    self.table = jnp.asarray(batch_table(
        len(corpus['train']), self.seq_len, int(config.batch_size),
        self.steps, int(config.seed)))
    self.shape = shape_schedule(config)
    self._chunk_fn = jax.jit(self._train_chunk, donate_argnums=(0, 1))
    self._eval_fn = jax.jit(self._evaluate)

  def tx(self, peak):
    return make_tx(self.config, self.name, lambda c: peak * self.shape(c),
                   self.kwargs)

  def init(self):
    dummy = jnp.zeros((1, self.seq_len), jnp.int32)
    params = self.model.init(jax.random.PRNGKey(int(self.config.seed)),
                             dummy)['params']
    return params, self.tx(1.0).init(params)

  def _loss(self, params, batch):
    logits = self.model.apply({'params': params}, batch['inputs'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['targets']).mean()

  def _train_chunk(self, params, opt_state, start, peak, tokens, table):
    tx = self.tx(peak)

    def step(carry, s):
      params, opt_state = carry
      batch = windows(tokens, table[s], self.seq_len)
      loss, grads = jax.value_and_grad(self._loss)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state), start + jnp.arange(self.chunk))
    return params, opt_state, losses

  def _evaluate(self, params, tokens, eval_index):
    def one(index):
      return self._loss(params, windows(tokens, index, self.seq_len))
    return jnp.mean(jax.lax.map(one, eval_index))

  def run(self, lr: float, *, progress: bool = True) -> dict:
    """Trains from the seed's initialization at peak rate ``lr``."""
    params, opt_state = self.init()
    state_bytes = memory.state_size(self.tx(1.0), params)
    hidden = hidden_matrices(params, tuple(self.config.method_exclude))
    hidden_bytes = memory.state_size(self.tx(1.0), hidden)
    peak = jnp.asarray(lr, jnp.float32)
    losses, evals, chunk_times = [], [], []
    bar = _progress(self.steps // self.chunk, f'{self.label} lr={lr:g}',
                    progress)
    t_start = time.time()
    for i in range(self.steps // self.chunk):
      t0 = time.perf_counter()
      params, opt_state, chunk_losses = self._chunk_fn(
          params, opt_state, jnp.asarray(i * self.chunk, jnp.int32), peak,
          self.tokens, self.table)
      chunk_losses = np.asarray(jax.device_get(chunk_losses), np.float64)
      chunk_times.append(time.perf_counter() - t0)
      losses.extend(chunk_losses.tolist())
      val = float(self._eval_fn(params, self.valid, self.eval_index))
      evals.append({'step': (i + 1) * self.chunk, 'valid_loss': val})
      if bar is not None:
        bar.set_postfix(train=f'{chunk_losses[-1]:.3f}', valid=f'{val:.3f}')
        bar.update()
    if bar is not None:
      bar.close()
    timed = chunk_times[1:] or chunk_times
    return {
        'optimizer': self.label, 'factory': self.name,
        'learning_rate': float(lr),
        'optimizer_kwargs': _jsonable(self.kwargs),
        'steps': self.steps, 'train_loss': losses, 'eval': evals,
        'final_valid_loss': evals[-1]['valid_loss'],
        'final_train_loss': float(np.mean(losses[-self.chunk:])),
        'diverged': not bool(np.isfinite(evals[-1]['valid_loss'])),
        'step_time_s': float(np.median(timed)) / self.chunk,
        'first_chunk_s': chunk_times[0], 'wall_s': time.time() - t_start,
        'state_bytes': int(state_bytes),
        'hidden_state_bytes': int(hidden_bytes),
        'hidden_params': int(sum(x.size for x in jax.tree.leaves(hidden))),
        'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
    }


def _progress(total, desc, enabled):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit='chunk', leave=False,
              file=sys.stderr)


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


def environment() -> dict:
  dev = jax.devices()[0]
  return {'device': getattr(dev, 'device_kind', dev.platform),
          'platform': dev.platform, 'jax': jax.__version__,
          'optax': optax.__version__, 'python': platform.python_version()}


def run_sweep(config, workdir: str, names: Iterable[str],
              learning_rates: Optional[Mapping[str, Sequence[float]]] = None,
              *, progress: bool = True, log=print,
              deadline: Optional[float] = None,
              concurrent_workers: int = 1) -> list[str]:
  """Runs every (name, rate) whose result file is missing; returns the files.

  Args:
    config: a compare config (configs/compare_*.py).
    workdir: results go to ``workdir/runs/<name>__lr<lr>.json``.
    names: optimizer names (optax_fac first, then optax; dotted for contrib).
    learning_rates: name -> rates (default ``config.sweep[name]``).
    progress: tqdm progress bars.
    log: where one line per finished run goes.
    deadline: a ``time.time()`` after which no further run is started (the
      ones not started stay missing: a later call runs them).
    concurrent_workers: how many sweep processes share the device (recorded
      with each run: its step time is then not its own).
  """
  corpus = load_corpus(config.data, workdir)
  check_one_corpus(read_runs(workdir), corpus['info']['sha256_16'])
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  written = []
  for name in names:
    rates = (learning_rates or {}).get(name) or sweep_rates(config, name)
    todo = [lr for lr in rates if not os.path.exists(
        os.path.join(workdir, 'runs', run_name(name, lr) + '.json'))]
    if not todo:
      log(f'{name}: all {len(rates)} rates already run (skipped)')
      continue
    if len(todo) < len(rates):
      log(f'{name}: {len(rates) - len(todo)} of {len(rates)} rates already '
          'run (skipped)')
    if deadline is not None and time.time() > deadline:
      log(f'deadline: {name} not started')
      continue
    trainer = Trainer(config, name, corpus)
    for lr in todo:
      if deadline is not None and time.time() > deadline:
        log(f'deadline: {name} lr {lr:g} not started')
        break
      try:
        result = trainer.run(lr, progress=progress)
      except Exception as e:  # pylint: disable=broad-except
        # One optimizer's failure (an error, not a bad loss: those are
        # results) must not stop the others; it is logged with its cause.
        log(f'Error: {name} lr {lr:g} failed: {type(e).__name__}: {e}')
        break
      result.update(config=_jsonable(config.to_dict()),
                    corpus=corpus['info'], environment=environment(),
                    concurrent_workers=int(concurrent_workers))
      path = os.path.join(workdir, 'runs', run_name(name, lr) + '.json')
      with open(path + '.tmp', 'w') as f:
        json.dump(result, f)
      os.replace(path + '.tmp', path)  # a run file is whole or absent
      written.append(path)
      log(f'{name:<20} lr {lr:<8g} valid {result["final_valid_loss"]:.4f}  '
          f'step {1e3 * result["step_time_s"]:.2f} ms  '
          f'first chunk {result["first_chunk_s"]:.1f} s')
  return written


def time_steps(config, label: str, corpus: dict, lr: float,
               chunks: int = 3) -> dict:
  """Step time of ``label`` alone on the device: the median of ``chunks``
  scanned chunks after one warm-up chunk (forward, backward and update).

  The sweep's own step times are only comparable when its runs had the
  device to themselves; this is the figure to compare when they did not.
  """
  trainer = Trainer(config, label, corpus)
  params, opt_state = trainer.init()
  peak = jnp.asarray(lr, jnp.float32)
  times = []
  for i in range(chunks + 1):
    t0 = time.perf_counter()
    params, opt_state, losses = trainer._chunk_fn(  # pylint: disable=protected-access
        params, opt_state, jnp.asarray(i * trainer.chunk, jnp.int32), peak,
        trainer.tokens, trainer.table)
    jax.block_until_ready(losses)
    times.append(time.perf_counter() - t0)
  return {'step_time_s': float(np.median(times[1:])) / trainer.chunk,
          'chunk_steps': trainer.chunk, 'chunks': chunks,
          'first_chunk_s': times[0]}


def sweep_rates(config, name: str) -> list[float]:
  """``config.sweep[name]`` or the grid of its family (``config.sweep_family``).

  ``config`` may be a ConfigDict or the plain dict a run file stores.
  """
  sweep, families = config['sweep'], config['sweep_family']
  if name in sweep:
    return [float(x) for x in sweep[name]]
  for family, pattern in families.items():
    if re.fullmatch(pattern, name):
      return [float(x) for x in sweep[family]]
  return [float(x) for x in sweep['default']]


# -- Summary -----------------------------------------------------------------------


def read_runs(workdir: str) -> list[dict]:
  runs_dir = os.path.join(workdir, 'runs')
  out = []
  for f in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    if f.endswith('.json'):
      with open(os.path.join(runs_dir, f)) as fh:
        out.append(json.load(fh))
  return out


def check_one_corpus(runs: Sequence[dict],
                     digest: Optional[str] = None) -> None:
  """Refuses runs made on different corpora (their losses do not compare).

  The corpus is named by its tokens' digest (``corpus.sha256_16``); the
  Python-source corpus changes with any installed package's version, so
  runs from two environments can differ in their data without a word.

  Args:
    runs: run results (:func:`read_runs`).
    digest: the corpus a new run is about to use, if any.

  Raises:
    CorpusMismatch: naming each digest and the runs (optimizer, rate) made
      on it.
  """
  by_digest = {}
  for r in runs:
    d = (r.get('corpus') or {}).get('sha256_16')
    by_digest.setdefault(d, []).append(
        f"{r['optimizer']} lr {r['learning_rate']:g}")
  if digest is not None:
    by_digest.setdefault(digest, []).insert(0, 'the new run')
  if len(by_digest) > 1:
    listing = '; '.join(f'{d}: {", ".join(names[:4])}'
                        + (f' and {len(names) - 4} more' if len(names) > 4
                           else '')
                        for d, names in by_digest.items())
    raise CorpusMismatch(
        f'Runs on {len(by_digest)} different corpora (tokens digest: runs) '
        f'cannot be compared: {listing}. Use one tokens.npz for a workdir '
        '(data.tokens_file), or a new workdir.')


def steps_to_reach(evals: Sequence[Mapping[str, float]],
                   target: float) -> Optional[float]:
  """The first step where the validation loss is <= ``target``.

  Linear interpolation between the two evaluations around the crossing;
  None if no evaluation reaches it.
  """
  prev = None
  for e in evals:
    if e['valid_loss'] <= target:
      if prev is None or not np.isfinite(prev['valid_loss']):
        return float(e['step'])
      frac = ((prev['valid_loss'] - target) /
              (prev['valid_loss'] - e['valid_loss']))
      return float(prev['step'] + frac * (e['step'] - prev['step']))
    prev = e
  return None


def ablation_of(run: Mapping[str, Any]) -> Optional[str]:
  """The optimizer an ablation run varies, or None for a sweep run.

  An ablation is a variant (``config.variants``) trained at one rate only
  (its sweep grid in the run's own config has one entry: the base
  optimizer's best rate), as configs/compare_ablations.py writes them; a
  variant swept over several rates (``adafactor_momentum_b1none``) is an
  optimizer of the sweep.
  """
  config = run.get('config') or {}
  label = run['optimizer']
  variant = (config.get('variants') or {}).get(label)
  if variant is None or len((config.get('sweep') or {}).get(label, ())) != 1:
    return None
  return variant['optimizer']


def best_runs(runs: Sequence[dict]) -> dict:
  """name -> the run with the lowest final validation loss (finite first)."""
  best = {}
  for r in runs:
    key = r['final_valid_loss'] if np.isfinite(r['final_valid_loss']) \
        else np.inf
    cur = best.get(r['optimizer'])
    if cur is None or key < cur[0]:
      best[r['optimizer']] = (key, r)
  return {k: v[1] for k, v in best.items()}


def summarize(runs: Sequence[dict], baseline: str = BASELINE,
              timing: Optional[Mapping[str, Mapping[str, float]]] = None
              ) -> list[dict]:
  """One row per optimizer: its best rate and how it compares with adamw's.

  ``timing`` (label -> :func:`time_steps`'s result) replaces the runs' own
  step times (needed when several runs shared the device).

  Row fields: optimizer, best_lr, rates (swept), lr_on_edge (the best rate is
  the smallest or largest swept), final_valid_loss, vs_baseline (relative
  difference of final validation loss), steps_to_baseline (None = not
  reached), steps_ratio, rates_planned (the config's grid; more rates ran
  where an edge was extended), state_bytes, state_ratio, hidden_state_bytes and
  hidden_state_ratio (on the hidden matrices alone), step_time_s,
  step_time_ratio, wall_to_baseline_s (steps_to_baseline x step time),
  diverged_rates.

  Raises:
    ValueError: no ``baseline`` run, or runs on different corpora
      (:func:`check_one_corpus`).
  """
  check_one_corpus(runs)
  best = best_runs(runs)
  if baseline not in best:
    raise ValueError(f'No {baseline!r} run: the comparison needs its final '
                     'validation loss.')
  timing = timing or {}

  def step_time(r):
    t = timing.get(r['optimizer'])
    return t['step_time_s'] if t else r['step_time_s']
  base = best[baseline]
  target = base['final_valid_loss']
  rows = []
  for name, r in best.items():
    rates = sorted(x['learning_rate'] for x in runs if x['optimizer'] == name)
    reach = steps_to_reach(r['eval'], target)
    planned = (len(sweep_rates(r['config'], name)) if 'config' in r
               else len(rates))
    rows.append(dict(
        optimizer=name, best_lr=r['learning_rate'], rates=rates,
        rates_planned=planned,
        lr_on_edge=len(rates) > 1 and r['learning_rate'] in (rates[0],
                                                             rates[-1]),
        final_valid_loss=r['final_valid_loss'],
        vs_baseline=r['final_valid_loss'] / target - 1.0,
        steps_to_baseline=reach,
        steps_ratio=None if reach is None else reach / base['steps'],
        state_bytes=r['state_bytes'],
        state_ratio=r['state_bytes'] / base['state_bytes'],
        hidden_state_bytes=r.get('hidden_state_bytes'),
        hidden_state_ratio=(r['hidden_state_bytes'] /
                            base['hidden_state_bytes']
                            if 'hidden_state_bytes' in r else None),
        step_time_s=step_time(r),
        step_time_ratio=step_time(r) / step_time(base),
        step_time_source='alone' if r['optimizer'] in timing else 'sweep',
        wall_to_baseline_s=None if reach is None else reach * step_time(r),
        diverged_rates=[x['learning_rate'] for x in runs
                        if x['optimizer'] == name and x['diverged']]))
  rows.sort(key=lambda row: (row['optimizer'] != baseline,
                             row['final_valid_loss']))
  return rows


def markdown_table(rows: Sequence[dict]) -> str:
  """The README table of :func:`summarize`'s rows.

  A row with fewer rates run than its config's grid says so: its best rate
  is not yet the best of its sweep.
  """
  head = ('| optimizer | best lr (swept) | final valid loss | vs adamw | '
          'steps to adamw\'s loss | state (all) | state (hidden matrices) | '
          'step time | wall to adamw\'s loss |\n'
          '|---|---|---|---|---|---|---|---|---|')
  lines = [head]
  for r in rows:
    rates = ', '.join(f'{x:g}' for x in r['rates'])
    edge = ' (edge)' if r['lr_on_edge'] else ''
    planned = r.get('rates_planned', len(r['rates']))
    if len(r['rates']) < planned:
      edge += f' (sweep incomplete: {len(r["rates"])} of {planned} rates)'
    reach = ('not reached' if r['steps_to_baseline'] is None else
             f'{r["steps_to_baseline"]:.0f} ({r["steps_ratio"]:.2f}×)')
    wall = ('-' if r['wall_to_baseline_s'] is None else
            f'{r["wall_to_baseline_s"]:.1f} s')
    hidden = ('-' if r.get('hidden_state_bytes') is None else
              f'{memory.format_bytes(r["hidden_state_bytes"])} '
              f'({r["hidden_state_ratio"]:.3f}×)')
    lines.append(
        f'| {r["optimizer"]} | {r["best_lr"]:g}{edge} ({rates}) | '
        f'{r["final_valid_loss"]:.4f} | {100 * r["vs_baseline"]:+.2f}% | '
        f'{reach} | {memory.format_bytes(r["state_bytes"])} '
        f'({r["state_ratio"]:.3f}×) | {hidden} | '
        f'{1e3 * r["step_time_s"]:.2f} ms '
        f'({r["step_time_ratio"]:.2f}×) | {wall} |')
  return '\n'.join(lines)


def read_timing(workdir: str) -> dict:
  """``workdir/timing.json`` (label -> :func:`time_steps`), or {}."""
  path = os.path.join(workdir, 'timing.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def plot(runs: Sequence[dict], out: str, title: str = '') -> str:
  """Validation-loss curves of each optimizer's best run, and final
  validation loss against the learning rate (every run).

  One colour per optimizer (up to 20 distinct), one legend for both panels.
  On the sweep panel a run that ended above the axis (or diverged) is a
  triangle on its top edge, so no run is silently off the plot.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  best = best_runs(runs)
  rows = summarize(runs) if BASELINE in best else [
      {'optimizer': n} for n in best]
  fig, (ax_c, ax_lr) = plt.subplots(1, 2, figsize=(15, 5.5))
  finite = [r['final_valid_loss'] for r in best.values()
            if np.isfinite(r['final_valid_loss'])]
  lo = min(finite) if finite else None
  every_final = [r['final_valid_loss'] for r in runs
                 if np.isfinite(r['final_valid_loss'])]
  top = min(lo + 0.6, max(every_final) + 0.05) if finite else None
  # The first ten: tab10's colours, solid; the next ten: the light shade of
  # each, dashed (tab20 pairs them); then around again.
  cmap = plt.get_cmap('tab20')
  handles = []
  for i, row in enumerate(rows):
    r = best[row['optimizer']]
    color = cmap((2 * (i % 10) + (i // 10) % 2) / 20 + 1 / 40)
    style = '-' if (i // 10) % 2 == 0 else '--'
    steps = [e['step'] for e in r['eval']]
    vals = [e['valid_loss'] for e in r['eval']]
    (h,) = ax_c.plot(steps, vals, style, color=color, lw=1.4,
                     label=f'{r["optimizer"]} (lr {r["learning_rate"]:g})')
    handles.append(h)
    sweep = sorted((x['learning_rate'], x['final_valid_loss']) for x in runs
                   if x['optimizer'] == r['optimizer'])
    lrs = np.array([x for x, _ in sweep])
    vals = np.array([y for _, y in sweep], dtype=float)
    cap = np.nan if top is None else top
    above = ~np.isfinite(vals) | (vals > cap)
    ax_lr.plot(lrs, np.where(above, cap, vals), style, color=color, lw=1.2,
               alpha=0.8)
    ax_lr.plot(lrs[~above], vals[~above], 'o', color=color, ms=5)
    ax_lr.plot(lrs[above], np.full(above.sum(), cap), '^', color=color,
               ms=7, clip_on=False)
  if BASELINE in best:
    target = best[BASELINE]['final_valid_loss']
    handles.append(ax_c.axhline(target, color='k', lw=0.8, ls=':',
                                label="adamw's final validation loss"))
    ax_lr.axhline(target, color='k', lw=0.8, ls=':')
  if finite:
    ax_c.set_ylim(lo - 0.05, max(finite) + 0.3)
    ax_lr.set_ylim(lo - 0.05, top)
  ax_c.set_xlabel('step')
  ax_c.set_ylabel('validation loss')
  ax_c.set_title('best learning rate of each optimizer')
  ax_lr.set_xscale('log')
  ax_lr.set_xlabel('peak learning rate')
  ax_lr.set_ylabel('final validation loss')
  ax_lr.set_title('learning-rate sweep (\u25b2: above the axis or diverged)')
  for ax in (ax_c, ax_lr):
    ax.grid(alpha=0.3)
  fig.subplots_adjust(left=0.05, right=0.79, bottom=0.1, top=0.86,
                      wspace=0.2)
  fig.legend(handles=handles, fontsize=8, loc='center left',
             bbox_to_anchor=(0.8, 0.48), frameon=False)
  if title:
    fig.suptitle(title)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
