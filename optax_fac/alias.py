"""Named optimizers: a method on the matrices, Adam on the rest (docs/algorithms.md §0).

Every named optimizer of the library is built by :func:`named_optimizer`:

    partition({'method': <method>, 'fallback': <Adam, float32 stats>}, labels)
    -> add_decayed_weights(weight_decay, mask)
    -> scale_by_learning_rate(learning_rate)

so W ← W − η(D + λW) everywhere (decoupled decay multiplied by the learning
rate, as ``optax.adamw``, and ``mask`` selects the decayed leaves as there).
A leaf gets the method if ``method_mask`` selects it and it is a matrix
(ndim >= 2, or given a view by ``views``); every other leaf (biases, norm
scales, leaves outside ``method_mask``) goes to the fallback.

``hfac``, ``sign_fsgd``, ``lion_factor`` and ``adafactor_momentum`` run their
method through :func:`matrix_method`: by default (``stack_leaves=True``) on
same-shape leaves stacked into one array per group (:mod:`optax_fac.stacking`),
which gives the same updates with a few kernels per group instead of per leaf.
"""


from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_fac import _common
from optax_fac import factored
from optax_fac import hfac as hfac_lib
from optax_fac import matrix
from optax_fac import stacking

METHOD = 'method'
FALLBACK = 'fallback'

MaskOrFn = Union[None, Any, Callable[[Any], Any]]


