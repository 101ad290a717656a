"""H-Fac, signFSGD and LionFactor: factored (rank-1 row/column) momentum.

docs/algorithms.md §2: the transforms ``scale_by_hfac``, ``scale_by_sign_fsgd``
and ``scale_by_lion_factor``, and beside them the named optimizers ``hfac``,
``sign_fsgd`` and ``lion_factor`` (the transform on the matrices, Adam on the
other leaves; see :mod:`optax_fac.compose`).

References:
  Nguyen, Chen, Liu, Liu, `H-Fac: Memory-Efficient Optimization with
  Factorized Hamiltonian Descent <https://arxiv.org/abs/2406.09958>`_,
  AISTATS 2025.
"""


from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_fac import _common
from optax_fac import compose
from optax_fac import factored
from optax_fac import matrix
from optax_fac import sharding
from optax_fac.factored import FactoredMomentumState


class HfacState(NamedTuple):
  """State of :func:`scale_by_hfac`: 2(m + n) float32 values per matrix."""
  count: jax.Array  # shape=(), dtype=jnp.int32.
  u: Any            # per leaf: row momentum (time-corrected EMA of row means)
  v: Any            # per leaf: column momentum
  row: Any          # per leaf: r̄, EMA of row means of G² + eps
  col: Any          # per leaf: s̄, EMA of column means of G² + eps


