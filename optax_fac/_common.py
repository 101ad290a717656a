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
# Decays and counters (docs/algorithms.md notation).


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
  """The library's float32 rule: ``x`` in float32 (statistics dtype).

  A ``jax.ShapeDtypeStruct`` (abstract init) becomes a float32 one with the
  same shape and sharding.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, STATS_DTYPE,
                                sharding=getattr(x, 'sharding', None))
  return x.astype(STATS_DTYPE)


def tree_f32(tree: Any) -> Any:
  """:func:`f32` of every leaf of ``tree``."""
  return jax.tree.map(f32, tree)


def moment_dtype(mu_dtype: Any, where: str = '') -> np.dtype:
  """The dtype of a first-moment buffer given a ``mu_dtype`` argument.

  None gives float32 (the library's float32 rule; in ``optax.adamw`` None
  means the parameter dtype). Otherwise the floating dtype ``mu_dtype``,
  canonicalized as ``optax`` does (float64 is float32 unless
  ``jax_enable_x64`` is on when this is called).

  Raises:
    ValueError: if ``mu_dtype`` is not a floating-point dtype.
  """
  if mu_dtype is None:
    return np.dtype(STATS_DTYPE)
  try:
    dtype = np.dtype(mu_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{where}mu_dtype must be a floating-point dtype or '
                     f'None, got {mu_dtype!r}.')
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


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


# --------------------------------------------------------------------------
# optax.tree_map_params support.
#
# optax.tree_map_params(tx, f, state) calls ``tx.init`` with a placeholder in
# place of the params (a pytree node with no children) and maps ``f`` over
# every part of the resulting state that is the placeholder again, i.e. every
# tree built by mapping over the params (Adam's moments). Factored statistics
# also have one entry per parameter but not the parameter's shape, so ``f``
# (a cast, a sharding) must not be mapped over them: their init puts the
# leaf :data:`NOT_PARAMS` there instead, and tree_map_params passes the real
# statistics through untouched (to ``transform_non_params``, if given).


class _NotParams:
  """Marks, in the state built from optax's params placeholder, a subtree
  that is not a copy of the params (factored statistics, stacked groups)."""

  def __repr__(self):
    return 'NOT_PARAMS'


NOT_PARAMS = _NotParams()


def is_params_placeholder(params: Any) -> bool:
  """True for the params stand-in of ``optax.tree_map_params``.

  That stand-in is a pytree node without children whose type is not one of
  the containers real params are made of; an empty dict/list/tuple (real
  params with no leaves) is not a placeholder.
  """
  if params is None or isinstance(params, (dict, list, tuple)):
    return False
  try:
    leaves, treedef = jax.tree.flatten(params)
  except TypeError:
    return False
  return not leaves and treedef.num_nodes == 1 and not isinstance(
      params, optax.MaskedNode)


def stats_or_marker(params: Any, build: Callable[[], Any]) -> Any:
  """``build()``, or :data:`NOT_PARAMS` for optax's params placeholder."""
  return NOT_PARAMS if is_params_placeholder(params) else build()


# --------------------------------------------------------------------------
# Integer settings under optax.inject_hyperparams.
#
# inject_hyperparams turns every int argument into an array, which is traced
# under jit. A *dynamic* integer (a refresh period) is used as an array. A
# *structural* one (which sides get a basis, a rank, a packing) decides
# shapes: it is read as a Python int where it is concrete, and update reads
# the structure from the state's shapes instead.


