"""Multi-host data parallelism: 2 processes on this machine (CPU, loopback).

Each process runs tests/multihost_worker.py: ``jax.distributed.initialize``
from the standard environment variables, 2 CPU devices each, a few
data-parallel steps with ``jax.jit`` over the global 4-device mesh. Both must
end with identical params, equal to a single-device run on the full batch.

The second test runs ``scripts/train.py --distributed`` (through the worker's
``train`` mode, which saves each process's final params) the same way on a
tiny LLaMA: identical params on both processes, equal to a one-process run;
metrics, config and summary written once (by process 0); then a 2-process
``--resume`` from the step-2 checkpoint ends bitwise where the straight run
ended.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import optax_fac
from optax_fac.experiments import distributed as dist
from optax_fac.experiments import parallel_check as pc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 120
STEPS = 3


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# One factored and one rotated optimizer (a basis refresh) of
# optax_fac.NAMED_OPTIMIZERS.
OPTIMIZERS = ('hfac', 'adadiag')


def test_optimizers_are_named_optimizers():
  assert set(OPTIMIZERS) <= set(optax_fac.NAMED_OPTIMIZERS)


def test_initialize_does_nothing_unless_asked(monkeypatch):
  for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES,
              dist.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  info = dist.initialize()  # no flag, no environment: single process
  assert info['process_count'] == 1 and not info['initialized']
  info = dist.initialize(False)
  assert info['process_count'] == 1


class Launch:
  """Two worker processes started in the background; ``wait()`` checks them.

  ``args(i)``: process i's command-line arguments for multihost_worker.py;
  ``use_env``: pass the coordinator, process count and id through the
  standard environment variables (else the arguments must carry them).
  """

  def __init__(self, tmp_path, tag, args, use_env=True, port=None,
               local_devices=None):
    self.logs = [tmp_path / f'log_{tag}_{i}.txt' for i in range(2)]
    self.procs = []
    for i in range(2):
      env = dict(os.environ)
      # The workers ask for their CPU devices themselves: a device count in
      # XLA_FLAGS would conflict with it. The rest of XLA_FLAGS (the test
      # suite's fast-compile flag, tests/conftest.py) is kept, so that the
      # workers compile their programs as this process does its reference.
      flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                     env.pop('XLA_FLAGS', '')).strip()
      if flags:
        env['XLA_FLAGS'] = flags
      for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES,
                  dist.ENV_PROCESS_ID):
        env.pop(var, None)
      env['JAX_PLATFORMS'] = 'cpu'
      env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
      if local_devices:
        env['JAX_NUM_CPU_DEVICES'] = str(local_devices)
      if use_env:
        env.update({dist.ENV_COORDINATOR: f'127.0.0.1:{port}',
                    dist.ENV_NUM_PROCESSES: '2',
                    dist.ENV_PROCESS_ID: str(i)})
      with open(self.logs[i], 'w') as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, 'multihost_worker.py')]
            + list(args(i)), env=env, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT))

  def wait(self):
    try:
      codes = [p.wait(timeout=TIMEOUT_S) for p in self.procs]
    except subprocess.TimeoutExpired:
      codes = None
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    text = '\n'.join(f'--- process {i}\n' + log.read_text()[-3000:]
                     for i, log in enumerate(self.logs))
    assert codes is not None, f'timed out after {TIMEOUT_S} s\n{text}'
    assert codes == [0, 0], f'exit codes {codes}\n{text}'
    return [log.read_text() for log in self.logs]


@pytest.mark.slow
def test_two_processes_train_to_identical_params(tmp_path):
  names = OPTIMIZERS
  port = _free_port()
  outs = [tmp_path / f'params_{i}.npz' for i in range(2)]
  Launch(tmp_path, 'toy', lambda i: [
      f'--out={outs[i]}', f'--steps={STEPS}', '--local_devices=2',
      f'--optimizers={",".join(names)}'], port=port).wait()

  a, b = (dict(np.load(o)) for o in outs)
  assert a.keys() == b.keys()
  for k in a:  # bit-identical on both hosts
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # And equal to one device on the full batch.
  txs = {k: pc.make_named(k)[0] for k in names}
  params, batch = pc.toy_problem(16)
  ref, _, _ = pc.run_single(txs, params, batch, STEPS,
                            jax.devices('cpu')[0])  # as the workers
  flat = jax.tree_util.tree_flatten_with_path(ref)[0]
  assert len(flat) == len(a) - 1
  for path, x in flat:
    got = a[jax.tree_util.keystr(path)]
    scale = np.max(np.abs(np.asarray(x)))
    np.testing.assert_allclose(got, np.asarray(x), rtol=0, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert a['__losses__'][-1] < a['__losses__'][0]


# --------------------------------------------------------------------------
# scripts/train.py --distributed


def _train_flags(workdir):
  from test_experiments_train import TINY_LM, TINY_LM_DATA  # pylint: disable=g-import-not-at-top
  flags = ['--config=' + os.path.join(ROOT, 'configs', 'demo_shakespeare.py'),
           f'--workdir={workdir}']
  overrides = TINY_LM + TINY_LM_DATA + [
      ('optimizer', 'hfac'), ('learning_rate', '3e-3'),
      ('num_train_steps', '4'), ('checkpoint_every_steps', '2'),
      ('eval_every_steps', '4'), ('flush_every_steps', '2')]
  return flags + [f'--config.{k}={v}' for k, v in overrides]


def _params(path):
  arrays = dict(np.load(path))
  return ({k: v for k, v in arrays.items() if not k.startswith('__')},
          {k: v for k, v in arrays.items() if k.startswith('__')})


@pytest.mark.slow
def test_train_script_distributed_two_processes(tmp_path):
  pytest.importorskip('flax')
  pytest.importorskip('ml_collections')
  pytest.importorskip('orbax.checkpoint')
  import runpy  # pylint: disable=g-import-not-at-top
  from optax_fac.experiments import train  # pylint: disable=g-import-not-at-top

  # Two processes x 2 CPU devices, coordinator from the flags.
  work = tmp_path / 'two'
  port = _free_port()
  outs = [tmp_path / f'two_{i}.npz' for i in range(2)]
  launch = Launch(tmp_path, 'two', lambda i: [
      'train', f'--out={outs[i]}', '--',
      '--distributed', f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2', f'--process_id={i}'] + _train_flags(work),
                  use_env=False, local_devices=2)
  # Meanwhile the same run in this (single) process, on one device.
  ref_dir = tmp_path / 'one'
  ref = runpy.run_path(os.path.join(ROOT, 'scripts', 'train.py'))['main'](
      _train_flags(ref_dir) + ['--no_progress'])
  logs = launch.wait()

  (p0, info0), (p1, info1) = _params(outs[0]), _params(outs[1])
  assert int(info0['__process_count__']) == 2
  assert int(info0['__device_count__']) == 4
  assert int(info0['__step__']) == int(info1['__step__']) == 4
  assert p0.keys() == p1.keys()
  for k in p0:  # bit-identical on both processes
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
  flat = jax.tree_util.tree_flatten_with_path(ref['state']['params'])[0]
  assert len(flat) == len(p0)
  for path, x in flat:  # = one process, one device, to float32 precision
    x = np.asarray(x)
    np.testing.assert_allclose(p0[jax.tree_util.keystr(path)], x, rtol=0,
                               atol=1e-5 * np.max(np.abs(x)),
                               err_msg=jax.tree_util.keystr(path))

  # Metrics, config and summary from process 0 only (one line per step);
  # progress and the printed summary on process 0 only.
  records = train.read_metrics(str(work / 'metrics.jsonl'))
  ref_records = train.read_metrics(str(ref_dir / 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  np.testing.assert_allclose([r['loss'] for r in records],
                             [r['loss'] for r in ref_records], rtol=1e-5)
  np.testing.assert_allclose(records[-1]['eval_loss'],
                             ref_records[-1]['eval_loss'], rtol=1e-5)
  summary = json.load(open(work / 'summary.json'))
  assert summary['process_count'] == 2 and summary['device_count'] == 4
  assert summary['final_train_loss'] == pytest.approx(
      float(info0['__final_train_loss__']))
  assert json.load(open(work / 'config.json'))['optimizer'] == 'hfac'
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4']
  assert '4/4' in logs[0] and '"final_eval_loss"' in logs[0]
  assert '4/4' not in logs[1] and 'final_eval_loss' not in logs[1]

  # Resume from the step-2 checkpoint (a copy of the workdir without step
  # 4), coordinator from the environment variables, no --distributed flag:
  # bitwise the straight 2-process run.
  again = tmp_path / 'resumed'
  shutil.copytree(work, again)
  shutil.rmtree(again / 'checkpoints' / '4')
  outs = [tmp_path / f'resumed_{i}.npz' for i in range(2)]
  Launch(tmp_path, 'resumed', lambda i: [
      'train', f'--out={outs[i]}', '--'] + _train_flags(again) + [
          '--resume', '--no_progress'], port=_free_port(),
         local_devices=2).wait()
  for out in outs:
    p, info = _params(out)
    assert int(info['__process_count__']) == 2
    for k in p0:
      np.testing.assert_array_equal(p[k], p0[k], err_msg=k)
  resumed = train.read_metrics(str(again / 'metrics.jsonl'))
  assert [r['step'] for r in resumed] == [1, 2, 3, 4]
  assert [r['loss'] for r in resumed] == [r['loss'] for r in records]
  assert resumed[-1]['eval_loss'] == records[-1]['eval_loss']
