"""How a parameter leaf is seen as a matrix (docs/algorithms.md §0).

This module is the one place that knows about axes, reshapes, batch axes and
square-matricization. Every transform in the library goes through it.

A :class:`MatrixView` names, for one leaf, which axes are **batch** axes
(handled independently, e.g. the layer axis of scanned layers), which are
folded into **rows** and which into **columns**. Row/column statistics are kept
in the parameter's own layout (a row statistic has the parameter's shape with
the column axes removed), so no transpose or reshape is needed for factored
statistics, and a row statistic's sharding is the parameter's sharding with
the column axes dropped.

Rules [decided]:

* ndim >= 2, default: the last axis is the column (output) axis, every other
  axis is folded into rows: ``(kh, kw, cin, cout) -> (kh*kw*cin, cout)``.
* ndim <= 1 leaves are not matrices. Named optimizers send them to a fallback
  (Adam). A raw ``scale_by_*`` transform that meets one views it as a
  ``1 x N`` row vector (rows=(), cols=(0,)); a scalar is ``1 x 1``. For the
  factored second moment this is exactly unfactored RMSprop on that leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """Which axes of a leaf are batch, row and column axes.

  Axes may be negative in a user's spec; :func:`resolve_view` normalises them
  against a shape. Not a pytree: a view is a leaf in a tree of views.
  """

  rows: tuple[int, ...]
  cols: tuple[int, ...]
  batch: tuple[int, ...] = ()

  def normalized(self, ndim: int, where: str = 'leaf') -> 'MatrixView':
    """Returns the view with non-negative axes, checking it covers ``ndim``."""
    def norm(axes, what):
      out = []
      for a in axes:
        if not -ndim <= a < ndim:
          raise ValueError(
              f'MatrixView for {where}: {what} axis {a} is out of range for a '
              f'{ndim}-d leaf.')
        out.append(a % ndim)
      return tuple(out)
    view = MatrixView(rows=norm(self.rows, 'row'), cols=norm(self.cols, 'col'),
                      batch=norm(self.batch, 'batch'))
    axes = view.batch + view.rows + view.cols
    if sorted(axes) != list(range(ndim)):
      raise ValueError(
          f'MatrixView for {where}: batch {view.batch}, rows {view.rows} and '
          f'cols {view.cols} must name every axis of the {ndim}-d leaf exactly '
          'once.')
    return view

  def stacked(self) -> 'MatrixView':
    """This view for the leaf stacked along a new leading (batch) axis."""
    def shift(axes):
      return tuple(a + 1 for a in axes)
    return MatrixView(rows=shift(self.rows), cols=shift(self.cols),
                      batch=(0,) + shift(self.batch))

  def dims(self, shape: Sequence[int]) -> tuple[int, int]:
    """(m, n): the number of rows and columns of one matrix of this view."""
    return (math.prod(shape[a] for a in self.rows),
            math.prod(shape[a] for a in self.cols))

  def batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[a] for a in self.batch)

  # -- Factored statistics in the parameter's own layout ------------------

  def row_stat_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of a per-row statistic: the leaf's shape without column axes."""
    return tuple(d for a, d in enumerate(shape) if a not in self.cols)

  def col_stat_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of a per-column statistic: the leaf's shape without row axes."""
    return tuple(d for a, d in enumerate(shape) if a not in self.rows)

  def row_sum(self, x: jax.Array) -> jax.Array:
    """Sums over the column axes: one value per row (per batch element)."""
    return jnp.sum(x, axis=self.cols)

  def col_sum(self, x: jax.Array) -> jax.Array:
    """Sums over the row axes: one value per column (per batch element)."""
    return jnp.sum(x, axis=self.rows)

  def row_mean(self, x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=self.cols)

  def col_mean(self, x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=self.rows)

  def expand_rows(self, r: jax.Array) -> jax.Array:
    """Broadcastable form of a row statistic against the leaf (r 1ᵀ)."""
    return jnp.expand_dims(r, self.cols)

  def expand_cols(self, c: jax.Array) -> jax.Array:
    """Broadcastable form of a column statistic against the leaf (1 cᵀ)."""
    return jnp.expand_dims(c, self.rows)

  def sum_rows_of_row_stat(self, r: jax.Array) -> jax.Array:
    """1ᵀ r for a row statistic, broadcastable against the leaf."""
    r_axes = [a for a in range(r.ndim + len(self.cols)) if a not in self.cols]
    row_axes_in_r = tuple(i for i, a in enumerate(r_axes) if a in self.rows)
    total = jnp.sum(r, axis=row_axes_in_r, keepdims=True)
    return jnp.expand_dims(total, self.cols)

  def mean_rows_of_row_stat(self, r: jax.Array) -> jax.Array:
    """mean(r) over the rows of a row statistic, broadcastable against the leaf.

    Each entry is scaled by 1/m before the sum, so the sum cannot overflow
    where the entries do not.
    """
    r_axes = [a for a in range(r.ndim + len(self.cols)) if a not in self.cols]
    row_axes_in_r = tuple(i for i, a in enumerate(r_axes) if a in self.rows)
    m = math.prod(r.shape[i] for i in row_axes_in_r)
    scale = 1.0 / m if m > 0 else 1.0
    total = jnp.sum(r * scale, axis=row_axes_in_r, keepdims=True)
    return jnp.expand_dims(total, self.cols)

  def matrix_mean(self, x: jax.Array) -> jax.Array:
    """Mean over one matrix (rows and columns), broadcastable against x."""
    return jnp.mean(x, axis=self.rows + self.cols, keepdims=True)

  # -- Explicit (*batch, m, n) matrices for matrix products ------------------

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """Transposes/reshapes a leaf to ``(*batch, m, n)``."""
    m, n = self.dims(x.shape)
    perm = self.batch + self.rows + self.cols
    y = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
    return y.reshape(self.batch_shape(x.shape) + (m, n))

  def from_matrix(self, y: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of :meth:`to_matrix` for a leaf of ``shape``."""
    perm = self.batch + self.rows + self.cols
    permuted_shape = tuple(shape[a] for a in perm)
    x = y.reshape(permuted_shape)
    if perm == tuple(range(len(shape))):
      return x
    return jnp.transpose(x, np.argsort(perm))


def explicit_mesh() -> bool:
  """True inside ``jax.set_mesh`` of a mesh with an Explicit axis type."""
  mesh = jax.sharding.get_abstract_mesh()
  return (not mesh.empty) and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def sharding_spec(x) -> tuple:
  """``x``'s PartitionSpec entries under sharding-in-types, one per axis."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def default_view(shape: Sequence[int]) -> Optional[MatrixView]:
  """The default view: ndim >= 2 -> rows = all but the last axis; else None."""
  ndim = len(shape)
  if ndim < 2:
    return None
  return MatrixView(rows=tuple(range(ndim - 1)), cols=(ndim - 1,))


def vector_view(shape: Sequence[int]) -> MatrixView:
  """The view a raw transform uses for ndim <= 1 leaves: a 1 x N row vector."""
  return MatrixView(rows=(), cols=tuple(range(len(shape))))


ViewSpec = Union[None, MatrixView, Any, Callable[[Any], Any]]


def _is_view_leaf(x) -> bool:
  return x is None or isinstance(x, MatrixView)


def is_tree_function(spec: Any, is_leaf: Optional[Callable[[Any], bool]] = None
                     ) -> bool:
  """True if a mask/views argument is to be called on the params (optax's rule).

  A function is callable at its one leaf; a bool tree or a tree of
  :class:`MatrixView` is not, even when its pytree type (an equinox-style
  module) defines ``__call__``: only a spec callable at every leaf is called.
  """
  leaves = jax.tree.leaves(jax.tree.map(callable, spec, is_leaf=is_leaf),
                           is_leaf=lambda x: isinstance(x, bool))
  return bool(leaves) and all(leaves)


def leaf_path_str(path) -> str:
  s = jax.tree_util.keystr(path)
  return s if s else '<root>'


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def resolve_views(params: Any, views: ViewSpec = None, *,
                  vectors: bool = False) -> Any:
  """A tree with the structure of ``params`` holding a view (or None) per leaf.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``). Leaves
      masked out by ``optax.masked``/``optax.partition`` (``optax.MaskedNode``)
      stay masked in the result.
    views: None (default view for every leaf), one ``MatrixView`` for every
      leaf, a tree of ``MatrixView``/None with the params' structure, or a
      callable ``params -> such a tree``. ``None`` at a leaf means "use the
      default view" for that leaf.
    vectors: if True, leaves without a matrix view get :func:`vector_view`
      (the raw transforms' rule); if False they stay ``None``.

  Returns:
    A tree of normalised ``MatrixView`` (or None) with the params' structure.
  """
  if not isinstance(views, MatrixView) and views is not None and (
      is_tree_function(views, is_leaf=_is_view_leaf)):
    views = views(params)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_masked)
  if views is None or isinstance(views, MatrixView):
    view_leaves = [views] * len(leaves_with_path)
  else:
    view_leaves, view_def = jax.tree.flatten(
        views, is_leaf=lambda x: _is_view_leaf(x) or _is_masked(x))
    if len(view_leaves) != len(leaves_with_path):
      raise ValueError(
          'views must be a tree with the structure of the params (one '
          f'MatrixView or None per leaf); got {view_def} for params {treedef}.')
  out = []
  for (path, leaf), view in zip(leaves_with_path, view_leaves):
    if _is_masked(leaf):
      out.append(leaf)
      continue
    shape = tuple(leaf.shape)
    where = leaf_path_str(path)
    view = default_view(shape) if view is None else view.normalized(
        len(shape), where)
    if view is None and vectors:
      view = vector_view(shape)
    out.append(view)
  return jax.tree.unflatten(treedef, out)


def square_shape(n: int) -> tuple[int, int]:
  """SMMF's square-matricization (docs/algorithms.md §4) of a leaf of ``n`` elements.

  Returns (n1, n2) with n2 the largest divisor of n not above isqrt(n) and
  n1 = n // n2 (so n1 >= n2). Examples: 512 -> (32, 16), 7 -> (7, 1),
  9408 -> (98, 96).
  """
  if n < 1:
    return (1, 1)
  for d in range(math.isqrt(n), 0, -1):
    if n % d == 0:
      return (n // d, d)
  raise AssertionError('unreachable')


def largest_divisor_at_most(n: int, k: int) -> int:
  """The largest divisor of ``n`` that is <= ``k`` (at least 1)."""
  for d in range(min(k, n), 0, -1):
    if n % d == 0:
      return d
  return 1
