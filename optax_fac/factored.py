"""Factored statistics: Adafactor-style second moment and factored momentum.

docs/algorithms.md §1 (``scale_by_factored_rms``) and §2.4
(``scale_by_factored_momentum``). Row/column statistics live in the
parameter's own layout (see :mod:`optax_fac.matrix`) and in float32.

References:
  Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
  Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  Nguyen et al., `H-Fac: Memory-Efficient Optimization with Factorized Hamiltonian
  Descent <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  Nguyen et al., `Improving Adaptive Moment Optimization via Preconditioner
  Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025 (App. A.2).
"""


import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from optax_fac import _common
from optax_fac import compose
from optax_fac import matrix
from optax_fac import row_col_kernel
from optax_fac import sharding


# --------------------------------------------------------------------------
# Shared statistics helpers (used by factored RMS, H-Fac and its relatives).


def row_col_statistics(g, view, *, means: bool, squares: bool,
                       fused_kernel: bool = False) -> list:
  """This step's row and column statistics of one leaf's gradient G.

  Returns ``[a, b]`` with ``means`` (a = G 1_n / n per row, b = Gᵀ 1_m / m
  per column), then ``[r, s]`` with ``squares`` (the row and column means
  of G², the Z = G² + ε of docs/algorithms.md §1 without its ε), float32,
  of the view's row and column statistic shapes.

  [decided] The means of G² are sums of (G/√n)² (resp. (G/√m)²): a sum of
  squares of gradients of scale 1e18 overflows float32, a mean of them
  does not, and no intermediate exceeds max G². No m×n G² is materialised.

  ``fused_kernel``: on an NVIDIA GPU, a 2-D leaf or a stacked group of them
  (batch axis 0) that :func:`optax_fac.row_col_kernel.tiling` tiles is read
  once for all of its statistics by the Pallas kernel
  (:func:`optax_fac.row_col_kernel.row_col_means`: the same sums, added in
  another order); elsewhere, and by default, XLA's reductions (a row and a
  column reduction, each reading G).
  """
  def arrays(g):
    g32 = _common.f32(g)
    m, n = view.dims(g32.shape)
    out = []
    if means:
      out += [view.row_mean(g32), view.col_mean(g32)]
    if squares:
      out += [view.row_sum(jnp.square(g32 * _inv_sqrt(n))),
              view.col_sum(jnp.square(g32 * _inv_sqrt(m)))]
    return out

  if not (fused_kernel and _kernel_takes(g, view)):
    return arrays(g)

  def kernel(g):
    members = [g] if g.ndim == 2 else [g[i] for i in range(g.shape[0])]
    out = row_col_kernel.row_col_means(members, means=means, squares=squares)
    return [o[0] for o in out] if g.ndim == 2 else out

  return _on_nvidia_gpu(kernel, arrays, g)


# The CUDA-or-not choice (module-level, so tests can take the kernel branch).
_on_nvidia_gpu = _common.on_nvidia_gpu


def _kernel_takes(g, view) -> bool:
  """Whether :func:`row_col_statistics`' kernel path takes this leaf: a
  plain (m, n) matrix or a stack of them on axis 0, tiled, no explicit
  mesh (the kernel is opaque to sharding in types)."""
  plain = ((g.ndim == 2 and view.rows == (0,) and view.cols == (1,)
            and not view.batch) or
           (g.ndim == 3 and view.batch == (0,) and view.rows == (1,)
            and view.cols == (2,)))
  return (plain and row_col_kernel.tiling(*g.shape[-2:]) is not None
          and not matrix.explicit_mesh())


def factored_second_moment_update(sq_rows, sq_cols, row, col, decay, eps):
  """EMA of the row/column means of Z = G² + eps (docs/algorithms.md §1).

  ``sq_rows``, ``sq_cols``: this step's row and column means of G²
  (:func:`row_col_statistics`); the statistics are means (r̄ = r/n,
  s̄ = s/m of the paper's row and column sums).
  """
  return (_common.ema(row, sq_rows + eps, decay),
          _common.ema(col, sq_cols + eps, decay))


def _inv_sqrt(k: int) -> float:
  return 1.0 / math.sqrt(k) if k > 0 else 1.0


def inverse_sqrt_factors(row, col, view):
  """Row and column factors k, l with 1/sqrt(V̂) = k lᵀ.

  V̂ = r̄ s̄ᵀ / mean(r̄) (equal to the paper's r sᵀ / (1ᵀ r) for sums
  r = n r̄, s = m s̄), so k = sqrt(mean(r̄)) / sqrt(r̄) (per row,
  broadcastable against the leaf) and l = 1 / sqrt(s̄) (per column): V̂ is
  never materialised, and no product of two statistics is formed.
  """
  mean = view.mean_rows_of_row_stat(row)
  return (jnp.sqrt(mean) * jax.lax.rsqrt(view.expand_rows(row)),
          jax.lax.rsqrt(view.expand_cols(col)))


