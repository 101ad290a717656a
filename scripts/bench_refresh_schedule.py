"""Step times over one refresh period: what a staggered schedule spreads out.

    python scripts/bench_refresh_schedule.py --model=llama1b \\
        --optimizer=adadiag:stagger=True --out=results/bench_refresh_schedule/x.json

On a GaLore LLaMA tree (scripts/bench_scale.py's, float32), one optimizer
step = ``tx.update`` + ``optax.apply_updates``, jitted, params and state
donated. The state's step counters are set to 1 (the first step, at which
every basis is computed, is left out), then steps 2 .. every + 1 run one by
one, each waited for: one whole period, so every leaf's refresh falls in it
once. With ``--periods`` > 1 the first period warms up (each branch's first
execution sets up its solver) and the last complete one is reported; if
``--max_seconds`` cut even the first, that partial period is reported with
``complete_period`` false (``steps_run`` counts every step run). Reported:
each step's time, the longest, the median, the sum (the period's cost) and
the amortized step (sum / steps reported), with ``optax.adamw``'s step
(minimum of ``--adamw_steps`` timed the same way, in the same process) for
the ratios. An optimizer without a periodic refresh is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import collections
import math

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from scripts import bench_scale  # noqa: E402
from optax_fac import rotation  # noqa: E402


def rotated_groups(state) -> dict:
  """How many bases a staggered schedule spreads over the period.

  Counts the rotated leaves of every :class:`optax_fac.SvdRotationState` in
  ``state`` (a stacked group of same-shape matrices is one leaf, refreshed
  in one step): ``groups``, the ``matrices`` they hold, and
  ``matrices_per_group`` ({matrices in a group: groups}).
  """
  sizes = []
  for node in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, rotation.SvdRotationState)):
    if not isinstance(node, rotation.SvdRotationState):
      continue
    keep_none = lambda x: x is None
    lefts = jax.tree.leaves(node.left, is_leaf=keep_none)
    rights = jax.tree.leaves(node.right, is_leaf=keep_none)
    for left, right in zip(lefts, rights):
      basis = left if left is not None else right
      if basis is not None:
        sizes.append(math.prod(basis.shape[:-2]))
  per_group = collections.Counter(sizes)
  return dict(groups=len(sizes), matrices=sum(sizes),
              matrices_per_group={str(k): per_group[k]
                                  for k in sorted(per_group)})


def timed_steps(spec, shapes, steps, deadline, periods=1, lr=1e-3):
  """(compile seconds, [ms per step] of each period run, in order, and
  :func:`rotated_groups` of the state).

  ``periods`` periods of ``steps`` steps after step 1; once ``deadline``
  passes no further step starts, so the last period may be partial.
  """
  tx = bench_scale.build(spec, lr)
  params = bench_scale.make_tree(shapes, 'float32', 0, 0.02)
  grads = bench_scale.make_tree(shapes, 'float32', 1, 1e-3)
  state, _ = bench_scale.set_counts(tx.init(params), 1)
  groups = rotated_groups(state)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps * periods):
    if time.perf_counter() > deadline:
      break
    t0 = time.perf_counter()
    params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(1e3 * (time.perf_counter() - t0))
  return (compile_s, [times[k:k + steps] for k in range(0, len(times), steps)],
          groups)


def last_period(periods, steps):
  """(the step times reported, whether they are one whole period): the
  last complete period, else the partial one (its steps are then fewer
  than ``steps``; with more than one period run, the first only warms up)."""
  complete = [p for p in periods if len(p) == steps]
  if complete:
    return complete[-1], True
  return (periods[-1] if periods else []), False


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='llama1b')
  p.add_argument('--optimizer', default='adadiag:stagger=True')
  p.add_argument('--every', type=int, default=None,
                 help='the period (default: the optimizer\'s own)')
  p.add_argument('--adamw_steps', type=int, default=20)
  p.add_argument('--periods', type=int, default=2)
  p.add_argument('--max_seconds', type=float, default=300.0)
  p.add_argument('--out', required=True)
  args = p.parse_args(argv)
  deadline = time.perf_counter() + args.max_seconds
  shapes = bench_scale.tree_shapes(args.model)
  info = bench_scale.optimizer_info(args.optimizer)
  if not info['refresh']:
    p.error(f'--optimizer={args.optimizer}: no periodic refresh (this '
            'script is for the rotation and subspace optimizers).')
  every = args.every or info['every']
  spec = args.optimizer + (f':every={every}' if args.every else '')
  _, adamw, _ = timed_steps('adamw', shapes, args.adamw_steps, deadline)
  if not adamw or not adamw[0]:
    sys.exit('bench_refresh_schedule.py: error: --max_seconds ran out '
             "before adamw's step was timed.")
  adamw_ms = min(adamw[0])
  print(f'adamw {adamw_ms:.2f} ms', flush=True)
  compile_s, periods, groups = timed_steps(spec, shapes, every, deadline,
                                           args.periods)
  times, complete = last_period(periods, every)
  if not times:
    sys.exit('bench_refresh_schedule.py: error: --max_seconds ran out '
             f'before a step of {spec} was timed.')
  doc = dict(
      model=args.model, optimizer=spec, every=every,
      device=jax.devices()[0].device_kind, jax=jax.__version__,
      adamw_ms=adamw_ms, compile_s=compile_s, periods=args.periods,
      periods_run=len(periods), steps_run=sum(map(len, periods)),
      steps_timed=len(times), complete_period=complete,
      rotated_groups=groups,
      step_ms=times,
      max_ms=max(times), median_ms=float(np.median(times)),
      sum_ms=sum(times), amortized_ms=sum(times) / len(times),
      max_vs_adamw=max(times) / adamw_ms,
      median_vs_adamw=float(np.median(times)) / adamw_ms,
      amortized_vs_adamw=sum(times) / len(times) / adamw_ms)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(doc, f, indent=1)
  print(json.dumps({k: v for k, v in doc.items() if k != 'step_ms'},
                   indent=1))


if __name__ == '__main__':
  main()
