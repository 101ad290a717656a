"""Multi-process (multi-host) support for the training loop.

:func:`initialize` calls ``jax.distributed.initialize`` when asked
(``enabled=True``, e.g. from ``scripts/train.py --distributed``) or when the
standard environment variables are set (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; ``JAX_LOCAL_DEVICE_IDS`` is read by
JAX itself). It must run before anything touches a JAX backend (creates an
array, asks for devices). Then :func:`data_mesh` is the 1-D ``('data',)`` mesh
the training loop (:mod:`optax_fac.experiments.train`) runs on,
:func:`process_rows` the block of a global batch's rows that this process
feeds, and :func:`global_batch` turns each process's rows into one global
array sharded over the mesh's data axis. Launch the same command once per
process, e.g. on two hosts::

    python scripts/train.py --distributed --coordinator_address=host0:1234 \
        --num_processes=2 --process_id={0,1} --config=... --workdir=SHARED

The data-parallel and sharded-state equivalence checks (a toy problem run on
one device, with ``jax.pmap`` and over meshes) are in
:mod:`optax_fac.experiments.parallel_check`.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def initialize(enabled: Optional[bool] = None, *,
               coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               initialization_timeout: int = 300) -> dict:
  """Calls ``jax.distributed.initialize`` when asked; returns a summary.

  Args:
    enabled: True: initialise (arguments, then the environment variables,
      then JAX's cluster auto-detection — SLURM, Open MPI, Kubernetes, Cloud
      TPU — fill in what is missing). False: never. None (default):
      initialise iff ``JAX_COORDINATOR_ADDRESS`` is set or a coordinator
      address is given.
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: total number of processes (env ``JAX_NUM_PROCESSES``).
    process_id: this process's index (env ``JAX_PROCESS_ID``).
    local_device_ids: restrict this process to some local devices.
    initialization_timeout: seconds to wait for all processes.

  Returns:
    ``dict(initialized=bool, process_index, process_count,
    local_device_count, device_count)``.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if enabled is None:
    enabled = coordinator_address is not None
  did = False
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout)
    did = True
  return dict(initialized=did or jax.distributed.is_initialized(),
              process_index=jax.process_index(),
              process_count=jax.process_count(),
              local_device_count=jax.local_device_count(),
              device_count=jax.device_count())


def is_main_process() -> bool:
  """True on process 0, the one that writes metrics, summaries and logs."""
  return jax.process_index() == 0


def data_mesh(devices: Optional[Sequence[Any]] = None,
              axis: str = 'data') -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices``.

  Default: every device of every process when there are several processes
  (data parallel over all of them), else the first local device (a
  single-process run keeps using one device, as before). [decided]
  """
  if devices is None:
    devices = (jax.devices() if jax.process_count() > 1
               else jax.local_devices()[:1])
  return jax.sharding.Mesh(np.array(list(devices)), (axis,))


def process_rows(num_rows: int, mesh: jax.sharding.Mesh,
                 axis: str = 'data') -> slice:
  """The rows of a global batch that this process feeds (one contiguous block).

  The batch's rows are split over ``axis`` in mesh order; this process's
  devices hold one contiguous block of them (process ``i`` of ``P`` gets rows
  ``[i·B/P, (i+1)·B/P)`` when the mesh lists devices by process, as
  :func:`data_mesh` does). Raises ValueError if ``num_rows`` is not divisible
  by the axis size or the block is not contiguous.
  """
  size = mesh.shape[axis]
  if num_rows % size:
    raise ValueError(f'The global batch ({num_rows} rows) must be divisible '
                     f'by the number of devices on the {axis!r} axis '
                     f'({size}).')
  sharding = NamedSharding(mesh, P(axis))
  starts = sorted({idx[0].start or 0 for idx in
                   sharding.addressable_devices_indices_map(
                       (num_rows,)).values()})
  block = num_rows // size
  if starts != list(range(starts[0], starts[0] + block * len(starts), block)):
    raise ValueError(f'This process\'s rows are not contiguous: {starts}.')
  return slice(starts[0], starts[-1] + block)


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh,
                 spec: P = P('data'),
                 global_rows: Optional[int] = None) -> Any:
  """One global array per leaf from each process's slice of the batch.

  Each process passes its own rows (``global rows / process_count`` of
  them, e.g. ``batch[process_rows(B, mesh)]``); the result is sharded by
  ``spec`` over ``mesh`` (rows split over the data axis). ``global_rows``:
  the global batch size (default: inferred, the processes' blocks being
  contiguous).
  """
  sharding = NamedSharding(mesh, spec)

  def one(x):
    x = np.asarray(x)
    shape = None if global_rows is None else (global_rows,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(one, local_batch)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh,
                axis: str = 'data') -> Any:
  """A host batch that every process holds in full -> one global array.

  Each process keeps only its :func:`process_rows` and
  :func:`global_batch` assembles them, so every process must pass the same
  batch (same data stream, as in ``train.py``).
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    return batch
  rows = int(np.shape(leaves[0])[0])
  sl = process_rows(rows, mesh, axis)
  local = jax.tree.map(lambda x: np.asarray(x)[sl], batch)
  return global_batch(local, mesh, P(axis), global_rows=rows)
