"""Cost of the AdaDiag rotation (docs/algorithms.md §3) against adamw, on GPU.

Three parts (``--parts``, default all):

* ``opt``: one optimizer step (update + apply_updates, jitted, donated
  params and state) on a LLaMA-130M-shaped tree (d 768, ffn 2048, 12 layers,
  vocab 32000, float32 params): adamw, hfac, adadiag non-refresh / refresh,
  hfac_diag non-refresh / refresh, adadiag_pp, the rotation alone
  (``svd_rotation(optax.identity())``), adadiag with the paper's mask
  (embedding and LM head keep Adam) and with ``precision="highest"``.
  A non-refresh step is timed with ``every`` = 10^9 (only t = 1, in the
  warm-up, refreshes); a refresh step with ``every=1``.
* ``train``: a full training step (forward, backward, optimizer) of a small
  byte-level LLaMA (pure JAX: RMSNorm, rotary attention, SwiGLU; d 384,
  6 layers, 6 heads, ffn 1024, vocab 256 → 10.8M parameters; batch 64 x 256;
  float32 params, bfloat16 compute) with adamw vs adadiag (non-refresh,
  refresh, and the amortised cost at every = 200).
* ``memory``: the optimizer-state table of docs/algorithms.md §6 for LLaMA
  60M/130M/350M/1B in bf16 accounting, the embedding and LM head keeping
  Adam states (``jax.eval_shape`` only, runs anywhere).

Every timing is the median over ``--steps`` individually timed steps
(``block_until_ready``) after ``--warmup`` steps. The table also gives the
FLOPs of the rotation matmuls (4 k² o per one-sided matrix with rotated side
k and other side o; 4 (m² n + m n²) two-sided) for comparison with the
measured overhead over adamw.

    python scripts/bench_rotation.py --out=results/bench_rotation
    python scripts/bench_rotation.py --tiny          # CPU smoke test

Writes ``<out>/bench_rotation.json`` (and ``memory_table.md``).
"""

from __future__ import annotations

import argparse
import json
import math
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
from optax_fac import rotation  # noqa: E402

NEVER = 10 ** 9  # an ``every`` that never refreshes again after t = 1


# --------------------------------------------------------------------------
# Trees and optimizers.


def llama_shapes(d, ffn, layers, vocab):
  tree = {'embed': (vocab, d), 'final_norm': (d,), 'lm_head': (d, vocab)}
  for i in range(layers):
    tree[f'layer{i:02d}'] = {
        'q': (d, d), 'k': (d, d), 'v': (d, d), 'o': (d, d),
        'gate': (d, ffn), 'up': (d, ffn), 'down': (ffn, d),
        'attn_norm': (d,), 'mlp_norm': (d,)}
  return tree


def is_shape(x):
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def not_embedding(params):
  """The papers' LLaMA recipe: embedding and LM head keep Adam states."""
  return {k: jax.tree.map(lambda _: k not in ('embed', 'lm_head'), v)
          for k, v in params.items()}


def optimizers(lr, part):
  """name -> (transform, description)."""
  out = {
      'adamw': (optax.adamw(lr, weight_decay=0.0), 'optax.adamw'),
      'adadiag': (optax_fac.adadiag(lr, every=NEVER), 'non-refresh step'),
      'adadiag_refresh': (optax_fac.adadiag(lr, every=1), 'refresh step'),
  }
  if part == 'opt':
    out.update({
        'rotation_only': (optax.chain(optax_fac.svd_rotation(
            optax.identity(), every=NEVER), optax.scale(-lr)),
                          'svd_rotation(identity): matmuls only'),
        'adadiag_highest': (optax_fac.adadiag(lr, every=NEVER,
                                              precision='highest'),
                            'non-refresh, full-f32 matmuls'),
        'adadiag_paper_mask': (optax_fac.adadiag(lr, every=NEVER,
                                                 method_mask=not_embedding),
                               'non-refresh, embedding/head on Adam'),
        'adadiag_svd_refresh': (optax_fac.adadiag(lr, every=1, basis='svd'),
                                'refresh step, basis="svd"'),
        'adadiag_pp': (optax_fac.adadiag_pp(lr, every=NEVER),
                       'two-sided, non-refresh'),
        'adadiag_pp_refresh': (optax_fac.adadiag_pp(lr, every=1),
                               'two-sided, refresh'),
        'hfac': (optax_fac.hfac(lr), 'base of hfac_diag'),
        'hfac_diag': (optax_fac.hfac_diag(lr, every=NEVER),
                      'non-refresh step'),
        'hfac_diag_refresh': (optax_fac.hfac_diag(lr, every=1),
                              'refresh step'),
    })
  return out


