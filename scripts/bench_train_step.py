"""A full training step per optimizer, and the largest LLaMA each one fits.

Two measurements on the GaLore LLaMA family (``optax_fac.experiments``'s
Flax model: bf16 compute, float32 or bfloat16 params), each optimizer in a
fresh process:

``--mode=time`` (default LLaMA-350M, batch 64 x 256 tokens): one training
step = forward + backward (next-token cross-entropy) + ``tx.update`` +
``optax.apply_updates``, params and state donated. Device time per step is a
``lax.fori_loop`` of steps over one batch inside one jit (the minimum over
repeats, divided by the loop's steps); ``× adamw`` is the ratio to
``optax.adamw``'s step in the same run. Also recorded: XLA's
``memory_analysis()`` of the compiled loop (the step's buffers and the loop's
scalar carry; ``--step_memory`` also compiles the single step) and the
device's high-water mark (``memory_stats``). ``--logs`` keeps each worker's
phases (a worker killed at ``--worker_timeout`` says where it was). An optimizer with a periodic refresh runs its non-refresh
step (its ``every`` is a traced value that never comes due; the refresh
branch is still compiled in, so its buffers count in the memory numbers).

``--mode=fit``: compile only (abstract shapes, nothing allocated) the same
step for each model of ``--sizes`` at one and at two layers, and read the
peak of ``memory_analysis()`` (arguments + outputs - aliased + temp:
``peak_bytes``). Every term grows linearly with the depth (one layer's parameters, gradients,
state and saved activations each), so the peak at the model's depth L is
``peak(1) + (L - 1) (peak(2) - peak(1))``: the model fits when that is at
most the device's memory (``bytes_limit`` of ``memory_stats``, with
``XLA_PYTHON_CLIENT_MEM_FRACTION=1.0`` unless set: the whole device, not jax's
default three quarters of it). With ``--check_fit`` the time mode compiles
the 1- and 2-layer steps too and compares the extrapolation with its
full-depth program (``fit_check`` in the result).

    python scripts/bench_train_step.py --mode=time --model=350m \\
        --out=results/bench_train_step/llama350m_time.json
    python scripts/bench_train_step.py --mode=fit --sizes=350m,1b,3b,7b \\
        --out=results/bench_train_step/fit.json

Optimizer specs are ``scripts/bench_scale.py``'s (``name`` or
``name:key=value``; ``adamw``, ``adafactor``, ``lion``, ``muon`` and
``adamw_bf16m`` are optax's). ``--table`` prints the table of one or more
result files.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import bench_scale  # noqa: E402
from optax_fac.experiments.models import llama  # noqa: E402

RECORD_PREFIX = 'TRAIN_STEP '
DEFAULT_OPTIMIZERS = (
    'adamw,adamw_bf16m,adafactor,hfac,sign_fsgd,lion_factor,'
    'adafactor_momentum,adafactor_momentum:b1=None,smmf,adam_sn,rmsprop_sn,'
    'adam_snsm,adadiag,adafac_diag,hfac_diag')


def model_config(size: str, layers=None, dtype='bfloat16', seq=256):
  """The GaLore LLaMA of ``size`` (``layers`` overrides its depth)."""
  overrides = {'dtype': jnp.dtype(dtype), 'max_len': seq}
  if layers is not None:
    overrides['num_layers'] = layers
  return llama.LlamaConfig.from_size(size, **overrides)


def make_step(cfg, spec):
  """``step(params, state, tokens, every) -> (params, state, loss)``.

  ``every`` (traced) is the refresh period of an optimizer that has one
  (``bench_scale.build``'s override), ignored otherwise.
  """
  model = llama.Llama(cfg)
  refresh = bench_scale.optimizer_info(spec)['refresh']

  def loss_fn(params, tokens):
    logits = model.apply({'params': params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  def step(params, state, tokens, every):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    tx = bench_scale.build(spec, 1e-3, every if refresh else None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def abstract_inputs(cfg, spec, param_dtype, batch, seq):
  """Shapes of (params, state, tokens, every) for ``cfg`` and ``spec``."""
  model = llama.Llama(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32)))
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype)),
      params['params'])
  state = jax.eval_shape(bench_scale.build(spec, 1e-3).init, params)
  return params, state, tokens, jax.ShapeDtypeStruct((), jnp.int32)


def peak_bytes(compiled) -> int:
  """Arguments + outputs - aliased + temp of a compiled program (bytes).

  From ``memory_analysis()``: everything the program holds at once, the
  temp buffer being XLA's packed allocation of every temporary. On a GPU it
  agrees with XLA's own ``peak_memory_in_bytes`` to 0.001%
  (``results/bench_scale/llama1b_float32_call7.json``, AdaDiag's step:
  24.3 GB of arguments + 10.2 GB of temp, 34.446 GB both ways); the CPU
  backend's ``peak_memory_in_bytes`` leaves the temporaries out.
  """
  ma = compiled.memory_analysis()
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes
             - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def layer_peaks(size, spec, param_dtype, batch, seq) -> tuple[int, int]:
  """:func:`peak_bytes` of the step compiled at 1 and at 2 layers (abstract)."""
  peaks = []
  for layers in (1, 2):
    cfg = model_config(size, layers, seq=seq)
    args = abstract_inputs(cfg, spec, param_dtype, batch, seq)
    peaks.append(peak_bytes(jax.jit(make_step(cfg, spec), donate_argnums=(
        0, 1)).lower(*args).compile()))
  return peaks[0], peaks[1]


def extrapolate(peaks, layers) -> int:
  """The peak at ``layers`` from the peaks at 1 and 2 (linear in depth)."""
  return peaks[0] + (layers - 1) * (peaks[1] - peaks[0])


# --------------------------------------------------------------------------
# Workers (one optimizer each, in a fresh process).


def fit_worker(args) -> dict:
  """Peaks at 1 and 2 layers for each size and dtype; the extrapolation."""
  rec = {'optimizer': args.optimizers, 'mode': 'fit', 'batch': args.batch,
         'seq': args.seq, 'sizes': {}}
  rec['bytes_limit'] = args.bytes_limit or (bench_scale._mem() or {}).get(
      'bytes_limit')
  for dtype in args.param_dtypes.split(','):
    for size in args.sizes.split(','):
      full = model_config(size)
      progress(rec, f'compile {size} {dtype} at 1 and 2 layers')
      peaks = layer_peaks(size, args.optimizers, dtype, args.batch, args.seq)
      per_layer = peaks[1] - peaks[0]
      peak = extrapolate(peaks, full.num_layers)
      entry = {'layers': full.num_layers, 'n_params': full.num_params(),
               'peak_1_layer': peaks[0], 'peak_2_layers': peaks[1],
               'peak_bytes': peak}
      limit = rec['bytes_limit']
      if limit:
        entry['fits'] = peak <= limit
        max_layers = (math.floor(1 + (limit - peaks[0]) / per_layer)
                      if per_layer > 0 else None)
        entry['max_layers'] = max_layers
        if max_layers and max_layers > 0:
          entry['max_layers_params'] = model_config(
              size, max_layers).num_params()
      rec['sizes'][f'{size}_{dtype}'] = entry
      # What is done so far, should the worker be killed before the end.
      print(RECORD_PREFIX + json.dumps({**rec, 'status': 'partial'}),
            flush=True)
      bench_scale._log(f'  [{args.optimizers}] {size} {dtype}: peak '
                       f'{peak / 2**30:.1f} GiB')
  return rec


_T0 = time.perf_counter()


def progress(rec, phase):
  """Marks the worker's phase (on stderr, kept in the parent's log)."""
  rec['phase'] = phase
  bench_scale._log(f'[{time.perf_counter() - _T0:7.1f} s] '
                   f'{rec["optimizer"]}: {phase}')


def time_worker(args) -> dict:
  """Device time and memory of the full-depth training step of one model."""
  spec = args.optimizers
  info = bench_scale.optimizer_info(spec)
  dev = jax.devices()[0]
  rec = {'optimizer': spec, 'mode': 'time', 'model': args.model,
         'dtype': args.param_dtypes, 'batch': args.batch,
         'seq': args.seq, 'device_kind': dev.device_kind,
         'jax': jax.__version__, 'optax': optax.__version__,
         'refresh': info['refresh']}
  cfg = model_config(args.model, seq=args.seq)
  step = make_step(cfg, spec)
  shapes = abstract_inputs(cfg, spec, args.param_dtypes, args.batch,
                           args.seq)
  # The batch and the model's own initialization (N(0, 0.02^2) matrices,
  # unit norms) are made on the host's CPU and copied over: XLA's GPU
  # compile of the whole init in one program took over 4 minutes for the
  # 350M model on an H200 (jax 0.11.2), the CPU's a few seconds.
  with jax.default_device(jax.devices('cpu')[0]):
    tokens = jax.random.randint(jax.random.key(1),
                                (args.batch, args.seq + 1), 0,
                                cfg.vocab_size, jnp.int32)
    params = jax.jit(lambda: jax.tree.map(
        lambda x, s: x.astype(s.dtype),
        llama.Llama(cfg).init(jax.random.key(0), tokens[:1, :-1])['params'],
        shapes[0]))()
  tokens, params = jax.device_put((tokens, params), dev)
  tx = bench_scale.build(spec, 1e-3)
  state = jax.jit(tx.init)(params)
  if info['refresh']:
    state, _ = bench_scale.set_counts(state, 1)
  never = jnp.asarray(bench_scale.NEVER, jnp.int32)
  jax.block_until_ready((params, state, tokens))
  progress(rec, 'setup done')
  rec.update(n_params=cfg.num_params(),
             param_bytes=bench_scale.tree_bytes(params),
             state_bytes=bench_scale.tree_bytes(state))
  mem0 = bench_scale._mem()
  progress(rec, 'compile')
  if args.step_memory:
    # The single step's own memory_analysis (a second compile of the model).
    t0 = time.perf_counter()
    one = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, tokens, never).compile()
    rec['compile_step_s'] = time.perf_counter() - t0
    rec['single_step_peak_bytes'] = peak_bytes(one)
    del one
  steps = args.loop_steps

  def loop(params, state, tokens, every):
    def body(_, carry):
      return step(carry[0], carry[1], tokens, every)
    return jax.lax.fori_loop(0, steps, body,
                             (params, state, jnp.zeros((), jnp.float32)))

  t0 = time.perf_counter()
  lowered = jax.jit(loop, donate_argnums=(0, 1)).lower(
      params, state, tokens, never)
  rec['lower_loop_s'] = time.perf_counter() - t0
  progress(rec, f'lowered in {rec["lower_loop_s"]:.1f} s; XLA compile')
  t0 = time.perf_counter()
  looped = lowered.compile()
  rec['compile_loop_s'] = time.perf_counter() - t0
  del lowered
  # Memory of the loop program: the step's, plus the loop's scalar carry.
  rec.update(bench_scale._xla_numbers(looped))
  rec['step_peak_bytes'] = peak_bytes(looped)
  progress(rec, 'steps')
  params, state, loss = looped(params, state, tokens, never)
  jax.block_until_ready(loss)
  rec['loss_after_warmup'] = float(loss)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    params, state, loss = looped(params, state, tokens, never)
    jax.block_until_ready((params, state, loss))
    times.append((time.perf_counter() - t0) / steps)
  rec.update(device_ms=1e3 * min(times), device_all_ms=[1e3 * t for t in times],
             loop_steps=steps, final_loss=float(loss))
  mem1 = bench_scale._mem()
  if mem0 and mem1:
    rec.update(bytes_limit=mem0.get('bytes_limit'),
               live_before_bytes=mem0['bytes_in_use'],
               peak_bytes_in_use=mem1['peak_bytes_in_use'])
  # The fit mode's extrapolation from one and two layers, checked here.
  if args.check_fit:
    progress(rec, 'check_fit')
    peaks = layer_peaks(args.model, spec, args.param_dtypes, args.batch,
                        args.seq)
    rec['fit_check'] = {
        'extrapolated_peak_bytes': extrapolate(peaks, cfg.num_layers),
        'compiled_peak_bytes': rec['step_peak_bytes']}
  return rec


def run_worker(args) -> int:
  # Shortly before the parent kills this worker, put every thread's Python
  # stack in its log: a timed-out row then says where the time went.
  faulthandler.dump_traceback_later(max(1.0, args.worker_timeout - 5.0))
  try:
    rec = (fit_worker if args.mode == 'fit' else time_worker)(args)
    rec['status'] = 'ok'
    progress(rec, 'done')
  except Exception as e:  # pylint: disable=broad-except
    msg = f'{type(e).__name__}: {e}'
    rec = {'optimizer': args.optimizers, 'mode': args.mode,
           'status': ('oom' if 'RESOURCE_EXHAUSTED' in msg else 'error'),
           'error': msg[:2000], 'traceback': traceback.format_exc()[-3000:]}
  print(RECORD_PREFIX + json.dumps(rec), flush=True)
  sys.stdout.flush()
  os._exit(0 if rec['status'] == 'ok' else 1)


# --------------------------------------------------------------------------
# The parent.


def run_one(args, spec) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--worker',
         f'--mode={args.mode}', f'--optimizers={spec}',
         f'--model={args.model}', f'--sizes={args.sizes}',
         f'--param_dtypes={args.param_dtypes}', f'--batch={args.batch}',
         f'--seq={args.seq}', f'--loop_steps={args.loop_steps}',
         f'--repeats={args.repeats}',
         f'--worker_timeout={args.worker_timeout}']
  if args.check_fit:
    cmd.append('--check_fit')
  if args.step_memory:
    cmd.append('--step_memory')
  if args.bytes_limit:
    cmd.append(f'--bytes_limit={args.bytes_limit}')
  env = dict(os.environ)
  if args.mode == 'fit':
    # Workers that compile side by side must not each reserve most of the
    # device's memory up front (jax's default).
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    # Fit against the whole device (jax's default fraction, 0.75, would
    # leave a quarter of it out), unless the caller set a fraction.
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '1.0')
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=args.worker_timeout, check=False)
    out, err = proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    err = (e.stderr.decode() if isinstance(e.stderr, bytes)
           else (e.stderr or '')) + f'\nkilled after {args.worker_timeout} s'
  if args.logs:
    os.makedirs(args.logs, exist_ok=True)
    name = re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec)
    with open(os.path.join(args.logs, f'{args.mode}_{name}.log'), 'w') as f:
      f.write(err or '')
  lines = [l for l in out.splitlines() if l.startswith(RECORD_PREFIX)]
  if lines:
    rec = json.loads(lines[-1][len(RECORD_PREFIX):])
  else:
    phases = re.findall(r'\] [^\n]*: ([^\n]*)', err or '')
    rec = {'optimizer': spec, 'mode': args.mode, 'status': 'error',
           'phase': phases[-1] if phases else None, 'error': err[-2000:]}
  if args.mode == 'time':  # bench_scale.add_ratios pairs (model, dtype)
    rec.update(model=args.model, dtype=args.param_dtypes)
  rec['wall_s'] = time.perf_counter() - t0
  bench_scale._log(f'{spec}: {rec["status"]} in {rec["wall_s"]:.0f} s'
                   + (f', {rec["device_ms"]:.2f} ms/step'
                      if 'device_ms' in rec else ''))
  return rec


def main_parent(args) -> int:
  specs = args.optimizers.split(',')
  for spec in specs:
    try:
      bench_scale.parse_spec(spec)
    except (ValueError, SyntaxError) as e:
      raise SystemExit(f'bench_train_step: --optimizers: {e}') from None
  for size in ([args.model] if args.mode == 'time' else args.sizes.split(',')):
    if size not in llama.SIZES:
      raise SystemExit(f'bench_train_step: unknown LLaMA size {size!r}; '
                       f'known: {", ".join(llama.SIZES)}')
  rows = []

  def save():  # after every worker: an interrupted run keeps what it did
    if args.mode == 'time':
      bench_scale.add_ratios(rows)
    doc = {'script': 'scripts/bench_train_step.py', 'argv': sys.argv[1:],
           'mode': args.mode, 'complete': len(rows) == len(specs),
           'failed': sum(r['status'] != 'ok' for r in rows), 'rows': rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + '.tmp', 'w') as f:
      json.dump(doc, f, indent=1)
    os.replace(args.out + '.tmp', args.out)

  with futures.ThreadPoolExecutor(args.parallel) as pool:
    for row in pool.map(lambda s: run_one(args, s), specs):
      rows.append(row)
      save()
  print(table(args.out))
  return 0 if all(r['status'] == 'ok' for r in rows) else 1


def _gib(x):
  return '' if x is None else f'{x / 2**30:.1f}'


def _size(x) -> str:
  """Bytes in GiB, or in MiB below one GiB (a factored state's size)."""
  return f'{x / 2**30:.1f} GiB' if x >= 2**30 else f'{x / 2**20:.1f} MiB'


def _failure(r) -> str:
  """A failed row in one cell: status, last phase, the error's last line."""
  error = (r.get('error') or '').strip().splitlines()
  text = f"{r['status']} ({r.get('phase') or '?'}): {error[-1] if error else ''}"
  return text[:160].replace('|', '/')


def table(*paths) -> str:
  """A Markdown table of one or more result files of the same mode.

  Time mode: a row per optimizer per file, each ratio to the adamw of its
  own file (its run); with several files a ``run`` column names the file.
  Fit mode: the files' rows one after another (they must share sizes and
  dtypes).

  Raises:
    ValueError: no path, or files of different modes.
  """
  if not paths:
    raise ValueError('table: give at least one result file')
  docs = []
  for path in paths:
    with open(path) as f:
      docs.append(json.load(f))
  modes = {doc['mode'] for doc in docs}
  if len(modes) != 1:
    raise ValueError(f'table: files of different modes {sorted(modes)}: '
                     f'{list(paths)}')
  rows = [r for doc in docs for r in doc['rows']]
  if docs[0]['mode'] == 'time':
    several = len(paths) > 1
    run = ' run |' if several else ''
    lines = ['| optimizer | step ms | × adamw | state | step peak GiB | '
             'device peak GiB |' + run,
             '|---|---:|---:|---:|---:|---:|' + ('---|' if several else '')]
    for path, doc in zip(paths, docs):
      cell = f' `{os.path.basename(path)}` |' if several else ''
      for r in doc['rows']:
        if r['status'] != 'ok':
          lines.append(f"| {r['optimizer']} | {_failure(r)} | | | | |" + cell)
          continue
        lines.append(
            f"| {r['optimizer']} | {r['device_ms']:.2f} | "
            f"{r.get('device_vs_adamw', float('nan')):.3f} | "
            f"{_size(r['state_bytes'])} | {_gib(r['step_peak_bytes'])} | "
            f"{_gib(r.get('peak_bytes_in_use'))} |" + cell)
    return '\n'.join(lines)
  keys = list(next((r['sizes'] for r in rows if r['status'] == 'ok'), {}))
  if not keys:
    return '\n'.join(['| optimizer | failure |', '|---|---|'] + [
        f"| {r['optimizer']} | {_failure(r)} |" for r in rows])
  dtypes = list(dict.fromkeys(k.rsplit('_', 1)[1] for k in keys))
  # Per dtype: the widest model of the file's sizes (its depth that fits).
  widest = {d: max((k for k in keys if k.endswith('_' + d)),
                   key=lambda k: llama.SIZES[k.rsplit('_', 1)[0]][0])
            for d in dtypes}
  extra = [f'largest fitting, {d}' for d in dtypes] + [
      f'{widest[d].rsplit("_", 1)[0]} width, {d}: layers (B params)'
      for d in dtypes]
  lines = ['| optimizer | ' + ' | '.join(
      [f'{k} GiB' for k in keys] + extra) + ' |',
           '|---|' + '---:|' * (len(keys) + len(extra))]
  for r in rows:
    if r['status'] != 'ok':
      lines.append(f"| {r['optimizer']} | {_failure(r)} |"
                   + ' |' * (len(keys) + len(extra) - 1))
      continue
    cells = []
    for k in keys:
      e = r['sizes'][k]
      mark = '' if e.get('fits', True) else ' ✗'
      cells.append(f"{_gib(e['peak_bytes'])}{mark}")
    for d in dtypes:  # the largest model of the file's sizes that fits
      fitting = [(e['n_params'], k.rsplit('_', 1)[0])
                 for k, e in r['sizes'].items()
                 if k.endswith('_' + d) and e.get('fits')]
      cells.append(f'{max(fitting)[1]} ({max(fitting)[0] / 1e9:.2f} B)'
                   if fitting else 'none')
    for d in dtypes:
      e = r['sizes'][widest[d]]
      cells.append(f"{e['max_layers']} ({e['max_layers_params'] / 1e9:.2f} B)"
                   if e.get('max_layers_params') else '')
    lines.append(f"| {r['optimizer']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--mode', choices=('time', 'fit'), default='time')
  p.add_argument('--optimizers', default=DEFAULT_OPTIMIZERS,
                 help='comma-separated specs (scripts/bench_scale.py)')
  sizes = ', '.join(llama.SIZES)
  p.add_argument('--model', default='350m',
                 help=f'time mode: the LLaMA size ({sizes})')
  p.add_argument('--sizes', default='350m,1b,3b,7b',
                 help=f'fit mode: comma-separated sizes ({sizes})')
  p.add_argument('--param_dtypes', default='float32',
                 help='fit mode: comma-separated; time mode: one')
  p.add_argument('--batch', type=int, default=64, help='sequences per step')
  p.add_argument('--seq', type=int, default=256, help='tokens per sequence')
  p.add_argument('--loop_steps', type=int, default=10,
                 help='time mode: training steps per timed call')
  p.add_argument('--repeats', type=int, default=3,
                 help='time mode: timed calls (the fastest is reported)')
  p.add_argument('--step_memory', action='store_true',
                 help="time mode: also compile the single step for its own "
                 'memory_analysis (by default the loop program\'s)')
  p.add_argument('--logs', default=None,
                 help="a folder for each worker's stderr (its phases)")
  p.add_argument('--check_fit', action='store_true',
                 help='time mode: also compile 1 and 2 layers, compare')
  p.add_argument('--bytes_limit', type=int, default=None,
                 help='fit mode: the memory to fit in (default: the '
                 "device's bytes_limit)")
  p.add_argument('--parallel', type=int, default=1,
                 help='workers at once (fit mode compiles only)')
  p.add_argument('--worker_timeout', type=float, default=600.0,
                 help='seconds before a worker is killed (its row then says '
                 'its last phase)')
  p.add_argument('--out', default=None, help='the result JSON file')
  p.add_argument('--table', nargs='+', default=None,
                 help="print these files' table (one mode)")
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.mode == 'time' and args.parallel != 1:
    p.error('--parallel: the time mode runs one worker at a time')
  if not (args.out or args.table or args.worker):
    p.error('--out: give the result file (or --table FILE to print one)')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.table:
    print(table(*args.table))
    return 0
  if args.worker:
    return run_worker(args)
  return main_parent(args)


if __name__ == '__main__':
  sys.exit(main())
