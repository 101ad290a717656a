"""Multi-process setup and data/state-parallel training checks.

Two parts:

* :func:`initialize` — the multi-host entry: calls ``jax.distributed.initialize``
  when asked (``enabled=True``, e.g. from ``scripts/train.py --distributed``)
  or when the standard environment variables are set
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
  ``JAX_LOCAL_DEVICE_IDS`` is read by JAX itself). Must run before anything
  touches a JAX backend. :func:`global_batch` turns each process's slice of
  the data into one global array sharded over the mesh's data axis.
* equivalence checks behind ``tests/test_parallel.py`` and
  ``scripts/parallel_check.py``: one training step of a tiny model (with a
  scanned/stacked layer) run on one device, with ``jax.pmap`` (gradients
  ``pmean``-ed, state replicated), with ``jax.jit`` over a 1-D data mesh
  (batch sharded, params and state replicated) and with ``jax.jit`` over a
  2-D ``('data', 'model')`` mesh with params sharded and the optimizer state
  sharded by :func:`optax_fac.state_shardings`. Only jax/optax are needed.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_fac

# --------------------------------------------------------------------------
# Multi-process initialisation.

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def _already_initialized() -> bool:
  try:
    from jax._src import distributed as _dist  # pylint: disable=g-import-not-at-top
    return _dist.global_state.client is not None
  except Exception:  # pylint: disable=broad-except
    return False


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
  if enabled and not _already_initialized():
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout)
    did = True
  return dict(initialized=did or _already_initialized(),
              process_index=jax.process_index(),
              process_count=jax.process_count(),
              local_device_count=jax.local_device_count(),
              device_count=jax.device_count())


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh,
                 spec: P = P('data')) -> Any:
  """One global array per leaf from each process's slice of the batch.

  Each process passes its own rows (``global rows / process_count`` of
  them); the result is sharded by ``spec`` over ``mesh`` (rows split over
  the data axis).
  """
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


# --------------------------------------------------------------------------
# Named optimizers under test.

NAMED_OPTIMIZERS = (
    'hfac', 'sign_fsgd', 'lion_factor', 'adafactor_momentum',      # §1-2
    'adadiag', 'adadiag_pp', 'adafac_diag', 'adafac_diag_pp',       # §3
    'hfac_diag',
    'smmf',                                                          # §4
    'adam_sn', 'adam_snsm', 'rmsprop_sn', 'adagrad_sn',             # §5
)


def available_named_optimizers() -> list[str]:
  """The names of :data:`NAMED_OPTIMIZERS` that optax_fac exports."""
  return [n for n in NAMED_OPTIMIZERS if hasattr(optax_fac, n)]


# Structural settings that make the tiny problem exercise the expensive
# paths: refresh the basis / projector at every step, a subspace rank below
# the matrix size. Only names the factory accepts are passed.
_TEST_KWARGS = dict(
    learning_rate=1e-2, weight_decay=0.1,
    every=1, update_proj_gap=1, proj_every=1, refresh_every=1,
    rank=4,
)

HIDDEN = 8
LAYERS = 2


def stacked_views(params: Any) -> Any:
  """Views: the scanned 'stack' leaf (L, in, out) has its layer axis as batch."""
  return {k: (optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))
              if k == 'stack' else None) for k in params}


def make_named(name: str, **overrides) -> optax.GradientTransformation:
  """Builds a named optimizer with the test settings its signature accepts."""
  fn = getattr(optax_fac, name)
  accepted = inspect.signature(fn).parameters
  kwargs = {k: v for k, v in {**_TEST_KWARGS, **overrides}.items()
            if k in accepted}
  if 'views' in accepted and 'views' not in kwargs:
    kwargs['views'] = stacked_views
  return fn(**kwargs)


# --------------------------------------------------------------------------
# A tiny model with a scanned (stacked) layer. Every matrix is square so
# that both sides' Gram matrices are full rank (rotation bases are then
# unique and comparable across runs).


def toy_params(seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  s = 1.0 / math.sqrt(hidden)
  return {
      'w_in': jax.random.normal(k[0], (hidden, hidden)) * s,
      'b_in': jnp.zeros((hidden,)),
      'stack': jax.random.normal(k[1], (layers, hidden, hidden)) * s,
      'w_out': jax.random.normal(k[2], (hidden, hidden)) * s,
      'b_out': jnp.full((hidden,), 0.1),
  }


def toy_batch(batch_size: int, seed: int = 1, hidden: int = HIDDEN):
  kx, ka = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (batch_size, hidden))
  a = jax.random.normal(ka, (hidden, hidden))
  return x, jnp.sin(x @ a)


def toy_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params['w_in'] + params['b_in'])
  h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h,
                      params['stack'])
  out = h @ params['w_out'] + params['b_out']
  return jnp.mean((out - y) ** 2)


def toy_param_specs(data: str = 'data', model: str = 'model'):
  """2-D sharding: rows on one mesh axis, columns on the other (both ways)."""
  return {'w_in': P(data, model), 'b_in': P(model),
          'stack': P(None, data, model), 'w_out': P(model, data),
          'b_out': P(None)}


def train_step(tx, loss_fn=toy_loss, axis_name: Optional[str] = None):
  """(params, state, batch) -> (params, state, loss); pmean if axis_name."""

  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      loss = jax.lax.pmean(loss, axis_name)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


# --------------------------------------------------------------------------
# The four ways of running the same steps.


def run_single(tx, params, batch, steps: int, device=None):
  device = device or jax.devices()[0]
  params, batch = jax.device_put((params, batch), device)
  state = jax.jit(tx.init)(params)
  step = jax.jit(train_step(tx))
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state


def _replicas_max_diff(tree) -> float:
  """Largest difference between copies of the same block on different devices."""
  worst = 0.0
  for x in jax.tree.leaves(tree):
    groups: dict = {}
    for shard in x.addressable_shards:
      key = tuple((s.start, s.stop) for s in shard.index)
      groups.setdefault(key, []).append(np.asarray(shard.data))
    for copies in groups.values():
      for c in copies[1:]:
        if c.dtype.kind in 'iub':
          d = float(np.max(c != copies[0])) if c.size else 0.0
        else:
          d = float(np.max(np.abs(c.astype(np.float64)
                                  - copies[0].astype(np.float64)))) \
              if c.size else 0.0
        worst = max(worst, d)
  return worst


def run_pmap(tx, params, batch, steps: int, devices=None):
  """``jax.pmap``: state replicated, per-device batch slice, grads pmean-ed."""
  devices = list(devices or jax.local_devices())
  n = len(devices)
  stack = lambda t: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), t)
  split = lambda t: jax.tree.map(
      lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), t)
  step = jax.pmap(train_step(tx, axis_name='dev'), axis_name='dev',
                  devices=devices)
  init = jax.pmap(tx.init, devices=devices)
  params_r = stack(params)
  state_r = init(params_r)
  batch_r = split(batch)
  for _ in range(steps):
    params_r, state_r, _ = step(params_r, state_r, batch_r)
  # Replicas must agree: compare every device's copy with device 0's.
  diff = 0.0
  for x in jax.tree.leaves((params_r, state_r)):
    a = np.asarray(x)
    if a.size and a.dtype.kind == 'f':
      diff = max(diff, float(np.max(np.abs(a - a[:1]))))
    elif a.size:
      diff = max(diff, float(np.max(a != a[:1])))
  first = lambda t: jax.tree.map(lambda x: np.asarray(x)[0], t)
  return first(params_r), first(state_r), diff


def run_mesh_dp(tx, params, batch, steps: int, devices=None):
  """``jax.jit`` over a 1-D mesh: batch sharded, params/state replicated."""
  devices = list(devices or jax.devices())
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  params = jax.device_put(params, rep)
  batch = jax.device_put(batch, data)
  state = jax.jit(tx.init, out_shardings=rep)(params)
  step = jax.jit(train_step(tx), in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep, rep))
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state, _replicas_max_diff((params, state))


def mesh_2d_shape(n: int, dim: int = HIDDEN) -> tuple[int, int]:
  """(data, model) sizes for n devices: model = 2 if n is even, data | dim."""
  model = 2 if n % 2 == 0 and dim % 2 == 0 else 1
  data = n // model
  while dim % data:
    data -= 1
  return data, model


def run_sharded_2d(tx, params, batch, steps: int, devices=None,
                   param_specs=None, views=None):
  """``jax.jit`` over a ('data', 'model') mesh: params and state sharded.

  The state's shardings come from :func:`optax_fac.state_shardings`;
  ``jax.jit(tx.init, out_shardings=...)`` builds it directly sharded.
  Returns (params, state, replica difference, state shardings).
  """
  devices = list(devices or jax.devices())
  d, m = mesh_2d_shape(len(devices))
  mesh = jax.sharding.Mesh(np.array(devices[:d * m]).reshape(d, m),
                           ('data', 'model'))
  param_specs = param_specs or toy_param_specs()
  p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                      is_leaf=lambda x: isinstance(x, P))
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params, p_sh)
  s_sh = optax_fac.state_shardings(tx, abstract, views=views)
  data = NamedSharding(mesh, P('data'))
  rep = NamedSharding(mesh, P())
  params = jax.device_put(params, p_sh)
  batch = jax.device_put(batch, data)
  state = jax.jit(tx.init, out_shardings=s_sh)(params)
  step = jax.jit(train_step(tx), in_shardings=(p_sh, s_sh, data),
                 out_shardings=(p_sh, s_sh, rep))
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state, _replicas_max_diff((params, state)), s_sh


# --------------------------------------------------------------------------
# Comparison.


def tree_max_rel_diff(a: Any, b: Any) -> float:
  """max over leaves of max|a - b| / max(max|b|, 1e-30); ints: mismatch rate."""
  worst = 0.0
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), (len(la), len(lb))
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape,
                                                        x.dtype, y.dtype)
    if not x.size:
      continue
    if x.dtype.kind in 'iub':
      worst = max(worst, float(np.mean(x != y)))
    else:
      x64, y64 = x.astype(np.float64), y.astype(np.float64)
      scale = max(float(np.max(np.abs(y64))), 1e-30)
      worst = max(worst, float(np.max(np.abs(x64 - y64))) / scale)
  return worst


@dataclasses.dataclass
class CheckResult:
  name: str
  mode: str
  params_diff: float   # relative, vs the single-device run
  state_diff: float    # relative, vs the single-device run
  replica_diff: float  # between copies of one block on different devices
  seconds: float
  ok: bool
  error: str = ''


def check_optimizer(name: str, modes=('pmap', 'mesh_dp', 'sharded_2d'), *,
                    steps: int = 2, devices=None, tol: float = 1e-4,
                    batch_size: Optional[int] = None) -> list[CheckResult]:
  """Runs ``name`` single-device and in each mode; compares params and state."""
  devices = list(devices or jax.devices())
  n = len(devices)
  if batch_size is None:
    batch_size = n * max(2, -(-16 // n))
  params = toy_params()
  batch = toy_batch(batch_size)
  tx = make_named(name)
  ref_p, ref_s = run_single(tx, params, batch, steps, devices[0])
  out = []
  for mode in modes:
    t0 = time.perf_counter()
    try:
      if mode == 'pmap':
        p, s, rep = run_pmap(tx, params, batch, steps, devices)
      elif mode == 'mesh_dp':
        p, s, rep = run_mesh_dp(tx, params, batch, steps, devices)
      elif mode == 'sharded_2d':
        p, s, rep, _ = run_sharded_2d(tx, params, batch, steps, devices)
      else:
        raise ValueError(f'unknown mode {mode!r}')
      pd, sd = tree_max_rel_diff(p, ref_p), tree_max_rel_diff(s, ref_s)
      ok = pd <= tol and sd <= tol and rep == 0.0
      out.append(CheckResult(name, mode, pd, sd, rep,
                             time.perf_counter() - t0, ok))
    except Exception as e:  # pylint: disable=broad-except
      out.append(CheckResult(name, mode, float('nan'), float('nan'),
                             float('nan'), time.perf_counter() - t0, False,
                             f'{type(e).__name__}: {e}'[:500]))
  return out
