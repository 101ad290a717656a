"""Helpers shared by every transform: argument checks, decays, per-leaf maps."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_fac import matrix

STATS_DTYPE = jnp.float32


# --------------------------------------------------------------------------
# Hyperparameter checks. Only concrete Python/NumPy numbers are checked: under
# optax.inject_hyperparams the values are traced arrays and cannot be.


def _concrete(value) -> float | None:
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
    return float(value)
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    if value.ndim == 0:
      return float(value)
  return None


def check_nonnegative(name: str, value: Any) -> None:
  """Raises ValueError if ``value`` is a known negative (or NaN) number."""
  if callable(value):  # a schedule: checked when called, if at all
    return
  v = _concrete(value)
  if v is not None and not v >= 0:
    raise ValueError(f'{name} must be >= 0, got {value!r}.')


def check_unit_interval(name: str, value: Any, *, allow_none: bool = False,
                        closed: bool = False) -> None:
  """Raises ValueError unless ``value`` is in [0, 1) (or [0, 1] if closed)."""
  if value is None:
    if allow_none:
      return
    raise ValueError(f'{name} must be a number in [0, 1), got None.')
  v = _concrete(value)
  if v is None:
    return
  ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
  if not ok:
    interval = '[0, 1]' if closed else '[0, 1)'
    raise ValueError(f'{name} must be in {interval}, got {value!r}.')


def check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  v = _concrete(value)
  if v is not None and not v > 0:
    raise ValueError(f'{name} must be > 0, got {value!r}.')


def check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
      or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}.')


def check_float_params(params: Any, where: str) -> None:
  """Raises TypeError naming the first leaf that is not floating point."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]:
    if isinstance(leaf, optax.MaskedNode):
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f'{where}: parameter {matrix.leaf_path_str(path)} has dtype '
          f'{leaf.dtype}; only floating-point parameters can be optimized '
          '(mask integer leaves out, e.g. with optax.masked).')


def check_same_structure(updates: Any, reference: Any, where: str,
                         expected_shape: Callable[[Any, Any], tuple] | None
                         = None, views: Any = None) -> None:
  """Raises ValueError if ``updates`` does not match the tree seen at init.

  ``reference`` is a state tree with the params' structure. If
  ``expected_shape(update_leaf, view)`` is given, each reference leaf's shape
  must equal it (e.g. the row-statistic shape of the update's view).
  """
  got = jax.tree.structure(updates)
  want = jax.tree.structure(reference)
  if got != want:
    raise ValueError(
        f'{where}: the updates tree does not match the tree the optimizer '
        f'was initialised with.\n  init:   {want}\n  update: {got}')
  if expected_shape is None:
    return
  flat_views = got.flatten_up_to(views)
  for (path, u), r, view in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0],
      jax.tree.leaves(reference), flat_views):
    if tuple(expected_shape(u, view)) != tuple(r.shape):
      raise ValueError(
          f'{where}: update {matrix.leaf_path_str(path)} has shape '
          f'{tuple(u.shape)}, which does not match the state built at init '
          f'(statistic of shape {tuple(r.shape)}).')


def row_stat_shape(leaf, view) -> tuple:
  return view.row_stat_shape(leaf.shape)


# --------------------------------------------------------------------------
# Decays and counters (ALGORITHMS.md notation).


def time_corrected_decay(beta: Any, count: jax.Array) -> jax.Array:
  """β̂_t = β(1 − β^{t−1}) / (1 − β^t) for step t = ``count`` (t >= 1).

  The EMA x̂_t = β̂_t x̂_{t−1} + (1 − β̂_t) x_t equals the bias-corrected EMA
  m_t / (1 − β^t) exactly, so bias-corrected state can be stored directly.
  β̂_1 = 0. Computed in float32 whatever the parameter dtype.
  """
  beta = jnp.asarray(beta, jnp.float32)
  t = jnp.asarray(count, jnp.float32)
  denom = 1.0 - beta ** t
  return jnp.where(denom > 0, beta * (1.0 - beta ** (t - 1.0)) /
                   jnp.where(denom > 0, denom, 1.0), 0.0)


def ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
  """decay * old + (1 − decay) * new."""
  return decay * old + (1.0 - decay) * new


def increment(count: jax.Array) -> jax.Array:
  return optax.safe_increment(count)


def zero_count() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def f32(x: jax.Array) -> jax.Array:
  return x.astype(STATS_DTYPE)


def zeros(shape: Sequence[int], dtype=STATS_DTYPE) -> jax.Array:
  return jnp.zeros(tuple(shape), dtype)


def zeros_like_result(fn: Callable[[Any], jax.Array], x: Any) -> jax.Array:
  """Zeros with the shape, dtype and sharding ``fn(x)`` would have.

  Built through ``jax.eval_shape`` so that, under sharding-in-types, a reduced
  statistic inherits the sharding the update step will give it (the trick of
  optax's factorized.py); works on ``jax.ShapeDtypeStruct`` too.
  """
  return jnp.zeros_like(jax.eval_shape(fn, x))


# --------------------------------------------------------------------------
# Per-leaf maps over several trees with one treedef.


def map_leaves(fn: Callable[..., tuple], n_out: int, treedef_source: Any,
               *trees: Any) -> tuple:
  """Applies ``fn`` leaf-wise and returns ``n_out`` trees shaped like source.

  ``trees`` are flattened up to ``treedef_source``'s structure (so a tree of
  views, whose leaves are ``MatrixView`` objects, or trees whose leaves are
  ``None``, are accepted). ``fn`` returns a tuple of ``n_out`` values.
  """
  treedef = jax.tree.structure(treedef_source)
  flat = [treedef.flatten_up_to(t) for t in trees]
  outs = [fn(*args) for args in zip(*flat)]
  if not outs:
    return tuple(jax.tree.unflatten(treedef, []) for _ in range(n_out))
  return tuple(jax.tree.unflatten(treedef, [o[i] for o in outs])
               for i in range(n_out))
