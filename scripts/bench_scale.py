"""Optimizer steps at scale: time, bandwidth and memory on GaLore LLaMA trees.

What it measures. For each (model, dtype, optimizer), one optimizer step =
``tx.update`` + ``optax.apply_updates``, jitted, params and optimizer state
donated, gradients an (undonated) input that stays alive outside the step.
Gradients are random normal arrays of the params' shapes and dtypes, made on
the device (this benchmarks the optimizer step, not a model). Per optimizer:

* ``device_ms``: device time per step, a ``lax.fori_loop`` of ``loop_steps``
  steps inside one jitted call (min over ``--repeats`` calls / loop_steps;
  an ``optimization_barrier`` ties the constant grads to each iteration, so
  XLA cannot hoist grad-only work out of the loop);
* ``pipelined_ms``: steps dispatched back to back from Python and waited for
  once (what a training loop sees: the larger of host dispatch and device
  time), and ``sync_ms``: the median of single steps each waited for;
* ratios to ``optax.adamw`` of the same run, model and dtype (``*_vs_adamw``;
  adamw is always run first in each group);
* ``state_bytes`` (the state's arrays on the device) and the **peak transient
  bytes**: ``peak_bytes_in_use`` of ``jax.devices()[0].memory_stats()`` after
  the steps minus ``bytes_in_use`` just before them (params + grads + state),
  in a fresh process per optimizer, cross-checked with the compiled step's
  ``memory_analysis()`` (``xla_transient_bytes`` = temp + output - alias).
  ``peak_setup_bytes`` is the high-water mark of the set-up (params, grads,
  state made on the device); ``peak_above_setup`` says whether the step's
  peak rose above it (when False, the step's transient is at most
  ``transient_bytes``). On CPU ``memory_stats()`` is None and only
  the XLA numbers are reported;
* the **ideal bytes** of a step and the achieved bandwidth ``ideal_bytes /
  device time``. The model: every array read or written once, i.e. params
  read + written and grads read (3 x param bytes), each state array read and
  written (2 x state bytes), except the arrays a non-refresh step only reads
  (rotation bases P, Q and subspace projectors: counted once). For float32
  params this is ``bench_step.IDEAL_ARRAYS`` x param bytes (adamw: 7 arrays).
  For the optimizers whose step is matrix products (rotations, Muon's
  Newton-Schulz, subspace projections) ``model_flops`` counts those products
  (2 flops per multiply-add) and ``tflops`` is model_flops / device time;
  for the rotations ``rotation_products_ms`` times those products alone
  (same groups, precision and loop; ``rotation_products_tflops``), and
  ``rotation_target_ms`` = 1.2 x (adamw's step + them) is the performance
  issue's target for their non-refresh step (``device_vs_rotation_target``);
* for the optimizers with a periodic refresh (``every``: adadiag, adadiag_pp,
  adafac_diag, adafac_diag_pp, hfac_diag, adam_snsm): the step above is the
  **non-refresh** step, and ``refresh_ms`` is a refresh step (single step,
  waited for), and ``amortized_ms = (refresh_ms + (every - 1) device_ms) /
  every`` at the optimizer's default ``every``. How: the step takes ``every``
  as a traced argument (the named optimizers accept a traced ``every``), so
  one compiled program serves both: ``every = 2**30`` gives non-refresh steps,
  ``every = 1`` refresh steps. Both schedules refresh at t = 1 (the rotations
  at (t - 1) mod every == 0, subspace momentum at t mod every == 0), so the
  state's step counters are set to 1 after ``init`` (as after a first step;
  the bases are still the initial ones, which costs the same), and the
  refresh steps come after all other timings: ``transient_bytes`` is the
  non-refresh step's peak, ``transient_refresh_bytes`` the high-water mark
  after the refresh steps (the solvers' workspaces are not in XLA's temp
  buffer, so it can be larger: AdaDiag at 1B on an H200, 22 GB against
  13 GB). A refresh step that takes seconds is timed once
  (``--refresh_seconds``), after the solver libraries are warmed up on a tiny
  problem.

Optimizers: optax's ``adamw`` (weight_decay 0, as ours), ``adamw_bf16m``
(``mu_dtype=bfloat16``: optax has no option for a bf16 second moment),
``adafactor`` (optax defaults), ``lion`` (weight_decay 0), ``muon``
(``optax.contrib.muon`` on the hidden matrices through its
``muon_weight_dimension_numbers``; its AdamW on the embedding, LM head and
norms), then every ``optax_fac.NAMED_OPTIMIZERS`` with its defaults, the
ones with a refresh last and the two-sided rotations at the very end. A
spec ``name:key=value:...`` passes keyword arguments (values parsed as
Python literals), e.g. ``adam_snsm:basis='eigh'``.

How it runs. The parent never touches the accelerator: each optimizer runs in
``python scripts/bench_scale.py --worker ...``, a fresh process that appends
JSON records to a file after each phase, so a crash, an out-of-memory or a
timeout keeps what was measured before it and the run goes on (``status``:
ok, error, oom, timeout, skipped; ``phase`` says where it stopped). The
parent writes ``<out>/bench_scale_<device-kind>.json`` after every optimizer
(rows of earlier runs on the same device are kept unless ``--fresh``; a new
row replaces an old one unless it is worse), kills a worker after
``--worker_timeout`` s and starts none once ``--max_seconds`` runs out (the
rest are recorded as skipped, with the reason). ``--skip_done`` resumes:
the rows already ok in the file are left out (adamw is measured again in
every run, for the ratios), so the same command run again goes on where
the last one stopped.

Cost on one H200 (LLaMA-1B, float32, jax 0.11.2), per optimizer, process
start and compiles included: 15-30 s for the elementwise ones, 65 s for
muon (two 25 s compiles), ~75 s for adadiag and adafac_diag (a 31 s
compile, a 25 s eigh refresh), ~150 s for adam_snsm (two 35 s compiles, a
62 s SVD refresh) and 150 s or more for each two-sided rotation (a 76 s
compile, then its refresh). All 19 at 1B take ~17 minutes: three runs of
the same command with ``--skip_done`` (each under 10 minutes).
``--compile_cache=DIR`` lets the workers (and a rerun) share compiled
programs and XLA's autotuning results, which should shorten the compiles
(not measured here).

    # on the GPU: LLaMA-1B float32, every optimizer; run it again (same
    # command) until the log says every optimizer is measured
    python scripts/bench_scale.py --models=llama1b --dtypes=float32 \\
        --max_seconds=530 --skip_done --out=results/bench_scale
    # the markdown table of a result file (for the README)
    python scripts/bench_scale.py \\
        --table=results/bench_scale/llama1b_float32_call5.json

``--fsdp`` runs the same measurements sharded over every local device
(FSDP): each leaf's largest axis that the device count divides is split
over a 1-D mesh (``fsdp_specs``), the grads alike, the state laid out by
``optax_fac.state_shardings``; the step's output keeps its input's
shardings; memory is the largest device's; ``collectives`` records the
bytes each kind of collective of the compiled step moves (per device); a
spec's ``split_refresh=True`` gives the rotations the mesh (their refresh's
decompositions split over the devices). Results go to
``<out>/bench_scale_<device>_fsdp<N>.json``.

    # on two GPUs: every optimizer sharded, the rotations' refresh split or not
    python scripts/bench_scale.py --fsdp --models=llama1b \
        --optimizers=all,adadiag:split_refresh=True --out=results/bench_scale

Models: GaLore's LLaMA configs (d_model, ffn, layers, vocab): llama60m,
llama130m (768, 2048, 12), llama350m (1024, 2736, 24), llama1b (2048, 5461,
24; 1.34 B params), and bench_step's ``tiny`` for tests.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
sys.path.insert(0, HERE)
import optax_fac  # noqa: E402
import bench_step  # noqa: E402

MODELS = dict(bench_step.MODELS, llama1b=(2048, 5461, 24, 32000))
NEVER = 2 ** 30  # an ``every`` that does not refresh again
RECORD_PREFIX = 'BENCH_SCALE '


# --------------------------------------------------------------------------
# Optimizers.


def _hidden_matrices(params):
  """Muon's dimension numbers: the 2-D leaves but the embedding and LM head."""
  def spec(path, x):
    names = {str(getattr(k, 'key', getattr(k, 'name', k))) for k in path}
    if x.ndim == 2 and not names & {'embed', 'lm_head'}:
      return optax.contrib.MuonDimensionNumbers()
    return None
  return jax.tree_util.tree_map_with_path(spec, params)


