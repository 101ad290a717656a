"""One process of the 2-process data-parallel test (tests/test_multihost.py).

Started with JAX_PLATFORMS=cpu and the standard variables
JAX_COORDINATOR_ADDRESS (a loopback address), JAX_NUM_PROCESSES,
JAX_PROCESS_ID; ``optax_fac.experiments.distributed.initialize()`` picks them
up. Each process owns ``--local_devices`` CPU devices and its own slice of
the batch; the step is ``jax.jit`` over the global ('data',) mesh (params and
optimizer state replicated). Writes the final params (this process's copy)
to ``--out`` as .npz.

    python tests/multihost_worker.py --out=/tmp/p0.npz --steps=3

Second mode, ``train``: runs ``scripts/train.py``'s ``main`` with the
arguments after ``--`` (e.g. ``--distributed``), then saves this process's
copy of the final params, the step and the process count to ``--out``:

    python tests/multihost_worker.py train --out=/tmp/p0.npz -- \
        --distributed --config=configs/demo_shakespeare.py --workdir=...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_main(argv):
  """``train --out=PATH -- <scripts/train.py arguments>``."""
  split = argv.index('--')
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv[:split])
  import runpy  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = runpy.run_path(os.path.join(root, 'scripts', 'train.py'))
  summary = script['main'](argv[split + 1:])  # initialises jax.distributed

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  state = summary['state']
  flat = jax.tree_util.tree_flatten_with_path(state['params'])[0]
  arrays = {jax.tree_util.keystr(p): np.asarray(a.addressable_data(0))
            for p, a in flat}
  arrays['__step__'] = np.asarray(state['step'].addressable_data(0))
  arrays['__process_count__'] = np.asarray(jax.process_count())
  arrays['__device_count__'] = np.asarray(jax.device_count())
  arrays['__final_train_loss__'] = np.asarray(summary['final_train_loss'])
  np.savez(args.out, **arrays)
  print(f'process {jax.process_index()} of {jax.process_count()}: saved '
        f'{args.out}', flush=True)


def main():
  if sys.argv[1:2] == ['train']:
    return train_main(sys.argv[2:])
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--local_devices', type=int, default=2)
  parser.add_argument('--optimizers', default='hfac,adadiag')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.local_devices)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from optax_fac.experiments import distributed as dist  # pylint: disable=g-import-not-at-top
  from optax_fac.experiments import parallel_check as pc  # pylint: disable=g-import-not-at-top

  info = dist.initialize()  # from the environment variables
  assert info['initialized'] and info['process_count'] == 2, info
  assert info['device_count'] == 2 * args.local_devices, info

  names = args.optimizers.split(',')  # make_named raises on an unknown name
  txs = {k: pc.make_named(k)[0] for k in names}
  tx = pc.combine(txs)
  params, (x, y) = pc.toy_problem(16)

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  # This process's rows of the global batch (devices are ordered by process).
  rows = 16 // info['process_count']
  lo = info['process_index'] * rows
  local = jax.tree.map(lambda a: np.asarray(a)[lo:lo + rows], (x, y))
  batch = dist.global_batch(local, mesh, P('data'))
  assert batch[0].shape == (16, x.shape[1])

  params = jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(rep, np.asarray(a)),
      pc.param_copies(txs, params))
  state = jax.jit(tx.init, out_shardings=rep)(params)
  step = jax.jit(pc.train_step(tx), in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep, rep))
  losses = []
  for _ in range(args.steps):
    params, state, loss = step(params, state, batch)
    losses.append(float(np.asarray(loss.addressable_data(0))))

  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = {jax.tree_util.keystr(p): np.asarray(a.addressable_data(0))
            for p, a in flat}
  arrays['__losses__'] = np.asarray(losses)
  np.savez(args.out, **arrays)
  print(f'process {info["process_index"]}: losses {losses}', flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
