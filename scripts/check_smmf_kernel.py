"""Checks SMMF's GPU kernel against SMMF's array code, on the GPU.

Runs one step of ``optax_fac.smmf`` with ``fused_kernel=True`` (one Pallas
kernel pass per group of tiled leaves) and with ``fused_kernel=False`` (the
array code, which the CPU tests check against a float64 transcription) from
the same state, along a few steps of a LLaMA-shaped tree, and reports per
step the largest difference of the updates relative to the leaf's largest
update, of the new state factors relative to their size, and the fraction of
new sign bits that differ.

    python scripts/check_smmf_kernel.py --model=llama130m --steps=5 \
        --out=results/bench_step
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import optax_fac  # noqa: E402
from scripts import bench_step  # noqa: E402


def _f64(x):
  return np.asarray(x, np.float64)


def compare_states(sk, sa):
  """(largest factor difference relative to the factor's size, fraction of
  sign bits that differ)."""
  factor_err, sign_diff, sign_total = 0.0, 0, 0
  for a, b in zip(jax.tree.leaves(sk), jax.tree.leaves(sa)):
    if a.dtype == jnp.uint8:
      sign_diff += int(np.unpackbits(np.asarray(a) ^ np.asarray(b)).sum())
      sign_total += 8 * a.size
    elif a.ndim:
      scale = max(float(np.max(np.abs(_f64(b)))), 1e-30)
      factor_err = max(factor_err,
                       float(np.max(np.abs(_f64(a) - _f64(b)))) / scale)
  return factor_err, sign_diff / max(sign_total, 1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='llama130m')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--out', default='results/bench_step')
  args = parser.parse_args(argv)
  shapes = bench_step.llama_shapes(*bench_step.MODELS[args.model])
  dtype = jnp.dtype(args.dtype)
  key = jax.random.PRNGKey(0)
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves) * (args.steps + 1))
  params = jax.tree.unflatten(treedef, [
      (0.02 * jax.random.normal(keys[i], s)).astype(dtype)
      for i, s in enumerate(leaves)])
  grads = [jax.tree.unflatten(treedef, [
      (jax.random.normal(keys[(t + 1) * len(leaves) + i], s)
       * 10.0 ** (i % 5 - 4)).astype(dtype) for i, s in enumerate(leaves)])
           for t in range(args.steps)]
  kernel_tx = optax_fac.smmf(1e-3, weight_decay=0.1)
  arrays_tx = optax_fac.smmf(1e-3, weight_decay=0.1, fused_kernel=False)
  kernel_step = jax.jit(kernel_tx.update)
  arrays_step = jax.jit(arrays_tx.update)
  # One step of each path from the same (array path's) state, along the
  # array path's trajectory: the updates must agree to float32 rounding. (The
  # trajectories themselves drift apart: where M is within rounding of 0 its
  # sign bit may differ, and the next step decompresses that element with the
  # full rank-1 magnitude r_i c_j of either sign.)
  state = arrays_tx.init(params)
  rows = []
  for t, g in enumerate(grads):
    uk, sk = kernel_step(g, state, params)
    ua, sa = arrays_step(g, state, params)
    update_err = max(
        float(np.max(np.abs(_f64(a) - _f64(b))))
        / max(float(np.max(np.abs(_f64(b)))), 1e-30)
        for a, b in zip(jax.tree.leaves(uk), jax.tree.leaves(ua)))
    factor_err, sign_frac = compare_states(sk, sa)
    rows.append(dict(step=t + 1, update_rel_diff=update_err,
                     factor_rel_diff=factor_err,
                     sign_bits_differing=sign_frac))
    print(rows[-1])
    params, state = optax.apply_updates(params, ua), sa
  # The same kernel step inside jax.pmap (one device): as under jit.
  pmapped = jax.pmap(kernel_tx.update)
  add_axis = lambda x: jax.tree.map(lambda a: a[None], x)  # noqa: E731
  up, _ = pmapped(add_axis(grads[0]), add_axis(state), add_axis(params))
  uj, _ = kernel_step(grads[0], state, params)
  pmap_equal = all(bool(jnp.array_equal(a[0], b)) for a, b in
                   zip(jax.tree.leaves(up), jax.tree.leaves(uj)))
  print('pmap updates equal to jit:', pmap_equal)
  text = jax.jit(kernel_tx.update).lower(
      grads[0], kernel_tx.init(params), params).as_text()
  result = dict(model=args.model, dtype=args.dtype,
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                kernel_calls=text.count('smmf_group_step'),
                pmap_updates_equal_jit=pmap_equal, rows=rows)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out,
                      f'check_smmf_kernel_{args.model}_{args.dtype}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  print('wrote', path, 'kernel calls in the lowered step:',
        result['kernel_calls'])


if __name__ == '__main__':
  main()
