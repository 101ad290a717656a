"""Trains one model with one optimizer from a config file.

    python scripts/train.py --config=configs/demo_shakespeare.py \
        --workdir=results/shakespeare_hfac --config.optimizer=hfac \
        --config.learning_rate=3e-3 --config.num_train_steps=100

Any config value can be overridden with --config.<field>=<value> (a typo
fails with the closest field names). Writes WORKDIR/metrics.jsonl (one JSON
object per logged step), WORKDIR/summary.json, and orbax checkpoints in
WORKDIR/checkpoints every config.checkpoint_every_steps; --resume continues
from the latest checkpoint exactly (same data position and RNG);
--stop_after=N stops early with a checkpoint, as a preempted job would.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optax_fac.experiments import cli  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='train.py', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True,
                      help='config file (configs/*.py), optionally path:arg')
  parser.add_argument('--workdir', required=True, help='output directory')
  parser.add_argument('--resume', action='store_true',
                      help='continue from the latest checkpoint in WORKDIR')
  parser.add_argument('--stop_after', type=int, default=None,
                      help='stop (with a checkpoint) once this many steps are '
                      'done, as a preempted job; --resume continues')
  parser.add_argument('--no_progress', action='store_true',
                      help='no progress bar')
  args, config = cli.parse(parser, argv)
  from optax_fac.experiments import train  # pylint: disable=g-import-not-at-top
  summary = train.train_and_evaluate(config, args.workdir, resume=args.resume,
                                     progress=not args.no_progress,
                                     stop_after=args.stop_after)
  printable = {k: v for k, v in summary.items()
               if k not in ('state', 'step_times')}
  print(json.dumps(printable, indent=1, default=str))
  return summary


if __name__ == '__main__':
  main()
