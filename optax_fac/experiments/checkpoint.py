"""Orbax checkpoints of the full training state and the data position.

One checkpoint = the train state (step, params, model state such as BatchNorm
statistics, optimizer state, RNG key) saved with ``StandardSave``, the data
iterator's state (a small JSON object) and a description of the run
(``meta``: optimizer name, config and its hash, and the path, dtype and shape
of every leaf of the state) with ``JsonSave``, in one ``CheckpointManager``
step directory. The optimizer state is stored as its flat list of leaves and
rebuilt with the tree structure of a freshly initialised state: optax states
are NamedTuples with ``MaskedNode`` and ``None`` parts, which a restore
without a target would turn into lists and dicts (google/orbax#487,
google-deepmind/ferminet#105).

Faults. A save is atomic: orbax writes a step into a temporary directory and
renames it when every item is written, so a process killed during a save
(even by SIGKILL) leaves the previous checkpoints as they were, and
:meth:`Checkpointer.restore` (orbax's ``latest_step``) never picks the
unfinished one; the manager deletes such leftovers when it next starts.
:meth:`Checkpointer.restore` compares ``meta`` with the run restoring it
first and raises :class:`CheckpointMismatchError`, naming the optimizer or
the leaf paths, dtypes and shapes that differ, instead of restoring a state
whose leaves would land in the wrong places (the optimizer state is a flat
list) or be cast to other dtypes (orbax casts silently). Other config
differences (e.g. a changed learning rate) only warn. Checkpoints written
before ``meta`` existed restore unchecked.

Multi-process runs (``scripts/train.py --distributed``): every process
constructs the :class:`Checkpointer` and calls ``save`` / ``restore`` with
the same global arrays (orbax synchronises them and writes each array once),
so the directory must be one that every process sees.

orbax-checkpoint is imported on first use, so training without checkpoints
needs only jax, flax and optax.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import warnings
from typing import Any, Optional

import jax
import numpy as np

# The version of ``meta``; checkpoints without it predate the checks.
FORMAT = 2

# Test hook (tests/test_checkpoint_faults.py): "STEP:MARKER" makes the save of
# step STEP stop for good once all its items are written, just before orbax
# commits it (renames the temporary directory), after writing the path of
# that directory to the file MARKER; the test then kills the process.
STALL_ENV = 'OPTAX_FAC_TEST_STALL_CHECKPOINT'

_SHOWN = 10  # differing leaves listed in a mismatch error


class CheckpointMismatchError(ValueError):
  """A checkpoint that was written by another optimizer or parameter tree."""


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'Checkpoints need orbax-checkpoint (pip install orbax-checkpoint), or '
        'set config.checkpoint_every_steps=0.') from e
  return ocp


def _to_saveable(state: dict) -> dict:
  out = {}
  for key, value in state.items():
    if key == 'opt_state':
      leaves = jax.tree.leaves(value)
      value = {f'{i:05d}': leaf for i, leaf in enumerate(leaves)}
    if jax.tree.leaves(value):
      out[key] = value
  return out


def _from_saveable(saved: dict, template: dict) -> dict:
  out = {}
  for key, value in template.items():
    if key == 'opt_state':
      treedef = jax.tree.structure(value)
      leaves = saved.get('opt_state', {})
      out[key] = jax.tree.unflatten(
          treedef, [leaves[k] for k in sorted(leaves)])
    else:
      out[key] = saved.get(key, value)
  return out


def _leaf_type(x) -> str:
  """'float32[8,6]': the dtype and shape of an array or ShapeDtypeStruct."""
  return f'{x.dtype}[{",".join(str(d) for d in np.shape(x))}]'


def tree_spec(state: Any) -> dict[str, str]:
  """``{leaf path: 'dtype[shape]'}`` of a tree (paths: ``keystr``)."""
  return {jax.tree_util.keystr(path): _leaf_type(x)
          for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def config_hash(config: Any) -> str:
  """A short stable hash of a JSON-able config."""
  text = json.dumps(config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(state: dict, optimizer: Optional[str] = None,
             config: Optional[dict] = None) -> dict:
  """The ``meta`` item of a checkpoint of ``state`` (JSON-able)."""
  config = json.loads(json.dumps(config, default=str)) if config else None
  return {
      'format': FORMAT,
      'optimizer': optimizer,
      'config': config,
      'config_hash': config_hash(config) if config else None,
      'tree': tree_spec(state),
      'opt_state_structure': str(jax.tree.structure(state.get('opt_state'))),
  }


def _flat_items(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat_items(v, f'{prefix}.{k}' if prefix else str(k)))
    return out
  return {prefix: d}


def _capped(lines: list[str]) -> list[str]:
  if len(lines) <= _SHOWN:
    return lines
  return lines[:_SHOWN] + [f'  ... and {len(lines) - _SHOWN} more']


def _by_rank(spec: dict[str, str]) -> dict[str, str]:
  """``spec`` with the params first and the optimizer state last."""
  order = ("['params']", "['model_state']", '', "['opt_state']")

  def rank(path):
    return max(i for i, p in enumerate(order) if path.startswith(p))
  return {p: spec[p] for p in sorted(spec, key=rank)}


def mismatches(saved: dict, current: dict) -> list[str]:
  """What differs between two :func:`describe` results (empty: compatible).

  Compared: the optimizer name (where both are known), the leaf paths and
  their dtypes and shapes, and the optimizer state's tree structure.
  """
  lines = []
  if (saved.get('optimizer') and current.get('optimizer')
      and saved['optimizer'] != current['optimizer']):
    lines.append(f'  optimizer: checkpoint {saved["optimizer"]!r}, this run '
                 f'{current["optimizer"]!r}')
  old, new = _by_rank(saved['tree']), _by_rank(current['tree'])
  lines += _capped([f'  {p}: checkpoint {old[p]}, this run {new[p]}'
                    for p in old if p in new and old[p] != new[p]])
  lines += _capped([f'  {p} ({old[p]}): only in the checkpoint'
                    for p in old if p not in new])
  lines += _capped([f'  {p} ({new[p]}): only in this run'
                    for p in new if p not in old])
  if not lines and (saved.get('opt_state_structure')
                    != current.get('opt_state_structure')):
    lines.append('  the optimizer state has the same leaves in another tree '
                 f'structure:\n    checkpoint: '
                 f'{saved.get("opt_state_structure")}\n    this run:   '
                 f'{current.get("opt_state_structure")}')
  return lines


def config_differences(saved: Optional[dict],
                       current: Optional[dict]) -> list[str]:
  """``'key: old -> new'`` for every differing (flattened) config field."""
  if not saved or not current:
    return []
  old, new = _flat_items(saved), _flat_items(current)
  return [f'{k}: {old.get(k, "<unset>")!r} -> {new.get(k, "<unset>")!r}'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _stalling_path_class(ocp, step: int, marker: str):
  """A temporary-path class whose commit of ``step`` never happens (tests)."""
  base = ocp.path.atomicity.AtomicRenameTemporaryPath

  class StallingTemporaryPath(base):

    async def finalize(self, *args, **kwargs):
      if self.get_final().name == str(step):
        with open(marker + '.tmp', 'w') as f:
          f.write(str(self.get()))
        os.replace(marker + '.tmp', marker)
        while True:  # until the test kills the process
          await asyncio.sleep(60)
      return await super().finalize(*args, **kwargs)

  return StallingTemporaryPath


class Checkpointer:
  """Saves / restores ``(train state dict, data state)`` under ``directory``.

  Args:
    directory: where the step directories go.
    max_to_keep: checkpoints kept (the oldest are deleted); None keeps all.
    optimizer: the optimizer's name, stored and checked on restore.
    config: the run's config (JSON-able), stored with its hash; a restore
      under a different one warns with the fields that differ.
  """

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2, *,
               optimizer: Optional[str] = None,
               config: Optional[dict] = None):
    ocp = _ocp()
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.optimizer = optimizer
    self.config = config
    extra = {}
    stall = os.environ.get(STALL_ENV)
    if stall:
      step, marker = stall.split(':', 1)
      extra['temporary_path_class'] = _stalling_path_class(ocp, int(step),
                                                           marker)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            cleanup_tmp_directories=True, **extra))

  def latest_step(self) -> Optional[int]:
    """The newest finished step (None if there is none)."""
    return self._mgr.latest_step()

  def save(self, step: int, state: dict, data_state: dict) -> None:
    """Starts saving ``state`` and ``data_state`` as ``step`` (asynchronous)."""
    ocp = self._ocp
    meta = describe(state, self.optimizer, self.config)
    self._mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  def metadata(self, step: Optional[int] = None) -> Optional[dict]:
    """The ``meta`` item of ``step`` (default: latest); None if it has none."""
    ocp = self._ocp
    self._mgr.wait_until_finished()
    step = self._mgr.latest_step() if step is None else step
    if step is None or not os.path.isdir(
        os.path.join(self.directory, str(step), 'meta')):
      return None
    return self._mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def check(self, template: dict, step: Optional[int] = None) -> None:
    """Raises :class:`CheckpointMismatchError` if ``step`` does not fit.

    Args:
      template: the state of this run (arrays or ``jax.ShapeDtypeStruct``).
      step: the checkpoint step (default: the latest).
    """
    step = self._mgr.latest_step() if step is None else step
    saved = self.metadata(step)
    if saved is None:
      return
    current = describe(template, self.optimizer, self.config)
    lines = mismatches(saved, current)
    if lines:
      raise CheckpointMismatchError(
          f'The checkpoint {os.path.join(self.directory, str(step))} was '
          'written by another optimizer or parameter tree:\n'
          + '\n'.join(lines) + '\nRestore it with the config it was written '
          'with (config.json next to it), or start in a new directory.')
    changed = config_differences(saved.get('config'), current.get('config'))
    if changed:
      warnings.warn(
          f'Restoring {os.path.join(self.directory, str(step))} under a '
          'changed config: ' + '; '.join(changed), stacklevel=2)

  def restore(self, template: dict, step: Optional[int] = None):
    """Returns ``(state, data_state)`` of ``step`` (default: the latest).

    Args:
      template: the state's structure, dtypes, shapes and shardings: arrays
        or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      step: the checkpoint step (default: the latest finished one).

    Raises:
      FileNotFoundError: no finished checkpoint.
      CheckpointMismatchError: the checkpoint's optimizer, leaf paths, dtypes
        or shapes differ from ``template``'s (see :meth:`check`).
    """
    ocp = self._ocp
    self._mgr.wait_until_finished()
    step = self._mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    self.check(template, step)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                       sharding=getattr(x, 'sharding', None)),
        _to_saveable(template))
    restored = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=ocp.args.JsonRestore()))
    return _from_saveable(restored['state'], template), restored['data']

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def has_checkpoint(directory: str) -> bool:
  """True if ``directory`` holds at least one finished checkpoint step."""
  if not os.path.isdir(directory):
    return False
  return any(d.isdigit() for d in os.listdir(directory))