BASELINES = {
    'adamw': ('optax.adamw(weight_decay=0)',
              lambda lr, **kw: optax.adamw(lr, **{'weight_decay': 0.0, **kw})),
    'adamw_bf16m': ('optax.adamw(weight_decay=0, mu_dtype=bfloat16)',
                    lambda lr, **kw: optax.adamw(
                        lr, **{'weight_decay': 0.0,
                               'mu_dtype': jnp.bfloat16, **kw})),
    'adafactor': ('optax.adafactor (defaults)',
                  lambda lr, **kw: optax.adafactor(lr, **kw)),
    'lion': ('optax.lion(weight_decay=0)',
             lambda lr, **kw: optax.lion(lr, **{'weight_decay': 0.0, **kw})),
    'muon': ('optax.contrib.muon on hidden matrices, AdamW on embed/head/norms',
             lambda lr, **kw: optax.contrib.muon(
                 lr, **{'muon_weight_dimension_numbers': _hidden_matrices,
                        **kw})),
}


def has_refresh(name: str) -> bool:
  fn = optax_fac.NAMED_OPTIMIZERS.get(name)
  return fn is not None and 'every' in inspect.signature(fn).parameters


def default_optimizers() -> list[str]:
  """Baselines, then ours without a refresh, then with one (the two-sided
  rotations last: they compile and refresh the longest)."""
  ours = list(optax_fac.NAMED_OPTIMIZERS)
  refreshed = [n for n in ours if has_refresh(n)]
  return (list(BASELINES) + [n for n in ours if not has_refresh(n)]
          + [n for n in refreshed if not n.endswith('_pp')]
          + [n for n in refreshed if n.endswith('_pp')])


def parse_spec(spec: str):
  """``name`` or ``name:key=value:key=value`` -> (name, kwargs)."""
  name, *pairs = spec.split(':')
  kwargs = {}
  for pair in pairs:
    key, value = pair.split('=', 1)
    kwargs[key] = ast.literal_eval(value)
  if name not in BASELINES and name not in optax_fac.NAMED_OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}: use one of '
                     f'{", ".join(default_optimizers())}')
  return name, kwargs


def optimizer_info(spec: str) -> dict:
  name, kwargs = parse_spec(spec)
  refresh = has_refresh(name)
  every = None
  if refresh:
    every = kwargs.get('every', inspect.signature(
        optax_fac.NAMED_OPTIMIZERS[name]).parameters['every'].default)
  return {'name': name, 'kwargs': kwargs, 'refresh': refresh, 'every': every,
          'family': 'optax' if name in BASELINES else 'optax_fac',
          'description': (BASELINES[name][0] if name in BASELINES
                          else f'optax_fac.{name} (defaults)')}


def build(spec: str, lr: float, every=None, mesh=None):
  """The transform of ``spec``; ``every`` (maybe traced) overrides its own.

  ``split_refresh=True`` in a spec stands for the run's ``mesh`` (--fsdp;
  None on one device).
  """
  name, kwargs = parse_spec(spec)
  if name in BASELINES:
    return BASELINES[name][1](lr, **kwargs)
  if kwargs.get('split_refresh') is True:
    kwargs = dict(kwargs, split_refresh=mesh)
  if every is not None:
    kwargs = dict(kwargs, every=every)
  return optax_fac.NAMED_OPTIMIZERS[name](learning_rate=lr, **kwargs)


# --------------------------------------------------------------------------
# Byte and flop models.


def tree_shapes(model: str):
  return bench_step.llama_shapes(*MODELS[model])


def shape_leaves(shapes):
  return jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))


def n_params(model: str) -> int:
  return sum(math.prod(s) for s in shape_leaves(tree_shapes(model)))


def rotated_side_dims(shape, sides, max_dim=8192):
  """Dims of the rotated sides of an (m, n) leaf (svd_rotation's rule)."""
  if len(shape) < 2:
    return []
  m, n = math.prod(shape[:-1]), shape[-1]
  if sides == 'one':
    k = min(m, n)
    return [k] if k <= max_dim else []
  return [d for d in (m, n) if d <= max_dim]


ROTATIONS = ('adadiag', 'adadiag_pp', 'adafac_diag', 'adafac_diag_pp',
             'hfac_diag')


