"""Background prefetching for resumable iterators (``get_state``/``set_state``)."""

from __future__ import annotations

import queue
import threading


class Prefetch:
  """Runs an iterator with get_state() in a thread, ``size`` batches ahead.

  ``get_state()`` is the state after the last batch *returned*, so
  checkpoints stay exact although the producer is ahead.
  """

  def __init__(self, it, size: int = 2):
    self._it = it
    self._size = size
    self._state = it.get_state()
    self._start()

  def _start(self):
    self._q = queue.Queue(self._size)
    self._stop = threading.Event()

    def work():
      try:
        for batch in self._it:
          item = (batch, self._it.get_state())
          while not self._stop.is_set():
            try:
              self._q.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
          if self._stop.is_set():
            return
        self._q.put(StopIteration)
      except BaseException as e:  # surfaced in the consumer
        self._q.put(e)

    self._thread = threading.Thread(target=work, daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    item = self._q.get()
    if item is StopIteration:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict:
    return self._state

  def set_state(self, state: dict) -> None:
    self.close()
    self._it.set_state(state)
    self._state = self._it.get_state()
    self._start()

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
