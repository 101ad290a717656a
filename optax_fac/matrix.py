"""How a parameter leaf is seen as a matrix (docs/algorithms.md §0).

This module is the one place that knows about axes, reshapes, batch axes and
square-matricization, and how each reshape is sharded under an explicit mesh
(:func:`reshape`, :func:`replicate`, :func:`reshard_like`,
:func:`reshape_tail`, :func:`merge_batch`; :meth:`MatrixView.to_matrix` /
:meth:`MatrixView.from_matrix`; :class:`SquareLayout`). Every transform in
the library goes through it.

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
from jax import lax


def _mean(x: jax.Array, axes) -> jax.Array:
  """``jnp.mean`` over ``axes``; zeros where they hold no element (the mean
  of nothing is taken as 0, not 0/0 = NaN: a zero-size m x n leaf then keeps
  finite statistics for its non-empty side)."""
  axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  if all(x.shape[a] for a in axes):
    return jnp.mean(x, axis=axes)
  kept = tuple(d for i, d in enumerate(x.shape)
               if i not in {a % x.ndim for a in axes})
  return jnp.zeros(kept, x.dtype)


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
    """Mean over the column axes; 0 where there are no columns (n = 0)."""
    return _mean(x, self.cols)

  def col_mean(self, x: jax.Array) -> jax.Array:
    """Mean over the row axes; 0 where there are no rows (m = 0)."""
    return _mean(x, self.rows)

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

  def to_matrix(self, x: jax.Array, *, flat_batch: bool = False
                ) -> jax.Array:
    """The leaf as matrices: ``(*batch, m, n)``, or ``(B, m, n)`` if flat.

    Transposes to (batch, rows, cols) axis order and reshapes row-major (the
    row and column indices are flattened in the view's axis order).

    Under an explicit mesh [decided] the matrix axes are gathered first
    (each device holds whole matrices: a decomposition needs them, and the
    factored statistics never come here); the batch axes keep their
    sharding. With ``flat_batch`` the batch axes are merged into one axis of
    size B = prod(batch) (a leaf without batch axes gives B = 1), sharded as
    :func:`merge_batch` says.
    """
    m, n = self.dims(x.shape)
    nb = len(self.batch)
    y = replicate(_to_front(x, self.batch + self.rows + self.cols), nb)
    y = reshape_tail(y, nb, (m, n))
    return merge_batch(y, nb, (m, n)) if flat_batch else y

  def from_matrix(self, y: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrix` (not flat): ``(*batch, m, n)`` -> leaf.

    Args:
      y: ``(*batch, m, n)`` matrices of this view.
      like: the leaf (an array of the leaf's shape) whose layout to restore.

    Returns:
      An array of ``like``'s shape; under an explicit mesh with ``like``'s
      sharding (the batch axes keep ``y``'s sharding through the reshape,
      then the result is resharded like ``like``).
    """
    perm = self.batch + self.rows + self.cols
    x = reshape_tail(y, len(self.batch),
                     tuple(like.shape[a] for a in perm[len(self.batch):]))
    return reshard_like(_from_front(x, perm), like)


def explicit_mesh() -> bool:
  """True inside ``jax.set_mesh`` of a mesh with an Explicit axis type."""
  mesh = jax.sharding.get_abstract_mesh()
  return (not mesh.empty) and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def sharding_spec(x, axes: Optional[Sequence[int]] = None) -> tuple:
  """``x``'s PartitionSpec entries under sharding-in-types, one per axis.

  With ``axes``, the entries of those axes of ``x`` in that order.
  """
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  return spec if axes is None else tuple(spec[a] for a in axes)


# --------------------------------------------------------------------------
# Sharding-aware reshapes: every reshape of the library is one of these.
#
# Under a mesh with Explicit axis types (``jax.set_mesh``, sharding in types)
# a reshape that merges or splits a sharded axis must name its output
# sharding, and these functions name it by the rules written on each.
# Outside such a mesh (no mesh, automatic sharding, one device, inside
# ``shard_map``) they are the plain ``jnp`` operations and XLA decides.


def _entries(spec, ndim: int) -> tuple:
  """PartitionSpec entries from a sequence or a callable, padded to ndim."""
  entries = tuple(spec() if callable(spec) else spec)
  return entries + (None,) * (ndim - len(entries))


def reshape(x: jax.Array, shape: Sequence[int], spec: Any = None
            ) -> jax.Array:
  """``x`` reshaped row-major to ``shape`` (same size).

  Args:
    x: any array.
    shape: the output shape.
    spec: the output's PartitionSpec entries under an explicit mesh: a
      sequence (shorter than ``shape``: the rest None) or a callable
      returning one, called only under an explicit mesh. None: no sharding
      is named (JAX infers it, as ``x.reshape``), with or without a mesh.

  Returns:
    The reshaped array (``x`` itself when its shape, and under an explicit
    mesh with ``spec`` its sharding, already match).
  """
  shape = tuple(shape)
  if spec is None or not explicit_mesh():
    return x if tuple(x.shape) == shape else x.reshape(shape)
  entries = _entries(spec, len(shape))
  if tuple(x.shape) == shape and sharding_spec(x) == entries:
    return x
  return lax.reshape(x, shape, out_sharding=jax.P(*entries))


def replicate(x: Optional[jax.Array], keep_leading: int = 0
              ) -> Optional[jax.Array]:
  """``x`` with its axes from ``keep_leading`` on unsharded.

  Under an explicit mesh, reshards ``x`` so that every axis after the first
  ``keep_leading`` is replicated (gathered) and the first ``keep_leading``
  keep their sharding; ``keep_leading=0`` replicates ``x`` fully. ``x``
  unchanged if it is None, already laid out so, or outside an explicit mesh.
  """
  if x is None or not explicit_mesh():
    return x
  spec = sharding_spec(x)
  if all(e is None for e in spec[keep_leading:]):
    return x
  return jax.sharding.reshard(
      x, jax.P(*spec[:keep_leading], *([None] * (x.ndim - keep_leading))))


def reshard_like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x`` with the sharding of ``ref`` (same rank) under an explicit mesh.

  ``x`` unchanged outside an explicit mesh or if it is already so sharded.
  """
  if not explicit_mesh() or sharding_spec(x) == sharding_spec(ref):
    return x
  return jax.sharding.reshard(x, jax.P(*sharding_spec(ref)))


def reshape_tail(x: jax.Array, nb: int, tail: Sequence[int]) -> jax.Array:
  """``(*batch, ...)`` -> ``(*batch, *tail)``: the axes after the first ``nb``
  reshaped to ``tail``.

  Under an explicit mesh the ``nb`` batch axes keep their sharding and the
  new tail axes are replicated (the caller gathers them first where they
  were sharded, see :func:`replicate`).
  """
  return reshape(x, tuple(x.shape[:nb]) + tuple(tail),
                 lambda: sharding_spec(x)[:nb])


def merge_batch(x: jax.Array, nb: int, tail: Sequence[int] = ()
                ) -> jax.Array:
  """``(*batch, ...)`` with ``nb`` leading batch axes -> ``(B, *tail)``.

  B = prod(batch) (1 for ``nb = 0``). Under an explicit mesh B keeps the
  sharding of the one batch axis when ``nb == 1`` and is replicated
  otherwise; the tail axes are replicated.
  """
  flat = (math.prod(x.shape[:nb]),) + tuple(tail)
  return reshape(x, flat, lambda: sharding_spec(x)[:1] if nb == 1 else ())


def _to_front(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
  """``jnp.transpose(x, perm)``, or ``x`` for the identity ``perm``."""
  return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def _from_front(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`_to_front`."""
  if perm == tuple(range(x.ndim)):
    return x
  return jnp.transpose(x, np.argsort(perm))


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


# --------------------------------------------------------------------------
# SMMF's square-matricization of a leaf (docs/algorithms.md §4).
#
# [decided] Under a mesh with Explicit axes a reshape to the square view must
# name its output sharding. The square view (SMMF's step temporaries M, V) is
# sharded along its rows (n1) over the mesh axes that shard the leaf's
# non-batch axes when n1 is divisible by their size, and replicated otherwise;
# batch axes keep their sharding. The persistent state (factors, packed signs;
# O(sqrt N) floats and N/8 bytes) is replicated (:func:`replicate`), as
# optax_fac.sharding's rule for SMMF states says. Without an explicit mesh
# (jit with automatic sharding, one device) nothing is specified and XLA
# decides.


def _axis_names(entry) -> tuple[str, ...]:
  """The mesh axis names of one PartitionSpec entry."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class SquareLayout:
  """How SMMF sees one leaf: ``(*batch, n1, n2)``, or ``(*batch, N)`` if dense.

  The batch axes come first (in the view's order), the other axes are
  flattened row-major into N elements per batch element and square-matricized
  to (n1, n2) = :func:`square_shape` (N); a dense leaf keeps the flat (N,).
  """
  shape: tuple[int, ...]
  batch: tuple[int, ...]        # batch axes of the leaf
  batch_shape: tuple[int, ...]
  n: int                        # elements per batch element
  n1: int
  n2: int
  dense: bool

  @property
  def perm(self) -> tuple[int, ...]:
    """The leaf's axes, batch axes first."""
    rest = tuple(a for a in range(len(self.shape)) if a not in self.batch)
    return self.batch + rest

  @property
  def nbytes(self) -> int:
    """Bytes of packed sign bits per batch element."""
    return -(-self.n // 8)

  def reshape(self, x: jax.Array, tail: Sequence[int]) -> jax.Array:
    """``(*batch, ...)`` -> ``(*batch, *tail)`` by the square view's rule.

    Under an explicit mesh the batch axes keep their sharding and the first
    tail axis is sharded over the mesh axes that shard ``x``'s non-batch axes
    when its size is divisible by theirs; every other tail axis (and the
    first one otherwise) is replicated.
    """
    nb = len(self.batch)
    shape = self.batch_shape + tuple(tail)

    def spec():
      entries = sharding_spec(x)
      rows = tuple(a for e in entries[nb:] for a in _axis_names(e))
      mesh = jax.sharding.get_abstract_mesh()
      size = math.prod(mesh.shape[a] for a in rows)
      rest = [None] * (len(shape) - nb)
      if rest and rows and shape[nb] % size == 0:
        rest[0] = rows if len(rows) > 1 else rows[0]
      return entries[:nb] + tuple(rest)

    return reshape(x, shape, spec)

  def to_square(self, x: jax.Array) -> jax.Array:
    """Leaf -> ``(*batch, n1, n2)``, or ``(*batch, N)`` for a dense leaf.

    Sharded under an explicit mesh by :meth:`reshape`'s rule.
    """
    tail = (self.n,) if self.dense else (self.n1, self.n2)
    return self.reshape(_to_front(x, self.perm), tail)

  def from_square(self, y: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_square`: ``(*batch, n1, n2)`` or ``(*batch, N)``
    -> the leaf's shape; under an explicit mesh with ``like``'s sharding
    (``like``: an array laid out as the leaf)."""
    permuted = tuple(self.shape[a] for a in self.perm)
    x = reshape(y, permuted, lambda: sharding_spec(like, self.perm))
    return _from_front(x, self.perm)


def square_layout(shape: Sequence[int], view: Optional[MatrixView],
                  vector_reshape: bool) -> SquareLayout:
  """The :class:`SquareLayout` of a leaf of ``shape``.

  Only ``view``'s batch axes are used (None: no batch axes). The leaf is
  kept dense, as the official SMMF code does, iff ``vector_reshape`` is off
  and it is 1-D after squeezing; scalars and (1, ..., 1) leaves are
  factorized. An empty leaf gets n1 = n2 = 0.
  """
  shape = tuple(int(d) for d in shape)
  batch = () if view is None else tuple(view.batch)
  batch_shape = tuple(shape[a] for a in batch)
  rest = [shape[a] for a in range(len(shape)) if a not in batch]
  n = math.prod(rest)
  dense = (not vector_reshape) and sum(d != 1 for d in rest) == 1
  n1, n2 = (0, 0) if n == 0 else square_shape(n)
  return SquareLayout(shape, batch, batch_shape, n, n1, n2, dense)


def largest_divisor_at_most(n: int, k: int) -> int:
  """The largest divisor of ``n`` that is <= ``k`` (at least 1)."""
  for d in range(min(k, n), 0, -1):
    if n % d == 0:
      return d
  return 1