def clip_factor(g32, row_factor, col_factor, view, threshold):
  """1 / max(1, RMS(U)/d) for U = G ⊙ k lᵀ, per matrix (1 if threshold None).

  RMS(U)² is written from G (mean of (G k l)²) rather than from a stored U,
  so the reduction re-reads G and the final update fuses into one pass; U is
  formed before squaring, so a huge G does not overflow.
  """
  if threshold is None:
    return jnp.ones((), g32.dtype)
  mean_sq = view.matrix_mean(jnp.square(g32 * row_factor * col_factor))
  return 1.0 / jnp.maximum(1.0, jnp.sqrt(mean_sq) / threshold)


def init_row_col(params, views):
  """Zero float32 row and column statistics for every leaf.

  For ``optax.tree_map_params``' params placeholder, two
  :data:`~optax_fac._common.NOT_PARAMS` markers (the statistics are not
  param-shaped, so functions of the params are not mapped over them).
  """
  if _common.is_params_placeholder(params):
    return _common.NOT_PARAMS, _common.NOT_PARAMS

  def one(p, view):
    return (_common.zeros_like_result(lambda x: view.row_sum(_common.f32(x)), p),
            _common.zeros_like_result(lambda x: view.col_sum(_common.f32(x)), p))
  return _common.map_leaves(one, 2, params, params, views)


# --------------------------------------------------------------------------
# §1 Factored second moment.


class FactoredRmsState(NamedTuple):
  """State of :func:`scale_by_factored_rms`."""
  count: jax.Array  # shape=(), dtype=jnp.int32.
  row: Any          # per leaf: row statistic r̄ (EMA of row means, float32)
  col: Any          # per leaf: column statistic s̄ (EMA of column means)
  mu: Any           # per leaf: full first moment M̂ (param-shaped, dtype
                    # ``mu_dtype``, float32 by default), or None without
                    # momentum


