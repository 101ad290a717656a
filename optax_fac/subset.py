"""Subset-Norm step sizes and Subspace-Momentum (docs/algorithms.md §5).

Transforms:

* :func:`scale_by_subset_norm` — one adaptive scalar per subset of
  coordinates (§5.1); returns N / (sqrt(v) + ε) where N is the gradient or the
  output of an optional ``momentum`` transform applied to the same gradient.
* :func:`scale_by_subspace_momentum` — momentum only inside a rank-r subspace
  of the gradient, plain gradient in the complement (§5.2).
* :func:`scale_by_bias_correction` — the code's step-size correction
  sqrt(1 − β2^t) / (1 − β1^t), applied to the whole numerator (§5.3).
* :func:`add_decayed_updated_weights` — decoupled weight decay of the
  *updated* weights, placed after the learning rate (§5.3).

Named optimizers (§5.3): :func:`adam_sn`, :func:`adam_snsm`,
:func:`rmsprop_sn`, :func:`adagrad_sn`. They are

    partition({'method': direction on matrices, 'fallback': same rule with
               element-wise statistics elsewhere})
    -> optax.scale_by_learning_rate(learning_rate)
    -> add_decayed_updated_weights(weight_decay, learning_rate, mask)

which reproduces the official code's step for every parameter group:
W ← W − s_t N / den, then W ← W − η_t λ W on the updated W, with
s_t = η_t sqrt(1 − β2^t) / (1 − β1^t) for the Adam variants and s_t = η_t
otherwise. The bias correction sits inside each branch (so a custom fallback
such as :func:`optax_fac.adam_fallback` is not corrected twice); the learning
rate stays an ordinary optax scalar-or-schedule evaluated on a step counter,
and only the decay transform needs it a second time (with its own counter,
which advances in lockstep). The same pieces compose by hand, e.g.::

    optax.chain(
        optax_fac.scale_by_subset_norm(
            momentum=optax_fac.scale_by_subspace_momentum(0.9, rank=128)),
        optax_fac.scale_by_bias_correction(0.9, 0.999),
        optax.scale_by_learning_rate(schedule),
        optax_fac.add_decayed_updated_weights(0.1, schedule))

[decided] Non-matrix leaves: the default fallback is the code's treatment of
its "regular" group, the same optimizer with element-wise statistics — AdamW
(with the code's ε placement) for ``adam_sn``/``adam_snsm``, RMSprop for
``rmsprop_sn`` and AdaGrad with EMA momentum for ``adagrad_sn``.

Under ``optax.MultiSteps`` the inner update runs on every mini-step, so the
subspace refresh (an SVD per matrix) runs k times on a refresh step; wrap the
optimizer in :class:`optax_fac.MultiSteps` (same state, inner update only on
the real step) to refresh once.

References:
  Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum: Faster
  Memory-Efficient Adaptive Optimization with Convergence Guarantees
  <https://arxiv.org/abs/2411.07120>`_, ICML 2025. Code:
  https://github.com/timmytonga/sn-sm (``GenericOptim.py``, ``subset_norm.py``,
  ``subspace_momentum.py``, ``projectors/svd_projector.py``).
"""


import functools
import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from optax_fac import _common
from optax_fac import compose
from optax_fac import linalg
from optax_fac import matrix
from optax_fac import sharding

SubsetSize = Union[str, int]
_HEURISTIC = ('heuristic', 'heuristics')
_RESETS = ('clean', 'faithful', 'none')
_METHODS = ('svd', 'eigh')
DEFAULT_RANK = 128


# --------------------------------------------------------------------------
# Small helpers.


def _check_subset_size(subset_size: Any):
  """'heuristic', a non-zero Python int, or None if traced (injected)."""
  if isinstance(subset_size, str):
    if subset_size not in _HEURISTIC:
      raise ValueError(
          "subset_size must be 'heuristic' or a non-zero int, got "
          f'{subset_size!r}.')
    return subset_size
  if _common.is_traced(subset_size):
    return None
  value = subset_size
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and (
      np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer)):
    value = int(value)
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
      or value == 0):
    raise ValueError(
        "subset_size must be 'heuristic' or a non-zero int, got "
        f'{subset_size!r}.')
  return int(value)