def rotation_flops(shapes, sides='one', max_dim=8192, mask_fn=None):
  """FLOPs of the forward + backward rotation matmuls of one step."""
  total = 0
  masked = mask_fn(shapes) if mask_fn else None
  flat = jax.tree.leaves(shapes, is_leaf=is_shape)
  flat_mask = (jax.tree.leaves(masked) if masked is not None
               else [True] * len(flat))
  for s, use in zip(flat, flat_mask):
    if len(s) < 2 or not use:
      continue
    m, n = math.prod(s[:-1]), s[-1]
    left, right = rotation.rotated_sides(s, sides=sides, max_dim=max_dim)
    total += 4 * m * m * n * left + 4 * m * n * n * right
  return total


# --------------------------------------------------------------------------
# Timing.


def time_steps(step, args, steps, warmup):
  """Median seconds of ``args = step(*args)``; args[0], args[1] donated."""
  for _ in range(warmup):
    args = step(*args)
  jax.block_until_ready(args)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    args = step(*args)
    jax.block_until_ready(args)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), args


def bench_opt(shapes, names, steps, warmup, refresh_steps, lr=1e-3):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = jax.tree.unflatten(treedef, [
      jax.random.normal(k, s, jnp.float32) * 1e-3
      for k, s in zip(keys, leaves)])
  results = {}
  for name, (tx, desc) in optimizers(lr, 'opt').items():
    if names and name not in names:
      continue
    params = jax.tree.map(lambda g: g * 20.0, grads)

    def step(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, grads

    step = jax.jit(step, donate_argnums=(0, 1))
    state = jax.jit(tx.init)(params)
    n = refresh_steps if 'refresh' in name else steps
    med, best, out = time_steps(step, (params, state, grads), n, warmup)
    del out
    results[name] = dict(median_ms=1e3 * med, min_ms=1e3 * best, steps=n,
                         description=desc)
    print(f'  {name:<22} {1e3 * med:9.3f} ms   ({desc})', flush=True)
  return results


# --------------------------------------------------------------------------
# A minimal byte-level LLaMA in pure JAX.


def init_llama(key, vocab, d, layers, ffn):
  def normal(k, *shape):
    return jax.random.normal(k, shape, jnp.float32) * 0.02
  keys = iter(jax.random.split(key, 3 + 7 * layers))
  params = {'embed': normal(next(keys), vocab, d),
            'final_norm': jnp.ones((d,)),
            'lm_head': normal(next(keys), d, vocab)}
  for i in range(layers):
    params[f'layer{i:02d}'] = {
        'q': normal(next(keys), d, d), 'k': normal(next(keys), d, d),
        'v': normal(next(keys), d, d), 'o': normal(next(keys), d, d),
        'gate': normal(next(keys), d, ffn), 'up': normal(next(keys), d, ffn),
        'down': normal(next(keys), ffn, d),
        'attn_norm': jnp.ones((d,)), 'mlp_norm': jnp.ones((d,))}
  return params


def rms_norm(x, w, eps=1e-6):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return (y * w).astype(x.dtype)


def rope(x, theta=10000.0):
  _, t, _, dh = x.shape
  freqs = theta ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
  return out.astype(x.dtype)


def llama_loss(params, tokens, heads, dtype):
  p = jax.tree.map(lambda w: w.astype(dtype), params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = p['embed'][inputs]
  b, t, d = x.shape
  layer_names = sorted(k for k in p if k.startswith('layer'))
  for name in layer_names:
    lp = p[name]
    h = rms_norm(x, lp['attn_norm'])
    q, k, v = (jnp.reshape(h @ lp[w], (b, t, heads, d // heads))
               for w in ('q', 'k', 'v'))
    att = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True)
    x = x + att.reshape(b, t, d) @ lp['o']
    h = rms_norm(x, lp['mlp_norm'])
    x = x + (jax.nn.silu(h @ lp['gate']) * (h @ lp['up'])) @ lp['down']
  logits = (rms_norm(x, p['final_norm']) @ p['lm_head']).astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, targets))


def bench_train(cfg, names, steps, warmup, refresh_steps, dtype, lr=1e-3):
  vocab, d, layers, ffn, heads, batch, seq = cfg
  params0 = init_llama(jax.random.key(1), vocab, d, layers, ffn)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, vocab)
  results = {'n_params': int(n_params)}
  shapes = jax.tree.map(lambda x: tuple(x.shape), params0)
  results['rotation_gflops'] = rotation_flops(
      jax.tree.map(tuple, shapes, is_leaf=is_shape)) / 1e9
  for name, (tx, desc) in optimizers(lr, 'train').items():
    if names and name not in names:
      continue
    params = jax.tree.map(jnp.copy, params0)

    def step(params, state, tokens, tx=tx):
      loss, grads = jax.value_and_grad(llama_loss)(params, tokens, heads,
                                                   dtype)
      updates, state = tx.update(grads, state, params)
      del loss
      return optax.apply_updates(params, updates), state, tokens

    step = jax.jit(step, donate_argnums=(0, 1))
    state = jax.jit(tx.init)(params)
    n = refresh_steps if 'refresh' in name else steps
    med, best, out = time_steps(step, (params, state, tokens), n, warmup)
    del out
    results[name] = dict(median_ms=1e3 * med, min_ms=1e3 * best, steps=n,
                         description=desc)
    print(f'  {name:<22} {1e3 * med:9.3f} ms   ({desc})', flush=True)
  if 'adadiag' in results and 'adadiag_refresh' in results:
    results['adadiag_amortized_every200_ms'] = (
        (199 * results['adadiag']['median_ms']
         + results['adadiag_refresh']['median_ms']) / 200)
  return results


