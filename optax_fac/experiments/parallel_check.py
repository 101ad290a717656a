"""Data-parallel and sharded-state equivalence checks on a toy problem.

The support behind ``tests/test_parallel.py``, ``tests/test_multihost.py`` and
``scripts/parallel_check.py``: one training step of a tiny model (with a
scanned/stacked layer) run on one device, with ``jax.pmap`` (gradients
``pmean``-ed, state replicated), with ``jax.jit`` over a 1-D data mesh (batch
sharded, params and state replicated) and with ``jax.jit`` over a 2-D
``('data', 'model')`` mesh with params sharded and the optimizer state sharded
by :func:`optax_fac.state_shardings`. Every named optimizer
(:data:`optax_fac.NAMED_OPTIMIZERS`) is built by :func:`make_named`. Only
jax/optax are needed.

The multi-host support of the training loop is in
:mod:`optax_fac.experiments.distributed`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_fac

# --------------------------------------------------------------------------
# The named optimizers under test: optax_fac.NAMED_OPTIMIZERS, each with
# explicit settings.

# Given to every named optimizer: weight decay on, and ``views`` (the scanned
# layer's stacked leaf, :func:`stacked_views`).
COMMON_KWARGS = dict(learning_rate=1e-2, weight_decay=0.1)

# Per optimizer, on top of COMMON_KWARGS: the settings that make the tiny
# problem exercise its expensive paths. ``every=1``: refresh the basis /
# projector at every step; ``rank=4``: a subspace rank below the matrix size
# (8). Passed as they are (a factory without one of them raises), and
# :func:`named_kwargs` checks that every factory taking one of these
# arguments is listed with it, so none silently runs on its defaults.
PATH_KWARGS = {
    'adadiag': dict(every=1),
    'adadiag_pp': dict(every=1),
    'adafac_diag': dict(every=1),
    'adafac_diag_pp': dict(every=1),
    'hfac_diag': dict(every=1),
    'adam_snsm': dict(every=1, rank=4),
}
# The arguments PATH_KWARGS sets.
PATH_ARGUMENTS = frozenset(k for kw in PATH_KWARGS.values() for k in kw)

HIDDEN = 8
LAYERS = 2


def stacked_views(params: Any) -> Any:
  """Views: the scanned 'stack' leaf (L, in, out) has its layer axis as batch."""
  return {k: (optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))
              if k == 'stack' else None) for k in params}


def named_kwargs(name: str) -> dict:
  """The test settings of ``optax_fac.NAMED_OPTIMIZERS[name]``.

  :data:`COMMON_KWARGS`, ``views=stacked_views`` and ``PATH_KWARGS[name]``.

  Raises:
    KeyError: ``name`` (or a key of :data:`PATH_KWARGS`) is not a named
      optimizer.
    TypeError: the factory lacks one of these arguments, or takes one of
      :data:`PATH_ARGUMENTS` that ``PATH_KWARGS[name]`` does not set.
  """
  unknown = sorted(set(PATH_KWARGS) - set(optax_fac.NAMED_OPTIMIZERS))
  if unknown:
    raise KeyError(f'PATH_KWARGS names {unknown}, which are not in '
                   'optax_fac.NAMED_OPTIMIZERS.')
  if name not in optax_fac.NAMED_OPTIMIZERS:
    raise KeyError(f'{name!r} is not in optax_fac.NAMED_OPTIMIZERS: '
                   f'{", ".join(optax_fac.NAMED_OPTIMIZERS)}.')
  kwargs = {**COMMON_KWARGS, 'views': stacked_views,
            **PATH_KWARGS.get(name, {})}
  accepted = inspect.signature(optax_fac.NAMED_OPTIMIZERS[name]).parameters
  if any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
    raise TypeError(f'optax_fac.{name} takes **kwargs: its arguments cannot '
                    'be checked.')
  missing = sorted(k for k in kwargs if k not in accepted)
  if missing:
    raise TypeError(f'optax_fac.{name} takes no {missing}; update '
                    'COMMON_KWARGS / PATH_KWARGS in '
                    'optax_fac/experiments/parallel_check.py.')
  unset = sorted(k for k in PATH_ARGUMENTS
                 if k in accepted and k not in kwargs)
  if unset:
    raise TypeError(f'optax_fac.{name} takes {unset}, which PATH_KWARGS '
                    f'does not set for it (the test would run on its '
                    f'defaults); add them to PATH_KWARGS[{name!r}].')
  return kwargs


def make_named(name: str, **overrides):
  """``optax_fac.NAMED_OPTIMIZERS[name]`` with :func:`named_kwargs`.

  ``overrides`` replace or add arguments (passed as they are).

  Returns:
    ``(tx, views)``: the transformation and the ``views`` it was built with.
  """
  kwargs = {**named_kwargs(name), **overrides}
  return optax_fac.NAMED_OPTIMIZERS[name](**kwargs), kwargs['views']


# --------------------------------------------------------------------------
# The problem: a small multi-output least-squares "model" with a scanned
# (stacked) layer, built so that every matrix gradient has well separated
# singular values. [decided] Why not a random MLP: its gradients have
# singular values down to ~1e-3 of the largest, whose Gram eigenvectors are
# determined only to ~1e-4 in float32, so a rotation basis computed from
# gradients summed in another order (any data-parallel run) legitimately
# differs by more than float32 tolerance. Here x has orthogonal columns
# (xᵀx = B·I, 1ᵀx = 0), so at the start G = U diag(s) Vᵀ / 4 exactly with
# s = 1, 7/8, ..., 1/8 (Gram eigenvalue gaps >= 3/64 of the largest).


def _hadamard(n: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def toy_problem(batch_size: int = 16, seed: int = 0, hidden: int = HIDDEN,
                layers: int = LAYERS):
  """(params, batch) of the test problem; ``batch_size`` a multiple of 16."""
  assert batch_size % 16 == 0 and hidden <= 15, (batch_size, hidden)
  rng = np.random.default_rng(seed)
  x = np.tile(_hadamard(16)[:, 1:hidden + 1], (batch_size // 16, 1))
  s = np.linspace(1.0, 1.0 / hidden, hidden)

  def orth():
    q, _ = np.linalg.qr(rng.normal(size=(hidden, hidden)))
    return q

  def w0():
    return rng.normal(size=(hidden, hidden)) / math.sqrt(hidden)

  def target(w):  # W* with G(W) = (W − W*) / 4 = U diag(s) Vᵀ / 4
    return w - orth() @ np.diag(s) @ orth().T

  params = {'w_in': w0(), 'b_in': np.zeros(hidden),
            'stack': np.stack([w0() for _ in range(layers)]),
            'w_out': w0(), 'b_out': np.full(hidden, 0.1)}
  b_in_t = rng.normal(size=hidden)
  b_out_t = rng.normal(size=hidden)
  y = {'in': x @ target(params['w_in']) + b_in_t,
       'stack': np.stack([x @ target(w) for w in params['stack']], axis=1),
       'out': x @ target(params['w_out']) + b_out_t}
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  return f32(params), f32((x, y))


def toy_loss(params, batch):
  """Σ over the matrices of mean_rows ‖x W + b − Y‖² / hidden."""
  x, y = batch
  sq = lambda r: jnp.mean(jnp.sum(r * r, axis=-1)) / r.shape[-1]
  loss = sq(x @ params['w_in'] + params['b_in'] - y['in'])
  loss += sq(x @ params['w_out'] + params['b_out'] - y['out'])

  def layer(total, wy):
    w, yl = wy
    return total + sq(x @ w - yl), None

  stack_loss, _ = jax.lax.scan(layer, 0.0, (params['stack'],
                                            jnp.swapaxes(y['stack'], 0, 1)))
  return loss + stack_loss


def toy_param_specs(data: str = 'data', model: str = 'model'):
  """2-D sharding: rows on one mesh axis, columns on the other (both ways)."""
  return {'w_in': P(data, model), 'b_in': P(model),
          'stack': P(None, data, model), 'w_out': P(model, data),
          'b_out': P(None)}


# --------------------------------------------------------------------------
# Several optimizers in one program (one compilation per mode for all of
# them): each gets its own copy of the params; the loss is the sum of the
# copies' losses, so each copy's gradient is exactly its own.


def combine(txs: dict) -> optax.GradientTransformationExtraArgs:
  """One transformation over ``{name: params}`` running ``txs[name]`` each."""

  def init_fn(params):
    return {k: tx.init(params[k]) for k, tx in txs.items()}

  def update_fn(updates, state, params=None, **extra_args):
    outs = {k: tx.update(updates[k], state[k],
                         None if params is None else params[k], **extra_args)
            for k, tx in txs.items()}
    return {k: o[0] for k, o in outs.items()}, {k: o[1] for k, o in
                                               outs.items()}

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def combined_loss(params_all, batch):
  return sum(toy_loss(p, batch) for p in params_all.values())


def train_step(tx, loss_fn=combined_loss, axis_name: Optional[str] = None):
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
# The four ways of running the same steps. ``txs``: {name: tx}.


def param_copies(txs: dict, params) -> dict:
  """One copy of ``params`` per optimizer: ``{name: params}``."""
  return {k: params for k in txs}


def run_single(txs: dict, params, batch, steps: int, device=None):
  """Reference: everything on one device.

  Returns:
    (params, state) after ``steps`` steps, and the initial state (host
    copies), which the replicated modes reuse instead of compiling init.
  """
  device = device or jax.devices()[0]
  tx = combine(txs)
  params, batch = jax.device_put((param_copies(txs, params), batch), device)
  state = jax.jit(tx.init)(params)
  state0 = jax.device_get(state)
  step = jax.jit(train_step(tx))
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state, state0


def replicas_max_diff(tree) -> float:
  """Largest difference between copies of one block on different devices.

  For every array, shards with the same index (copies of the same block on
  the devices it is replicated over) are compared; 0.0 means every device
  holds bit-identical values (a refreshed basis included).
  """
  worst = 0.0
  for x in jax.tree.leaves(tree):
    groups: dict = {}
    for shard in x.addressable_shards:
      key = tuple((s.start, s.stop) for s in shard.index)
      groups.setdefault(key, []).append(np.asarray(shard.data))
    for copies in groups.values():
      for c in copies[1:]:
        if not c.size:
          continue
        if c.dtype.kind in 'iub':
          worst = max(worst, float(np.max(c != copies[0])))
        else:
          worst = max(worst, float(np.max(np.abs(
              c.astype(np.float64) - copies[0].astype(np.float64)))))
  return worst


def run_pmap(txs: dict, params, batch, steps: int, devices=None,
             state0=None):
  """``jax.pmap``: state replicated, per-device batch slice, grads pmean-ed.

  ``state0``: the initial state to replicate (default: ``pmap(tx.init)``).
  """
  devices = list(devices or jax.local_devices())
  n = len(devices)
  tx = combine(txs)
  stack = lambda t: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), t)
  split = lambda t: jax.tree.map(
      lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), t)
  step = jax.pmap(train_step(tx, axis_name='dev'), axis_name='dev',
                  devices=devices)
  params_r = stack(param_copies(txs, params))
  if state0 is None:
    state_r = jax.pmap(tx.init, devices=devices)(params_r)
  else:
    state_r = stack(state0)
  batch_r = split(batch)
  for _ in range(steps):
    params_r, state_r, _ = step(params_r, state_r, batch_r)
  diff = 0.0  # every device's copy vs device 0's
  for x in jax.tree.leaves((params_r, state_r)):
    a = np.asarray(x)
    if a.size and a.dtype.kind == 'f':
      diff = max(diff, float(np.max(np.abs(a - a[:1]))))
    elif a.size:
      diff = max(diff, float(np.max(a != a[:1])))
  first = lambda t: jax.tree.map(lambda x: np.asarray(x)[0], t)
  return first(params_r), first(state_r), diff


def run_mesh_dp(txs: dict, params, batch, steps: int, devices=None,
                state0=None):
  """``jax.jit`` over a 1-D mesh: batch sharded, params/state replicated.

  ``state0``: the initial state to replicate (default: ``jit(tx.init)``).
  """
  devices = list(devices or jax.devices())
  tx = combine(txs)
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  params = jax.device_put(param_copies(txs, params), rep)
  batch = jax.device_put(batch, data)
  state = (jax.jit(tx.init, out_shardings=rep)(params) if state0 is None
           else jax.device_put(state0, rep))
  step = jax.jit(train_step(tx), in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep, rep))
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state, replicas_max_diff((params, state))


def mesh_2d_shape(n: int, dim: int = HIDDEN) -> tuple[int, int]:
  """(data, model) sizes for n devices: model = 2 if n is even, data | dim."""
  model = 2 if n % 2 == 0 and dim % 2 == 0 else 1
  data = n // model
  while dim % data:
    data -= 1
  return data, model


def mesh_2d(devices=None) -> jax.sharding.Mesh:
  devices = list(devices or jax.devices())
  d, m = mesh_2d_shape(len(devices))
  return jax.sharding.Mesh(np.array(devices[:d * m]).reshape(d, m),
                           ('data', 'model'))


def sharded_state_shardings(txs: dict, views: dict, params, mesh,
                            param_specs=None):
  """{name: state shardings} from :func:`optax_fac.state_shardings`."""
  param_specs = param_specs or toy_param_specs()
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=NamedSharding(mesh, s)),
      params, param_specs)
  return {k: optax_fac.state_shardings(tx, abstract, views=views.get(k))
          for k, tx in txs.items()}


def run_sharded_2d(txs: dict, params, batch, steps: int, devices=None, *,
                   views: Optional[dict] = None, param_specs=None):
  """``jax.jit`` over a ('data', 'model') mesh: params and state sharded.

  The state's shardings come from :func:`optax_fac.state_shardings`, and
  ``jax.jit(tx.init, out_shardings=...)`` builds it directly sharded.

  Returns:
    (params, state, replica difference, state shardings).
  """
  mesh = mesh_2d(devices)
  tx = combine(txs)
  param_specs = param_specs or toy_param_specs()
  p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                      is_leaf=lambda x: isinstance(x, P))
  s_sh = sharded_state_shardings(txs, views or {}, params, mesh, param_specs)
  p_sh = param_copies(txs, p_sh)
  data = NamedSharding(mesh, P('data'))
  rep = NamedSharding(mesh, P())
  params = jax.device_put(param_copies(txs, params), p_sh)
  batch = jax.device_put(batch, data)
  state = jax.jit(tx.init, out_shardings=s_sh)(params)
  step = jax.jit(train_step(tx), in_shardings=(p_sh, s_sh, data),
                 out_shardings=(p_sh, s_sh, rep))
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state, replicas_max_diff((params, state)), s_sh


# --------------------------------------------------------------------------
# Comparison and the check behind the tests and scripts/parallel_check.py.


def leaf_rel_diffs(a: Any, b: Any) -> list[float]:
  """Per leaf: max|a − b| / max|b| (floats); mismatch fraction (ints)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb):
    raise ValueError(f'trees differ: {len(la)} vs {len(lb)} leaves')
  out = []
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype:
      raise ValueError(f'leaf mismatch: {x.shape} {x.dtype} vs {y.shape} '
                       f'{y.dtype}')
    if not x.size:
      out.append(0.0)
    elif x.dtype.kind in 'iub':
      out.append(float(np.mean(x != y)))
    else:
      x64, y64 = x.astype(np.float64), y.astype(np.float64)
      scale = max(float(np.max(np.abs(y64))), 1e-30)
      out.append(float(np.max(np.abs(x64 - y64))) / scale)
  return out


