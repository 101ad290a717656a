"""Named-optimizer plumbing: fallback, masks, float32, input checks (§0).

The one composition layer of the library. The ``scale_by_*`` transforms do
not use it; each named optimizer (written beside its transform: ``hfac`` in
hfac.py, ``adadiag`` in rotation.py, ...) is one call of
:func:`named_optimizer`::

    checked(chain(
        partition({'method': <method>, 'fallback': <Adam, float32 stats>},
                  method_labels(method_mask, views)),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate)))

so W ← W − η(D + λW) everywhere (decoupled decay multiplied by the learning
rate, as ``optax.adamw``, with ``mask`` selecting the decayed leaves as
there). A leaf gets the method if ``method_mask`` selects it and it is a
matrix (ndim >= 2, or given a view by ``views``); every other leaf (biases,
norm scales, leaves outside ``method_mask``) goes to the fallback. The
Subset-Norm family decays the updated weights after the step instead
(``decay_after_step``), as its official code does.

This module imports no algorithm module, so there is no cycle: algorithm
modules import it for their named optimizers only.
"""

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_fac import _common
from optax_fac import matrix
from optax_fac import stacking

METHOD = 'method'
FALLBACK = 'fallback'

MaskOrFn = Union[None, Any, Callable[[Any], Any]]


# --------------------------------------------------------------------------
# Float32 statistics and the fallback.