def _subset_size_from_state(nu, shape, view) -> int:
  """k′ of a leaf's integer partition, read from its accumulator's shape."""
  if tuple(nu.shape) == tuple(shape):
    return 1
  m, n = view.dims(shape)
  return max(1, (m * n) // max(1, nu.shape[-1]))


def subset_length(numel: int, subset_size: int) -> int:
  """k′: the length of each subset of the integer partition (§5.1).

  k > 0: the largest divisor of ``numel`` that is <= k (k is clipped to
  ``numel``); k < 0: the same with k = floor(sqrt(numel) / |k|) (at least 1).
  """
  if subset_size < 0:
    k = int(math.sqrt(numel) / abs(subset_size))
  else:
    k = subset_size
  return matrix.largest_divisor_at_most(numel, max(1, min(k, max(numel, 1))))


def _rows_are_subsets(m: int, n: int) -> bool:
  """Heuristic partition: one subset per row iff m > n (tie: per column)."""
  return m > n


def _subset_norm_shape(shape, view, subset_size) -> tuple:
  """Shape of the subset-norm statistic of a leaf (one value per subset)."""
  m, n = view.dims(shape)
  if isinstance(subset_size, str):
    return (view.row_stat_shape(shape) if _rows_are_subsets(m, n)
            else view.col_stat_shape(shape))
  k = subset_length(m * n, subset_size)
  if k == 1:
    return tuple(shape)
  return view.batch_shape(shape) + ((m * n) // k,)


# --------------------------------------------------------------------------
# §5.1 Subset-Norm.


def _subset_len(shape, view, subset_size) -> int:
  """L: the number of coordinates in each subset of a leaf."""
  m, n = view.dims(shape)
  if isinstance(subset_size, str):
    return n if _rows_are_subsets(m, n) else m
  return subset_length(m * n, subset_size)


def _subset_statistic(g32, view, subset_size):
  """ū: the per-subset MEAN of G² (one value per subset, see §5.1).

  [decided] The paper's statistic is the per-subset sum u = L ū; the mean is
  stored (as a sum of (G/√L)², so nothing overflows where G² does not) and
  the denominator is sqrt(L)·sqrt(v̄) + ε = sqrt(v) + ε exactly.
  """
  shape = g32.shape
  m, n = view.dims(shape)
  scale = 1.0 / math.sqrt(max(1, _subset_len(shape, view, subset_size)))
  if isinstance(subset_size, str):
    g2 = jnp.square(g32 * scale)
    return view.row_sum(g2) if _rows_are_subsets(m, n) else view.col_sum(g2)
  k = subset_length(m * n, subset_size)
  if k == 1:  # element-wise, in the parameter's layout
    return g32 * g32
  gs = matrix.reshape_tail(view.to_matrix(g32), len(view.batch),
                          (m * n // k, k))
  return jnp.sum(jnp.square(gs * scale), axis=-1)


def _divide_by_subsets(num, den, view, subset_size):
  """num / den with den (one value per subset) broadcast over each subset."""
  shape = num.shape
  m, n = view.dims(shape)
  if isinstance(subset_size, str):
    return (num / view.expand_rows(den) if _rows_are_subsets(m, n)
            else num / view.expand_cols(den))
  k = subset_length(m * n, subset_size)
  if k == 1:
    return num / den
  nb = len(view.batch)
  ds = (matrix.reshape_tail(view.to_matrix(num), nb, (m * n // k, k))
        / den[..., None])
  return view.from_matrix(matrix.reshape_tail(ds, nb, (m, n)), like=num)


class SubsetNormState(NamedTuple):
  """State of :func:`scale_by_subset_norm`."""
  count: jax.Array  # shape=(), dtype=jnp.int32.
  nu: Any           # per leaf: one float32 accumulator per subset (of the
                    # subset's mean of G²; the sum is L times it; for
                    # b2 = 1 the mean over the t steps, v = L·t·nu)
  momentum: Any     # state of the ``momentum`` transform (EmptyState if none)


def scale_by_subset_norm(
    b2: float = 0.999,
    eps: float = 1e-6,
    subset_size: SubsetSize = 'heuristic',
    *,
    momentum: Optional[optax.GradientTransformation] = None,
    views: matrix.ViewSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Subset-Norm adaptive step size (docs/algorithms.md §5.1).

  One adaptive scalar per subset of coordinates. With u = the per-subset sum
  of G², v ← β2 v + (1 − β2) u (β2 < 1, "Adam-style") or v ← v + u (β2 = 1,
  "AdaGrad-style"), the output is N / (sqrt(v) + ε) with the denominator
  broadcast over each subset, where N is G, or ``momentum``'s output on the
  same G (the subset norm is always computed from the gradient, so a
  momentum transform cannot simply be chained in front). No bias correction:
  chain :func:`scale_by_bias_correction` for the Adam-style step size.
  [decided] The state holds v̄ = v / L (L coordinates per subset), computed
  from means of G², so it stays finite for every gradient at which Adam's
  state is; the denominator sqrt(L)·sqrt(v̄) + ε is the same number. For
  β2 = 1 it holds the running mean over the t steps so far, v̄ = v / (L t),
  updated as v̄ ← v̄ + (ū − v̄) / t, and the denominator is
  sqrt(L)·sqrt(t)·sqrt(v̄) + ε: the running sum v of G² of scale 1e19
  overflows float32 at the second step, the mean does not.

  Partitions (``subset_size``, structural):

  * ``'heuristic'`` (default, the paper's headline runs): subsets run along
    the larger dimension of the (m, n) view — for m > n one subset per row
    (state of the row-statistic shape, m values), otherwise one per column
    (n values). Tie m = n: one subset per column, i.e. per output unit in the
    (in, out) layout, as the official code does in PyTorch's (out, in) layout.
  * an int k: each matrix of the view is flattened row-major and reshaped to
    (N/k′, k′), k′ the largest divisor of N = mn that is <= k (k < 0 means
    k = floor(sqrt(N)/|k|)); one subset per row, N/k′ values. k′ = 1 is the
    element-wise (RMSprop/Adam) denominator, stored in the parameter's shape.
    [decided] The flattening is of the (in, out) view, so for a Dense kernel
    the subsets differ from the official code's (which flattens PyTorch's
    (out, in) weight); pass ``views=MatrixView(rows=(1,), cols=(0,))`` to get
    the code's grouping. Batch axes of a view are partitioned separately.

  Leaves with ndim <= 1 are 1 x N row vectors: the heuristic then gives the
  element-wise denominator.

  Args:
    b2: second-moment decay in [0, 1]; 1 = AdaGrad-style running sum.
    eps: ε added to sqrt(v) (the code's default 1e-6).
    subset_size: ``'heuristic'`` or a non-zero int (structural: list it in
      ``static_args`` of ``optax.inject_hyperparams``).
    momentum: optional transform giving the numerator N from the gradient
      (e.g. ``optax.ema(0.9, debias=False)`` or
      :func:`scale_by_subspace_momentum`); it sees float32 gradients and its
      state is kept inside this transform's state.
    views: per-leaf :class:`optax_fac.MatrixView` override.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025.
  """
  _common.check_unit_interval('b2', b2, closed=True)
  _common.check_nonnegative('eps', eps)
  subset_size = _check_subset_size(subset_size)
  inner = (None if momentum is None
           else optax.with_extra_args_support(momentum))

  def expected_shape(u, view):
    return _subset_norm_shape(u.shape, view, subset_size)

  def init_fn(params):
    if _common.is_params_placeholder(params):  # optax.tree_map_params
      # Element-wise accumulators (subset size 1) are param-shaped.
      nu = (jax.tree.map(lambda x: x, params) if subset_size == 1
            else _common.NOT_PARAMS)
      return SubsetNormState(
          count=_common.zero_count(), nu=nu,
          momentum=(optax.EmptyState() if inner is None
                    else inner.init(params)))
    _common.check_float_params(params, 'scale_by_subset_norm')
    if subset_size is None:
      raise _common.traced_structural_error(['subset_size'],
                                            'scale_by_subset_norm')
    views_tree = matrix.resolve_views(params, views, vectors=True)
    (nu,) = _common.map_leaves(
        lambda p, view: (_common.zeros_like_result(
            lambda x: _subset_statistic(_common.f32(x), view, subset_size),
            p),), 1, params, params, views_tree)
    inner_state = (optax.EmptyState() if inner is None
                   else inner.init(_common.tree_f32(params)))
    return SubsetNormState(count=_common.zero_count(), nu=nu,
                           momentum=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    views_tree = matrix.resolve_views(updates, views, vectors=True)
    _common.check_same_structure(
        updates, state.nu, 'scale_by_subset_norm',
        expected_shape if subset_size is not None else None, views_tree)
    g32 = _common.tree_f32(updates)
    if inner is None:
      numer, inner_state = g32, state.momentum
    else:
      numer, inner_state = inner.update(
          g32, state.momentum, None if params is None else _common.tree_f32(params),
          **extra_args)
    beta2 = jnp.asarray(b2, jnp.float32)
    eps32 = jnp.asarray(eps, jnp.float32)
    running = beta2 == 1.0  # AdaGrad-style: nu is the mean over the t steps
    t = _common.increment(state.count).astype(jnp.float32)
    root_t = jnp.where(running, jnp.sqrt(t), 1.0)

    def accumulate(nu, u):
      return jnp.where(running, nu + (u - nu) / t,
                       beta2 * nu + (1.0 - beta2) * u)

    def one(g, g32, num, nu, view):
      k = (subset_size if subset_size is not None
           else _subset_size_from_state(nu, g.shape, view))
      nu = accumulate(nu, _subset_statistic(g32, view, k))
      root_len = math.sqrt(max(1, _subset_len(g.shape, view, k)))
      den = root_len * root_t * jnp.sqrt(nu) + eps32
      d = _divide_by_subsets(_common.f32(num), den, view, k)
      return d.astype(g.dtype), nu

    d, nu = _common.map_leaves(one, 2, updates, updates, g32, numer, state.nu,
                               views_tree)
    return d, SubsetNormState(count=_common.increment(state.count), nu=nu,
                              momentum=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# §5.2 Subspace-Momentum.


class SubspaceMomentumState(NamedTuple):
  """State of :func:`scale_by_subspace_momentum`.

  Per leaf (view (m, n), r = min(rank, m, n)): for m <= n the momentum is
  (*batch, r, n) and the projector A is (*batch, m, r); for m > n the
  momentum is (*batch, m, r) and the projector B is (*batch, r, n).

  ``skipped_refreshes`` counts the refresh steps at which at least one
  projector (of any leaf or batch element) was not replaced because the
  gradient or its decomposition was not finite: that matrix kept its previous
  projector (zeros before the first successful refresh, i.e. plain gradient
  steps on that leaf). It stays 0 in a healthy run; log it to see refreshes
  that did not happen.
  """
  count: jax.Array  # shape=(), dtype=jnp.int32.
  mu: Any           # per leaf: momentum in subspace coordinates (float32)
  projector: Any    # per leaf: orthonormal basis of the subspace (float32)
  skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.


def _subspace_dims(shape, view, rank):
  """(left, r, mu_shape, projector_shape) of a leaf."""
  m, n = view.dims(shape)
  batch = view.batch_shape(shape)
  r = max(0, min(rank, m, n))
  left = m <= n  # tie: project the input side (rows of the (in, out) view)
  if left:
    return left, r, batch + (r, n), batch + (m, r)
  return left, r, batch + (m, r), batch + (r, n)


def _projector(g: jax.Array, r: int, left: bool, method: str,
               precision) -> jax.Array:
  """A (m, r) or B (r, n) of (*batch, m, n) g: its top-r left singular
  vectors as columns, or right ones as rows
  (:func:`optax_fac.linalg.top_singular_vectors`; empty for r = 0)."""
  vecs = linalg.top_singular_vectors(g, r, left=left, method=method,
                                     precision=precision)
  return vecs if left else jnp.swapaxes(vecs, -1, -2)


def _project(g, basis, left, precision):
  """p̃ = Aᵀ G (left, r x n) or G Bᵀ (right, m x r)."""
  if left:
    return jnp.einsum('...mr,...mn->...rn', basis, g, precision=precision)
  return jnp.einsum('...mn,...rn->...mr', g, basis, precision=precision)


def _project_back(y, basis, left, precision):
  """back(Y) = A Y (left) or Y B (right), an (m, n) matrix."""
  if left:
    return jnp.einsum('...mr,...rn->...mn', basis, y, precision=precision)
  return jnp.einsum('...mr,...rn->...mn', y, basis, precision=precision)


def scale_by_subspace_momentum(
    b1: float = 0.9,
    rank: Optional[int] = None,
    every: int = 200,
    reset: str = 'clean',
    *,
    basis: str = 'svd',
    precision: Any = 'highest',
    views: matrix.ViewSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Subspace-Momentum (docs/algorithms.md §5.2): momentum in a rank-r subspace.

  The projector comes from the thin SVD (float32) of the current gradient,
  on the smaller side of the (m, n) view, r = min(rank, m, n):

  * m <= n: A = top-r left singular vectors (m x r), p̃ = Aᵀ G (r x n),
    back(Y) = A Y. (Tie m = n: the input side, rows of the (in, out) view —
    the official code projects the input side of PyTorch's (out, in) weight.)
  * m > n: B = top-r right singular vectors (r x n), p̃ = G Bᵀ (m x r),
    back(Y) = Y B.

  Each step: m ← β1 m + (1 − β1) p̃; the output is the numerator
  N = back(m) + (G − back(p̃)) (momentum in the subspace, the plain gradient in
  its complement), computed as G + back(m − p̃). No bias correction.

  Refresh at t = 1 and whenever t mod ``every`` = 0 (the code's schedule; note
  it differs from ``svd_rotation``'s (t − 1) mod T), under one ``lax.cond`` on
  this transform's own counter. ``reset`` says what happens to the momentum
  at a refresh step t > 1:

  * ``'clean'`` [decided, default]: zero it before the EMA, so
    m = (1 − β1) p̃ in the new basis.
  * ``'faithful'`` [code]: the EMA of this step is computed from the old
    buffer with the new basis' p̃ (and used for N); the buffer is then zeroed,
    so step t + 1 starts from m = (1 − β1) p̃.
  * ``'none'``: never reset (the old coefficients are reused in the new basis).

  [decided] Each singular vector's sign is chosen so that its
  largest-magnitude entry is positive (the code's SVD signs are arbitrary;
  this makes the result deterministic across backends). The decomposition
  is of G / max|G| (the vectors do not depend on the scale, and the Gram
  matrix of ``basis='eigh'`` would overflow float32 for |G| ~ 1e18). A
  non-finite gradient or decomposition keeps the previous projector of that
  matrix (zeros before the first successful refresh) and is counted in the
  state's ``skipped_refreshes`` [decided]. ``basis='eigh'`` computes the
  same subspace from the eigenvectors of the Gram matrix of the projected side
  (G Gᵀ or Gᵀ G), sorted by descending eigenvalue — usually much faster on
  accelerators.

  Leaves with ndim <= 1 are 1 x N row vectors (r = 1, the projector is ±1),
  which gives ordinary EMA momentum on them. [decided] The projector and the
  momentum are float32 whatever the parameter dtype (the code keeps them in
  the parameter's dtype).

  Memory: r·max(m, n) (momentum) + r·min(m, n) (projector) float32 values.

  Args:
    b1: momentum decay β1.
    rank: subspace rank r >= 1, clipped to min(m, n) per leaf; None = 128
      (structural: ``update`` reads it from the state's shapes).
    every: refresh period T >= 1 (may be injected; a traced int is fine).
    reset: ``'clean'``, ``'faithful'`` or ``'none'`` (see above).
    basis: ``'svd'`` (thin SVD, as the code) or ``'eigh'`` (Gram matrix).
    precision: matmul precision of the projections (``'highest'`` = true
      float32, as PyTorch's default; ``'default'`` allows TF32/bf16 passes).
    views: per-leaf :class:`optax_fac.MatrixView` override.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025.
  """
  _common.check_unit_interval('b1', b1)
  rank = _common.structural_int('rank', rank, DEFAULT_RANK,
                                where='scale_by_subspace_momentum: ')
  _common.check_dynamic_int('every', every, 'scale_by_subspace_momentum: ')
  if reset not in _RESETS:
    raise ValueError(f'reset must be one of {_RESETS}, got {reset!r}.')
  if basis not in _METHODS:
    raise ValueError(f'basis must be one of {_METHODS}, got {basis!r}.')
  method = basis

  def leaf_rank(projector) -> int:
    """r of a leaf: ``rank``, or (when ``rank`` is traced) the state's."""
    if rank is not None:
      return rank
    return int(min(projector.shape[-2:]))

  def projector_shape(u, view):
    return _subspace_dims(u.shape, view, rank)[3]

  def init_fn(params):
    if _common.is_params_placeholder(params):  # optax.tree_map_params
      return SubspaceMomentumState(count=_common.zero_count(),
                                   mu=_common.NOT_PARAMS,
                                   projector=_common.NOT_PARAMS,
                                   skipped_refreshes=_common.zero_count())
    _common.check_float_params(params, 'scale_by_subspace_momentum')
    if rank is None:
      raise _common.traced_structural_error(['rank'],
                                            'scale_by_subspace_momentum')
    views_tree = matrix.resolve_views(params, views, vectors=True)

    def one(p, view):
      # Zeros with the shapes, dtypes and shardings the update will produce
      # (stable state types under sharding-in-types and lax.cond).
      left, r, _, _ = _subspace_dims(p.shape, view, rank)
      basis = lambda x: _projector(
          view.to_matrix(_common.f32(x)), r, left, method, precision)
      proj = _common.zeros_like_result(basis, p)
      mu = _common.zeros_like_result(
          lambda x: _project(view.to_matrix(_common.f32(x)), proj, left,
                             precision), p)
      return mu, proj

    mu, projector = _common.map_leaves(one, 2, params, params, views_tree)
    return SubspaceMomentumState(count=_common.zero_count(), mu=mu,
                                 projector=projector,
                                 skipped_refreshes=_common.zero_count())

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    views_tree = matrix.resolve_views(updates, views, vectors=True)
    _common.check_same_structure(
        updates, state.projector, 'scale_by_subspace_momentum',
        projector_shape if rank is not None else None, views_tree)
    count = _common.increment(state.count)
    refresh = (count == 1) | (count % every == 0)
    reset_now = refresh & (count > 1)
    beta1 = jnp.asarray(b1, jnp.float32)
    (mats,) = _common.map_leaves(
        lambda g, view: (view.to_matrix(_common.f32(g)),), 1, updates,
        updates, views_tree)

    def new_projectors(operands):
      mats, old = operands

      def one(g, p_old, u, view):
        left, r, _, _ = _subspace_dims(u.shape, view, leaf_rank(p_old))
        # Singular vectors are scale-invariant: G / max|G| keeps the Gram
        # matrix of basis='eigh' finite for gradients of any finite scale.
        scaled = (linalg.scale_to_unit_max(g, (-2, -1))
                  if g.shape[-2] * g.shape[-1] else g)
        p = _projector(scaled, r, left, method, precision)
        # A NaN/Inf gradient keeps the old projector (an SVD of a non-finite
        # matrix need not come back non-finite), per matrix.
        ok = (jnp.all(jnp.isfinite(p), axis=(-2, -1), keepdims=True)
              & jnp.all(jnp.isfinite(g), axis=(-2, -1), keepdims=True))
        return jnp.where(ok, p, p_old), ~jnp.all(ok)

      projector, skipped = _common.map_leaves(one, 2, updates, mats, old,
                                              updates, views_tree)
      return projector, functools.reduce(
          jnp.logical_or, jax.tree.leaves(skipped), jnp.zeros((), bool))

    def keep_projectors(operands):
      return operands[1], jnp.zeros((), bool)

    projector, skipped = jax.lax.cond(refresh, new_projectors,
                                      keep_projectors,
                                      (mats, state.projector))
    skipped_refreshes = jnp.where(
        skipped, _common.increment(state.skipped_refreshes),
        state.skipped_refreshes)

    def one(u, g, mu, p, view):
      left, _, _, _ = _subspace_dims(u.shape, view, leaf_rank(p))
      proj = _project(g, p, left, precision)
      if reset == 'clean':
        mu = jnp.where(reset_now, 0.0, mu)
      mu = _common.ema(mu, proj, beta1)
      numer = view.from_matrix(
          g + _project_back(mu - proj, p, left, precision), like=u)
      if reset == 'faithful':
        mu = jnp.where(reset_now, 0.0, mu)
      return numer.astype(u.dtype), mu

    numer, mu = _common.map_leaves(one, 2, updates, updates, mats, state.mu,
                                   projector, views_tree)
    return numer, SubspaceMomentumState(count=count, mu=mu,
                                        projector=projector,
                                        skipped_refreshes=skipped_refreshes)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# §5.3 The generic step: bias correction, learning rate, decay after the step.


class BiasCorrectionState(NamedTuple):
  """State of :func:`scale_by_bias_correction`."""
  count: jax.Array  # shape=(), dtype=jnp.int32.


def scale_by_bias_correction(
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies updates by sqrt(1 − β2^t) / (1 − β1^t) (docs/algorithms.md §5.3).

  The official code's Adam-style step-size correction,
  s_t = η sqrt(1 − β2^t)/(1 − β1^t), applied to the whole numerator
  (complement gradient of subspace momentum included) with ε left
  uncorrected. Computed in float32; t counts this transform's own updates.

  Args:
    b1: first-moment decay (0 = no momentum correction).
    b2: second-moment decay.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.
  """
  _common.check_unit_interval('b1', b1)
  _common.check_unit_interval('b2', b2)

  def init_fn(params):
    del params
    return BiasCorrectionState(count=_common.zero_count())

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = _common.increment(state.count)
    t = count.astype(jnp.float32)
    beta1 = jnp.asarray(b1, jnp.float32)
    beta2 = jnp.asarray(b2, jnp.float32)
    factor = jnp.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    updates = jax.tree.map(
        lambda u: (factor * _common.f32(u)).astype(u.dtype), updates)
    return updates, BiasCorrectionState(count=count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# §5.3 Weight decay of the updated weights (the official code's order).


def add_decayed_updated_weights(
    weight_decay: Any = 0.0,
    learning_rate: optax.ScalarOrSchedule = 1.0,
    mask: compose.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Decoupled weight decay of the *updated* weights (docs/algorithms.md §5.3).

  Goes **after** ``optax.scale_by_learning_rate``: given the signed step
  Δ = −s_t N/den, it returns Δ − η_t λ (W + Δ), so that
  W_new = (W + Δ) − η_t λ (W + Δ): the official Subset-Norm code's "weight
  decay at the end" (the difference from decaying the old W, as
  ``optax.adamw`` does, is second order). η_t is evaluated like
  ``optax.scale_by_learning_rate`` does (a schedule is called with this
  transform's own counter, which starts at 0 and advances once per update,
  so it agrees with the learning-rate transform's). Needs ``params`` unless
  ``weight_decay`` is a literal 0.

  Args:
    weight_decay: λ >= 0.
    learning_rate: η (float or schedule), the same as the step's.
    mask: which leaves are decayed (bool tree, prefix or callable, as
      ``optax.masked``); None = all.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> tx = optax_fac.add_decayed_updated_weights(0.5, learning_rate=0.1)
    >>> w, step = jnp.array([2.0]), jnp.array([-1.0])
    >>> tx.update(step, tx.init(w), w)[0]  # -1 - 0.05 * (2 - 1)
    Array([-1.05], dtype=float32)
  """
  _common.check_nonnegative('weight_decay', weight_decay)
  _common.check_nonnegative('learning_rate', learning_rate)
  no_decay = (isinstance(weight_decay, (int, float))
              and not isinstance(weight_decay, bool) and weight_decay == 0)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=_common.zero_count())

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    count = _common.increment(state.count)
    if no_decay:
      return updates, optax.ScaleByScheduleState(count=count)
    if params is None:
      raise ValueError(
          'add_decayed_updated_weights needs the current parameters: call '
          'update(updates, state, params).')
    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    coef = jnp.asarray(lr, jnp.float32) * jnp.asarray(weight_decay,
                                                      jnp.float32)

    def one(u, p):
      u32 = _common.f32(u)
      return (u32 - coef * (_common.f32(p) + u32)).astype(u.dtype)

    return (jax.tree.map(one, updates, params),
            optax.ScaleByScheduleState(count=count))

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


# --------------------------------------------------------------------------
# Named optimizers.


def _ema(b1, mu_dtype: Optional[DTypeLike] = None
         ) -> optax.GradientTransformation:
  """The code's EMA momentum N ← β1 N + (1 − β1) G, stored in ``mu_dtype``.

  ``optax.ema(b1, debias=False)``'s state (``optax.EmaState``) and
  arithmetic, with the stored EMA in ``mu_dtype`` (None = float32). The
  stored buffer is read into float32, the EMA is computed and returned in
  float32, and it is stored rounded once to ``mu_dtype`` (``optax.ema``
  with a bfloat16 accumulator would also round β1 N to bfloat16 first).
  For float32 it is bit-identical to ``optax.ema``.
  """
  _common.moment_dtype(mu_dtype)

  def init_fn(params):
    return optax.EmaState(
        count=_common.zero_count(),
        ema=optax.tree.zeros_like(params,
                                  dtype=_common.moment_dtype(mu_dtype)))

  def update_fn(updates, state, params=None):
    del params
    decay = (b1 if isinstance(b1, (int, float))
             else jnp.asarray(b1, jnp.float32))
    new = jax.tree.map(lambda g, t: (1 - decay) * g + decay * _common.f32(t),
                       updates, state.ema)
    stored = jax.tree.map(lambda n, t: n.astype(t.dtype), new, state.ema)
    return new, optax.EmaState(count=_common.increment(state.count),
                               ema=stored)

  return optax.GradientTransformation(init_fn, update_fn)


def _direction(momentum, b1, b2, eps, subset_size, bias_correction, views):
  sn = scale_by_subset_norm(b2, eps, subset_size, momentum=momentum,
                            views=views)
  if not bias_correction:
    return sn
  return optax.chain(sn, scale_by_bias_correction(b1, b2))


def _sn_optimizer(momentum, b1, b2, bias_correction, *, eps, subset_size,
                  views, fallback, learning_rate, weight_decay, mask,
                  method_mask, mu_dtype=None):
  """partition(SN direction | fallback) -> -η_t -> decay of the updated weights.

  The default fallback is the same rule element-wise (subset size 1), with an
  EMA momentum where the method has a momentum, as the official code's
  "regular" parameter group.
  """
  method = _direction(momentum, b1, b2, eps, subset_size, bias_correction,
                      views)
  if fallback is None:
    fallback = _direction(None if momentum is None else _ema(b1, mu_dtype),
                          b1, b2, eps, 1, bias_correction, views)
  decay = add_decayed_updated_weights(weight_decay, learning_rate, mask)
  return compose.named_optimizer(
      method, fallback=fallback, learning_rate=learning_rate,
      weight_decay=weight_decay, mask=mask, method_mask=method_mask,
      views=views, decay_after_step=decay)


def adam_sn(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    subset_size: SubsetSize = 'heuristic',
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
    mu_dtype: Optional[DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamSN (docs/algorithms.md §5.3): Adam momentum over a Subset-Norm step size.

  N = EMA_β1(G) (full momentum, mn values), den = sqrt(v) + ε with v the
  subset-norm accumulator (§5.1, β2), W ← W − s_t N/den with
  s_t = η_t sqrt(1 − β2^t)/(1 − β1^t), then the updated weights decay by
  η_t λ (:func:`optax_fac.add_decayed_updated_weights`, the code's order).
  Non-matrix leaves (and matrices outside ``method_mask``) get the default
  fallback, AdamW in the code's form (ε added to sqrt(v) of the uncorrected
  second moment), as the official code's "regular" parameter group. The
  authors recommend a learning rate about 10x the usual Adam one. Memory
  mn + max(m, n) per (m, n) matrix (heuristic subsets).

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: momentum decay β1 in [0, 1).
    b2: second-moment decay β2 in [0, 1).
    eps: ε >= 0 added to the denominator.
    weight_decay: λ >= 0 of the decay of the updated weights.
    mask: which leaves decay (``optax.adamw``'s ``mask``; None = all).
    method_mask: which matrices get Subset-Norm (None = every ndim >= 2
      leaf).
    subset_size: ``'heuristic'`` (rows or columns, whichever is longer) or
      an int k >= 1 (see :func:`scale_by_subset_norm`; structural).
    views: :class:`optax_fac.MatrixView` overrides.
    fallback: a complete scale-only direction for the other leaves (e.g.
      :func:`optax_fac.adam_fallback`); None = the code's AdamW.
    mu_dtype: floating dtype of the stored momentum N (the matrices' and
      the default fallback's), as ``optax.adamw``'s ``mu_dtype``; e.g.
      ``jnp.bfloat16`` saves 2 bytes per element. It is read into float32
      each step and the float32 EMA (which this step uses) is stored
      rounded to ``mu_dtype``. None = float32 (optax: the parameter
      dtype). A ``fallback`` passed in keeps its own dtypes.

  Returns:
    AdamSN as an ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> params = {'w': jnp.ones((512, 256)), 'b': jnp.zeros(256)}
    >>> tx = optax_fac.adam_sn(learning_rate=1e-2)
    >>> optax_fac.state_size(tx, params)  # mn + m, and Adam on b
    528412
    >>> optax_fac.state_size(  # bfloat16 momentum: 2 bytes less per mn + 256
    ...     optax_fac.adam_sn(1e-2, mu_dtype=jnp.bfloat16), params)
    265756
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025.
  """
  _common.check_unit_interval('b2', b2)
  return _sn_optimizer(
      _ema(b1, mu_dtype), b1, b2, True, eps=eps, subset_size=subset_size,
      views=views, fallback=fallback, learning_rate=learning_rate,
      weight_decay=weight_decay, mask=mask, method_mask=method_mask,
      mu_dtype=mu_dtype)


def adam_snsm(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    subset_size: SubsetSize = 'heuristic',
    rank: Optional[int] = None,
    every: int = 200,
    reset: str = 'clean',
    basis: str = 'svd',
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamSNSM (docs/algorithms.md §5.3): Subspace-Momentum over Subset-Norm.

  N = subspace momentum (§5.2: rank r, refresh every T steps, ``reset``),
  den = subset norm (§5.1), W ← W − s_t N/den with
  s_t = η_t sqrt(1 − β2^t)/(1 − β1^t) (the correction multiplies the
  complement gradient too, as in the code), then the updated weights decay.
  The default fallback for the other leaves is AdamW in the code's form
  (full EMA momentum). Memory r·max(m, n) + r·min(m, n) + max(m, n) per
  matrix (heuristic subsets; the projector included).

  Learning rate: about 10x AdamW's, as its authors advise. In the README's
  swept benchmark (a 22.7 M LLaMA on Python source, 2000 steps, AdamW best
  at 3e-3, rank and period at their defaults) the best peak rate was 3e-2,
  1e-2 ended 1.8% worse and 1e-1 did not train (final loss 3.53); at 3e-2 AdamSNSM ended 5.8%
  below AdamW's validation loss, reaching AdamW's final loss in 0.68x the
  steps. On GaLore's LLaMA-60M (AdamW best at 1e-3) the best rate was
  again 3e-2 (1e-2 ended 1.2% worse, 1e-1 did not train: 4.34), 3.7% below
  AdamW in 0.77x the steps. Range that works: 1e-2 to 3e-2, i.e. 3-30x
  AdamW's best (3e-3 at 22.7 M, 1e-3 at 60M). Rank
  and period: rank 64 and 32 ended 0.7% and 1.3% worse than 128 at 22.7 M;
  a period of 50 or 500 did not differ from 200 by more than 0.3%.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: subspace momentum decay β1 in [0, 1).
    b2: β2 in [0, 1) of the subset-norm accumulator.
    eps: ε >= 0 of the denominator.
    weight_decay: λ >= 0 (updated weights, the code's order).
    mask: weight-decay mask, as for ``optax.adamw``.
    method_mask: matrices given AdamSNSM (None = all ndim >= 2 leaves).
    subset_size: ``'heuristic'`` or an int (structural).
    rank: subspace rank r >= 1, clipped to min(m, n); None = 128
      (structural: decides the state's shapes).
    every: projector refresh period T >= 1 (may be injected; traced is fine).
    reset: the momentum at a refresh, ``'clean'`` | ``'faithful'`` |
      ``'none'`` (see :func:`scale_by_subspace_momentum`).
    basis: the projector's decomposition, ``'svd'`` or ``'eigh'`` (as
      :func:`optax_fac.svd_rotation`'s ``basis``).
    views: per-leaf matrix views.
    fallback: direction for non-matrix leaves (None = the code's AdamW).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (AdamSNSM).

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> tx = optax_fac.adam_snsm(learning_rate=1e-2, rank=8)
    >>> state = tx.init({'w': jnp.ones((64, 32))})
    >>> optax_fac.state_size(tx, {'w': jnp.ones((64, 32))}) // 4
    840

  References:
    Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025.
  """
  _common.check_unit_interval('b2', b2)
  sm = scale_by_subspace_momentum(b1, rank, every, reset, basis=basis,
                                  views=views)
  return _sn_optimizer(
      sm, b1, b2, True, eps=eps, subset_size=subset_size, views=views, fallback=fallback,
      learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
      method_mask=method_mask)


def rmsprop_sn(
    learning_rate: optax.ScalarOrSchedule,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    subset_size: SubsetSize = 'heuristic',
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSpropSN (docs/algorithms.md §5.3): no momentum, Subset-Norm step size.

  W ← W − η_t G/den (β1 = 0, no bias correction), then the updated weights
  decay by η_t λ. The default fallback is RMSprop (β2, ε, element-wise), as
  in the code. Memory max(m, n) float32 values per matrix (heuristic).

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b2: second-moment decay β2 in [0, 1).
    eps: ε >= 0 added to the denominator.
    weight_decay: λ >= 0 (decay of the updated weights).
    mask: the decayed leaves (bool tree / prefix / function, as
      ``optax.adamw``).
    method_mask: matrices with Subset-Norm (None = every matrix).
    subset_size: subset length: ``'heuristic'`` or an int (structural).
    views: matrix views of the leaves.
    fallback: direction of the other leaves (None = RMSprop).

  Returns:
    RMSpropSN, an ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> params = {'w': jnp.ones((512, 256)), 'b': jnp.zeros(256)}
    >>> optax_fac.state_size(optax_fac.rmsprop_sn(1e-3), params) // 4
    771

  References:
    Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025.
  """
  _common.check_unit_interval('b2', b2)
  return _sn_optimizer(
      None, 0.0, b2, False, eps=eps, subset_size=subset_size, views=views, fallback=fallback,
      learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
      method_mask=method_mask)


def adagrad_sn(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    subset_size: SubsetSize = 'heuristic',
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
    mu_dtype: Optional[DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGradSN (docs/algorithms.md §5.3): EMA momentum, Subset-Norm running sum.

  N = EMA_β1(G) (not bias corrected), den = sqrt(Σ_t u_t) + ε with u the
  per-subset sum of G² (β2 = 1), W ← W − η_t N/den, then the updated
  weights decay. The default fallback is the same rule element-wise
  (AdaGrad with EMA momentum), as in the code. Memory mn + max(m, n) per
  matrix (heuristic).

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: momentum decay β1 in [0, 1) (0 = no momentum; the buffer is kept).
    eps: ε >= 0 of the denominator.
    weight_decay: λ >= 0, applied to the updated weights.
    mask: ``optax.adamw``-style decay mask (None = every leaf).
    method_mask: matrix leaves that get AdaGradSN (None = all of them).
    subset_size: ``'heuristic'`` | int k >= 1 (structural).
    views: MatrixView overrides.
    fallback: other leaves' direction (None = element-wise AdaGradSN).
    mu_dtype: floating dtype of the stored momentum N (the matrices' and
      the default fallback's), as ``optax.adamw``'s ``mu_dtype``; e.g.
      ``jnp.bfloat16`` saves 2 bytes per element. It is read into float32
      each step and the float32 EMA (which this step uses) is stored
      rounded to ``mu_dtype``. None = float32 (optax: the parameter
      dtype). A ``fallback`` passed in keeps its own dtypes.

  Returns:
    AdaGradSN (``optax.GradientTransformationExtraArgs``).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> tx = optax_fac.adagrad_sn(learning_rate=0.1)
    >>> w = {'w': jnp.full((4, 2), 3.0)}
    >>> tx.update(w, tx.init(w), w)[0]['w'][0]  # -η(1 - β1)G / ‖G_row‖
    Array([-0.00707107, -0.00707107], dtype=float32)

  References:
    Nguyen & Nguyen, `Subset-Norm and Subspace-Momentum
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025.
  """
  _common.check_unit_interval('b1', b1)
  return _sn_optimizer(
      _ema(b1, mu_dtype), b1, 1.0, False, eps=eps, subset_size=subset_size,
      views=views, fallback=fallback, learning_rate=learning_rate,
      weight_decay=weight_decay, mask=mask, method_mask=method_mask,
      mu_dtype=mu_dtype)


# --------------------------------------------------------------------------
# Partition specs of the states (optax_fac.state_partition_specs), matching
# what the update produces under an explicit mesh.


def _nu_spec(x, info):
  """Subset-norm statistic: row/column statistic, param-shaped or flat."""
  shape = tuple(x.shape)
  if shape == info.shape:
    return jax.P(*info.spec)
  view = info.view or matrix.vector_view(info.shape)
  m, n = view.dims(info.shape)
  rows = view.row_stat_shape(info.shape)
  cols = view.col_stat_shape(info.shape)
  if shape == rows and (_rows_are_subsets(m, n) or shape != cols):
    return jax.P(*(info.spec[a] for a in range(len(info.shape))
                   if a not in view.cols))
  if shape == cols:
    return jax.P(*(info.spec[a] for a in range(len(info.shape))
                   if a not in view.rows))
  nb = len(view.batch)
  if len(shape) == nb + 1 and shape[:nb] == view.batch_shape(info.shape):
    return jax.P(*info.entries(view.batch), None)  # integer partition
  return jax.P(*([None] * len(shape)))


def _matrix_state_spec(x, info):
  """Subspace momentum / projector (*batch, ., .): batch axes as the param."""
  view = info.view or matrix.vector_view(info.shape)
  nb = len(view.batch)
  shape = tuple(x.shape)
  if len(shape) == nb + 2 and shape[:nb] == view.batch_shape(info.shape):
    return jax.P(*info.entries(view.batch), None, None)
  return jax.P(*([None] * len(shape)))


sharding.register_state_rule(SubsetNormState, {
    'count': 'scalar', 'nu': _nu_spec, 'momentum': 'state'})
sharding.register_state_rule(SubspaceMomentumState, {
    'count': 'scalar', 'mu': _matrix_state_spec, 'projector': _matrix_state_spec,
    'skipped_refreshes': 'scalar'})
sharding.register_state_rule(BiasCorrectionState, {'count': 'scalar'})