# --------------------------------------------------------------------------
# The memory table of docs/algorithms.md §6.

PAPER_G = 1024 * 10 ** 6   # the papers' "G": 1024 MB of 10^6 bytes
PUBLISHED_1B = {'adam': 5.23, 'adadiag': 6.61, 'adadiag_pp': 11.59,
                'adafactor_no_momentum': 0.26, 'hfac': 0.52, 'hfac_diag': 1.89}
LLAMA_SIZES = {'60m': (512, 1376, 8), '130m': (768, 2048, 12),
               '350m': (1024, 2736, 24), '1b': (2048, 5461, 24)}


def memory_optimizers(lr=1e-3):
  m = not_embedding
  return {
      'adam': optax.adamw(lr),
      'adadiag': optax_fac.adadiag(lr, method_mask=m),
      'adadiag_pp': optax_fac.adadiag_pp(lr, method_mask=m),
      'adafactor_no_momentum': optax_fac.named_optimizer(
          optax_fac.scale_by_factored_rms(b1=None), learning_rate=lr, method_mask=m,
          fallback=optax_fac.scale_in_float32(optax.scale_by_rms())),
      'adafactor_momentum': optax_fac.adafactor_momentum(lr, method_mask=m),
      'adafac_diag_no_momentum': optax_fac.adafac_diag(lr, b1=None, method_mask=m),
      'adafac_diag': optax_fac.adafac_diag(lr, method_mask=m),
      'hfac': optax_fac.hfac(lr, method_mask=m),
      'hfac_diag': optax_fac.hfac_diag(lr, method_mask=m),
  }


def memory_table(sizes):
  table = {}
  for size, (d, ffn, layers) in sizes.items():
    shapes = llama_shapes(d, ffn, layers, 32000)
    tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                        shapes, is_leaf=is_shape)
    table[size] = {name: optax_fac.state_size(tx, tree, dtype_bytes=2)
                   / PAPER_G for name, tx in memory_optimizers().items()}
  names = list(memory_optimizers())
  lines = ['| optimizer | ' + ' | '.join(f'LLaMA {s}' for s in table)
           + ' | published 1.3B |',
           '|---|' + '---|' * (len(table) + 1)]
  for name in names:
    pub = PUBLISHED_1B.get(name)
    lines.append(f'| {name} | ' + ' | '.join(
        f'{table[s][name]:.2f}' for s in table)
                 + f" | {'' if pub is None else f'{pub:.2f}'} |")
  text = '\n'.join(lines)
  return table, text