def tree_max_rel_diff(a: Any, b: Any) -> float:
  return max(leaf_rel_diffs(a, b), default=0.0)


@dataclasses.dataclass
class CheckResult:
  name: str
  mode: str
  params_diff: float   # relative, vs the single-device run
  state_diff: float    # relative, vs the single-device run
  replica_diff: float  # between copies of one block on different devices
  seconds: float       # the whole mode for the group (compile included)
  ok: bool
  error: str = ''


MODES = ('pmap', 'mesh_dp', 'sharded_2d')
# 'sharded_2d_t': the same mesh with the param specs' mesh axes swapped (on
# 2 devices the mesh is (1, 2), so this is the row-sharded variant).
ALL_MODES = MODES + ('sharded_2d_t',)


def check_group(names: Sequence[str], modes: Sequence[str] = MODES, *,
                steps: int = 2, devices=None, tol: float = 1e-4,
                batch_size: Optional[int] = None) -> list[CheckResult]:
  """Runs the named optimizers one device vs each mode; compares everything.

  All ``names`` run in one program per mode (one compilation). A mode
  passes for an optimizer when its params and optimizer state after
  ``steps`` steps match the single-device run on the full batch to ``tol``
  (relative to each leaf's largest entry) and every device holds identical
  copies of every replicated block.
  """
  devices = list(devices or jax.devices())
  n = len(devices)
  if batch_size is None:
    batch_size = 16 * n // math.gcd(16, n)  # a multiple of 16 and of n
  params, batch = toy_problem(batch_size)
  built = {k: make_named(k) for k in names}
  txs = {k: b[0] for k, b in built.items()}
  views = {k: b[1] for k, b in built.items()}
  ref_p, ref_s, state0 = run_single(txs, params, batch, steps, devices[0])
  out = []
  for mode in modes:
    t0 = time.perf_counter()
    try:
      if mode == 'pmap':
        p, s, rep = run_pmap(txs, params, batch, steps, devices, state0)
      elif mode == 'mesh_dp':
        p, s, rep = run_mesh_dp(txs, params, batch, steps, devices, state0)
      elif mode in ('sharded_2d', 'sharded_2d_t'):
        specs = (toy_param_specs() if mode == 'sharded_2d'
                 else toy_param_specs(data='model', model='data'))
        p, s, rep, _ = run_sharded_2d(txs, params, batch, steps, devices,
                                      views=views, param_specs=specs)
      else:
        raise ValueError(f'unknown mode {mode!r}')
      dt = time.perf_counter() - t0
      for k in names:
        pd = tree_max_rel_diff(p[k], ref_p[k])
        sd = tree_max_rel_diff(s[k], ref_s[k])
        out.append(CheckResult(k, mode, pd, sd, rep, dt,
                               pd <= tol and sd <= tol and rep == 0.0))
    except Exception as e:  # pylint: disable=broad-except
      dt = time.perf_counter() - t0
      msg = f'{type(e).__name__}: {e}'[:800]
      out.extend(CheckResult(k, mode, float('nan'), float('nan'),
                             float('nan'), dt, False, msg) for k in names)
  return out
