"""Plots the loss curves of several runs.

    python scripts/plot.py results/demo/runs/* --out=results/demo/loss_curves.png
    python scripts/plot.py adamw=DIR_A hfac=DIR_B --out=loss.png --window=20

Each argument is a run directory (holding metrics.jsonl), a metrics.jsonl
file, or LABEL=PATH; the label defaults to the directory name.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optax_fac.experiments import plotting  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='run dirs, metrics files or '
                      'LABEL=PATH')
  parser.add_argument('--out', default='loss_curves.png')
  parser.add_argument('--title', default=None)
  parser.add_argument('--window', type=int, default=10,
                      help='moving-average window of the training loss')
  parser.add_argument('--log_y', action='store_true')
  args = parser.parse_args(argv)
  runs = {}
  for spec in args.runs:
    if '=' in spec:
      label, path = spec.split('=', 1)
    else:
      path = spec.rstrip('/')
      base = os.path.basename(path)
      label = (os.path.basename(os.path.dirname(path)) if base ==
               'metrics.jsonl' else base)
    runs[label] = path
  out = plotting.plot_runs(runs, args.out, title=args.title,
                           window=args.window, log_y=args.log_y)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
