"""The README's demo: one small LLaMA on Shakespeare, several optimizers.

    python scripts/demo.py --workdir=results/demo           # make demo
    python scripts/demo.py --workdir=/tmp/d --steps=20 --optimizers=adamw,hfac

Trains the config (default configs/demo_shakespeare.py) once per optimizer in
config.demo.optimizers (or --optimizers), each with its learning rate from
config.demo.learning_rates, then prints a table (final train / validation
loss, optimizer-state bytes, step time) and writes WORKDIR/summary.json,
WORKDIR/runs/<optimizer>/metrics.jsonl and WORKDIR/loss_curves.png.
Any config value can be overridden with --config.<field>=<value>.
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optax_fac.experiments import cli  # noqa: E402
from optax_fac.experiments import optimizers as opt_lib  # noqa: E402

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'demo_shakespeare.py')


def _mib(n):
  return f'{n / 2**20:.2f} MiB' if n >= 2**20 else f'{n / 2**10:.1f} KiB'


def table(rows) -> str:
  base = next((r['opt_state_bytes'] for r in rows
               if r['optimizer'] == 'adamw'), None)
  head = (f'{"optimizer":<12} {"lr":>8} {"train loss":>10} {"val loss":>9} '
          f'{"opt state":>11} {"vs adamw":>8} {"step ms":>8} {"total s":>8}')
  lines = [head, '-' * len(head)]
  for r in rows:
    ratio = f'{r["opt_state_bytes"] / base:.3f}' if base else '-'
    fmt = lambda v, p: '-' if v is None else f'{v:.{p}f}'  # noqa: E731
    step_ms = (None if r['median_step_time_s'] is None
               else 1e3 * r['median_step_time_s'])
    lines.append(
        f'{r["optimizer"]:<12} {r["learning_rate"]:>8.0e} '
        f'{fmt(r["final_train_loss"], 3):>10} {fmt(r["final_eval_loss"], 3):>9} '
        f'{_mib(r["opt_state_bytes"]):>11} {ratio:>8} {fmt(step_ms, 1):>8} '
        f'{r["wall_s"]:>8.1f}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='demo.py',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument('--workdir', default='results/demo')
  parser.add_argument('--steps', type=int, default=None,
                      help='training steps per optimizer (default: config)')
  parser.add_argument('--optimizers', default=None,
                      help='comma-separated names (default: config.demo)')
  parser.add_argument('--no_progress', action='store_true')
  parser.add_argument('--no_plot', action='store_true')
  args, config = cli.parse(parser, argv)
  from optax_fac.experiments import train  # pylint: disable=g-import-not-at-top

  if args.optimizers:
    names = [n.strip() for n in args.optimizers.split(',') if n.strip()]
    for n in names:
      try:
        opt_lib.lookup(n)
      except ValueError as e:
        parser.exit(2, f'demo.py: error: --optimizers: {e}\n')
  else:
    names = []
    for n in config.demo.optimizers:
      try:
        opt_lib.lookup(n)
        names.append(n)
      except ValueError:
        print(f'note: optimizer {n!r} is not available in this installation; '
              'skipped.')
  if args.steps:
    config.num_train_steps = args.steps
    steps = args.steps
    config.eval_every_steps = min(config.eval_every_steps or steps, steps)
  lrs = config.demo.learning_rates
  kwargs = config.demo.optimizer_kwargs

  print(f'{len(names)} optimizers x {config.num_train_steps} steps: model '
        f'{dict(config.model)}, data {config.data.name} '
        f'(tokenizer {config.data.get("tokenizer", "-")}), batch '
        f'{config.batch_size}.', flush=True)
  rows = []
  t0 = time.time()
  for name in names:
    run = config.copy_and_resolve_references()
    run.optimizer = name
    run.learning_rate = float(lrs.get(name, config.learning_rate))
    with run.unlocked():
      run.optimizer_kwargs = dict(kwargs.get(name, {}))
    summary = train.train_and_evaluate(
        run, os.path.join(args.workdir, 'runs', name),
        progress=not args.no_progress, desc=f'{name:<10}')
    summary.pop('state', None)
    summary.pop('step_times', None)
    rows.append(summary)
  total = time.time() - t0

  print()
  print(table(rows))
  print(f'\ntotal {total:.0f} s on {os.cpu_count()} CPU(s) '
        f'({platform.processor() or platform.machine()}); metrics in '
        f'{os.path.join(args.workdir, "runs")}/<optimizer>/metrics.jsonl')
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump({'runs': rows, 'total_s': total,
               'config': config.to_dict()}, f, indent=1, default=str)
  if not args.no_plot:
    try:
      from optax_fac.experiments import plotting  # pylint: disable=g-import-not-at-top
      out = plotting.plot_runs(
          {r['optimizer']: os.path.join(args.workdir, 'runs', r['optimizer'])
           for r in rows}, os.path.join(args.workdir, 'loss_curves.png'),
          title=f'{config.model.name} on {config.data.name}')
      print(f'plot: {out}')
    except ImportError:
      print('matplotlib is not installed: no plot (scripts/plot.py later).')


if __name__ == '__main__':
  main()