def rotation_groups(spec: str, shapes) -> list[dict]:
  """The rotated matrices of a rotation optimizer, in its stacked groups.

  Per group: ``shape`` (m, n) of each matrix (leading axes merged into the
  rows, svd_rotation's view), ``members`` B (stack_leaves' default 64 MiB
  groups of same-shape float32 leaves, or the spec's ``stack_leaves``),
  ``dims`` the rotated sides' sizes and ``sides`` their names ('left',
  'right'; from ``sides``, ``max_dim`` of the spec or the optimizer's
  defaults) and ``precision`` (the spec's, None: JAX's
  default). Empty for any other optimizer.
  """
  name, kwargs = parse_spec(spec)
  if name not in ROTATIONS:
    return []
  params = inspect.signature(optax_fac.NAMED_OPTIMIZERS[name]).parameters
  default = lambda k, d: kwargs.get(k, params[k].default if k in params
                                    else d)
  sides, max_dim = default('sides', 'one'), default('max_dim', None) or 8192
  stack = default('stack_leaves', True)  # True, False or a byte cap
  cap = (optax_fac.stacking.DEFAULT_MAX_GROUP_BYTES if stack is True
         else stack)
  by_shape = {}
  for s in shape_leaves(shapes):
    if len(s) >= 2:
      by_shape.setdefault((math.prod(s[:-1]), s[-1]), []).append(
          len(by_shape.get((math.prod(s[:-1]), s[-1]), [])))
  out = []
  for shape, members in by_shape.items():
    dims = rotated_side_dims(shape, sides, max_dim)
    if not dims:
      continue
    m, n = shape
    names = ((['left'] if m <= n else ['right']) if sides == 'one' else
             [side for side, d in (('left', m), ('right', n))
              if d <= max_dim])
    split = ([[i] for i in members] if stack is False else
             optax_fac.stacking.split_members(members, 4 * math.prod(shape),
                                              cap))
    out += [dict(shape=shape, members=len(g), dims=dims, sides=names,
                 precision=default('precision', None)) for g in split]
  return out


def model_flops(spec: str, shapes) -> float | None:
  """Flops of a non-refresh step's matrix products (None: elementwise)."""
  name, kwargs = parse_spec(spec)
  leaves = [s for s in shape_leaves(shapes) if len(s) >= 2]
  total = 0
  if name in ROTATIONS:
    # forward P^T G (Q) and back P D (Q^T): 2 x 2 k^2 o per rotated side
    return float(sum(4 * k * math.prod(g['shape']) * g['members']
                     for g in rotation_groups(spec, shapes) for k in g['dims']))
  if name == 'muon':  # Newton-Schulz: A = X X^T, A A, B X per iteration
    steps = kwargs.get('ns_steps', 5)
    for path_shape in _muon_shapes(shapes):
      m, n = sorted(path_shape)
      total += steps * (4 * m * m * n + 2 * m ** 3)
    return float(total)
  if name == 'adam_snsm':  # project G and back-project: 2 x 2 r m n
    rank = kwargs.get('rank') or 128
    for s in leaves:
      m, n = math.prod(s[:-1]), s[-1]
      total += 4 * min(rank, m, n) * m * n
    return float(total)
  return None


def _dot(spec, x, y, precision):
  """``einsum``; 'bf16': operands in bfloat16, float32 accumulation."""
  if precision == 'bf16':
    return jnp.einsum(spec, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)
  return jnp.einsum(spec, x, y, precision=precision)


def rotate_round_trip(x, bases, sides, precision=None):
  """P (Pᵀ X Q) Qᵀ of a (B, m, n) stack, product by product (4 k m n flops
  a side); X itself for orthogonal bases."""
  for side, p in zip(sides, bases):  # forward: Pᵀ X, X Q
    x = (_dot('bji,bjn->bin', p, x, precision) if side == 'left'
         else _dot('bmj,bjk->bmk', x, p, precision))
  for side, p in zip(sides, bases):  # back: P X, X Qᵀ
    x = (_dot('bij,bjn->bin', p, x, precision) if side == 'left'
         else _dot('bmk,bjk->bmj', x, p, precision))
  return x


def rotation_products_ms(groups, loop_steps, repeats, seed=2):
  """Device ms of a step's rotation products alone (:func:`rotation_groups`).

  Per group, B float32 (m, n) matrices G and orthogonal bases of each
  rotated side; one evaluation is the forward and back products of every
  group (Pᵀ G then P G̃ on the left, G Q then G̃ Qᵀ on the right: the flops
  :func:`model_flops` counts), at the group's precision ('bf16': operands
  rounded to bfloat16, float32 accumulation, as ``svd_rotation``). Timed as
  the minimum over ``repeats`` calls of a ``lax.fori_loop`` of
  ``loop_steps`` evaluations in one jit, each feeding the next (the
  barrier keeps XLA from hoisting anything out of the loop). The floor of
  the issue's target for the rotations: adamw's step + these products.
  """
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(groups)))
  gs, bases = [], []
  for g in groups:
    b, (m, n) = g['members'], g['shape']
    gs.append(jax.random.normal(next(keys), (b, m, n)) * 1e-3)
    bases.append([jnp.linalg.qr(jax.random.normal(
        next(keys), (b, m, m) if side == 'left' else (b, n, n)))[0]
                  for side in g['sides']])

  def loop(gs, bases):
    def body(_, carry):
      gs, bases = jax.lax.optimization_barrier(carry)
      return [rotate_round_trip(x, ps, g['sides'], g['precision'])
              for x, ps, g in zip(gs, bases, groups)], bases
    return jax.lax.fori_loop(0, loop_steps, body, (gs, bases))

  compiled = jax.jit(loop, donate_argnums=(0,)).lower(gs, bases).compile()
  gs, bases = compiled(gs, bases)
  jax.block_until_ready(gs)
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    gs, bases = compiled(gs, bases)
    jax.block_until_ready(gs)
    best = min(best, (time.perf_counter() - t0) / loop_steps)
  return 1e3 * best


def _muon_shapes(shapes):
  out = []
  for path, s in jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple))[0]:
    names = {str(getattr(k, 'key', k)) for k in path}
    if len(s) == 2 and not names & {'embed', 'lm_head'}:
      out.append(s)
  return out


# --------------------------------------------------------------------------
# The worker: one (model, dtype, optimizer) in this process.


