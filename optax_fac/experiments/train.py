"""The training loop behind ``scripts/train.py`` and ``scripts/demo.py``.

``train_and_evaluate(config, workdir)`` builds the data, the model and the
optimizer (by name, :mod:`optax_fac.experiments.optimizers`) from a config,
trains with one jitted step, and writes

* ``workdir/metrics.jsonl`` — one JSON object per logged step: ``step``
  (steps done), ``loss`` (that step's training loss), ``learning_rate``,
  ``step_time`` (seconds, averaged over the last host sync), ``throughput``
  (tokens or images per second), ``accuracy`` for classification, and at
  evaluation steps ``eval_loss`` (+ ``eval_accuracy``);
* ``workdir/checkpoints/<step>`` — orbax checkpoints of params, optimizer
  state, model state, RNG key and the data iterator's position, every
  ``checkpoint_every_steps``; ``resume=True`` restores the latest finished
  one and continues exactly (same batches, same RNG: bitwise-equal on CPU).
  A process killed during a save (SIGKILL included) resumes from the last
  finished checkpoint, losing only the steps since it; a checkpoint of
  another optimizer or parameter tree fails with
  :class:`~optax_fac.experiments.checkpoint.CheckpointMismatchError` naming
  what differs (:mod:`optax_fac.experiments.checkpoint`);
* ``workdir/summary.json`` — what :func:`summarize` returns.

Multi-host (``scripts/train.py --distributed``, after
:func:`optax_fac.experiments.distributed.initialize`): with several processes
the step is data parallel over every device of every process — a 1-D
``('data',)`` mesh (:func:`~optax_fac.experiments.distributed.data_mesh`),
params, optimizer state and model state replicated, each batch's rows split
over the devices. Every process runs the same data stream (same seed, same
position) and feeds only its own contiguous block of each global batch's
rows (:func:`~optax_fac.experiments.distributed.shard_batch`), so a run gives
the same batches, and to float32 precision the same result, on any number
of processes, and the data position in a checkpoint is the same for all.
[decided] Simple over economical: each process reads (tokenizes, decodes)
the whole global batch and drops the other rows. ``batch_size`` and
``eval_batch_size`` must be divisible by the number of devices. Only process
0 writes ``metrics.jsonl``, ``config.json``, ``summary.json`` and shows
progress; orbax checkpoints are saved and restored by all processes
together, as orbax requires (it writes the metadata and the data position
from process 0 and each replicated array once, possibly split between the
processes; resume is bitwise exact on CPU, tested), so ``workdir`` must be
one directory that every process sees (a shared or network filesystem,
GCS). A single process trains on its first device, as before.

Config fields (see ``configs/*.py``): seed, batch_size, eval_batch_size,
num_train_steps or num_epochs, optimizer, learning_rate, optimizer_kwargs,
weight_decay, method_exclude, weight_decay_exclude, grad_clip, schedule
(warmup_steps | warmup_fraction, decay, final_fraction), label_smoothing,
microbatches (gradient accumulation inside one step), log_every_steps,
flush_every_steps, eval_every_steps, checkpoint_every_steps, max_checkpoints,
model.*, data.*.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_fac import memory
from optax_fac.experiments import data as data_lib
from optax_fac.experiments import distributed as dist
from optax_fac.experiments import models
from optax_fac.experiments import optimizers


def _get(config, key, default=None):
  try:
    value = config.get(key, default)
  except AttributeError:
    value = getattr(config, key, default)
  return default if value is None else value


def _plain(x):
  """ConfigDict / tuples -> plain Python (for kwargs and JSON)."""
  if hasattr(x, 'to_dict'):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(_plain(v) for v in x)
  return x


# -- Metrics file ----------------------------------------------------------------


class MetricsWriter:
  """Appends JSON lines to ``path``; on resume drops records past ``step``.

  ``enabled=False`` (processes other than 0 of a multi-host run): nothing is
  written; the records of this run are kept in memory for :meth:`read`.
  """

  def __init__(self, path: str, resume_step: Optional[int] = None,
               enabled: bool = True):
    self.path = path
    self.enabled = enabled
    self._records = []
    if not enabled:
      return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resume_step is None:
      open(path, 'w').close()
    elif os.path.exists(path):
      kept = [r for r in read_metrics(path) if r['step'] <= resume_step]
      with open(path, 'w') as f:
        for r in kept:
          f.write(json.dumps(r) + '\n')

  def write(self, records) -> None:
    if not self.enabled:
      self._records.extend(records)
      return
    with open(self.path, 'a') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')

  def read(self) -> list[dict]:
    """All records: the file's, or (disabled) this run's."""
    return read_metrics(self.path) if self.enabled else list(self._records)


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# -- Progress --------------------------------------------------------------------


class _Progress:
  """tqdm when available (and enabled), else a line every few flushes."""

  def __init__(self, total, initial, desc, enabled):
    self._bar = None
    self._enabled = enabled
    self._last_print = 0.0
    if enabled:
      try:
        from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc,
                              dynamic_ncols=True, file=sys.stdout)
      except ImportError:
        pass
    self.total, self.desc = total, desc

  def update(self, step, n, postfix):
    if self._bar is not None:
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(n)
    elif self._enabled and (time.time() - self._last_print > 10 or
                            step == self.total):
      self._last_print = time.time()
      items = ' '.join(f'{k}={v}' for k, v in postfix.items())
      print(f'{self.desc} {step}/{self.total} {items}', flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


# -- Building blocks -------------------------------------------------------------


def total_steps(config, data: data_lib.Data) -> int:
  steps = _get(config, 'num_train_steps', 0)
  if steps:
    return int(steps)
  epochs = _get(config, 'num_epochs', 0)
  if epochs and data.num_train_examples:
    return int(epochs * data.num_train_examples // config.batch_size)
  raise ValueError('Set config.num_train_steps (or num_epochs for image '
                   'data).')


def make_schedule(config, steps: int) -> optax.Schedule:
  sched = _get(config, 'schedule', {})
  warmup = _get(sched, 'warmup_steps', 0)
  if _get(sched, 'warmup_fraction', 0):
    warmup = int(round(sched.warmup_fraction * steps))
  if _get(sched, 'warmup_epochs', 0):
    raise ValueError('schedule.warmup_epochs must be converted to steps; use '
                     'warmup_steps or warmup_fraction.')
  return optimizers.make_schedule(
      float(config.learning_rate), steps, warmup_steps=min(warmup, steps),
      decay=_get(sched, 'decay', 'cosine'),
      final_fraction=float(_get(sched, 'final_fraction', 0.0)))


def make_tx(config, schedule) -> optax.GradientTransformation:
  return optimizers.make_optimizer(
      config.optimizer, schedule,
      weight_decay=float(_get(config, 'weight_decay', 0.0)),
      method_exclude=tuple(_get(config, 'method_exclude', ())),
      weight_decay_exclude=tuple(_get(config, 'weight_decay_exclude', ())),
      grad_clip=_get(config, 'grad_clip', None),
      **_plain(_get(config, 'optimizer_kwargs', {})))


def build_model(config, data: data_lib.Data):
  model_cfg = _plain(config.model)
  if data.task == 'lm':
    model_cfg.setdefault('vocab_size', data.vocab_size)
    if model_cfg['vocab_size'] < data.vocab_size:
      raise ValueError(f'model.vocab_size={model_cfg["vocab_size"]} is below '
                       f'the tokenizer vocabulary ({data.vocab_size}).')
    model_cfg.setdefault('max_len', data.example_shape[0])
  else:
    model_cfg.setdefault('num_classes', data.num_classes)
    model_cfg.setdefault('in_channels', data.example_shape[-1])
    if model_cfg['name'] == 'vit':
      model_cfg.setdefault('image_size', data.example_shape[0])
  return models.build_model(model_cfg)


def _dummy_input(data: data_lib.Data):
  if data.task == 'lm':
    return jnp.zeros((1,) + data.example_shape, jnp.int32)
  return jnp.zeros((1,) + data.example_shape, jnp.float32)


def _losses(logits, batch, task, label_smoothing):
  if task == 'lm':
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['targets']).mean()
    return loss, {}
  labels = batch['label']
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, labels)
  weight = batch.get('weight', jnp.ones(per_example.shape, jnp.float32))
  denom = jnp.maximum(weight.sum(), 1.0)
  correct = (jnp.argmax(logits, -1) == jnp.argmax(batch['label'], -1))
  return ((per_example * weight).sum() / denom,
          {'accuracy': (correct * weight).sum() / denom})


def _shardings(mesh):
  """(replicated, batch rows over 'data') shardings of ``mesh``, or Nones."""
  if mesh is None:
    return None, None
  return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def make_train_step(model, tx, task, schedule, label_smoothing=0.0,
                    microbatches: int = 1, mesh=None):
  """The jitted update: (state, batch) -> (state, metrics).

  With ``microbatches = k > 1`` the batch is split into k equal parts whose
  gradients are averaged (``lax.scan``) before one optimizer update: the
  same update as the full batch, in 1/k of the activation memory. With a
  ``mesh`` (1-D, axis ``'data'``) the state and metrics are replicated and
  the batch is split over the data axis.
  """

  def grads_of(params, model_state, batch, rng):
    inputs = batch['inputs'] if task == 'lm' else batch['image']

    def loss_fn(p):
      variables = {'params': p, **model_state}
      mutable = list(model_state.keys())
      out = model.apply(variables, inputs, train=True,
                        rngs={'dropout': rng}, mutable=mutable or False)
      logits, new_model_state = out if mutable else (out, {})
      loss, aux = _losses(logits, batch, task, label_smoothing)
      return loss, (aux, dict(new_model_state))

    (loss, (aux, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return grads, {'loss': loss, **aux}, new_model_state

  def step_fn(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    params = state['params']
    if microbatches <= 1:
      grads, metrics, model_state = grads_of(params, state['model_state'],
                                             batch, rng)
    else:
      k = microbatches
      split = jax.tree.map(
          lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

      def body(carry, xs):
        acc, model_state = carry
        i, mb = xs
        g, m, model_state = grads_of(params, model_state, mb,
                                     jax.random.fold_in(rng, i))
        acc = jax.tree.map(lambda a, b: a + b / k, acc, (g, m))
        return (acc, model_state), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grads_of(params, state['model_state'],
                           jax.tree.map(lambda x: x[0], split), rng)[:2]))
      (acc, model_state), _ = jax.lax.scan(
          body, (zeros, state['model_state']), (jnp.arange(k), split))
      grads, metrics = acc
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    params = optax.apply_updates(params, updates)
    new_state = dict(state, step=state['step'] + 1, params=params,
                     opt_state=opt_state, model_state=model_state)
    metrics = dict(metrics, learning_rate=schedule(state['step']))
    return new_state, metrics

  if mesh is None:
    return jax.jit(step_fn, donate_argnums=0)
  rep, rows = _shardings(mesh)
  return jax.jit(step_fn, donate_argnums=0, in_shardings=(rep, rows),
                 out_shardings=(rep, rep))


def make_eval_step(model, task, mesh=None):
  def eval_fn(state, batch):
    inputs = batch['inputs'] if task == 'lm' else batch['image']
    variables = {'params': state['params'], **state['model_state']}
    logits = model.apply(variables, inputs, train=False)
    loss, aux = _losses(logits, batch, task, 0.0)
    weight = (batch['weight'].sum() if 'weight' in batch else
              jnp.asarray(inputs.shape[0], jnp.float32))
    return {'loss': loss, **aux}, weight
  if mesh is None:
    return jax.jit(eval_fn)
  rep, rows = _shardings(mesh)
  return jax.jit(eval_fn, in_shardings=(rep, rows), out_shardings=rep)


def evaluate(eval_step, state, batches) -> dict:
  sums, total = {}, 0.0
  for batch in batches:
    metrics, weight = jax.device_get(eval_step(state, batch))
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v) * float(weight)
    total += float(weight)
  return {f'eval_{k}': v / total for k, v in sums.items()}


def init_state(model, tx, data, seed: int, mesh=None) -> dict:
  """The train state; replicated over ``mesh`` if given."""

  def init():
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    key = init_rng
    variables = model.init({'params': key, 'dropout': key},
                           _dummy_input(data), train=False)
    variables = dict(variables)
    params = variables.pop('params')
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'model_state': variables, 'opt_state': tx.init(params),
            'rng': train_rng}

  if mesh is None:
    return jax.jit(init)()
  return jax.jit(init, out_shardings=_shardings(mesh)[0])()


# -- The loop ---------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, *, resume: bool = False,
                       progress: bool = True, desc: Optional[str] = None,
                       stop_after: Optional[int] = None) -> dict:
  """Trains per ``config``; writes metrics/checkpoints/summary to ``workdir``.

  Args:
    config: an experiment config (``configs/*.py``).
    workdir: output directory.
    resume: restore the latest finished checkpoint in
      ``workdir/checkpoints`` and continue from it (fails if there is none,
      and with ``CheckpointMismatchError`` if it was written by another
      optimizer or parameter tree).
    progress: show a progress bar.
    desc: progress-bar label (default: the optimizer name).
    stop_after: stop once this many steps are done (a checkpoint is saved
      there if checkpoints are on), as a preempted job would; the schedule
      still spans ``num_train_steps``, so a later ``resume=True`` run
      continues exactly.

  Returns:
    The run summary (also written to ``workdir/summary.json`` by process 0;
    on other processes its metrics cover this run's steps only), with the
    final ``state`` (global arrays) and ``step_times`` added.
  """
  main = dist.is_main_process()
  mesh = dist.data_mesh()
  if main:
    os.makedirs(workdir, exist_ok=True)
  seed = int(_get(config, 'seed', 0))
  batch_size = int(config.batch_size)
  data = data_lib.make_data(_plain(config.data), batch_size,
                            int(_get(config, 'eval_batch_size', batch_size)),
                            seed)
  for key, rows in (('batch_size', batch_size),
                    ('eval_batch_size',
                     int(_get(config, 'eval_batch_size', batch_size)))):
    if rows % mesh.size:
      raise ValueError(f'config.{key}={rows} is not divisible by the number '
                       f'of devices ({mesh.size}) it is split over.')
  steps = total_steps(config, data)
  schedule = make_schedule(config, steps)
  tx = make_tx(config, schedule)
  model, model_cfg = build_model(config, data)

  ckpt_every = int(_get(config, 'checkpoint_every_steps', 0))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  from optax_fac.experiments import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if not resume and ckpt_lib.has_checkpoint(ckpt_dir):
    raise FileExistsError(
        f'{ckpt_dir} already holds checkpoints: pass --resume to continue '
        'that run, or use a new --workdir.')

  t_init = time.time()
  state = init_state(model, tx, data, seed, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in
                   jax.tree.leaves(state['params']))
  state_bytes = memory.state_size(tx, state['params'])
  checkpointer = None
  if ckpt_every or resume:
    checkpointer = ckpt_lib.Checkpointer(
        ckpt_dir, max_to_keep=_get(config, 'max_checkpoints', 2),
        optimizer=str(config.optimizer), config=_plain(config))
  start = 0
  if resume:
    state, data_state = checkpointer.restore(state)
    data.train.set_state(data_state)
    start = int(state['step'])
    if main:
      print(f'Resuming from step {start} ({os.path.join(ckpt_dir, str(start))})'
            '.', flush=True)

  writer = MetricsWriter(os.path.join(workdir, 'metrics.jsonl'),
                         resume_step=start if resume else None, enabled=main)
  if main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(_plain(config), f, indent=1, default=str)

  microbatches = int(_get(config, 'microbatches', 1))
  if batch_size % microbatches:
    raise ValueError(f'batch_size={batch_size} is not divisible by '
                     f'microbatches={microbatches}.')
  train_step = make_train_step(model, tx, data.task, schedule,
                               float(_get(config, 'label_smoothing', 0.0)),
                               microbatches, mesh)
  eval_step = make_eval_step(model, data.task, mesh)
  put = lambda batch: dist.shard_batch(batch, mesh)  # noqa: E731
  log_every = max(1, int(_get(config, 'log_every_steps', 1)))
  flush_every = max(log_every, int(_get(config, 'flush_every_steps', 10)))
  eval_every = int(_get(config, 'eval_every_steps', 0))
  units = batch_size * data.units_per_example
  label = desc or config.optimizer
  bar = _Progress(steps, start, label, progress and main)

  pending = []  # (step, device metrics)
  step_times = []
  last = {'time': time.time(), 'step': start}
  last_loss = [float('nan')]
  first_flush = [True]
  eval_metrics = {}
  compile_time = [None]

  def flush(step, extra=None, exclude=0.0):
    host = jax.device_get([m for _, m in pending])
    now = time.time()
    n = step - last['step']
    dt = (now - last['time'] - exclude) / max(n, 1)
    if first_flush[0]:
      compile_time[0] = now - last['time']
      first_flush[0] = False
    elif n:
      step_times.extend([dt] * n)
    records = []
    for (s, _), m in zip(pending, host):
      rec = {'step': s}
      rec.update({k: float(v) for k, v in m.items()})
      rec['step_time'] = dt
      rec['throughput'] = units / dt if dt > 0 else float('nan')
      records.append(rec)
    if extra:
      if records and records[-1]['step'] == step:
        records[-1].update(extra)
      else:
        records.append({'step': step, 'loss': last_loss[0], **extra})
    if records:
      last_loss[0] = records[-1]['loss']
    writer.write(records)
    pending.clear()
    last['time'], last['step'] = time.time(), step
    postfix = {'loss': f'{last_loss[0]:.3f}'}
    if eval_metrics:
      postfix['eval'] = f'{eval_metrics["eval_loss"]:.3f}'
    postfix['tput'] = f'{units / dt:.0f}/s' if dt > 0 else '-'
    bar.update(step, n, postfix)

  end = steps if stop_after is None else max(start, min(steps, stop_after))
  try:
    for step in range(start, end):
      batch = put(next(data.train))
      state, metrics = train_step(state, batch)
      done = step + 1
      if done % log_every == 0 or done == steps:
        pending.append((done, metrics))
      is_eval = eval_every and (done % eval_every == 0 or done == steps)
      is_ckpt = ckpt_every and (done % ckpt_every == 0 or done == steps)
      if is_eval:
        jax.block_until_ready(state['params'])
        t_eval = time.time()
        eval_metrics = evaluate(eval_step, state,
                                map(put, data.eval_batches()))
        flush(done, eval_metrics, exclude=time.time() - t_eval)
      elif len(pending) * log_every >= flush_every or done == end or \
          (done == start + 1):
        flush(done)
      if is_ckpt or (ckpt_every and done == end):
        checkpointer.save(done, state, data.train.get_state())
    if pending:
      flush(end)
  finally:
    bar.close()
    if checkpointer is not None:
      checkpointer.close()
    if hasattr(data.train, 'close'):
      data.train.close()

  records = writer.read()
  summary = summarize(records)
  summary.update({
      'median_step_time_s': (float(np.median(step_times)) if step_times
                             else None),
      'optimizer': config.optimizer,
      'learning_rate': float(config.learning_rate),
      'steps': end,
      'num_params': num_params,
      'opt_state_bytes': state_bytes,
      'compile_and_first_step_s': compile_time[0],
      'wall_s': time.time() - t_init,
      'model': _plain(config.model),
  })
  if jax.process_count() > 1:
    summary['process_count'] = jax.process_count()
    summary['device_count'] = mesh.size
  if main:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1, default=str)
  summary['state'] = state
  summary['step_times'] = step_times
  return summary


def summarize(records: list[dict], tail: int = 20) -> dict:
  """Final train loss (mean of the last ``tail`` records) and evaluation."""
  losses = [r['loss'] for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  out = {
      'final_train_loss': float(np.mean(losses[-tail:])) if losses else None,
      'final_eval_loss': evals[-1]['eval_loss'] if evals else None,
  }
  if evals and 'eval_accuracy' in evals[-1]:
    out['final_eval_accuracy'] = evals[-1]['eval_accuracy']
  return out
