"""Time one optimizer step (update + apply, jitted, donated buffers).

Three timings per optimizer, because on a tree of ~100 leaves the host's
dispatch of one call (hundreds of buffers) is comparable to the GPU work:

* ``sync``: median of single calls, each waited for (dispatch + device);
* ``pipelined``: many calls dispatched back to back, waited for once, as a
  training loop runs (per step: the larger of dispatch and device time);
* ``device``: ``lax.fori_loop`` over steps inside one jitted call (device
  time per step, no host dispatch).

Optimizer steps are memory-bound, so the table also shows the bytes an ideal
implementation must move (each array read/written once, counted per optimizer
below), the bytes XLA's cost analysis reports for the compiled step, the
achieved bandwidth on the ideal bytes (device timing) and the kernel count.

    python scripts/bench_step.py --model=llama130m \
        --optimizers=adamw,hfac,sign_fsgd --out=results/bench_step

Optimizers are named as in optax_fac (first) or optax. Prints a table and
writes ``<out>/bench_step_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import optax_fac  # noqa: E402

MODELS = {
    # GaLore's LLaMA configs: (d_model, ffn, layers, vocab)
    'tiny': (64, 172, 2, 256),
    'llama60m': (512, 1376, 8, 32000),
    'llama130m': (768, 2048, 12, 32000),
    'llama350m': (1024, 2736, 24, 32000),
}
# Single large matrices: no launch overhead, pure bandwidth.
SINGLE = {'matrix8k': (8192, 8192), 'matrix16k': (16384, 8192)}

# Arrays of parameter size an ideal step reads + writes (p, g in; p out = 3
# for stateless-looking steps; Adam also reads and writes m and v).
IDEAL_ARRAYS = {'adamw': 7, 'adam': 7, 'lion': 5, 'sgd': 3, 'adafactor': 3,
                'hfac': 3, 'sign_fsgd': 3, 'lion_factor': 3,
                'adafactor_momentum': 5, 'smmf': 3, 'adam_sn': 5,
                'rmsprop_sn': 3, 'adagrad_sn': 5, 'adam_snsm': 3}


def llama_shapes(d, ffn, layers, vocab):
  tree = {'embed': (vocab, d), 'final_norm': (d,), 'lm_head': (d, vocab)}
  for i in range(layers):
    tree[f'layer{i:02d}'] = {
        'q': (d, d), 'k': (d, d), 'v': (d, d), 'o': (d, d),
        'gate': (d, ffn), 'up': (d, ffn), 'down': (ffn, d),
        'attn_norm': (d,), 'mlp_norm': (d,)}
  return tree


def make_optimizer(spec: str, lr: float):
  """``name`` or ``name:key=value:key=value`` (values parsed as Python)."""
  import ast  # pylint: disable=import-outside-toplevel
  name, *pairs = spec.split(':')
  kwargs = {k: ast.literal_eval(v) for k, v in (p.split('=') for p in pairs)}
  if name in optax_fac.NAMED_OPTIMIZERS:
    return optax_fac.NAMED_OPTIMIZERS[name](learning_rate=lr, **kwargs)
  if name in ('adamw', 'lion'):
    return getattr(optax, name)(learning_rate=lr, weight_decay=0.0)
  return getattr(optax, name)(learning_rate=lr)


def bench_one(name, shapes, dtype, iters, warmup, seed=0, loop_steps=20):
  tx = make_optimizer(name, 1e-3)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(
      x, tuple))
  keys = jax.random.split(jax.random.key(seed), 2 * len(leaves))
  params = jax.tree.unflatten(treedef, [
      jax.random.normal(k, s, dtype) * 0.02 for k, s in zip(keys, leaves)])
  grads_list = [jax.tree.unflatten(treedef, [
      jax.random.normal(k, s, dtype) * 1e-3
      for k, s in zip(keys[len(leaves):], leaves)]) for _ in range(1)]
  state = jax.jit(tx.init)(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step_jit = jax.jit(step, donate_argnums=(0, 1))
  compiled = step_jit.lower(params, state, grads_list[0]).compile()
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_bytes = float(cost.get('bytes accessed', float('nan')))
  except Exception:  # pylint: disable=broad-except
    xla_bytes = float('nan')
  entry = compiled.as_text().split('ENTRY', 1)[-1]
  kernels = sum(1 for line in entry.splitlines()
                if ' fusion(' in line or 'custom-call(' in line)
  for _ in range(warmup):
    params, state = compiled(params, state, grads_list[0])
  jax.block_until_ready((params, state))
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    params, state = compiled(params, state, grads_list[i % len(grads_list)])
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  pipelined = []
  for _ in range(3):
    t0 = time.perf_counter()
    for i in range(iters):
      params, state = compiled(params, state, grads_list[i % len(grads_list)])
    jax.block_until_ready((params, state))
    pipelined.append((time.perf_counter() - t0) / iters)

  def loop(params, state, grads):
    return jax.lax.fori_loop(0, loop_steps, lambda _, c: step(*c, grads),
                             (params, state))
  looped = jax.jit(loop, donate_argnums=(0, 1)).lower(
      params, state, grads_list[0]).compile()
  params, state = looped(params, state, grads_list[0])
  jax.block_until_ready((params, state))
  device = []
  for _ in range(5):
    t0 = time.perf_counter()
    params, state = looped(params, state, grads_list[0])
    jax.block_until_ready((params, state))
    device.append((time.perf_counter() - t0) / loop_steps)
  n_params = sum(int(np.prod(s)) for s in leaves)
  state_bytes = optax_fac.state_size(tx, params)
  return {
      'optimizer': name,
      'median_ms': 1e3 * statistics.median(times),
      'min_ms': 1e3 * min(times),
      'p90_ms': 1e3 * float(np.percentile(times, 90)),
      'pipelined_ms': 1e3 * min(pipelined),
      'device_ms': 1e3 * min(device),
      'n_params': n_params,
      'state_bytes': state_bytes,
      'xla_bytes_accessed': xla_bytes,
      'kernels': kernels,
      'ideal_bytes': IDEAL_ARRAYS.get(name.split(':')[0], float('nan')) * n_params
                     * jnp.dtype(dtype).itemsize,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='llama130m',
                      choices=sorted(MODELS) + sorted(SINGLE))
  parser.add_argument('--optimizers', default='adamw,hfac,sign_fsgd')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--iters', type=int, default=50)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=2,
                      help='time the whole list this many times (spread)')
  parser.add_argument('--out', default='results/bench_step')
  parser.add_argument('--tag', default='',
                      help='suffix of the result file name')
  args = parser.parse_args(argv)

  shapes = ({'w': SINGLE[args.model]} if args.model in SINGLE
            else llama_shapes(*MODELS[args.model]))
  dtype = jnp.dtype(args.dtype)
  rows = []
  for rep in range(args.repeats):
    for name in args.optimizers.split(','):
      row = bench_one(name, shapes, dtype, args.iters, args.warmup)
      row['repeat'] = rep
      rows.append(row)
      print(f"{rep} {name:<22} {row['median_ms']:8.3f} ms", flush=True)

  base = {(r['repeat'], k): r[k] for r in rows if r['optimizer'] == 'adamw'
          for k in ('median_ms', 'pipelined_ms', 'device_ms')}
  print(f'\n{args.model} ({rows[0]["n_params"] / 1e6:.1f} M params, '
        f'{args.dtype}) on {jax.devices()[0].device_kind}')
  print('times in ms; x = ratio to adamw of the same repeat and timing')
  print(f'{"optimizer":<30} {"rep":>3} {"sync":>7} {"x":>5} {"pipel.":>7} '
        f'{"x":>5} {"device":>7} {"x":>5} {"state MiB":>9} {"ideal GB":>8} '
        f'{"XLA GB":>7} {"GB/s":>6} {"kernels":>7}')
  for r in rows:
    line = f"{r['optimizer']:<30} {r['repeat']:>3}"
    for key, short in (('median_ms', 'vs_adamw'),
                       ('pipelined_ms', 'pipelined_vs_adamw'),
                       ('device_ms', 'device_vs_adamw')):
      b = base.get((r['repeat'], key))
      r[short] = r[key] / b if b else float('nan')
      line += f" {r[key]:>7.3f} {r[short]:>5.2f}"
    bw = r['ideal_bytes'] / (r['device_ms'] * 1e-3) / 1e9
    print(f"{line} {r['state_bytes'] / 2**20:>9.1f} "
          f"{r['ideal_bytes'] / 1e9:>8.3f} {r['xla_bytes_accessed'] / 1e9:>7.3f}"
          f" {bw:>6.0f} {r['kernels']:>7}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f'bench_step_{args.model}_{args.dtype}{args.tag}.json')
  with open(path, 'w') as f:
    json.dump({'model': args.model, 'dtype': args.dtype,
               'device': jax.devices()[0].device_kind,
               'jax': jax.__version__, 'optax': optax.__version__,
               'host': platform.node(), 'rows': rows}, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
