"""Writes an SMMF state from the GPU kernel path, for the CPU restore test.

Run on an NVIDIA GPU; commits nothing by itself:

    python scripts/smmf_gpu_state.py --out=tests/data/smmf_gpu_state.npz

Trains ``optax_fac.smmf`` (``fused_kernel=True``: one Pallas kernel pass
per group of tiled leaves) for ``SAVE_AT`` steps on a small tree whose two
(64, 128) matrices the kernel tiles (a (100, 30) matrix and a vector take
the array code), then saves the leaves of ``(params, opt_state)`` with the
tree's structure, and the params after ``CONTINUE`` more steps: once with the
kernel, once with the array code (``fused_kernel=False``) from the same
state, both on the GPU. The gradients are a function of the step alone
(:func:`grads`), so the CPU test (tests/test_checkpoint_faults.py) restores
the state into its own template, continues with the same gradients and
compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import optax_fac  # noqa: E402
from optax_fac import smmf_kernel  # noqa: E402

SHAPES = {'w1': (64, 128), 'w2': (64, 128), 'odd': (100, 30), 'bias': (128,)}
LEARNING_RATE = 1e-2
SAVE_AT, CONTINUE = 4, 3


def params0() -> dict:
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in SHAPES.items()}


def grads(step: int) -> dict:
  """The gradient of (1-based) ``step``: float32, a function of it alone."""
  rng = np.random.default_rng(1000 + step)
  scale = rng.uniform(0.1, 2.0)
  return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
          for k, s in SHAPES.items()}


def make(fused_kernel: bool):
  return optax_fac.smmf(LEARNING_RATE, fused_kernel=fused_kernel)


def run(tx, params, state, first: int, last: int):
  """Steps ``first..last`` (1-based, inclusive) of ``tx`` from ``state``."""
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state
  for t in range(first, last + 1):
    params, state = step(params, state, grads(t))
  return params, state


def flat(tree) -> dict:
  return {f'{i:03d}': np.asarray(x) for i, x in
          enumerate(jax.tree.leaves(tree))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  traced = []
  kernel_step = smmf_kernel.smmf_group_step

  def counted(*a, **kw):
    traced.append(1)
    return kernel_step(*a, **kw)
  smmf_kernel.smmf_group_step = counted
  tx = make(True)
  params, state = run(tx, params0(), tx.init(params0()), 1, SAVE_AT)
  kernel_traces = len(traced)
  saved = (params, state)
  p_kernel, _ = run(tx, params, state, SAVE_AT + 1, SAVE_AT + CONTINUE)
  p_array, _ = run(make(False), params, state, SAVE_AT + 1,
                   SAVE_AT + CONTINUE)
  smmf_kernel.smmf_group_step = kernel_step
  # Traced on every backend (jax.lax.platform_dependent); lowered, and so
  # in the compiled step as a custom call, on CUDA alone.
  hlo = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(
      params, state, grads(1)).compile().as_text().lower()
  info = dict(device=jax.devices()[0].device_kind,
              platform=jax.devices()[0].platform, jax=jax.__version__,
              kernel_traces=kernel_traces,
              kernel_in_compiled_step=('triton' in hlo or 'mosaic' in hlo),
              save_at=SAVE_AT,
              continue_steps=CONTINUE,
              treedef=str(jax.tree.structure(saved)))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(
      args.out, info=json.dumps(info),
      **{f'saved_{k}': v for k, v in flat(saved).items()},
      **{f'kernel_{k}': v for k, v in flat(p_kernel).items()},
      **{f'array_{k}': v for k, v in flat(p_array).items()})
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(p_kernel), jax.tree.leaves(p_array)))
  print(json.dumps(dict(info, kernel_vs_array_max_abs=diff), indent=1))


if __name__ == '__main__':
  main()
