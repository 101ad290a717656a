"""Gradient accumulation that runs the inner optimizer once per real step.

``optax.MultiSteps`` (optax 0.2.8) calls the inner ``update`` on every
micro-step, with the gradient accumulated so far and the inner state of the
last real step, and keeps the new inner state only on the last micro-step
(``jnp.where(emit, new, old)``). For most optimizers that is only wasted
arithmetic, but for transforms with an expensive periodic refresh
(:func:`optax_fac.svd_rotation`'s eigh/SVD, the subspace SVD of
:func:`optax_fac.adam_snsm`) it means the refresh runs on each of the k
micro-steps of a refresh step: the inner counter does not advance on
micro-steps, and the inner transform sees nothing that tells a micro-step from
a real step, so it cannot skip the work itself.

:class:`MultiSteps` here is a drop-in subclass whose inner update runs under
``jax.lax.cond(emit, ...)``: on non-emitting micro-steps no inner work runs at
all. Constructor, state (``optax.MultiStepsState``), ``has_updated``,
``gradient_transformation`` and ``should_skip_update_fn`` behave as in optax.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

# The keyword under which MultiSteps.update passes the emit flag to the gate
# around the inner optimizer (through optax.MultiSteps' extra-args forwarding).
_EMIT = '_optax_fac_multisteps_emit'


def _gated(inner: optax.GradientTransformationExtraArgs
           ) -> optax.GradientTransformationExtraArgs:
  """``inner`` whose update runs only when the extra arg ``_EMIT`` is True.

  When it is False the update returns zeros shaped like ``inner``'s updates
  and the state unchanged. Without ``_EMIT`` it is ``inner`` itself.
  """

  def update_fn(updates, state, params=None, **extra_args):
    emit = extra_args.pop(_EMIT, None)
    if emit is None:
      return inner.update(updates, state, params, **extra_args)

    def run(updates, state):
      new_updates, new_state = inner.update(updates, state, params,
                                            **extra_args)
      # optax.MultiSteps keeps the old state's dtypes (jnp.where + astype);
      # lax.cond also needs both branches to agree.
      new_state = jax.tree.map(lambda n, s: jnp.asarray(n, jnp.result_type(s)),
                               new_state, state)
      return new_updates, new_state

    def hold(updates, state):
      shapes = jax.eval_shape(run, updates, state)[0]
      return optax.tree.zeros_like(shapes), state

    return jax.lax.cond(emit, run, hold, updates, state)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


class MultiSteps(optax.MultiSteps):
  """``optax.MultiSteps`` that runs the inner update once per real step.

  Same constructor, state type (``optax.MultiStepsState``: checkpoints, tree
  structure and :func:`optax_fac.state_partition_specs` are unchanged) and
  results as ``optax.MultiSteps``: every k-th call returns the inner
  optimizer's update of the accumulated (mean or summed) gradient, the other
  calls return zeros. The difference is cost: optax 0.2.8 runs the inner
  update on every micro-step and discards the result (``jnp.where``); here it
  runs under ``jax.lax.cond`` on the emit flag, so the k − 1 non-emitting
  micro-steps do no inner work. This matters for transforms with an
  expensive refresh: :func:`optax_fac.svd_rotation` decomposes once per
  refresh step instead of k times. [decided]

  Differences from ``optax.MultiSteps`` that can be observed: on a
  non-emitting micro-step the returned updates are exact zeros (optax returns
  ``0 * u`` of an update of the partial accumulation, i.e. -0.0 or NaN where
  that update was negative or not finite); and the inner transform no longer
  sees partial accumulations (a ``jax.debug.callback`` inside it fires once
  per real step). ``inner_opt`` returns the wrapped optimizer.

  Args:
    opt: the wrapped optimizer.
    every_k_schedule: an int, or a function of the gradient step count
      returning the number of micro-steps per real step.
    use_grad_mean: average (True) or sum (False) the accumulated gradients.
    should_skip_update_fn: as in ``optax.MultiSteps``: a rejected micro-step
      leaves the state (except ``skip_state``) unchanged.
    accumulator_dtype: dtype of the accumulated gradients (float32).

  Example::

    tx = optax_fac.MultiSteps(optax_fac.adadiag(1e-3), every_k_schedule=4)
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: Union[int, Callable[[Any], Any]],
      use_grad_mean: bool = True,
      should_skip_update_fn: Optional[Callable[..., Any]] = None,
      accumulator_dtype: Any = jnp.float32,
  ):
    self._optax_fac_inner = optax.with_extra_args_support(opt)
    super().__init__(_gated(self._optax_fac_inner), every_k_schedule,
                     use_grad_mean=use_grad_mean,
                     should_skip_update_fn=should_skip_update_fn,
                     accumulator_dtype=accumulator_dtype)
    if isinstance(every_k_schedule, int):
      self._optax_fac_k = lambda step: every_k_schedule
    else:
      self._optax_fac_k = every_k_schedule

  @property
  def inner_opt(self):
    return self._optax_fac_inner

  def update(self, updates, state, params=None, **extra_args):
    """Accumulates gradients; runs the inner update on every k-th call only."""
    if _EMIT in extra_args:
      raise ValueError(f'{_EMIT!r} is reserved by optax_fac.MultiSteps.')
    # The same flag optax.MultiSteps computes inside its update.
    emit = state.mini_step == (self._optax_fac_k(state.gradient_step) - 1)
    return super().update(updates, state, params,
                          **{_EMIT: jnp.asarray(emit)}, **extra_args)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(init=self.init,
                                                 update=self.update)
