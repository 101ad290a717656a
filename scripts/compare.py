"""Convergence benchmark: one LLaMA on real text, optimizers x learning rates.

    python scripts/compare.py --config=configs/compare_sweep.py \\
        --workdir=results/compare_sweep                      # every optimizer
    python scripts/compare.py --config=configs/compare_tiny.py \\
        --workdir=/tmp/c --optimizers=adamw,hfac              # seconds, CPU
    python scripts/compare.py --workdir=results/compare_sweep --report_only
    python scripts/compare.py --prepare_only --workdir=DIR    # tokens.npz only

Trains each optimizer of --optimizers (default: config.optimizers) at each
rate of its grid (config.sweep; --lrs=1e-3,3e-3 overrides for all), skipping
runs whose result file exists (an interrupted sweep resumes), then writes
WORKDIR/summary.json (rows of the table: best rate, final validation loss,
steps and wall-clock to adamw's final validation loss, state bytes, step
time), WORKDIR/table.md and WORKDIR/valid_loss.png; ablations (variants run
at one rate, configs/compare_ablations.py) go to WORKDIR/ablations.md, each
beside its base optimizer and adamw. --extend_edges adds, for
each optimizer whose best rate is the smallest or largest of its grid, the
next rate beyond it (x1/3 or x3), once. --workers=N runs N processes that
share one GPU (optimizers dealt out in turn; one compiles while another
trains), then times each optimizer's step alone (WORKDIR/timing.json, what
the table's step-time column shows); --max_seconds stops starting runs
after that long (the rest run on the next call). The setup is in
optax_fac/experiments/compare.py; any config value can be overridden with
--config.<field>=<value>.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optax_fac.experiments import compare  # noqa: E402
from optax_fac.experiments import config_lib  # noqa: E402
from optax_fac.experiments import optimizers as opt_lib  # noqa: E402

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'compare_sweep.py')


def next_rate(lr, up):
  """The neighbour of ``lr`` on the 1-3-10 grid (1e-3 -> 3e-3 or 3e-4)."""
  mantissa = f'{lr:.0e}'[0]
  factor = {('1', True): 3, ('3', True): 10 / 3, ('1', False): 0.3,
            ('3', False): 1 / 3}.get((mantissa, up), 3 if up else 1 / 3)
  return float(f'{lr * factor:.0e}')


def edge_rates(runs, labels):
  """label -> [the next rate beyond the edge] where the best is on one."""
  out = {}
  for row in compare.summarize(runs) if runs else []:
    if row['optimizer'] not in labels or not row['lr_on_edge']:
      continue
    lr, rates = row['best_lr'], row['rates']
    out[row['optimizer']] = [next_rate(lr, up=lr == rates[-1])]
  return out


def spawn_workers(argv, args, labels):
  """Runs ``args.workers`` copies of this script, each on its share of labels."""
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION',
                 f'{0.9 / args.workers:.2f}')
  env['PYTHONUNBUFFERED'] = '1'
  # Compile once per optimizer: the timing pass then finds the programs.
  env.setdefault('JAX_COMPILATION_CACHE_DIR',
                 os.path.join(os.path.abspath(args.workdir), 'jax_cache'))
  os.environ['JAX_COMPILATION_CACHE_DIR'] = env['JAX_COMPILATION_CACHE_DIR']
  compare.load_corpus(config_lib.config_from_argv(
      args.config, config_lib.split_argv(argv)[0]).data, args.workdir)
  os.makedirs(args.workdir, exist_ok=True)
  base = [a for a in argv if not a.startswith('--workers')]
  procs = []
  for i in range(args.workers):
    log = open(os.path.join(args.workdir, f'worker{i}.log'), 'w')
    procs.append((subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *base,
         f'--workers={args.workers}', f'--worker_index={i}', '--no_progress',
         f'--optimizers={",".join(labels)}'],
        env=env, stdout=log, stderr=subprocess.STDOUT), log))
  for proc, log in procs:
    proc.wait()
    log.close()
  for i in range(args.workers):
    with open(os.path.join(args.workdir, f'worker{i}.log')) as f:
      lines = [l for l in f if l.startswith(tuple(labels)) or 'deadline' in l
               or 'Error' in l]
    print(f'-- worker {i}:', *[l.rstrip() for l in lines], sep='\n')


def time_alone(config, workdir, labels):
  """Times each label that has runs, alone on the device (timing.json)."""
  runs = compare.read_runs(workdir)
  best = compare.best_runs(runs)
  timing = compare.read_timing(workdir)
  corpus = compare.load_corpus(config.data, workdir)
  for label in labels:
    if label in best and label not in timing:
      timing[label] = compare.time_steps(config, label, corpus,
                                         best[label]['learning_rate'])
      timing[label]['device'] = compare.environment()['device']
      print(f'{label:<26} alone: '
            f'{1e3 * timing[label]["step_time_s"]:.2f} ms/step', flush=True)
      with open(os.path.join(workdir, 'timing.json'), 'w') as f:
        json.dump(timing, f, indent=1)


def report(workdir, title):
  runs = compare.read_runs(workdir)
  if not runs:
    print(f'no runs in {workdir}/runs')
    return
  if not any(r['optimizer'] == compare.BASELINE for r in runs):
    print(f'no {compare.BASELINE} run yet in {workdir}/runs: no table')
    return
  timing = compare.read_timing(workdir)
  sweep, ablations = [], []
  for r in runs:
    (ablations if compare.ablation_of(r) else sweep).append(r)
  rows = compare.summarize(sweep, timing=timing)
  table = compare.markdown_table(rows)
  first = runs[0]
  summary = {'rows': rows, 'environment': first['environment'],
             'corpus': first['corpus'], 'config': first['config'],
             'num_runs': len(runs)}
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  if ablations:
    # Each ablation beside its base optimizer's best run and adamw's.
    bases = {compare.BASELINE} | {compare.ablation_of(r) for r in ablations}
    summary['ablation_rows'] = compare.summarize(
        [r for r in sweep if r['optimizer'] in bases] + ablations,
        timing=timing)
    ablation_table = compare.markdown_table(summary['ablation_rows'])
    with open(os.path.join(workdir, 'ablations.md'), 'w') as f:
      f.write(ablation_table + '\n')
    print(f'ablations ({len(ablations)} runs, {workdir}/ablations.md):')
    print(ablation_table)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  try:
    out = compare.plot(sweep, os.path.join(workdir, 'valid_loss.png'), title)
    print(f'plot: {out}')
  except ImportError:
    print('matplotlib is not installed: no plot.')


def main(argv=None):
  parser = argparse.ArgumentParser(prog='compare.py',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--optimizers', default=None,
                      help='comma-separated labels (default: config)')
  parser.add_argument('--lrs', default=None,
                      help='comma-separated peak rates for every optimizer')
  parser.add_argument('--extend_edges', action='store_true')
  parser.add_argument('--report_only', action='store_true')
  parser.add_argument('--prepare_only', action='store_true')
  parser.add_argument('--no_progress', action='store_true')
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--worker_index', type=int, default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--max_seconds', type=float, default=None)
  parser.add_argument('--time_only', action='store_true',
                      help='only time each optimizer alone (timing.json)')
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides, rest = config_lib.split_argv(argv)
  args = parser.parse_args(rest)
  try:
    config = config_lib.config_from_argv(args.config, overrides)
  except config_lib.ConfigError as e:
    parser.exit(2, f'compare.py: error: {e}\n')
  title = (f'LLaMA d{config.model.d_model} x{config.model.num_layers} '
           f'({config.model.dtype}) on Python source, batch '
           f'{config.batch_size}x{config.data.seq_len}, '
           f'{config.num_train_steps} steps')
  if args.report_only:
    report(args.workdir, title)
    return
  if args.prepare_only:
    corpus = compare.load_corpus(config.data, args.workdir)
    print(json.dumps(corpus['info'], indent=1))
    return
  labels = ([n.strip() for n in args.optimizers.split(',') if n.strip()]
            if args.optimizers else list(config.optimizers))
  for label in labels:
    name, _ = compare.resolve(config, label)
    try:
      opt_lib.lookup(name)
    except ValueError as e:
      parser.exit(2, f'compare.py: error: --optimizers: {label}: {e}\n')
  rates = None
  if args.lrs:
    grid = [float(x) for x in args.lrs.split(',')]
    rates = {label: grid for label in labels}
  deadline = (None if args.max_seconds is None
              else time.time() + args.max_seconds)
  if args.time_only:
    time_alone(config, args.workdir, labels)
    return
  if args.workers > 1 and args.worker_index is None:
    spawn_workers(argv, args, labels)
    time_alone(config, args.workdir, labels)
    report(args.workdir, title)
    return
  if args.worker_index is not None:
    labels = labels[args.worker_index::args.workers]
  compare.run_sweep(config, args.workdir, labels, rates,
                    progress=not args.no_progress, deadline=deadline,
                    concurrent_workers=args.workers)
  if args.worker_index is not None:
    return
  if args.extend_edges:
    extra = edge_rates(compare.read_runs(args.workdir), labels)
    if extra:
      print(f'extending edges: {extra}')
      compare.run_sweep(config, args.workdir, list(extra), extra,
                        progress=not args.no_progress, deadline=deadline)
  report(args.workdir, title)


if __name__ == '__main__':
  try:
    main()
  except compare.CorpusMismatch as e:  # a usage error, not a crash
    sys.exit(f'compare.py: error: {e}')