def scale_by_factored_rms(
    b1: Optional[float] = None,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = None,
    *,
    mu_dtype: Optional[DTypeLike] = None,
    views: matrix.ViewSpec = None,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adafactor-style factored second moment (docs/algorithms.md §1).

  With Z = G² + eps, r̄ and s̄ are bias-corrected EMAs (decay ``b2``) of the
  row and column means of Z, V̂ = r̄ s̄ᵀ / mean(r̄) (= r sᵀ / (1ᵀ r) for the
  sums; means stay finite for any gradient at which Adam is), the update is
  D = G / sqrt(V̂) (``b1=None``) or D = M̂ / sqrt(V̂) with M̂ the bias-corrected
  EMA of the gradient (momentum on the gradient, the "signal-to-noise" form of
  the AdaDiag paper, App. A.2; optax.adafactor instead takes momentum of the
  scaled update). Optional clipping D ← D / max(1, RMS(D)/d).

  Leaves with ndim <= 1 are viewed as 1 x N (unfactored RMSprop on them).

  Precision: r̄, s̄ and all arithmetic are float32 whatever the parameter
  dtype (float64 under ``jax_enable_x64`` included); the update comes back
  in the parameter dtype. The stored M̂ is in ``mu_dtype``: each step reads
  it into float32, computes the EMA and D from the float32 value, and
  stores that value rounded to ``mu_dtype`` (as ``optax.scale_by_adam``'s
  ``mu_dtype``).

  Args:
    b1: momentum decay in [0, 1), or None for no first moment.
    b2: second-moment decay in [0, 1) (Adam-style EMA with bias correction).
    eps: ε₁ >= 0 added to G² (float32).
    clipping_threshold: d > 0 for update clipping; None disables it.
    mu_dtype: floating dtype of the stored first moment M̂ (e.g.
      ``jnp.bfloat16``: 2 bytes per element instead of 4); None = float32
      (``optax.adamw``'s None means the parameter dtype; here statistics
      are float32 by default).
    views: per-leaf :class:`optax_fac.MatrixView` override (see
      :func:`optax_fac.matrix.resolve_views`).
    fused_kernel: on NVIDIA GPUs, compute each matrix's row and column
      statistics in one pass over G
      (:func:`optax_fac.factored.row_col_statistics`); False (default):
      XLA's two reductions. Same equations. Static.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Shazeer & Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, 2018;
    Nguyen et al., `AdaDiag <https://arxiv.org/abs/2502.07488>`_, 2025.
  """
  _common.check_unit_interval('b1', b1, allow_none=True)
  _common.check_unit_interval('b2', b2)
  _common.check_nonnegative('eps', eps)
  _common.check_positive('clipping_threshold', clipping_threshold, allow_none=True)
  _common.moment_dtype(mu_dtype, 'scale_by_factored_rms: ')
  _common.check_static_bool('fused_kernel', fused_kernel,
                            'scale_by_factored_rms: ')

  def init_fn(params):
    _common.check_float_params(params, 'scale_by_factored_rms')
    views_tree = matrix.resolve_views(params, views, vectors=True)
    row, col = init_row_col(params, views_tree)
    mu = None if b1 is None else optax.tree.zeros_like(
        params, dtype=_common.moment_dtype(mu_dtype))
    return FactoredRmsState(count=_common.zero_count(), row=row, col=col,
                            mu=mu)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    views_tree = matrix.resolve_views(updates, views, vectors=True)
    _common.check_same_structure(updates, state.row, 'scale_by_factored_rms',
                                 _common.row_stat_shape, views_tree)
    count = _common.increment(state.count)
    beta2 = _common.time_corrected_decay(b2, count)
    beta1 = None if b1 is None else _common.time_corrected_decay(b1, count)
    mu_tree = state.mu if b1 is not None else jax.tree.map(
        lambda _: None, updates)

    def one(g, row, col, mu, view):
      g32 = _common.f32(g)
      row, col = factored_second_moment_update(
          *row_col_statistics(g, view, means=False, squares=True,
                              fused_kernel=fused_kernel),
          row, col, beta2, eps)
      if beta1 is None:
        numer, new_mu = g32, None
      else:
        # Read in float32, stored rounded to the buffer's dtype (mu_dtype).
        new_mu = _common.ema(_common.f32(mu), g32, beta1)
        numer = new_mu
        new_mu = new_mu.astype(mu.dtype)
      k, l = inverse_sqrt_factors(row, col, view)
      # Clipping is defined on D = M̂ ⊙ k lᵀ, so its RMS uses the numerator.
      d = numer * (k * clip_factor(numer, k, l, view, clipping_threshold)) * l
      return d.astype(g.dtype), row, col, new_mu

    d, row, col, mu = _common.map_leaves(
        one, 4, updates, updates, state.row, state.col, mu_tree, views_tree)
    return d, FactoredRmsState(count=count, row=row, col=col,
                               mu=None if b1 is None else mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# §2.4 Factored momentum.


class FactoredMomentumState(NamedTuple):
  """State of :func:`scale_by_factored_momentum` (and signFSGD)."""
  count: jax.Array  # shape=(), dtype=jnp.int32.
  u: Any            # per leaf: row momentum (EMA of row means a), float32
  v: Any            # per leaf: column momentum (EMA of column means b)


def scale_by_factored_momentum(
    b1: float = 0.9,
    *,
    sign: bool = False,
    views: matrix.ViewSpec = None,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rank-1 (row + column) momentum of H-Fac (docs/algorithms.md §2.4).

  Keeps u, v: EMAs of the gradient's row means a and column means b. With
  û = u − a and v̂ = v − b (the momentum's row/column component minus the
  current gradient's own), returns

  * ``sign=False``: the factored heavy-ball direction
    D = G + ½ β̂1 (û 1ᵀ + 1 v̂ᵀ), with u, v time-corrected EMAs (β̂1);
  * ``sign=True``: the signFSGD direction
    D = ½[sign(G + β û 1ᵀ) + sign(G + β 1 v̂ᵀ)], with plain EMAs (§2.2).

  Composes with other transforms, e.g. chained before
  :func:`scale_by_factored_rms`. Memory m + n per matrix.

  Args:
    b1: momentum decay β1 in [0, 1).
    sign: return the signFSGD direction instead of the heavy-ball one.
    views: per-leaf :class:`optax_fac.MatrixView` override.
    fused_kernel: on NVIDIA GPUs, the row and column means of each matrix
      in one pass over G (:func:`optax_fac.factored.row_col_statistics`);
      False (default): XLA's two reductions. Static.

  Returns:
    A transform with a :class:`FactoredMomentumState`: per (m, n) leaf a row
    statistic u of shape ``view.row_stat_shape`` and a column statistic v,
    float32; updates in the input dtype.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> tx = optax_fac.scale_by_factored_momentum(b1=0.9)
    >>> state = tx.init({'w': jnp.ones((6, 4))})
    >>> state.u['w'].shape, state.v['w'].shape
    ((6,), (4,))

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  _common.check_unit_interval('b1', b1)
  _common.check_static_bool('fused_kernel', fused_kernel,
                            'scale_by_factored_momentum: ')

  def init_fn(params):
    _common.check_float_params(params, 'scale_by_factored_momentum')
    views_tree = matrix.resolve_views(params, views, vectors=True)
    u, v = init_row_col(params, views_tree)
    return FactoredMomentumState(count=_common.zero_count(), u=u, v=v)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    views_tree = matrix.resolve_views(updates, views, vectors=True)
    _common.check_same_structure(updates, state.u,
                                 'scale_by_factored_momentum',
                                 _common.row_stat_shape, views_tree)
    count = _common.increment(state.count)
    beta = (jnp.asarray(b1, jnp.float32) if sign
            else _common.time_corrected_decay(b1, count))

    def one(g, u, v, view):
      g32 = _common.f32(g)
      a, b = row_col_statistics(g, view, means=True, squares=False,
                                fused_kernel=fused_kernel)
      u = _common.ema(u, a, beta)
      v = _common.ema(v, b, beta)
      u_hat = view.expand_rows(u - a)
      v_hat = view.expand_cols(v - b)
      if sign:
        d = 0.5 * (jnp.sign(g32 + beta * u_hat) + jnp.sign(g32 + beta * v_hat))
      else:
        d = g32 + 0.5 * beta * (u_hat + v_hat)
      return d.astype(g.dtype), u, v

    d, u, v = _common.map_leaves(one, 3, updates, updates, state.u, state.v,
                                 views_tree)
    return d, FactoredMomentumState(count=count, u=u, v=v)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)



# --------------------------------------------------------------------------
# Named optimizer: the factored second moment on the matrices, Adam elsewhere.


def adafactor_momentum(
    learning_rate: optax.ScalarOrSchedule,
    b1: Optional[float] = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = None,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_eps: float = 1e-8,
    stack_leaves: compose.StackLeaves = True,
    mu_dtype: Optional[DTypeLike] = None,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Factored second moment with optional momentum (docs/algorithms.md §1).

  The base optimizer of AdafacDiag: :func:`scale_by_factored_rms` on
  matrices (``b1=None``: no first moment, memory m + n float32 values per
  matrix; a float: momentum on the gradient, memory mn + m + n), Adam on the
  other leaves (β1 = ``b1`` or 0.9, β2, ``fallback_eps``). Unlike
  ``optax.adafactor`` there is no relative step size and β2 is constant.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: momentum decay in [0, 1), or None for no first moment.
    b2: second-moment decay β2 in [0, 1).
    eps: ε₁ >= 0 added to G² (float32).
    clipping_threshold: d > 0 of the update clipping (None = off).
    weight_decay: λ >= 0 of W ← W − η(D + λW).
    mask: which leaves decay (``optax.adamw``'s ``mask``; None = all).
    method_mask: which matrices get the factored second moment (None =
      every ndim >= 2 leaf).
    views: matrix views per leaf (:class:`optax_fac.MatrixView`).
    fallback_eps: Adam's ε on the non-matrix leaves.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    mu_dtype: floating dtype of every stored first moment, as in
      ``optax.adamw``: the matrices' M̂ (when ``b1`` is not None) and the
      fallback Adam's μ (not its ν); e.g. ``jnp.bfloat16`` saves 2 bytes
      per element. Read into float32 at each step and rounded when
      stored. None = float32 (optax: the parameter dtype).
    fused_kernel: on NVIDIA GPUs, the matrices' row and column statistics
      in one pass over each gradient (a Pallas kernel). Off by default:
      measured, it was no faster than XLA's two reductions, or slower
      (the numbers: ``optax_fac/row_col_kernel.py``). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (Adafactor-style).

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> params = {'w': jnp.ones((512, 256)), 'b': jnp.zeros(256)}
    >>> [optax_fac.state_size(optax_fac.adafactor_momentum(1e-3, b1=b), params)
    ...  for b in (None, 0.9)]  # bytes without / with momentum, Adam on b
    [5128, 529416]
    >>> optax_fac.state_size(  # 2 bytes less per momentum element (mn + 256)
    ...     optax_fac.adafactor_momentum(1e-3, mu_dtype=jnp.bfloat16), params)
    266760

  References:
    Shazeer & Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, 2018;
    Nguyen et al., `AdaDiag <https://arxiv.org/abs/2502.07488>`_, 2025.
  """
  return compose.named_optimizer(
      compose.matrix_method(
          lambda v: scale_by_factored_rms(
              b1, b2, eps, clipping_threshold, mu_dtype=mu_dtype, views=v,
              fused_kernel=fused_kernel),
          views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=compose.adam_fallback(0.9 if b1 is None else b1, b2,
                                     fallback_eps, mu_dtype=mu_dtype))


sharding.register_state_rule(FactoredRmsState, {
    'count': 'scalar', 'row': 'row', 'col': 'col', 'mu': 'param'})
sharding.register_state_rule(FactoredMomentumState, {
    'count': 'scalar', 'u': 'row', 'v': 'col'})
