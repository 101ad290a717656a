"""Orbax checkpoints of the full training state and the data position.

One checkpoint = the train state (step, params, model state such as BatchNorm
statistics, optimizer state, RNG key) saved with ``StandardSave`` and the data
iterator's state (a small JSON object) with ``JsonSave``, in one
``CheckpointManager`` step directory. The optimizer state is stored as its
flat list of leaves and rebuilt with the tree structure of a freshly
initialised state: optax states are NamedTuples with ``MaskedNode`` and
``None`` parts, which a restore without a target would turn into lists and
dicts (google/orbax#487, google-deepmind/ferminet#105).

Multi-process runs (``scripts/train.py --distributed``): every process
constructs the :class:`Checkpointer` and calls ``save`` / ``restore`` with
the same global arrays (orbax synchronises them and writes each array once),
so the directory must be one that every process sees.

orbax-checkpoint is imported on first use, so training without checkpoints
needs only jax, flax and optax.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np


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


class Checkpointer:
  """Saves / restores ``(train state dict, data state)`` under ``directory``."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2):
    ocp = _ocp()
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def save(self, step: int, state: dict, data_state: dict) -> None:
    ocp = self._ocp
    self._mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        data=ocp.args.JsonSave(data_state)))

  def restore(self, template: dict, step: Optional[int] = None):
    """Returns ``(state, data_state)``; ``template`` gives structure/shardings."""
    ocp = self._ocp
    self._mgr.wait_until_finished()
    step = self._mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
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
