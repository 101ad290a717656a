"""Multi-host data parallelism: 2 processes on this machine (CPU, loopback).

Each process runs tests/multihost_worker.py: ``jax.distributed.initialize``
from the standard environment variables, 2 CPU devices each, a few
data-parallel steps with ``jax.jit`` over the global 4-device mesh. Both must
end with identical params, equal to a single-device run on the full batch.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import optax_fac
from optax_fac.experiments import distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 120
STEPS = 3


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _optimizers():
  return [n for n in ('hfac', 'adadiag') if hasattr(optax_fac, n)]


def test_initialize_does_nothing_unless_asked(monkeypatch):
  for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES,
              dist.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  info = dist.initialize()  # no flag, no environment: single process
  assert info['process_count'] == 1 and not info['initialized']
  info = dist.initialize(False)
  assert info['process_count'] == 1


def test_two_processes_train_to_identical_params(tmp_path):
  names = _optimizers()
  port = _free_port()
  procs, outs, logs = [], [], []
  for i in range(2):
    env = dict(os.environ)
    env.pop('XLA_FLAGS', None)
    env.update({
        'JAX_PLATFORMS': 'cpu',
        dist.ENV_COORDINATOR: f'127.0.0.1:{port}',
        dist.ENV_NUM_PROCESSES: '2',
        dist.ENV_PROCESS_ID: str(i),
        'PYTHONPATH': ROOT + os.pathsep + env.get('PYTHONPATH', ''),
    })
    out = tmp_path / f'params_{i}.npz'
    log = open(tmp_path / f'log_{i}.txt', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(HERE, 'multihost_worker.py'),
         f'--out={out}', f'--steps={STEPS}', '--local_devices=2',
         f'--optimizers={",".join(names)}'],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    outs.append(out)
    logs.append(log)
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  text = '\n'.join(f'--- process {i}\n' + (tmp_path / f'log_{i}.txt')
                   .read_text()[-3000:] for i in range(2))
  assert codes is not None, f'timed out after {TIMEOUT_S} s\n{text}'
  assert codes == [0, 0], f'exit codes {codes}\n{text}'

  a, b = (dict(np.load(o)) for o in outs)
  assert a.keys() == b.keys()
  for k in a:  # bit-identical on both hosts
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # And equal to one device on the full batch.
  txs = {k: dist.make_named(k)[0] for k in names}
  params, batch = dist.toy_problem(16)
  ref, _, _ = dist.run_single(txs, params, batch, STEPS,
                              jax.devices('cpu')[0])  # as the workers
  flat = jax.tree_util.tree_flatten_with_path(ref)[0]
  assert len(flat) == len(a) - 1
  for path, x in flat:
    got = a[jax.tree_util.keystr(path)]
    scale = np.max(np.abs(np.asarray(x)))
    np.testing.assert_allclose(got, np.asarray(x), rtol=0, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert a['__losses__'][-1] < a['__losses__'][0]
