"""Optimizers and schedules by name, for configs.

``make_optimizer('hfac', schedule, weight_decay=0.1, method_exclude=('embed',))``
looks the name up in ``optax_fac.NAMED_OPTIMIZERS`` first, then in ``optax``
(dotted names such as ``contrib.muon`` are looked up under ``optax``). Keyword
arguments are checked against the optimizer's signature, so a typo in
``config.optimizer_kwargs`` fails with the list of accepted names.

Masks are built from parameter *names* (flattened paths ``a/b/kernel``,
matched with ``re.search``), which survive layer stacking unlike shape-based
masks:

* ``method_exclude``: leaves that an optax_fac optimizer must leave to its
  fallback (Adam) — the papers' LLaMA recipes exclude the token embedding
  and the LM head. Passed as the optimizer's ``method_mask``; ignored by
  optax's own optimizers (they are the baselines and treat every leaf alike).
* ``weight_decay_exclude``: leaves without weight decay (passed as ``mask``,
  which means the weight-decay mask in optax_fac as in optax.adamw).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import optax

import optax_fac


def path_names(params: Any) -> Any:
  """A tree like ``params`` whose leaves are their 'a/b/kernel' path names."""
  def name(path, _):
    parts = []
    for k in path:
      for attr in ('key', 'name', 'idx'):
        if hasattr(k, attr):
          parts.append(str(getattr(k, attr)))
          break
      else:
        parts.append(str(k))
    return '/'.join(parts)
  return jax.tree_util.tree_map_with_path(name, params)


def name_mask(exclude: Iterable[str]) -> Callable[[Any], Any]:
  """A mask function: True for leaves whose name matches none of ``exclude``."""
  patterns = [re.compile(p) for p in exclude]

  def mask(params):
    return jax.tree.map(lambda n: not any(p.search(n) for p in patterns),
                        path_names(params))
  return mask


def _takes_learning_rate(fn) -> bool:
  """Whether an optax function is an optimizer (takes a learning rate)."""
  if isinstance(fn, type):
    return False
  name = getattr(fn, '__name__', '')
  if name.startswith(('scale_by', 'add_')):
    return False
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return 'learning_rate' in params


def available_optimizers() -> dict[str, list[str]]:
  """Names ``make_optimizer`` accepts, by module (optax_fac first).

  The optax_fac names are ``optax_fac.NAMED_OPTIMIZERS`` (in its order).
  """
  ours = list(optax_fac.NAMED_OPTIMIZERS)
  theirs = sorted(n for n in dir(optax) if not n.startswith('_')
                  and callable(getattr(optax, n))
                  and _takes_learning_rate(getattr(optax, n))
                  and n not in ours)
  return {'optax_fac': ours, 'optax': theirs}


def lookup(name: str):
  """Returns ``(module_name, factory)`` for an optimizer name."""
  if name in optax_fac.NAMED_OPTIMIZERS:
    return 'optax_fac', optax_fac.NAMED_OPTIMIZERS[name]
  obj = optax
  for part in name.split('.'):
    obj = getattr(obj, part, None)
    if obj is None:
      break
  if obj is not None and callable(obj) and _takes_learning_rate(obj):
    return 'optax', obj
  names = available_optimizers()
  raise ValueError(
      f'Unknown optimizer {name!r}. optax_fac optimizers: '
      f'{", ".join(names["optax_fac"])}. optax optimizers: '
      f'{", ".join(names["optax"])} (and dotted names such as contrib.muon).')


def make_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    method_exclude: Sequence[str] = (),
    weight_decay_exclude: Sequence[str] = (),
    grad_clip: Optional[float] = None,
    **kwargs,
) -> optax.GradientTransformation:
  """Builds a named optimizer (optax_fac first, then optax) for a config.

  Args:
    name: e.g. ``'hfac'``, ``'adadiag'``, ``'adamw'``, ``'contrib.muon'``.
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay (must be 0 for optimizers without a
      ``weight_decay`` argument).
    method_exclude: name patterns of leaves an optax_fac optimizer leaves to
      its fallback (its ``method_mask`` argument).
    weight_decay_exclude: name patterns of leaves without weight decay.
    grad_clip: if set, ``optax.clip_by_global_norm(grad_clip)`` first.
    **kwargs: further keyword arguments of the optimizer (``b1``, ...).

  Returns:
    The optax transformation.
  """
  module, factory = lookup(name)
  accepted = inspect.signature(factory).parameters
  has_var_kw = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
  unknown = sorted(k for k in kwargs if k not in accepted)
  if unknown and not has_var_kw:
    raise ValueError(
        f'Optimizer {name!r} ({module}) does not accept {unknown}; it accepts '
        f'{sorted(k for k in accepted if k != "learning_rate")}.')
  kwargs = dict(kwargs)
  if weight_decay:
    if 'weight_decay' not in accepted:
      raise ValueError(f'Optimizer {name!r} ({module}) has no weight_decay '
                       'argument; set weight_decay=0.')
    kwargs['weight_decay'] = weight_decay
    if weight_decay_exclude:
      wd_mask = name_mask(weight_decay_exclude)
      if 'mask' in accepted:
        kwargs['mask'] = wd_mask  # the weight-decay mask, as in optax.adamw
      else:
        raise ValueError(f'Optimizer {name!r} ({module}) takes no weight-decay '
                         'mask; set weight_decay_exclude=().')
  if method_exclude and module == 'optax_fac':
    if 'method_mask' not in accepted:
      raise ValueError(f'Optimizer {name!r} takes no method_mask; set '
                       'method_exclude=().')
    kwargs['method_mask'] = name_mask(method_exclude)
  tx = factory(learning_rate=learning_rate, **kwargs)
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


def make_schedule(
    peak: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    decay: str = 'cosine',
    final_fraction: float = 0.0,
) -> optax.Schedule:
  """Linear warmup from 0 to ``peak``, then a decay to ``final_fraction·peak``.

  Args:
    peak: the peak learning rate.
    total_steps: number of training steps (warmup included).
    warmup_steps: linear warmup steps.
    decay: 'cosine', 'linear' or 'constant'.
    final_fraction: the end value as a fraction of ``peak`` (GaLore's LLaMA
      recipe: cosine to 10%; the ViT recipe: linear to 0).
  """
  warmup_steps = int(warmup_steps)
  total_steps = int(total_steps)
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f'warmup_steps={warmup_steps} must be in [0, '
                     f'total_steps={total_steps}].')
  rest = max(total_steps - warmup_steps, 1)
  end = peak * final_fraction
  if decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, rest, alpha=final_fraction)
  elif decay == 'linear':
    after = optax.linear_schedule(peak, end, rest)
  elif decay == 'constant':
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"decay={decay!r}: use 'cosine', 'linear' or 'constant'.")
  if warmup_steps == 0:
    return after
  warm = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])