def _emit(path, record):
  line = json.dumps(record, default=_json_default)
  if path:
    with open(path, 'a') as f:
      f.write(line + '\n')
      f.flush()
      os.fsync(f.fileno())
  else:
    print(RECORD_PREFIX + line, flush=True)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return str(x)


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _mem():
  """Device memory: the largest of the local devices' (one device: its own)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(stats):
    return None
  return {k: max(int(st[k]) for st in stats)
          for k in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit')
          if all(k in st for st in stats)}


FSDP_AXIS = 'fsdp'


def fsdp_specs(shapes, devices: int):
  """FSDP partition specs: each leaf's largest axis that ``devices`` divide
  split over the 1-D mesh axis ``fsdp`` (ties: the first), else replicated."""
  def spec(shape):
    axes = [a for a in sorted(range(len(shape)), key=lambda a: -shape[a])
            if shape[a] % devices == 0]
    if not axes or devices == 1:
      return jax.sharding.PartitionSpec()
    entries = [None] * len(shape)
    entries[axes[0]] = FSDP_AXIS
    return jax.sharding.PartitionSpec(*entries)
  return jax.tree.map(spec, shapes, is_leaf=lambda x: isinstance(x, tuple))


_COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
                'collective-permute')


def collective_bytes(hlo_text: str) -> dict:
  """Output bytes of each kind of collective in a compiled (per-device)
  module's text: {kind: bytes}, plus ``count`` of collective ops. An
  ``-start``/``-done`` pair counts once (its start's largest array)."""
  out = dict.fromkeys(_COLLECTIVES, 0)
  out['count'] = 0
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?\S+ = (.*?) ([a-z-]+)\(', line)
    if not m:
      continue
    op = m.group(2)
    kind = op[:-len('-start')] if op.endswith('-start') else op
    if kind not in out or op.endswith('-done'):
      continue
    sizes = [math.prod(int(d) for d in dims.split(',') if d)
             * _DTYPE_BYTES.get(dtype, 4) for dtype, dims in
             re.findall(r'([a-z]+\d*)\[([\d,]*)\]', m.group(1))]
    # A variadic collective returns each of its arrays; an async -start
    # returns (operands, results, ...): its largest array is the result.
    out[kind] += max(sizes, default=0) if op != kind else sum(sizes)
    out['count'] += 1
  return out


_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 'f64': 8, 's32': 4, 'u32': 4,
                's8': 1, 'u8': 1, 'pred': 1, 's64': 8, 'u64': 8}


def make_tree(shapes, dtype, seed, scale):
  """Random normal leaves of ``shapes``, made on the device leaf by leaf (one
  small program per distinct shape: one program for the whole tree would
  compile one kernel per leaf, ~40 s for the 1B tree on a GPU)."""
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  scale = jnp.asarray(scale, jnp.float32)
  out = [_normal_leaf(k, scale, tuple(s), jnp.dtype(dtype))
         for k, s in zip(keys, leaves)]
  jax.block_until_ready(out)
  return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _normal_leaf(key, scale, shape, dtype):
  return jax.random.normal(key, shape, dtype) * scale.astype(dtype)


def set_counts(state, value):
  """Every scalar int ``count`` field of the state set to ``value``."""
  n = [0]

  def one(path, x):
    last = path[-1] if path else None
    if (isinstance(last, jax.tree_util.GetAttrKey) and last.name == 'count'
        and getattr(x, 'ndim', None) == 0
        and jnp.issubdtype(x.dtype, jnp.integer)):
      n[0] += 1
      return jnp.full_like(x, value)
    return x
  return jax.tree_util.tree_map_with_path(one, state), n[0]


def readonly_bytes(state):
  """Bytes of the state arrays a non-refresh step reads but does not write."""
  kinds = (optax_fac.SvdRotationState, optax_fac.SubspaceMomentumState)
  total = 0
  for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)):
    if isinstance(node, optax_fac.SvdRotationState):
      total += tree_bytes((node.left, node.right))
    elif isinstance(node, optax_fac.SubspaceMomentumState):
      total += tree_bytes(node.projector)
  return total


def tree_bytes(tree):
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _xla_numbers(compiled):
  out = {}
  try:
    ma = compiled.memory_analysis()
    for key in ('temp', 'argument', 'output', 'alias', 'generated_code'):
      out[f'xla_{key}_bytes'] = int(getattr(ma, f'{key}_size_in_bytes'))
    peak = getattr(ma, 'peak_memory_in_bytes', None)
    out['xla_peak_bytes'] = int(peak) if peak is not None else None
    out['xla_transient_bytes'] = (out['xla_temp_bytes']
                                  + out['xla_output_bytes']
                                  - out['xla_alias_bytes'])
  except Exception as e:  # pylint: disable=broad-except
    out['xla_memory_error'] = repr(e)[:300]
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['xla_bytes_accessed'] = float(cost.get('bytes accessed', float('nan')))
    out['xla_flops'] = float(cost.get('flops', float('nan')))
  except Exception as e:  # pylint: disable=broad-except
    out['xla_cost_error'] = repr(e)[:300]
  try:
    entry = compiled.as_text().split('ENTRY', 1)[-1]
    out['kernels'] = sum(1 for line in entry.splitlines()
                         if ' fusion(' in line or 'custom-call(' in line)
  except Exception:  # pylint: disable=broad-except
    out['kernels'] = None
  return out


def _clamp_steps(seconds, per_step, lo, hi):
  return int(max(lo, min(hi, math.ceil(seconds / max(per_step, 1e-9)))))