def scale_by_hfac(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    *,
    views: matrix.ViewSpec = None,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""H-Fac: factored momentum plus factored second moment (docs/algorithms.md §2.1).

  Each step t, with time-corrected decays β̂1, β̂2, row/column means a, b of G:

  1. u ← β̂1 u + (1−β̂1) a;  v ← β̂1 v + (1−β̂1) b.
  2. r̄, s̄ ← EMAs (β̂2) of the row/column means of Z = G² + eps (the
     paper's sums r = n r̄, s = m s̄; means do not overflow).
  3. U = G / sqrt(V̂), V̂ = r̄ s̄ᵀ / mean(r̄);  Û = U / max(1, RMS(U)/d).
  4. φ_ij = β̂1 (u_i − a_i) / sqrt(r̄_i);  ψ_ij = β̂1 (v_j − b_j) / sqrt(s̄_j).
  5. D = ½(φ + ψ) + Û.

  At t = 1, β̂1 = 0 and D = Û (a clipped Adafactor step). The step listing
  is a third-party transcription of the paper's algorithm, consistent with
  the AdaDiag paper's prose (App. A.2); the defaults are our choice.

  Args:
    b1: momentum decay β1 in [0, 1).
    b2: second-moment decay β2 in [0, 1).
    eps: ε₁ >= 0 added to G² (float32).
    clipping_threshold: d > 0 in Û = U / max(1, RMS(U)/d); None disables
      clipping.
    views: per-leaf :class:`optax_fac.MatrixView` override (ndim <= 1 leaves
      are seen as 1 x N rows).
    fused_kernel: on NVIDIA GPUs, compute each matrix's row and column
      statistics in one pass over G
      (:func:`optax_fac.factored.row_col_statistics`); False (default):
      XLA's reductions. Same equations. Static.

  Returns:
    A transform with an :class:`HfacState` (float32 u, r̄ of the row
    statistic's shape, v, s̄ of the column statistic's; 2(m + n) values per
    matrix); updates in the input dtype, no learning rate applied.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> tx = optax_fac.scale_by_hfac()
    >>> g = {'w': jnp.ones((6, 4))}
    >>> d, state = tx.update(g, tx.init(g))
    >>> d['w'][0]  # t = 1: the clipped Adafactor step G / sqrt(V̂)
    Array([1., 1., 1., 1.], dtype=float32)

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  _common.check_unit_interval('b1', b1)
  _common.check_unit_interval('b2', b2)
  _common.check_nonnegative('eps', eps)
  _common.check_positive('clipping_threshold', clipping_threshold, allow_none=True)
  _common.check_static_bool('fused_kernel', fused_kernel, 'scale_by_hfac: ')

  def init_fn(params):
    _common.check_float_params(params, 'scale_by_hfac')
    views_tree = matrix.resolve_views(params, views, vectors=True)
    u, v = factored.init_row_col(params, views_tree)
    row, col = factored.init_row_col(params, views_tree)
    return HfacState(count=_common.zero_count(), u=u, v=v, row=row, col=col)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    views_tree = matrix.resolve_views(updates, views, vectors=True)
    _common.check_same_structure(updates, state.row, 'scale_by_hfac',
                                 _common.row_stat_shape, views_tree)
    count = _common.increment(state.count)
    beta1 = _common.time_corrected_decay(b1, count)
    beta2 = _common.time_corrected_decay(b2, count)

    def one(g, u, v, row, col, view):
      g32 = _common.f32(g)
      a, b, sq_rows, sq_cols = factored.row_col_statistics(
          g, view, means=True, squares=True, fused_kernel=fused_kernel)
      u = _common.ema(u, a, beta1)
      v = _common.ema(v, b, beta1)
      row, col = factored.factored_second_moment_update(
          sq_rows, sq_cols, row, col, beta2, eps)
      k, l = factored.inverse_sqrt_factors(row, col, view)
      k = k * factored.clip_factor(g32, k, l, view, clipping_threshold)
      # r̄ = r / n and s̄ = s / m are stored (means, see factored.py).
      phi = beta1 * (u - a) * jax.lax.rsqrt(row)
      psi = beta1 * (v - b) * jax.lax.rsqrt(col)
      # One fused pass: D = ½(φ 1ᵀ + 1 ψᵀ) + G ⊙ (k lᵀ)/max(1, RMS(U)/d).
      d = 0.5 * (view.expand_rows(phi) + view.expand_cols(psi)) + g32 * k * l
      return d.astype(g.dtype), u, v, row, col

    d, u, v, row, col = _common.map_leaves(
        one, 5, updates, updates, state.u, state.v, state.row, state.col,
        views_tree)
    return d, HfacState(count=count, u=u, v=v, row=row, col=col)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_sign_fsgd(
    b1: float = 0.9,
    *,
    views: matrix.ViewSpec = None,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""signFSGD direction (docs/algorithms.md §2.2).

  u ← β u + (1−β) a;  v ← β v + (1−β) b (plain EMAs);
  D = ½[sign(G + β (u − a) 1ᵀ) + sign(G + β 1 (v − b)ᵀ)].

  Args:
    b1: momentum decay β in [0, 1).
    views: per-leaf :class:`optax_fac.MatrixView` override.
    fused_kernel: on NVIDIA GPUs, the row and column means of each matrix
      in one pass over G (:func:`optax_fac.factored.row_col_statistics`);
      False (default): XLA's two reductions. Static.

  .. note::
    The H-Fac paper names signFSGD but its listing is reconstructed here
    (docs/algorithms.md §2.2), not transcribed.

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  return factored.scale_by_factored_momentum(b1, sign=True, views=views,
                                            fused_kernel=fused_kernel)


def scale_by_lion_factor(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    views: matrix.ViewSpec = None,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LionFactor direction (docs/algorithms.md §2.3): double-β factored momentum.

  With u, v from the previous step:
  c_row = G + β1 (u − a) 1ᵀ;  c_col = G + β1 1 (v − b)ᵀ;
  D = ½[sign(c_row) + sign(c_col)];  then u ← β2 u + (1−β2) a,
  v ← β2 v + (1−β2) b.

  Args:
    b1: β1 in [0, 1), the interpolation of the sign argument.
    b2: β2 in [0, 1), the momentum decay.
    views: per-leaf :class:`optax_fac.MatrixView` override.
    fused_kernel: on NVIDIA GPUs, the row and column means of each matrix
      in one pass over G (:func:`optax_fac.factored.row_col_statistics`);
      False (default): XLA's two reductions. Static.

  .. note::
    The paper names LionFactor ("double-β, like Lion"); the exact form here
    is reconstructed (docs/algorithms.md §2.3).

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025;
    Chen et al., `Symbolic Discovery of Optimization Algorithms (Lion)
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  _common.check_unit_interval('b1', b1)
  _common.check_unit_interval('b2', b2)
  _common.check_static_bool('fused_kernel', fused_kernel,
                            'scale_by_lion_factor: ')

  def init_fn(params):
    _common.check_float_params(params, 'scale_by_lion_factor')
    views_tree = matrix.resolve_views(params, views, vectors=True)
    u, v = factored.init_row_col(params, views_tree)
    return FactoredMomentumState(count=_common.zero_count(), u=u, v=v)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    views_tree = matrix.resolve_views(updates, views, vectors=True)
    _common.check_same_structure(updates, state.u, 'scale_by_lion_factor',
                                 _common.row_stat_shape, views_tree)
    beta1 = jnp.asarray(b1, jnp.float32)
    beta2 = jnp.asarray(b2, jnp.float32)

    def one(g, u, v, view):
      g32 = _common.f32(g)
      a, b = factored.row_col_statistics(g, view, means=True, squares=False,
                                         fused_kernel=fused_kernel)
      c_row = g32 + beta1 * view.expand_rows(u - a)
      c_col = g32 + beta1 * view.expand_cols(v - b)
      d = 0.5 * (jnp.sign(c_row) + jnp.sign(c_col))
      return (d.astype(g.dtype), _common.ema(u, a, beta2),
              _common.ema(v, b, beta2))

    d, u, v = _common.map_leaves(one, 3, updates, updates, state.u, state.v,
                                 views_tree)
    return d, FactoredMomentumState(count=_common.increment(state.count), u=u,
                                    v=v)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)



# --------------------------------------------------------------------------
# Named optimizers: the transform on the matrices, Adam on the other leaves.


def hfac(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_eps: float = 1e-8,
    stack_leaves: compose.StackLeaves = True,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""H-Fac (docs/algorithms.md §2.1): factored momentum and second moment.

  Matrices get :func:`scale_by_hfac`; other leaves get Adam with the same
  β1, β2 and ε = ``fallback_eps`` (ε₁ = ``eps`` is added to G² and is far too
  small for Adam's denominator). W ← W − η(D + λW). Memory: 2(m + n)
  float32 values per (m, n) matrix, against 2mn for Adam.

  Learning rate: AdamW's best or a third of it (1e-3 was H-Fac's best in
  both sizes of the README's benchmark). In its swept benchmark (a 22.7 M
  LLaMA on Python source, 2000 steps, AdamW best at 3e-3) H-Fac's best
  peak rate was 1e-3, 3e-3 ended 5% worse, 3e-4 27% worse and 1e-2 did not
  train (final loss 3.47, finite); at its best rate it ended 9.7% above AdamW's
  validation loss (the factored second moment with full momentum,
  :func:`optax_fac.adafactor_momentum`, ended within 0.2%). On GaLore's
  LLaMA-60M (same data and schedule, AdamW best at 1e-3) the best rate was
  again 1e-3: 3e-3 stalled (+45% over 1e-3), 3e-4 ended 15% worse, and H-Fac
  ended 6.0% above AdamW. Sensitive: a factor of 3 either way from the best
  cost 5-45% here, so sweep around it.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: momentum decay β1 in [0, 1).
    b2: second-moment decay β2 in [0, 1).
    eps: ε₁ >= 0 added to G² (float32; the default 1e-30 as Adafactor's).
    clipping_threshold: d > 0 of the update clipping Û = U / max(1, RMS(U)/d)
      (as ``optax.adafactor``'s); None disables it.
    weight_decay: λ >= 0 of the decoupled decay W ← W − η(D + λW).
    mask: the weight-decay mask, exactly as ``optax.adamw``'s (bool tree,
      prefix or function of the params; None = every leaf).
    method_mask: which matrix leaves get H-Fac (same forms; None = every
      ndim >= 2 leaf); the others get the Adam fallback.
    views: per-leaf :class:`optax_fac.MatrixView` (tree, one view, or a
      function of the params) for leaves whose rows are not ``shape[:-1]``.
    fallback_eps: Adam's ε on the fallback leaves.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    fused_kernel: on NVIDIA GPUs, the matrices' row and column statistics
      in one pass over each gradient (a Pallas kernel). Off by default:
      measured, it was no faster than XLA's two reductions, or slower
      (the numbers: ``optax_fac/row_col_kernel.py``). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a few vectors
    per matrix plus Adam's moments of the fallback leaves.

  Raises:
    ValueError: a hyperparameter out of range (naming it); at init,
      non-float params or a mask/views tree that does not fit.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> params = {'w': jnp.ones((512, 256)), 'b': jnp.zeros(256)}
    >>> tx = optax_fac.hfac(learning_rate=1e-3)
    >>> optax_fac.state_size(tx, params)  # bytes; optax.adamw: 1050628
    8200
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  return compose.named_optimizer(
      compose.matrix_method(
          lambda v: scale_by_hfac(b1, b2, eps, clipping_threshold, views=v,
                                  fused_kernel=fused_kernel),
          views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=compose.adam_fallback(b1, b2, fallback_eps))


def sign_fsgd(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    stack_leaves: compose.StackLeaves = True,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""signFSGD (docs/algorithms.md §2.2): sign descent with factored momentum.

  Matrices get :func:`scale_by_sign_fsgd` (every entry of the step is ±1
  or 0, so the learning rate is the step's RMS: take it about 10x smaller
  than Adam's); other leaves get Adam (β1, ``fallback_b2``,
  ``fallback_eps``). Memory m + n float32 values per matrix.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: momentum decay β in [0, 1).
    weight_decay: λ >= 0; the step is W ← W − η(sign(·) + λW).
    mask: the leaves decayed, as ``optax.adamw``'s ``mask`` (None = all).
    method_mask: the matrix leaves that get signFSGD (None = every
      ndim >= 2 leaf); the others get Adam.
    views: :class:`optax_fac.MatrixView` overrides (tree, view, function).
    fallback_b2, fallback_eps: Adam's β2 in [0, 1) and ε >= 0 on the
      fallback leaves.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    fused_kernel: on NVIDIA GPUs, the matrices' row and column statistics
      in one pass over each gradient (a Pallas kernel). Off by default:
      measured, it was no faster than XLA's two reductions, or slower
      (the numbers: ``optax_fac/row_col_kernel.py``). Static.

  Returns:
    The signFSGD ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    >>> tx = optax_fac.sign_fsgd(learning_rate=0.1)
    >>> step, _ = tx.update({'w': w}, tx.init({'w': w}), {'w': w})
    >>> sorted(set(jnp.abs(step['w']).ravel().tolist()))  # 0.1 * |sign|
    [0.0, 0.10000000149011612]

  .. note::
    The paper names signFSGD; the step listing is reconstructed
    (docs/algorithms.md §2.2).

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  return compose.named_optimizer(
      compose.matrix_method(
          lambda v: scale_by_sign_fsgd(b1, views=v, fused_kernel=fused_kernel),
          views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=compose.adam_fallback(b1, fallback_b2, fallback_eps))


def lion_factor(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    stack_leaves: compose.StackLeaves = True,
    fused_kernel: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LionFactor (docs/algorithms.md §2.3): Lion's two βs, factored momentum.

  Matrices get :func:`scale_by_lion_factor`: the sign of an interpolation
  (β1) between the rank-1 momentum and the gradient, the momentum updated
  with β2; other leaves get Adam (β1, ``fallback_b2``, ``fallback_eps``).
  Memory m + n float32 values per matrix. As for ``optax.lion``, take η
  3-10x smaller than Adam's and λ correspondingly larger.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: β1 in [0, 1), the interpolation of the sign argument.
    b2: β2 in [0, 1), the momentum decay.
    weight_decay: λ >= 0 (decoupled, multiplied by η).
    mask: weight-decay mask with ``optax.adamw``'s meaning.
    method_mask: leaves given LionFactor if they are matrices (None = all
      ndim >= 2 leaves).
    views: matrix views of leaves (see :class:`optax_fac.MatrixView`).
    fallback_b2, fallback_eps: β2 and ε of the Adam fallback.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    fused_kernel: on NVIDIA GPUs, the matrices' row and column statistics
      in one pass over each gradient (a Pallas kernel). Off by default:
      measured, it was no faster than XLA's two reductions, or slower
      (the numbers: ``optax_fac/row_col_kernel.py``). Static.

  Returns:
    The LionFactor optimizer, an ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> tx = optax.inject_hyperparams(optax_fac.lion_factor)(learning_rate=3e-4)
    >>> state = tx.init({'kernel': jnp.ones((8, 4))})
    >>> float(state.hyperparams['learning_rate'])
    0.0003000000142492354

  .. note::
    The paper names LionFactor; its exact form is reconstructed
    (docs/algorithms.md §2.3).

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025;
    Chen et al., `Lion <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  return compose.named_optimizer(
      compose.matrix_method(
          lambda v: scale_by_lion_factor(b1, b2, views=v,
                                         fused_kernel=fused_kernel),
          views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=compose.adam_fallback(b1, fallback_b2, fallback_eps))


sharding.register_state_rule(HfacState, {
    'count': 'scalar', 'u': 'row', 'v': 'col', 'row': 'row', 'col': 'col'})
