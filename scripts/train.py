"""Trains one model with one optimizer from a config file.

    python scripts/train.py --config=configs/demo_shakespeare.py \
        --workdir=results/shakespeare_hfac --config.optimizer=hfac \
        --config.learning_rate=3e-3 --config.num_train_steps=100

Any config value can be overridden with --config.<field>=<value> (a typo
fails with the closest field names). Writes WORKDIR/metrics.jsonl (one JSON
object per logged step), WORKDIR/summary.json, and orbax checkpoints in
WORKDIR/checkpoints every config.checkpoint_every_steps; --resume continues
from the latest finished checkpoint exactly (same data position and RNG;
bitwise on CPU), also after the process was killed during a save; it fails,
naming what differs, if the checkpoint is of another optimizer or parameter
tree. --stop_after=N stops early with a checkpoint, as a preempted job would.

Multi-host: run the same command once per process with --distributed
(``jax.distributed.initialize``; the coordinator, process count and id come
from --coordinator_address / --num_processes / --process_id, else from
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else from
JAX's cluster auto-detection on SLURM, Open MPI, Kubernetes or Cloud TPU).
Setting JAX_COORDINATOR_ADDRESS alone also turns it on. Training is then data
parallel over every device of every process (params and optimizer state
replicated, each process feeding its block of every global batch); process
0 writes the metrics, summary and progress; all processes save the orbax
checkpoints together, so WORKDIR must be a directory every process sees:

    # on host i of 2 (i = 0, 1):
    python scripts/train.py --distributed --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=$i \
        --config=configs/c4_llama_60m.py --workdir=/mnt/nfs/c4_60m_hfac
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
  group = parser.add_argument_group('multi-host')
  group.add_argument('--distributed', action='store_true',
                     help='call jax.distributed.initialize (implied when '
                     'JAX_COORDINATOR_ADDRESS is set)')
  group.add_argument('--coordinator_address', default=None,
                     help='host:port of process 0 (env '
                     'JAX_COORDINATOR_ADDRESS)')
  group.add_argument('--num_processes', type=int, default=None,
                     help='number of processes (env JAX_NUM_PROCESSES)')
  group.add_argument('--process_id', type=int, default=None,
                     help='this process\'s index (env JAX_PROCESS_ID)')
  # Parsing and the config checks touch no JAX backend, so
  # jax.distributed.initialize can still run after them.
  args, config = cli.parse(parser, argv)
  from optax_fac.experiments import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(
      True if args.distributed else None,
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes, process_id=args.process_id)
  from optax_fac.experiments import train  # pylint: disable=g-import-not-at-top
  summary = train.train_and_evaluate(config, args.workdir, resume=args.resume,
                                     progress=not args.no_progress,
                                     stop_after=args.stop_after)
  if distributed.is_main_process():
    printable = {k: v for k, v in summary.items()
                 if k not in ('state', 'step_times')}
    print(json.dumps(printable, indent=1, default=str))
  return summary


if __name__ == '__main__':
  main()
