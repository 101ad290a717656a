"""Data-parallel and sharded-state equivalence checks on whatever devices exist.

For every named optimizer of optax_fac: 2 training steps of a small
least-squares model with a scanned layer on one device (the reference), then

  pmap          jax.pmap over all devices, grads pmean-ed, state replicated
  mesh_dp       jax.jit over a ('data',) mesh: batch sharded, params/state
                replicated
  sharded_2d    jax.jit over a ('data', 'model') mesh: params sharded (rows on
                one axis, columns on the other), optimizer state sharded by
                optax_fac.state_shardings, init by jax.jit(tx.init,
                out_shardings=...)
  sharded_2d_t  the same with the params' mesh axes swapped

A mode passes when params and optimizer state match the reference to --tol
(relative to each leaf's largest entry) and every device holds bit-identical
copies of every replicated block (refreshed rotation bases included).
Prints a table; writes OUT/parallel_check.json and OUT/parallel_check.log.

    python scripts/parallel_check.py --out=results/parallel_gpu      # GPUs
    python scripts/parallel_check.py --cpu_devices=8 --out=results/parallel_cpu

Matmuls run at --matmul_precision=highest by default: with TF32 (the GPU
default) the single-device and the data-parallel runs differ at TF32
rounding (~1e-3), which says nothing about the parallel implementation.
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='results/parallel_check',
                      help='output directory')
  parser.add_argument('--optimizers', default='all',
                      help='comma-separated names (default: every named one)')
  parser.add_argument('--modes', default='all',
                      help='comma-separated subset of pmap,mesh_dp,'
                      'sharded_2d,sharded_2d_t')
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--tol', type=float, default=1e-4)
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='use N host CPU devices (forces the CPU backend)')
  parser.add_argument('--matmul_precision', default='highest',
                      help="jax_default_matmul_precision ('default' keeps "
                      "the backend's)")
  parser.add_argument('--group', choices=('each', 'all'), default='each',
                      help='compile each optimizer separately (isolates '
                      'failures) or all in one program (faster on CPU)')
  args = parser.parse_args(argv)

  if args.cpu_devices:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  if args.cpu_devices:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  if args.matmul_precision != 'default':
    jax.config.update('jax_default_matmul_precision', args.matmul_precision)
  import optax  # pylint: disable=g-import-not-at-top
  import optax_fac  # pylint: disable=g-import-not-at-top
  from optax_fac.experiments import parallel_check as pc  # pylint: disable=g-import-not-at-top

  names = (list(optax_fac.NAMED_OPTIMIZERS) if args.optimizers == 'all'
           else args.optimizers.split(','))
  unknown = [n for n in names if n not in optax_fac.NAMED_OPTIMIZERS]
  if unknown:
    parser.error(f'--optimizers: not named optimizers: {", ".join(unknown)} '
                 f'(choose from {", ".join(optax_fac.NAMED_OPTIMIZERS)})')

  os.makedirs(args.out, exist_ok=True)
  log_path = os.path.join(args.out, 'parallel_check.log')
  log = open(log_path, 'w')

  def say(line=''):
    print(line, flush=True)
    log.write(line + '\n')
    log.flush()

  modes = pc.ALL_MODES if args.modes == 'all' else tuple(
      args.modes.split(','))
  devices = jax.devices()
  d, m = pc.mesh_2d_shape(len(devices))
  env = dict(
      backend=jax.default_backend(), device_count=len(devices),
      devices=[str(x) for x in devices],
      device_kind=devices[0].device_kind, jax=jax.__version__,
      optax=optax.__version__, optax_fac=optax_fac.__version__,
      python=platform.python_version(), mesh_2d=dict(data=d, model=m),
      matmul_precision=args.matmul_precision, steps=args.steps, tol=args.tol)
  say(f'devices: {len(devices)} x {env["device_kind"]} ({env["backend"]}); '
      f'jax {jax.__version__}, optax {optax.__version__}; 2-D mesh '
      f'data={d} x model={m}; matmul precision {args.matmul_precision}')
  say()
  header = (f'{"optimizer":<20} {"mode":<13} {"params rel":>11} '
            f'{"state rel":>11} {"replicas":>9} {"sec":>7}  ok')
  say(header)
  say('-' * len(header))

  groups = [names] if args.group == 'all' else [[n] for n in names]
  results = []
  t_start = time.perf_counter()
  for group in groups:
    for r in pc.check_group(group, modes, steps=args.steps, tol=args.tol,
                            devices=devices):
      results.append(r)
      say(f'{r.name:<20} {r.mode:<13} {r.params_diff:>11.2e} '
          f'{r.state_diff:>11.2e} {r.replica_diff:>9.2g} {r.seconds:>7.1f}  '
          f'{"yes" if r.ok else "NO"}')
      if r.error:
        say(f'    {r.error}')
  all_ok = all(r.ok for r in results)
  say()
  say(f'{sum(r.ok for r in results)}/{len(results)} checks passed in '
      f'{time.perf_counter() - t_start:.0f} s; '
      f'{"ALL OK" if all_ok else "FAILURES"}')
  with open(os.path.join(args.out, 'parallel_check.json'), 'w') as f:
    json.dump(dict(env=env, all_ok=all_ok,
                   results=[r.__dict__ for r in results]), f, indent=1)
  log.close()
  return 0 if all_ok else 1


if __name__ == '__main__':
  sys.exit(main())