def scale_in_float32(
    inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on float32 copies of the updates; returns the input dtype.

  Keeps every statistic of ``inner`` in float32 whatever the parameter dtype
  (``optax.scale_by_adam`` keeps its second moment in the parameter dtype,
  where float16 underflows G² and ε to 0). The copies are made by
  :func:`optax_fac._common.tree_f32`, the library's one float32 rule.

  Args:
    inner: any transform; it sees float32 updates and params.

  Returns:
    A transform with ``inner``'s state and updates in the input dtypes.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> tx = optax_fac.scale_in_float32(optax.scale_by_adam())
    >>> state = tx.init({'w': jnp.ones(3, jnp.bfloat16)})
    >>> state.nu['w'].dtype
    dtype('float32')
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_common.tree_f32(params))

  def update_fn(updates, state, params=None, **extra_args):
    params32 = None if params is None else _common.tree_f32(params)
    out, state = inner.update(_common.tree_f32(updates), state, params32,
                              **extra_args)
    out = jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def first_moment_read_in_float32(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` with its stored first moment ``mu`` read as float32.

  With a narrow ``mu_dtype``, ``optax.scale_by_adam`` multiplies β1 by the
  stored bfloat16 μ in bfloat16 (one more rounding) before adding the
  float32 gradient term; read as float32, the stored μ is the float32 EMA
  rounded once to ``mu_dtype``. For a float32 μ it changes nothing.

  Args:
    inner: a transform whose state is a NamedTuple with a ``mu`` field
      (``optax.scale_by_adam(..., mu_dtype=...)``); it casts ``mu`` back to
      its ``mu_dtype`` itself.

  Returns:
    A transform with ``inner``'s state and updates.
  """
  def update_fn(updates, state, params=None):
    return inner.update(
        updates, state._replace(mu=_common.tree_f32(state.mu)), params)

  return optax.GradientTransformation(inner.init, update_fn)


def adam_fallback(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  *, mu_dtype: Optional[Any] = None
                  ) -> optax.GradientTransformationExtraArgs:
  """The default fallback for non-matrix leaves: Adam with float32 moments.

  Args:
    b1, b2: Adam's moment decays in [0, 1).
    eps: Adam's ε >= 0, added to sqrt(ν̂).
    mu_dtype: floating dtype of the stored first moment μ (ν stays
      float32); None = float32. Read into float32 at each step, rounded
      once when stored.

  Returns:
    ``scale_in_float32(optax.scale_by_adam(b1, b2, eps, mu_dtype=...))``.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> tx = optax_fac.adam_fallback(mu_dtype=jnp.bfloat16)
    >>> state = tx.init({'b': jnp.ones(3)})
    >>> state.mu['b'].dtype, state.nu['b'].dtype
    (dtype(bfloat16), dtype('float32'))
  """
  if mu_dtype is None:
    return scale_in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  dtype = _common.moment_dtype(mu_dtype, 'adam_fallback: ')
  return scale_in_float32(first_moment_read_in_float32(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=dtype)))


# --------------------------------------------------------------------------
# Masks.


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


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def method_labels(method_mask: MaskOrFn = None, views: matrix.ViewSpec = None
                  ) -> Callable[[Any], Any]:
  """A labels function for ``optax.partition``: 'method' or 'fallback'.

  A leaf gets 'method' if ``method_mask`` selects it and it has a matrix
  view (ndim >= 2, or a view given by ``views``). Leaves masked out by an
  outer ``optax.masked`` / ``optax.partition`` arrive as
  ``optax.MaskedNode`` and keep that (no label).
  """

  def labels(params):
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


# --------------------------------------------------------------------------
# Input checks.


def check_moments(b1: Any = 0.0, b2: Any = 0.0, eps: Any = 0.0) -> None:
  """Adam-like hyperparameters: β1, β2 in [0, 1), ε >= 0 (ValueError)."""
  _common.check_unit_interval('b1', b1)
  _common.check_unit_interval('b2', b2)
  _common.check_nonnegative('eps', eps)


def _check_update_leaves(updates, params, where):
  """Raises ValueError naming the first update whose shape is off."""
  _common.check_same_structure(updates, params, where)
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree.leaves(params)):
    if tuple(u.shape) != tuple(p.shape):
      raise ValueError(
          f'{where}: update {matrix.leaf_path_str(path)} has shape '
          f'{tuple(u.shape)}, but the parameter has shape {tuple(p.shape)}.')


def checked(tx: optax.GradientTransformationExtraArgs, *,
            masks: Optional[dict] = None, views: matrix.ViewSpec = None
            ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` with the input checks every named optimizer makes.

  ``init`` rejects non-floating parameters (naming the leaf) and mask or
  views trees that do not fit the params (naming the argument and the leaf
  paths); ``update`` rejects updates whose tree or leaf shapes differ from
  the params'. The state is ``tx``'s own (nothing is added).

  Args:
    tx: the optimizer (an ``optax.chain``).
    masks: ``{argument name: mask}`` to check against the params.
    views: the views argument to check.

  Returns:
    A transform with ``tx``'s state and updates.
  """
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


# --------------------------------------------------------------------------
# The named optimizer.


StackLeaves = Union[bool, int]


def matrix_method(make: Callable[[matrix.ViewSpec], optax.GradientTransformation],
                  views: matrix.ViewSpec = None, stack_leaves: StackLeaves = True,
                  **stack_kwargs) -> optax.GradientTransformation:
  """``make(views)``, run on same-shape leaves stacked if ``stack_leaves``.

  Stacking (:func:`optax_fac.stack_leaves`, which gets ``stack_kwargs``)
  changes the state layout (one stacked statistic per group of equal-shape
  leaves), not the updates; it makes a step launch a few kernels per group
  instead of per leaf. ``stack_leaves``: True (groups of at most
  ``stacking.DEFAULT_MAX_GROUP_BYTES``), False (leaf by leaf) or an int
  (groups of at most that many bytes).

  Raises:
    ValueError: if ``stack_leaves`` is neither a bool nor a positive int.
  """
  if isinstance(stack_leaves, (bool, np.bool_)):
    if not stack_leaves:
      return make(views)
  elif isinstance(stack_leaves, (int, np.integer)) and stack_leaves > 0:
    stack_kwargs = dict(stack_kwargs, max_group_bytes=int(stack_leaves))
  else:
    raise ValueError('stack_leaves must be True, False or a positive int '
                     f'(the bytes of a stacked group), got {stack_leaves!r}.')
  return stacking.stack_leaves(make, views=views, **stack_kwargs)


def named_optimizer(
    method: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    method_mask: MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
    partition: bool = True,
    decay_after_step: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a named optimizer: ``method`` on matrices, ``fallback`` elsewhere.

  ``partition({method, fallback}) -> add_decayed_weights(weight_decay, mask)
  -> scale_by_learning_rate(learning_rate)``, with the input checks of
  :func:`checked`.

  Args:
    method: a scale-only transform (no learning rate, no sign flip) for the
      selected matrix leaves. It must be built with the same ``views``.
    learning_rate: η >= 0, a float or an optax schedule.
    weight_decay: λ >= 0 of the decoupled decay W ← W − ηλW.
    mask: which leaves are decayed, exactly as in ``optax.adamw``: a bool
      tree (or prefix) or a function of the params; None = every leaf.
    method_mask: which leaves get ``method`` (bool tree or function of the
      params); None = every matrix leaf. Unselected leaves go to
      ``fallback``.
    views: per-leaf :class:`optax_fac.MatrixView` override (a tree, one
      view, or a function of the params).
    fallback: transform for every other leaf; default Adam with float32
      moments (:func:`adam_fallback`).
    partition: False runs ``method`` on every leaf (no fallback, no
      partition state; SMMF's default).
    decay_after_step: a transform placed after the learning rate that
      decays the updated weights (the Subset-Norm code's order,
      :func:`optax_fac.add_decayed_updated_weights`), replacing
      ``optax.adamw``'s ``add_decayed_weights(weight_decay, mask)`` before
      it.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: a negative ``learning_rate`` or ``weight_decay``; at init,
      non-float params or masks/views that do not fit (naming the leaves).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> tx = optax_fac.named_optimizer(optax_fac.scale_by_hfac(),
    ...                                learning_rate=1e-2)
    >>> state = tx.init({'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)})
    >>> sorted(state[0].inner_states)
    ['fallback', 'method']
  """
  _common.check_nonnegative('learning_rate', learning_rate)
  _common.check_nonnegative('weight_decay', weight_decay)
  if partition:
    fallback = adam_fallback() if fallback is None else fallback
    direction = optax.partition({METHOD: method, FALLBACK: fallback},
                                method_labels(method_mask, views))
  else:
    direction = method
  if decay_after_step is not None:
    tail = (optax.scale_by_learning_rate(learning_rate), decay_after_step)
  else:
    tail = (optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(learning_rate))
  return checked(optax.chain(direction, *tail),
                 masks={'mask': mask, 'method_mask': method_mask}, views=views)