# --------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='results/bench_rotation')
  parser.add_argument('--parts', default='opt,train,memory')
  parser.add_argument('--only', default='',
                      help='comma-separated optimizer names (default all)')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--refresh-steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--compute-dtype', default='bfloat16')
  parser.add_argument('--tiny', action='store_true',
                      help='tiny sizes and few steps (CPU smoke test)')
  args = parser.parse_args(argv)
  parts = args.parts.split(',')
  names = [n for n in args.only.split(',') if n]
  if args.tiny:
    tree_cfg = (64, 128, 2, 512)
    train_cfg = (256, 32, 2, 64, 4, 2, 16)
    args.steps, args.refresh_steps, args.warmup = 3, 2, 1
    mem_sizes = {'60m': LLAMA_SIZES['60m']}
  else:
    tree_cfg = (768, 2048, 12, 32000)          # LLaMA-130M
    train_cfg = (256, 384, 6, 1024, 6, 64, 256)  # byte-level, 10.8M params
    mem_sizes = LLAMA_SIZES
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  report = {'device': getattr(dev, 'device_kind', str(dev)),
            'platform': dev.platform, 'jax': jax.__version__,
            'optax': optax.__version__, 'python': platform.python_version(),
            'steps': args.steps, 'refresh_steps': args.refresh_steps,
            'warmup': args.warmup, 'tiny': args.tiny}
  print(f"device: {report['device']} ({report['platform']}), "
        f"jax {jax.__version__}")

  if 'opt' in parts:
    d, ffn, layers, vocab = tree_cfg
    shapes = llama_shapes(d, ffn, layers, vocab)
    print(f'\n[opt] optimizer step on a LLaMA tree d={d} ffn={ffn} '
          f'layers={layers} vocab={vocab} (float32)')
    res = bench_opt(shapes, names, args.steps, args.warmup,
                    args.refresh_steps)
    res['tree'] = dict(d=d, ffn=ffn, layers=layers, vocab=vocab)
    res['n_params'] = int(sum(math.prod(s) for s in jax.tree.leaves(
        shapes, is_leaf=is_shape)))
    res['rotation_gflops'] = rotation_flops(shapes) / 1e9
    res['rotation_gflops_paper_mask'] = rotation_flops(
        shapes, mask_fn=not_embedding) / 1e9
    report['opt'] = res
    _print_ratios(res)

  if 'train' in parts:
    vocab, d, layers, ffn, heads, batch, seq = train_cfg
    print(f'\n[train] byte-level LLaMA d={d} layers={layers} ffn={ffn} '
          f'heads={heads}, batch {batch}x{seq}, compute {args.compute_dtype}')
    res = bench_train(train_cfg, names, args.steps, args.warmup,
                      args.refresh_steps, jnp.dtype(args.compute_dtype))
    res['config'] = dict(vocab=vocab, d=d, layers=layers, ffn=ffn,
                         heads=heads, batch=batch, seq=seq,
                         compute_dtype=args.compute_dtype)
    print(f"  params: {res['n_params'] / 1e6:.2f} M")
    report['train'] = res
    _print_ratios(res)

  if 'memory' in parts:
    table, text = memory_table(mem_sizes)
    print('\n[memory] optimizer state, bf16 accounting, embedding/LM head '
          'keep Adam; unit: the papers\' G = 1.024e9 bytes\n' + text)
    report['memory'] = dict(unit_bytes=PAPER_G, table=table,
                            published_1b=PUBLISHED_1B)
    with open(os.path.join(args.out, 'memory_table.md'), 'w') as f:
      f.write('Optimizer-state memory (docs/algorithms.md §6): bf16 accounting, '
              'embedding and LM head keep Adam states, unit G = 1.024e9 '
              'bytes.\nWritten by scripts/bench_rotation.py --parts=memory.'
              '\n\n' + text + '\n')

  path = os.path.join(args.out, 'bench_rotation.json')
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  old.update(report)
  with open(path, 'w') as f:
    json.dump(old, f, indent=1, sort_keys=True)
  print(f'\nwrote {path}')


def _print_ratios(res):
  base = res.get('adamw', {}).get('median_ms')
  if not base:
    return
  print(f"  vs adamw ({base:.3f} ms):")
  for name, r in res.items():
    if isinstance(r, dict) and 'median_ms' in r and name != 'adamw':
      print(f"    {name:<22} x{r['median_ms'] / base:6.2f}   "
            f"+{r['median_ms'] - base:8.3f} ms")
  if 'rotation_gflops' in res:
    print(f"  rotation matmuls: {res['rotation_gflops']:.1f} GFLOP per step")


if __name__ == '__main__':
  main()
