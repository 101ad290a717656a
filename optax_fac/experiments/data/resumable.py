"""The step-indexed resumable iterator shared by the text and image batchers."""

from __future__ import annotations

from typing import Iterator

import numpy as np


class StepIterator:
  """Batches of ``num_items`` items where the batch at step s depends on s only.

  Items are visited in a fresh seeded permutation each epoch
  (``default_rng([seed, epoch])``), or in order with ``shuffle=False``;
  :meth:`batch_indices` gives the items of a step. Subclasses define
  ``batch_at(step)``; ``next()`` returns the batch of the current step and
  advances it. State = {'step': s}.
  """

  def __init__(self, num_items: int, batch_size: int, seed: int = 0,
               shuffle: bool = True):
    self.num_items = int(num_items)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.step = 0
    self._perms = {}  # the permutation of the latest epoch drawn

  def _perm(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_items)
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng(
          [self.seed, epoch]).permutation(self.num_items)}
    return self._perms[epoch]

  def batch_indices(self, step: int) -> np.ndarray:
    """The items of batch ``step``: positions step·B … step·B + B - 1 of the
    concatenated epochs' permutations."""
    flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    epochs, within = np.divmod(flat, self.num_items)
    idx = np.empty_like(flat)
    for e in np.unique(epochs):
      sel = epochs == e
      idx[sel] = self._perm(int(e))[within[sel]]
    return idx

  def batch_at(self, step: int) -> dict:
    raise NotImplementedError

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state['step'])