def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def structural_int(name: str, value: Any, default: int, *,
                   minimum: int = 1, where: str = '') -> int | None:
  """A structural integer setting as a Python int (None if traced).

  Args:
    name: the argument's name (for errors).
    value: None (use ``default``), an int, or a concrete integer array (what
      ``optax.inject_hyperparams`` passes); a traced array gives None (the
      caller then reads the structure from the state).
    default: the value None stands for.
    minimum: the smallest allowed value.
    where: the function, for messages.

  Raises:
    ValueError: for a non-integer or a value below ``minimum``.
  """
  if value is None:
    return default
  if is_traced(value):
    return None
  v = value
  if isinstance(v, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(v) != 0 or not jnp.issubdtype(v.dtype, jnp.integer):
      raise ValueError(f'{where}{name} must be an int, got {value!r}.')
    v = int(v)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ValueError(
        f'{where}{name} must be an int >= {minimum}, got {value!r}.')
  return int(v)


def traced_structural_error(names: Sequence[str], where: str) -> ValueError:
  """The error for structural settings that arrive traced at init."""
  listed = ', '.join(repr(n) for n in names)
  one = len(names) == 1
  return ValueError(
      f'{where}: {listed} {"decides" if one else "decide"} the shape of the '
      f'state and {"is" if one else "are"} traced here (optax.'
      'inject_hyperparams under jax.jit turns ints into traced arrays). Pass '
      f'static_args=({listed},) to optax.inject_hyperparams, or leave '
      f'{"it" if one else "them"} at the default (None).')


def check_dynamic_int(name: str, value: Any, where: str = '') -> None:
  """A positive integer that may be an (injected, traced) int array."""
  if is_traced(value):
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f'{where}{name} must be an int, got {value!r}.')
    return
  structural_int(name, value, 1, where=where)


def on_nvidia_gpu(kernel: Callable[..., Any], arrays: Callable[..., Any],
                  *args) -> Any:
  """``kernel(*args)`` where the step is lowered for CUDA, else ``arrays``.

  Decided at lowering (``jax.lax.platform_dependent``): a Pallas kernel
  branch is never lowered for other backends.
  """
  return jax.lax.platform_dependent(*args, cuda=kernel, default=arrays)


def check_static_bool(name: str, value: Any, where: str = '') -> None:
  """A Python (or NumPy) bool: an option that decides the program's shape."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{where}{name} must be a bool, got {value!r}.')


# --------------------------------------------------------------------------
# Masks: a bool tree (of any pytree type, callable modules included), a prefix
# of the params, or a function of the params (optax's rule: a mask is a
# function iff it is callable at every leaf).


def _paths(tree: Any, is_leaf=None) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def structure_mismatch(name: str, tree: Any, params: Any,
                       is_leaf=None) -> str:
  """A message naming the leaf paths where ``tree`` and ``params`` differ."""
  want = _paths(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  got = _paths(tree, is_leaf=is_leaf)
  missing = [p for p in want if not any(p.startswith(g) for g in got)]
  extra = [g for g in got if not any(p.startswith(g) for p in want)]
  parts = []
  if missing:
    parts.append('no entry for ' + ', '.join(missing[:5])
                 + (' ...' if len(missing) > 5 else ''))
  if extra:
    parts.append('entries not in the params: ' + ', '.join(extra[:5])
                 + (' ...' if len(extra) > 5 else ''))
  detail = '; '.join(parts) or (
      f'tree {jax.tree.structure(tree, is_leaf=is_leaf)} vs params '
      f'{jax.tree.structure(params)}')
  return (f'{name} must have the structure of the params (or be a prefix of '
          f'it, or a function of the params): {detail}.')


def resolve_mask(name: str, mask: Any, params: Any) -> Any:
  """The bool tree (params' structure) of a mask argument; None = all True.

  Raises:
    ValueError: naming ``name`` and the leaf paths, if the tree does not fit.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if mask is None:
    return jax.tree.map(lambda _: True, params, is_leaf=is_masked)
  tree = mask(params) if matrix.is_tree_function(mask) else mask

  def check(path, m):  # a bool, not anything truthy (``...``, a string)
    if not (is_masked(m) or isinstance(m, (bool, np.bool_)) or (
        getattr(m, 'dtype', None) == np.bool_ and np.ndim(m) == 0)):
      raise ValueError(
          f'{name}: a mask holds bools, got {m!r} at '
          f'{jax.tree_util.keystr(path) or "the root"}.')

  jax.tree_util.tree_map_with_path(check, tree, is_leaf=is_masked)
  try:
    return jax.tree.map(
        lambda m, p: jax.tree.map(lambda _: bool(m), p, is_leaf=is_masked),
        tree, params, is_leaf=is_masked)
  except (ValueError, TypeError):
    raise ValueError(structure_mismatch(name, tree, params)) from None