def scale_in_float32(
    inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on float32 copies of the updates; returns the input dtype.

  Keeps every statistic of ``inner`` in float32 whatever the parameter dtype
  (optax.scale_by_adam keeps its second moment in the parameter dtype, where
  float16 underflows G² and eps to 0).
  """
  inner = optax.with_extra_args_support(inner)

  def to_f32(tree):
    def one(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                    sharding=getattr(x, 'sharding', None))
      return x.astype(jnp.float32)
    return jax.tree.map(one, tree)

  def init_fn(params):
    return inner.init(to_f32(params))

  def update_fn(updates, state, params=None, **extra_args):
    params32 = None if params is None else to_f32(params)
    out, state = inner.update(to_f32(updates), state, params32, **extra_args)
    out = jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_fallback(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                  ) -> optax.GradientTransformationExtraArgs:
  """The default fallback for non-matrix leaves: Adam with float32 moments."""
  return scale_in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))


def exclude_by_name(*substrings: str) -> Callable[[Any], Any]:
  """A mask function: False for leaves whose path contains a substring.

  For ``method_mask`` (the paper-faithful LLaMA recipes keep Adam states for
  the token embedding and the LM head:
  ``method_mask=exclude_by_name('embed', 'lm_head')``) or for the
  weight-decay ``mask`` (``mask=exclude_by_name('bias', 'scale')``).

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> fn = optax_fac.exclude_by_name('embed')
    >>> fn({'embed': jnp.ones((8, 4)), 'w': jnp.ones((4, 4))})
    {'embed': False, 'w': True}
  """
  def mask(params):
    def keep(path, _):
      name = jax.tree_util.keystr(path)
      return not any(s in name for s in substrings)
    return jax.tree_util.tree_map_with_path(keep, params)
  return mask


def method_labels(method_mask: MaskOrFn = None, views: matrix.ViewSpec = None
                  ) -> Callable[[Any], Any]:
  """A labels function for optax.partition: 'method' or 'fallback' per leaf.

  A leaf gets 'method' if ``method_mask`` selects it and it has a matrix
  view (ndim >= 2, or a view given by ``views``).
  """

  def labels(params):
    # Leaves masked out by an outer optax.masked / optax.partition arrive as
    # optax.MaskedNode and keep that (no label) in the result.
    views_tree = matrix.resolve_views(params, views, vectors=False)
    mask_tree = _common.resolve_mask('method_mask', method_mask, params)
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_masked)
    flat_views = treedef.flatten_up_to(views_tree)
    flat_mask = treedef.flatten_up_to(mask_tree)
    flat = [x if _is_masked(x) else
            METHOD if (bool(m) and v is not None) else FALLBACK
            for x, v, m in zip(leaves, flat_views, flat_mask)]
    return jax.tree.unflatten(treedef, flat)

  return labels


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_moments(b1: Any = 0.0, b2: Any = 0.0, eps: Any = 0.0) -> None:
  """The checks of Adam-like hyperparameters: β in [0, 1), ε >= 0."""
  _common.check_unit_interval('b1', b1)
  _common.check_unit_interval('b2', b2)
  _common.check_nonnegative('eps', eps)


def named_optimizer(
    method: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    method_mask: MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a named optimizer: ``method`` on matrices, ``fallback`` elsewhere.

  ``partition({method, fallback}) -> add_decayed_weights(weight_decay, mask)
  -> scale_by_learning_rate(learning_rate)``, with the input checks of
  :func:`checked`.

  Args:
    method: a scale-only transform (no learning rate, no sign flip) for the
      selected matrix leaves. It must be built with the same ``views``.
    learning_rate: a float or an optax schedule (η).
    weight_decay: λ of the decoupled decay W ← W − ηλW (>= 0).
    mask: which leaves are decayed, exactly as in ``optax.adamw``: a bool
      tree (or prefix) or a function of the params; None = every leaf.
    method_mask: which leaves get ``method`` (bool tree or function of the
      params); None = every matrix leaf. Unselected leaves go to
      ``fallback``.
    views: per-leaf :class:`optax_fac.MatrixView` override.
    fallback: transform for every other leaf; default Adam with float32
      moments (:func:`adam_fallback`).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.
  """
  _common.check_nonnegative('learning_rate', learning_rate)
  _common.check_nonnegative('weight_decay', weight_decay)
  fallback = adam_fallback() if fallback is None else fallback
  return checked(optax.chain(
      optax.partition({METHOD: method, FALLBACK: fallback},
                      method_labels(method_mask, views)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), masks={'mask': mask, 'method_mask': method_mask}, views=views)


def matrix_method(make: Callable[[matrix.ViewSpec], optax.GradientTransformation],
                  views: matrix.ViewSpec = None,
                  stack_leaves: bool = True) -> optax.GradientTransformation:
  """``make(views)``, run on same-shape leaves stacked if ``stack_leaves``.

  Stacking (:func:`optax_fac.stack_leaves`) changes the state layout (one
  stacked statistic per group of equal-shape leaves), not the updates; it
  makes a step launch a few kernels per group instead of per leaf.
  """
  if stack_leaves:
    return stacking.stack_leaves(make, views=views)
  return make(views)


def _check_update_leaves(updates, params, where):
  """Raises ValueError naming the first update whose shape/dtype is off."""
  _common.check_same_structure(updates, params, where)
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree.leaves(params)):
    if tuple(u.shape) != tuple(p.shape):
      raise ValueError(
          f'{where}: update {matrix.leaf_path_str(path)} has shape '
          f'{tuple(u.shape)}, but the parameter has shape {tuple(p.shape)}.')


def checked(tx: optax.GradientTransformation, *,
            masks: Optional[dict] = None, views: matrix.ViewSpec = None
            ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` with the input checks every named optimizer makes.

  ``init`` rejects non-floating parameters (naming the leaf) and mask or
  views trees that do not fit the params (naming the argument and the leaf
  paths); ``update`` rejects updates whose tree or leaf shapes differ from
  the params'. The state is ``tx``'s own (nothing is added).
  """
  tx = optax.with_extra_args_support(tx)
  masks = dict(masks or {})

  def init_fn(params):
    if not _common.is_params_placeholder(params):
      _common.check_float_params(params, 'optax_fac optimizer init')
      for name, m in masks.items():
        _common.resolve_mask(name, m, params)
      matrix.resolve_views(params, views)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      _check_update_leaves(updates, params, 'optax_fac optimizer update')
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hfac(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    *,
    method_mask: MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_eps: float = 1e-8,
    stack_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""H-Fac (docs/algorithms.md §2.1): factored momentum and second moment.

  Matrices get :func:`optax_fac.scale_by_hfac`; other leaves get Adam with
  the same β1, β2 and ε = ``fallback_eps`` (ε₁ = ``eps`` is added to G² and is
  far too small for Adam's denominator). W ← W − η(D + λW).
  Memory: 2(m + n) float32 values per matrix.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1: momentum decay β1 in [0, 1).
    b2: second-moment decay β2 in [0, 1).
    eps: ε₁ >= 0 added to G² (float32).
    clipping_threshold: d > 0 of the update clipping Û = U / max(1, RMS(U)/d)
      (as ``optax.adafactor``'s); None disables it.
    weight_decay: λ >= 0 of the decoupled decay W ← W − η(D + λW).
    mask: which leaves are decayed, as in ``optax.adamw``: a bool tree (or a
      prefix of the params) or a function of the params; None = all.
    method_mask: which matrix leaves get the method (same forms as
      ``mask``); None = every ndim >= 2 leaf. The rest get the Adam fallback.
    views: per-leaf :class:`optax_fac.MatrixView` override (a tree, one view,
      or a function of the params).
    stack_leaves: run the method on same-shape leaves stacked into one array
      per group (:func:`optax_fac.stack_leaves`); same updates, fewer
      kernels.
    fallback_eps: Adam's ε on the fallback leaves.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
    >>> tx = optax_fac.hfac(learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  return named_optimizer(
      matrix_method(
          lambda v: hfac_lib.scale_by_hfac(b1, b2, eps, clipping_threshold, views=v),
          views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=adam_fallback(b1, b2, fallback_eps))


def sign_fsgd(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    *,
    method_mask: MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    stack_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""signFSGD (docs/algorithms.md §2.2): sign descent with factored momentum.

  Matrices get :func:`optax_fac.scale_by_sign_fsgd`; other leaves get Adam
  (β1, ``fallback_b2``, ``fallback_eps``). Memory m + n per matrix.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1: momentum decay β in [0, 1).
    weight_decay: λ >= 0 of the decoupled decay W ← W − η(D + λW).
    mask: which leaves are decayed, as in ``optax.adamw``: a bool tree (or a
      prefix of the params) or a function of the params; None = all.
    method_mask: which matrix leaves get the method (same forms as
      ``mask``); None = every ndim >= 2 leaf. The rest get the Adam fallback.
    views: per-leaf :class:`optax_fac.MatrixView` override (a tree, one view,
      or a function of the params).
    stack_leaves: run the method on same-shape leaves stacked into one array
      per group (:func:`optax_fac.stack_leaves`); same updates, fewer
      kernels.
    fallback_b2, fallback_eps: Adam's β2 and ε on the fallback leaves.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  .. note::
    The paper names signFSGD; the step listing is reconstructed
    (docs/algorithms.md §2.2).

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  return named_optimizer(
      matrix_method(lambda v: hfac_lib.scale_by_sign_fsgd(b1, views=v),
                    views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=adam_fallback(b1, fallback_b2, fallback_eps))


def lion_factor(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    *,
    method_mask: MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    stack_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""LionFactor (docs/algorithms.md §2.3): Lion's double-β with factored momentum.

  Matrices get :func:`optax_fac.scale_by_lion_factor`; other leaves get Adam
  (β1, ``fallback_b2``, ``fallback_eps``). Memory m + n per matrix.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1: β1 in [0, 1), the interpolation of the sign argument.
    b2: β2 in [0, 1), the momentum decay.
    weight_decay: λ >= 0 of the decoupled decay W ← W − η(D + λW).
    mask: which leaves are decayed, as in ``optax.adamw``: a bool tree (or a
      prefix of the params) or a function of the params; None = all.
    method_mask: which matrix leaves get the method (same forms as
      ``mask``); None = every ndim >= 2 leaf. The rest get the Adam fallback.
    views: per-leaf :class:`optax_fac.MatrixView` override (a tree, one view,
      or a function of the params).
    stack_leaves: run the method on same-shape leaves stacked into one array
      per group (:func:`optax_fac.stack_leaves`); same updates, fewer
      kernels.
    fallback_b2, fallback_eps: Adam's β2 and ε on the fallback leaves.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  .. note::
    The paper names LionFactor; its exact form is reconstructed
    (docs/algorithms.md §2.3).

  References:
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  return named_optimizer(
      matrix_method(lambda v: hfac_lib.scale_by_lion_factor(b1, b2, views=v),
                    views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=adam_fallback(b1, fallback_b2, fallback_eps))


def adafactor_momentum(
    learning_rate: optax.ScalarOrSchedule,
    b1: Optional[float] = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = None,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    *,
    method_mask: MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback_eps: float = 1e-8,
    stack_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Factored second moment with optional momentum (docs/algorithms.md §1).

  The base optimizer of AdafacDiag: :func:`optax_fac.scale_by_factored_rms`
  on matrices (``b1=None`` = without momentum, memory m + n; a float = with
  momentum on the gradient, memory mn + m + n), Adam on other leaves.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1: momentum decay in [0, 1), or None for no first moment.
    b2: second-moment decay β2 in [0, 1).
    eps: ε₁ >= 0 added to G² (float32).
    clipping_threshold: d > 0 of the update clipping (None = off).
    weight_decay: λ >= 0 of the decoupled decay W ← W − η(D + λW).
    mask: which leaves are decayed, as in ``optax.adamw``: a bool tree (or a
      prefix of the params) or a function of the params; None = all.
    method_mask: which matrix leaves get the method (same forms as
      ``mask``); None = every ndim >= 2 leaf. The rest get the Adam fallback.
    views: per-leaf :class:`optax_fac.MatrixView` override (a tree, one view,
      or a function of the params).
    stack_leaves: run the method on same-shape leaves stacked into one array
      per group (:func:`optax_fac.stack_leaves`); same updates, fewer
      kernels.
    fallback_eps: Adam's ε on the fallback leaves.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Shazeer & Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, 2018;
    Nguyen et al., `AdaDiag <https://arxiv.org/abs/2502.07488>`_, 2025.
  """
  return named_optimizer(
      matrix_method(
          lambda v: factored.scale_by_factored_rms(
              b1, b2, eps, clipping_threshold, views=v),
          views, stack_leaves),
      learning_rate=learning_rate, weight_decay=weight_decay,
      mask=mask, method_mask=method_mask, views=views,
      fallback=adam_fallback(0.9 if b1 is None else b1, b2, fallback_eps))