def run_worker(args):
  """Measures one optimizer; appends records to ``args.record_file``."""
  t_start = time.perf_counter()
  deadline = t_start + args.deadline_s if args.deadline_s else None
  info = optimizer_info(args.optimizers)
  rec = {'model': args.models, 'dtype': args.dtypes,
         'optimizer': args.optimizers, **{k: info[k] for k in (
             'name', 'family', 'description', 'refresh', 'every')},
         'status': 'running', 'phase': 'init'}
  emit = lambda: _emit(args.record_file, rec)  # noqa: E731
  try:
    if args.compile_cache:
      jax.config.update('jax_compilation_cache_dir', args.compile_cache)
    dev = jax.devices()[0]
    rec.update(device_kind=dev.device_kind, platform=dev.platform,
               jax=jax.__version__, optax=optax.__version__,
               jaxlib=_jaxlib(),
               python=platform.python_version(), host=platform.node())
    emit()
    rec['phase'] = 'setup'
    dtype = jnp.dtype(args.dtypes)
    shapes = tree_shapes(args.models)
    t0 = time.perf_counter()
    params = make_tree(shapes, dtype, 0, 0.02)
    grads = make_tree(shapes, dtype, 1, 1e-3)
    mesh = None
    if args.fsdp:
      # FSDP over every local device: params and grads sharded by
      # fsdp_specs, the state by the library's rules (state_shardings).
      mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (FSDP_AXIS,))
      specs = fsdp_specs(shapes, mesh.size)
      put = lambda tree: jax.tree.map(  # noqa: E731
          lambda x, sp: jax.device_put(x, jax.sharding.NamedSharding(
              mesh, sp)), tree, specs)
      params, grads = put(params), put(grads)
      rec.update(fsdp_devices=mesh.size,
                 fsdp_sharded_leaves=sum(any(sp) for sp in jax.tree.leaves(
                     specs, is_leaf=lambda x: isinstance(
                         x, jax.sharding.PartitionSpec))))
    rec['setup_trees_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tx = build(args.optimizers, args.lr, mesh=mesh)
    if mesh is None:
      state = jax.jit(tx.init)(params)
    else:
      state = jax.jit(tx.init, out_shardings=optax_fac.state_shardings(
          tx, params, specs, mesh, warn=False))(params)
    counts = 0
    if info['refresh']:
      state, counts = set_counts(state, 1)
    jax.block_until_ready((params, grads, state))
    rec['setup_init_s'] = time.perf_counter() - t0
    param_bytes = tree_bytes(params)
    rec.update(
        n_params=int(sum(x.size for x in jax.tree.leaves(params))),
        param_bytes=param_bytes, grad_bytes=tree_bytes(grads),
        state_bytes=tree_bytes(state), state_leaves=len(jax.tree.leaves(state)),
        readonly_state_bytes=readonly_bytes(state), counts_set=counts)
    rec['ideal_bytes'] = (3 * param_bytes + 2 * rec['state_bytes']
                          - rec['readonly_state_bytes'])
    rec['model_flops'] = model_flops(args.optimizers, shapes)
    every_normal = jnp.asarray(NEVER, jnp.int32)
    every_refresh = jnp.asarray(1, jnp.int32)
    refresh = info['refresh']

    def step(params, state, grads, every):
      t = build(args.optimizers, args.lr, every if refresh else None, mesh)
      updates, state = t.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    mem0 = _mem()
    rec['setup_s'] = time.perf_counter() - t_start
    rec['phase'] = 'compile'
    emit()
    _log(f'  [{args.optimizers}] setup {rec["setup_s"]:.1f} s, state '
         f'{rec["state_bytes"] / 2**30:.3f} GiB; compiling')
    t0 = time.perf_counter()
    # Sharded (--fsdp): the step returns params and state as they came in,
    # so that each step's output is the next one's input.
    keep = None if mesh is None else jax.tree.map(
        lambda x: x.sharding, (params, state))
    compiled = jax.jit(step, donate_argnums=(0, 1), out_shardings=keep).lower(
        params, state, grads, every_normal).compile()
    rec['compile_step_s'] = time.perf_counter() - t0
    rec.update(_xla_numbers(compiled))
    if mesh is not None:  # what the sharded step moves between devices
      rec['collectives'] = collective_bytes(compiled.as_text())
    memc = _mem()
    if mem0 and memc:
      # The high-water mark through compilation (XLA's autotuning runs
      # candidate kernels on scratch buffers of its own), before any step:
      # a transient_bytes equal to it and above xla_temp_bytes was set while
      # compiling, not by the step.
      rec['transient_compile_bytes'] = (memc['peak_bytes_in_use']
                                        - mem0['bytes_in_use'])

    rec['phase'] = 'steps'
    emit()

    def call(p, s, every):
      return compiled(p, s, grads, every)

    warm = []
    for _ in range(2):
      t0 = time.perf_counter()
      params, state = call(params, state, every_normal)
      jax.block_until_ready((params, state))
      warm.append(time.perf_counter() - t0)
    n = _clamp_steps(args.phase_seconds, warm[-1], 3, args.iters)
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      params, state = call(params, state, every_normal)
      jax.block_until_ready((params, state))
      times.append(time.perf_counter() - t0)
    pipelined = []
    for _ in range(2):
      t0 = time.perf_counter()
      for _ in range(n):
        params, state = call(params, state, every_normal)
      jax.block_until_ready((params, state))
      pipelined.append((time.perf_counter() - t0) / n)
    rec.update(sync_ms=1e3 * statistics.median(times),
               sync_min_ms=1e3 * min(times), first_call_ms=1e3 * warm[0],
               sync_iters=n, pipelined_ms=1e3 * min(pipelined))
    mem1 = _mem()
    if mem0 and mem1:
      rec.update(live_before_bytes=mem0['bytes_in_use'],
                 peak_setup_bytes=mem0['peak_bytes_in_use'],
                 bytes_limit=mem0.get('bytes_limit'),
                 peak_step_bytes=mem1['peak_bytes_in_use'],
                 live_after_bytes=mem1['bytes_in_use'],
                 transient_bytes=(mem1['peak_bytes_in_use']
                                  - mem0['bytes_in_use']),
                 peak_above_setup=(mem1['peak_bytes_in_use']
                                   > mem0['peak_bytes_in_use']))
    else:
      rec.update(transient_bytes=None, peak_above_setup=None)
    _log(f'  [{args.optimizers}] compile {rec["compile_step_s"]:.1f} s, '
         f'sync {rec["sync_ms"]:.2f} ms, pipelined {rec["pipelined_ms"]:.2f}'
         f' ms; compiling the loop')

    rec['phase'] = 'loop'
    emit()
    loop_steps = _clamp_steps(args.phase_seconds / 2, min(times), 2,
                              args.loop_steps)

    def loop(params, state, grads, every):
      def body(_, carry):
        # The barrier ties the (constant) grads to this iteration's params,
        # so XLA cannot hoist grad-only work (G², its row sums, ...) out of
        # the loop; it costs no copy.
        g, p = jax.lax.optimization_barrier((grads, carry[0]))
        return step(p, carry[1], g, every)
      return jax.lax.fori_loop(0, loop_steps, body, (params, state))

    t0 = time.perf_counter()
    looped = jax.jit(loop, donate_argnums=(0, 1), out_shardings=keep).lower(
        params, state, grads, every_normal).compile()
    rec['compile_loop_s'] = time.perf_counter() - t0
    params, state = looped(params, state, grads, every_normal)
    jax.block_until_ready((params, state))
    device = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      params, state = looped(params, state, grads, every_normal)
      jax.block_until_ready((params, state))
      device.append((time.perf_counter() - t0) / loop_steps)
    rec.update(device_ms=1e3 * min(device),
               device_median_ms=1e3 * statistics.median(device),
               loop_steps=loop_steps, loop_repeats=args.repeats)
    rec['bandwidth_gbs'] = rec['ideal_bytes'] / min(device) / 1e9
    if rec['model_flops']:
      rec['tflops'] = rec['model_flops'] / min(device) / 1e12
    mem2 = _mem()
    if mem0 and mem2:
      rec['transient_loop_bytes'] = (mem2['peak_bytes_in_use']
                                     - mem0['bytes_in_use'])
    del looped
    _log(f'  [{args.optimizers}] device {rec["device_ms"]:.2f} ms/step '
         f'({loop_steps} steps/call)')

    groups = rotation_groups(args.optimizers, shapes)
    if groups and mesh is None:  # one device's floor (the target)
      # The rotation's products alone, the floor of its non-refresh step
      # beside adamw's (add_ratios: rotation_target_ms).
      rec['phase'] = 'products'
      emit()
      rec['rotation_products_ms'] = rotation_products_ms(
          groups, loop_steps, args.repeats)
      rec['rotation_products_tflops'] = (rec['model_flops']
                                         / rec['rotation_products_ms'] / 1e9)
      _log(f'  [{args.optimizers}] rotation products alone '
           f'{rec["rotation_products_ms"]:.2f} ms')

    if refresh and args.refresh_steps >= 0:
      rec['phase'] = 'refresh'
      emit()
      # The solver libraries' one-time set-up (handles, workspaces) on a tiny
      # problem first, so that the first timed refresh does not pay for it.
      x = jnp.eye(8, dtype=jnp.float32) + 0.01
      jax.block_until_ready((jax.jit(jnp.linalg.eigh)(x),
                             jax.jit(jnp.linalg.svd)(x)))
      rtimes = []
      while len(rtimes) < 1 + args.refresh_steps:
        spent = sum(rtimes)
        left = deadline - time.perf_counter() if deadline else float('inf')
        if rtimes and (spent + rtimes[-1] > args.refresh_seconds
                       or left < 2 * rtimes[-1] + 5):
          break
        t0 = time.perf_counter()
        params, state = call(params, state, every_refresh)
        jax.block_until_ready((params, state))
        rtimes.append(time.perf_counter() - t0)
        rec['refresh_times_ms'] = [1e3 * t for t in rtimes]
        emit()
        _log(f'  [{args.optimizers}] refresh step {1e3 * rtimes[-1]:.1f} ms')
      rec['refresh_first_call_only'] = len(rtimes) == 1
      r = min(rtimes[1:]) if len(rtimes) > 1 else rtimes[0]
      rec['refresh_ms'] = 1e3 * r
      every = info['every']
      rec['amortized_ms'] = (rec['refresh_ms']
                             + (every - 1) * rec['device_ms']) / every
      mem3 = _mem()
      if mem0 and mem3:
        rec['transient_refresh_bytes'] = (mem3['peak_bytes_in_use']
                                          - mem0['bytes_in_use'])
    rec['status'] = 'ok'
    rec['phase'] = 'done'
  except Exception as e:  # pylint: disable=broad-except
    msg = f'{type(e).__name__}: {e}'
    rec['status'] = ('oom' if 'RESOURCE_EXHAUSTED' in msg
                     or 'out of memory' in msg.lower() else 'error')
    rec['error'] = msg[:2000]
    rec['traceback'] = traceback.format_exc()[-3000:]
    _log(f'  [{args.optimizers}] {rec["status"]} in phase {rec["phase"]}: '
         f'{msg[:500]}')
  rec['worker_wall_s'] = time.perf_counter() - t_start
  rec['final'] = True
  emit()
  sys.stderr.flush()
  # No interpreter teardown: freeing tens of GB of buffers and the compiled
  # programs can take longer than the measurement; the record is on disk.
  os._exit(0 if rec['status'] == 'ok' else 1)


def _jaxlib():
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


# --------------------------------------------------------------------------
# The parent: one worker process per optimizer, the JSON after each.


RATIO_KEYS = (('device_ms', 'device_vs_adamw', 'device_ms'),
              ('pipelined_ms', 'pipelined_vs_adamw', 'pipelined_ms'),
              ('sync_ms', 'sync_vs_adamw', 'sync_ms'),
              ('amortized_ms', 'amortized_vs_adamw', 'device_ms'),
              ('refresh_ms', 'refresh_vs_adamw', 'device_ms'),
              ('state_bytes', 'state_vs_adamw', 'state_bytes'))


def add_ratios(rows):
  """``*_vs_adamw`` from the adamw row of the same run, model and dtype.

  A row whose run's adamw row is no longer in ``rows`` (a later run measured
  adamw again) keeps the ratios computed when its run wrote it.
  """
  base = {(r.get('run_id'), r['model'], r['dtype']): r for r in rows
          if r.get('optimizer') == 'adamw' and r.get('device_ms')}
  for r in rows:
    b = base.get((r.get('run_id'), r['model'], r['dtype']))
    if b is None:
      continue
    for key, ratio, base_key in RATIO_KEYS:
      if r.get(key) is not None and b.get(base_key):
        r[ratio] = r[key] / b[base_key]
      else:
        r.pop(ratio, None)
    if r.get('rotation_products_ms') and r.get('device_ms'):
      # The performance issue's target for a rotation's non-refresh step:
      # 1.2 x (adamw's step + the rotation products alone), same run.
      r['rotation_target_ms'] = 1.2 * (b['device_ms']
                                       + r['rotation_products_ms'])
      r['device_vs_rotation_target'] = r['device_ms'] / r['rotation_target_ms']


def slug(text):
  return re.sub(r'[^a-z0-9]+', '_', (text or 'unknown').lower()).strip('_')


def write_json(path, doc):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(doc, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def run_one(args, model, dtype, spec, timeout, record_file):
  if os.path.exists(record_file):
    os.remove(record_file)
  cmd = [sys.executable, os.path.abspath(__file__), '--worker',
         f'--models={model}', f'--dtypes={dtype}', f'--optimizers={spec}',
         f'--record_file={record_file}', f'--deadline_s={timeout}']
  for key in ('lr', 'iters', 'loop_steps', 'repeats', 'phase_seconds',
              'refresh_steps', 'refresh_seconds', 'compile_cache'):
    value = getattr(args, key)
    if value is not None:
      cmd.append(f'--{key}={value}')
  if args.fsdp:
    cmd.append('--fsdp')
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
  killed = False
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    rc = proc.wait()
    killed = True
  wall = time.perf_counter() - t0
  rec = None
  if os.path.exists(record_file):
    with open(record_file) as f:
      lines = [line for line in f.read().splitlines() if line.strip()]
    for line in reversed(lines):
      try:
        rec = json.loads(line)
        break
      except json.JSONDecodeError:
        continue
  if rec is None:
    rec = {'model': model, 'dtype': dtype, 'optimizer': spec,
           'phase': 'start'}
  final = rec.pop('final', False)
  if killed and final:
    rec['note'] = f'killed at exit after {wall:.0f} s, after its final record'
  elif killed:
    rec['status'] = 'timeout'
    rec['error'] = (f'killed after {wall:.0f} s (the worker limit) in phase '
                    f'{rec.get("phase")}; metrics of earlier phases kept')
  elif not final or rec.get('status') in (None, 'running'):
    rec['status'] = 'error'
    rec['error'] = (f'worker exited with code {rc} in phase '
                    f'{rec.get("phase")} without a final record (crash?)')
  rec['wall_s'] = wall
  rec['returncode'] = rc
  return rec


def probe_device():
  """{device_kind, local_devices}, from a short-lived process (the parent
  stays off the accelerator)."""
  out = subprocess.run([sys.executable, os.path.abspath(__file__), '--probe'],
                       capture_output=True, text=True, timeout=300,
                       check=False)
  for line in out.stdout.splitlines():
    if line.startswith(RECORD_PREFIX):
      return json.loads(line[len(RECORD_PREFIX):])
  raise SystemExit(f'--skip_done: the device probe failed:\n{out.stderr}')


def result_path(out, device_kind, fsdp_devices=None):
  """``<out>/bench_scale_<device>[_fsdp<N>].json``."""
  return os.path.join(out, f'bench_scale_{slug(device_kind)}' + (
      f'_fsdp{fsdp_devices}' if fsdp_devices else '') + '.json')


def main_parent(args):
  t_start = time.perf_counter()
  jax.config.update('jax_platforms', 'cpu')  # the parent leaves the GPU alone
  models = args.models.split(',')
  dtypes = args.dtypes.split(',')
  for m in models:
    if m not in MODELS:
      raise SystemExit(f'unknown model {m!r}: {", ".join(MODELS)}')
  specs = []  # 'all' (alone or in the list) stands for every default one
  for item in args.optimizers.split(','):
    specs += default_optimizers() if item in ('all', '') else [item]
  specs = list(dict.fromkeys(specs))
  for s in specs:
    parse_spec(s)
  if 'adamw' not in specs:
    specs = ['adamw'] + specs  # the ratios' base, in the same run
  else:
    specs = ['adamw'] + [s for s in specs if s != 'adamw']
  os.makedirs(args.out, exist_ok=True)
  run_id = time.strftime('%Y%m%d-%H%M%S')
  config = {k: v for k, v in vars(args).items() if k not in (
      'worker', 'probe', 'record_file', 'deadline_s', 'table')}
  config['optimizers'] = specs
  path = doc = None
  done, previous = set(), {}
  if args.skip_done:
    probe = probe_device()
    path = result_path(args.out, probe['device_kind'],
                       probe['local_devices'] if args.fsdp else None)
    doc = _load_doc(path, False)
    previous = {(r['model'], r['dtype'], r['optimizer']): r
                for r in doc['rows']}
    done = {k for k, r in previous.items() if r.get('status') == 'ok'}
  plan = []
  for m in models:
    for d in dtypes:
      todo = [s for s in specs[1:] if (m, d, s) not in done]
      if todo or (m, d, 'adamw') not in done:
        plan += [(m, d, s) for s in ['adamw'] + todo]
      else:
        _log(f'{m} {d}: every optimizer already measured in {path}')
  record_file = os.path.join(args.out, f'.bench_scale_worker_{os.getpid()}'
                             '.jsonl')
  rows = []
  if not plan:
    _log('bench_scale: nothing to run')
    print(path)
    return 0
  _log(f'bench_scale: {len(plan)} runs, budget {args.max_seconds:.0f} s')
  for i, (model, dtype, spec) in enumerate(plan):
    left = args.max_seconds - (time.perf_counter() - t_start)
    key = f'{model} {dtype} {spec}'
    prev = previous.get((model, dtype, spec), {})
    need = (prev.get('wall_s') or 0) + 30 if prev.get('status') == 'timeout' \
        else 0
    if left < max(args.min_start_seconds, need):
      rec = {'model': model, 'dtype': dtype, 'optimizer': spec,
             'status': 'skipped',
             'error': f'budget: {max(left, 0):.0f} s of --max_seconds='
                      f'{args.max_seconds:.0f} left (< --min_start_seconds='
                      f'{args.min_start_seconds:.0f}' + (
                          f', or the {need:.0f} s its last attempt was '
                          'killed after + 30 s' if need else '') + ')'}
      _log(f'[{i + 1}/{len(plan)}] {key}: skipped ({rec["error"]})')
    else:
      timeout = max(1.0, min(args.worker_timeout, left))
      _log(f'[{i + 1}/{len(plan)}] {key} (t={time.perf_counter() - t_start:.0f}'
           f' s, worker limit {timeout:.0f} s)')
      rec = run_one(args, model, dtype, spec, timeout, record_file)
      _log(f'[{i + 1}/{len(plan)}] {key}: {rec["status"]} in '
           f'{rec["wall_s"]:.1f} s' + (
               f', device {rec["device_ms"]:.3f} ms' if rec.get('device_ms')
               else '') + (f' ({rec.get("error", "")[:200]})'
                           if rec['status'] != 'ok' else ''))
    rec['run_id'] = run_id
    rows.append(rec)
    if doc is None and rec.get('device_kind'):
      path = result_path(args.out, rec['device_kind'],
                         rec.get('fsdp_devices'))
      doc = _load_doc(path, args.fresh)
      _log(f'results: {path}')
    if doc is not None:
      _save(path, doc, rows, run_id, config, t_start)
  if doc is None:  # no worker got as far as the device
    path = os.path.join(args.out, 'bench_scale_unknown.json')
    doc = _load_doc(path, True)
    _save(path, doc, rows, run_id, config, t_start)
  if os.path.exists(record_file):
    os.remove(record_file)
  _log(f'wrote {path} ({time.perf_counter() - t_start:.0f} s)')
  print(path)
  return 0


def _load_doc(path, fresh):
  if not fresh and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {'schema': 'bench_scale/1', 'runs': [], 'rows': []}


def _save(path, doc, rows, run_id, config, t_start):
  """Writes this run's rows over the file's, key (model, dtype, optimizer):
  a new row replaces an old one unless it is worse (skipped, or failed where
  the old one is ok)."""
  key = lambda r: (r['model'], r['dtype'], r['optimizer'])  # noqa: E731
  old_rows = {key(r): r for r in doc['rows'] if r.get('run_id') != run_id}
  merged = dict(old_rows)
  for r in rows:
    o = old_rows.get(key(r))
    if o is None or r.get('status') == 'ok' or (
        r.get('status') != 'skipped' and o.get('status') != 'ok'):
      merged[key(r)] = r
  order = [key(r) for r in doc['rows']] + [key(r) for r in rows]
  all_rows = [merged[k] for k in dict.fromkeys(order) if k in merged]
  add_ratios(all_rows)
  first = next((r for r in rows if r.get('device_kind')), {})
  runs = [r for r in doc['runs'] if r.get('run_id') != run_id]
  runs.append({'run_id': run_id, 'config': config,
               'elapsed_s': time.perf_counter() - t_start,
               **{k: first.get(k) for k in ('device_kind', 'platform', 'jax',
                                            'jaxlib', 'optax', 'python',
                                            'host')}})
  doc.update(runs=runs, rows=all_rows,
             device=first.get('device_kind') or doc.get('device'),
             models={m: {'d_model': v[0], 'ffn': v[1], 'layers': v[2],
                         'vocab': v[3], 'n_params': n_params(m)}
                     for m, v in MODELS.items()})
  write_json(path, doc)


# --------------------------------------------------------------------------
# The markdown table.


def _f(x, fmt, scale=1.0):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return '—'
  return format(x * scale, fmt)


def table(path) -> str:
  with open(path) as f:
    doc = json.load(f)
  rows = doc['rows']
  add_ratios(rows)
  runs = {r['run_id']: r for r in doc.get('runs', [])}
  out = []
  groups = []
  for r in rows:
    g = (r['model'], r['dtype'])
    if g not in groups:
      groups.append(g)
  for model, dtype in groups:
    grp = [r for r in rows if (r['model'], r['dtype']) == (model, dtype)]
    run = runs.get(grp[0].get('run_id'), {})
    n = grp[0].get('n_params') or n_params(model)
    unit, scale = ('GiB', 1 / 2 ** 30) if n > 5e7 else ('MiB', 1 / 2 ** 20)
    out.append(f'**{model}** ({n / 1e9:.2f} B params, {dtype} params) on '
               f'{run.get("device_kind") or doc.get("device")}, jax '
               f'{run.get("jax")}, optax {run.get("optax")}; one step = '
               'update + apply_updates, donated; × = ratio to optax.adamw of '
               'the same run.\n')
    out.append(f'| optimizer | device ms | × | pipelined ms | × | '
               f'state {unit} | transient {unit} (mem. stats) | transient {unit} (XLA) | '
               'ideal GB | GB/s | TFLOP/s | refresh ms | refresh transient '
               f'{unit} | amortized ms | × | status |')
    out.append('|---|' + '---:|' * 14 + '---|')
    for r in grp:
      status = r.get('status', '?')
      if status != 'ok':
        status += f' ({r.get("phase", "")})' if status != 'skipped' else ''
      out.append('| ' + ' | '.join([
          f'`{r["optimizer"]}`', _f(r.get('device_ms'), '.2f'),
          _f(r.get('device_vs_adamw'), '.2f'),
          _f(r.get('pipelined_ms'), '.2f'),
          _f(r.get('pipelined_vs_adamw'), '.2f'),
          _f(r.get('state_bytes'), '.2f', scale),
          _f(r.get('transient_bytes'), '.2f', scale),
          _f(r.get('xla_transient_bytes'), '.2f', scale),
          _f(r.get('ideal_bytes'), '.3f', 1e-9),
          _f(r.get('bandwidth_gbs'), '.0f'),
          _f(r.get('tflops'), '.0f'),
          _f(r.get('refresh_ms'), '.0f'),
          _f(r.get('transient_refresh_bytes'), '.2f', scale),
          _f(r.get('amortized_ms'), '.2f'),
          _f(r.get('amortized_vs_adamw'), '.2f'),
          status]) + ' |')
    out.append('')
  out.append('device / pipelined: in-jit `lax.fori_loop` time per step / '
             'steps dispatched back to back. transient: peak device memory '
             'during the step minus params, grads and state (memory_stats in '
             'a fresh process; XLA: temp + output - alias of the compiled '
             'step). ideal GB: 3 × param bytes + 2 × state bytes (read-only '
             'bases once); GB/s = ideal / device time. Rotation and subspace '
             'optimizers: non-refresh step; refresh = one refresh step; '
             'amortized = (refresh + (every − 1) × device) / every at the '
             'default every.')
  return '\n'.join(out)


# --------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='llama1b',
                 help=f'comma-separated: {", ".join(MODELS)}')
  p.add_argument('--dtypes', default='float32',
                 help='comma-separated param dtypes: float32,bfloat16')
  p.add_argument('--optimizers', default='all',
                 help='comma-separated specs (name or name:key=value); '
                      '"all" in the list: the baselines, then '
                      'NAMED_OPTIMIZERS, refresh ones last; adamw is always '
                      'run first')
  p.add_argument('--out', default='results/bench_scale')
  p.add_argument('--max_seconds', type=float, default=530.0,
                 help='overall budget; workers not started in time are '
                      'recorded as skipped')
  p.add_argument('--worker_timeout', type=float, default=300.0,
                 help='a worker is killed after this many seconds')
  p.add_argument('--min_start_seconds', type=float, default=20.0,
                 help='no worker is started with less budget left')
  p.add_argument('--quick', action='store_true',
                 help='shorter timings: --phase_seconds=0.25 --repeats=2 '
                      '--refresh_steps=0')
  p.add_argument('--phase_seconds', type=float, default=None,
                 help='target seconds of each timing phase (default 1.0)')
  p.add_argument('--iters', type=int, default=None,
                 help='max single / pipelined steps (default 50)')
  p.add_argument('--loop_steps', type=int, default=None,
                 help='max steps of the in-jit loop (default 20)')
  p.add_argument('--repeats', type=int, default=None,
                 help='timed calls of the loop (default 3)')
  p.add_argument('--refresh_steps', type=int, default=None,
                 help='refresh steps timed after the first one (default 1; '
                      '0: the first only; -1: no refresh step); '
                      'refresh_ms is the min of those after the first, else '
                      'the first')
  p.add_argument('--refresh_seconds', type=float, default=None,
                 help='no further refresh step once another one would bring '
                      'their total past this (default 5: a refresh of '
                      'seconds is timed once)')
  p.add_argument('--lr', type=float, default=None)
  p.add_argument('--compile_cache', default=None,
                 help='jax persistent compilation cache directory; with it '
                      'XLA\'s per-fusion autotuning results are shared by '
                      'the workers too (compile_*_s then counts cache hits)')
  p.add_argument('--fresh', action='store_true',
                 help='overwrite the result file instead of merging')
  p.add_argument('--table', default=None,
                 help='print the markdown table of this result file and exit')
  p.add_argument('--skip_done', action='store_true',
                 help='resume: leave out the (model, dtype, optimizer) rows '
                      'already "ok" in this device\'s result file (adamw is '
                      'measured again in each run, for the ratios)')
  p.add_argument('--fsdp', action='store_true',
                 help='params, grads and state sharded over every local '
                 'device (FSDP: fsdp_specs, the state by '
                 'optax_fac.state_shardings); memory is the largest '
                 "device's; the step's collectives are recorded; a spec's "
                 'split_refresh=True passes the mesh. Results go to '
                 '<out>/bench_scale_<device>_fsdp<N>.json')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--probe', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--record_file', default=None, help=argparse.SUPPRESS)
  p.add_argument('--deadline_s', type=float, default=None,
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  defaults = {'phase_seconds': 1.0, 'iters': 50, 'loop_steps': 20,
              'repeats': 3, 'refresh_steps': 1, 'refresh_seconds': 5.0,
              'lr': 1e-3}
  if args.quick:
    defaults.update(phase_seconds=0.25, repeats=2, refresh_steps=0)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.table:
    print(table(args.table))
    return 0
  if args.probe:
    print(RECORD_PREFIX + json.dumps(
        {'device_kind': jax.devices()[0].device_kind,
         'local_devices': jax.local_device_count()}), flush=True)
    os._exit(0)
  if args.worker:
    return run_worker(args)
  return main_parent(args)


if __name__ == '__main__':
  sys.exit(main())
