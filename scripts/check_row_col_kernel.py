"""The one-pass row + column statistics kernel against XLA's, on the GPU.

    python scripts/check_row_col_kernel.py --model=llama1b \\
        --out=results/row_col_kernel/llama1b.json

On the matrices of a GaLore LLaMA tree (scripts/bench_scale.py's, float32),
grouped as ``optax_fac.stack_leaves`` groups them by default (same shape, at
most 64 MiB of gradients a group), computes every group's row and column
means of G (``means``: H-Fac's, signFSGD's, LionFactor's momentum
statistics), of G² (``squares``: Adafactor's), or both (H-Fac), three ways:

* ``xla``: the array code the optimizers run today on a stacked group (a
  row and a column reduction, ``optax_fac.matrix``'s ``row_mean`` and
  ``col_mean``, ``factored.factored_second_moment_update``'s sums of
  squares);
* ``kernel``: ``optax_fac.row_col_kernel.row_col_means`` (one pass a tile);
* ``read``: one ``jnp.sum`` per member, the floor (one read of G at XLA's
  streaming bandwidth).

Device time is the minimum over ``--repeats`` calls of a ``lax.fori_loop``
of ``--loop_steps`` evaluations inside one jit, divided by the steps (the
gradients pass an ``optimization_barrier`` each iteration, so XLA cannot
hoist the statistics out of the loop). Also reported: bytes of one read of
G, the achieved bandwidth, and the kernel's largest difference from the
array code relative to each statistic's largest value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from optax_fac import row_col_kernel  # noqa: E402
from optax_fac import stacking  # noqa: E402
from scripts import bench_scale  # noqa: E402

MODES = {'means': (True, False), 'squares': (False, True),
         'both': (True, True)}


def groups_of(shapes, cap=stacking.DEFAULT_MAX_GROUP_BYTES):
  """The 2-D leaves' shapes in stack_leaves' default groups: [(shape, B)]."""
  by_shape = {}
  for s in bench_scale.shape_leaves(shapes):
    if len(s) == 2:
      by_shape.setdefault(tuple(s), []).append(len(by_shape.get(tuple(s), [])))
  out = []
  for shape, members in by_shape.items():
    for g in stacking.split_members(members, 4 * math.prod(shape), cap):
      out.append((shape, len(g)))
  return out


def xla_stats(gs, means, squares):
  """What the optimizers' array code computes on a stacked group."""
  g = jnp.stack(gs)  # stacking.stack's; XLA fuses it into the reductions
  m, n = g.shape[1:]
  out = []
  if means:
    out += [jnp.mean(g, axis=2), jnp.mean(g, axis=1)]
  if squares:
    out += [jnp.sum(jnp.square(g * (1 / math.sqrt(n))), axis=2),
            jnp.sum(jnp.square(g * (1 / math.sqrt(m))), axis=1)]
  return out


def read_floor(gs, means, squares):
  del means, squares
  return [jnp.stack([jnp.sum(g) for g in gs])]


def looped(fn, steps):
  """``fn`` over every group, ``steps`` times in one jit; a scalar out."""
  def run(groups):
    def body(_, carry):
      groups, acc = carry
      groups = jax.lax.optimization_barrier(groups)
      for gs in groups:
        for s in fn(gs):
          acc = acc + s.reshape(-1)[0]
      return groups, acc
    return jax.lax.fori_loop(0, steps, body, (groups, jnp.zeros(())))[1]
  return jax.jit(run)


def time_ms(compiled, groups, steps, repeats):
  jax.block_until_ready(compiled(groups))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(groups))
    best = min(best, (time.perf_counter() - t0) / steps)
  return 1e3 * best


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='llama1b',
                 choices=sorted(bench_scale.MODELS),
                 help="the tree (scripts/bench_scale.py's models; default "
                 '%(default)s)')
  p.add_argument('--loop_steps', type=int, default=20,
                 help='evaluations per timed call (default %(default)s)')
  p.add_argument('--repeats', type=int, default=3,
                 help='timed calls; the fastest is reported (default '
                 '%(default)s)')
  p.add_argument('--interpret', action='store_true',
                 help="the kernel in Pallas' interpreter (a CPU smoke run)")
  p.add_argument('--out', required=True, help='the result JSON file')
  args = p.parse_args(argv)
  spec = groups_of(bench_scale.tree_shapes(args.model))
  key = iter(jax.random.split(jax.random.key(0), sum(b for _, b in spec)))
  groups = [[jax.random.normal(next(key), shape) * 1e-3 for _ in range(b)]
            for shape, b in spec]
  read_bytes = sum(4 * math.prod(s) * b for s, b in spec)
  doc = dict(model=args.model, device=jax.devices()[0].device_kind,
             jax=jax.__version__, groups=[[list(s), b] for s, b in spec],
             tiled=[list(s) for s, _ in spec
                    if row_col_kernel.tiling(*s) is not None],
             read_bytes=read_bytes, loop_steps=args.loop_steps, modes={})

  def kernel(gs, means, squares):
    return row_col_kernel.row_col_means(gs, means=means, squares=squares,
                                        interpret=args.interpret)

  for mode, (means, squares) in MODES.items():
    row = {}
    for name, fn in (('read', read_floor), ('xla', xla_stats),
                     ('kernel', kernel)):
      f = looped(lambda gs, fn=fn: fn(gs, means, squares), args.loop_steps)
      t0 = time.perf_counter()
      compiled = f.lower(groups).compile()
      row[f'{name}_compile_s'] = time.perf_counter() - t0
      ms = time_ms(compiled, groups, args.loop_steps, args.repeats)
      row[f'{name}_ms'] = ms
      row[f'{name}_gb_per_s'] = read_bytes / ms / 1e6
    row['kernel_vs_xla'] = row['kernel_ms'] / row['xla_ms']
    row['kernel_vs_read'] = row['kernel_ms'] / row['read_ms']
    # The kernel's values against the array code's, per statistic.
    err = 0.0
    for gs in groups:
      for a, b in zip(jax.jit(lambda gs: kernel(gs, means, squares))(gs),
                      jax.jit(lambda gs: xla_stats(gs, means, squares))(gs)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = max(err, float(np.abs(a - b).max() / max(np.abs(b).max(),
                                                         1e-30)))
    row['max_rel_diff'] = err
    doc['modes'][mode] = row
    print(mode, json.dumps({k: round(v, 4) for k, v in row.items()}),
          flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(doc, f, indent=1)


if __name__ == '__main__':
  main()
