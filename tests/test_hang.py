"""Guards against deadlocks: an optimizer step on 8 CPU devices must return.

A hang cannot fail a test by itself, it blocks the suite. So the steps run
in a subprocess (this file, run as a script), which the test watches: a
worker that makes no CPU progress for ``IDLE_S`` seconds in the middle of a
step is deadlocked (a deadlocked process is idle, while a slow one computes),
and a worker still running after ``TIMEOUT_S`` seconds is stuck anyway.
Either way the test fails with the name of the step and every thread's
Python stack, instead of blocking the suite.

What hung: ``adadiag_pp`` (``svd_rotation(sides='two')``) under ``jax.pmap``
and under a sharded ``jax.jit`` on 8 CPU devices, at its first step (the
basis refresh), with jaxlib 0.10.x. That jaxlib splits a batched CPU LAPACK
call (eigh, svd) that costs at least 2e5 flops into tasks on XLA:CPU's
intra-op thread pool, and the calling thread blocks until they are done.
XLA ran the refresh's eigh calls on workers of that same pool, one per
device. Once every worker was waiting, no thread was left to run the tasks.
The pool has max(#cores, #devices) threads, so 8 devices on a machine with
at most 8 cores is the case to test. Whether jaxlib splits a call depends
on its batch and matrix size only. Whether every worker ends up waiting at
once depends on XLA's scheduling, and for adadiag_pp's refresh it did in
every run we tried. The matrices here are big enough (two 48 x 48 Gram
matrices in one call) for jaxlib to split the call. tests/test_parallel.py's
toy problem (8 x 8) is far below that.

Cases (each optimizer gets only ``learning_rate``, plus
``stack_leaves=False`` for the reported unstacked case):

* reported: the two reported programs with their rank-1 gradients.
  ``jax.pmap`` with ``lax.pmean``-ed gradients (``adadiag_pp`` stacked and
  not), and ``jax.jit`` over a (4, 2) ('data', 'model') mesh with sharded
  leaves and the state from ``optax_fac.state_shardings``.
* generic: every named optimizer in both programs, on random full-rank
  gradients and more leaves (two of the same shape, so that stacked groups
  have a batch).

Compilation is most of the cost, so the workers compile with
``--xla_backend_optimization_level=0`` (LLVM's optimizations only; the
thread pool and LAPACK calls are the same, and the hang reproduces with it)
and, under pytest, with the rest of the suite's fast-compile flags
(tests/conftest.py: the fusion emitter, which changes neither the thread
pool nor the LAPACK calls either).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

NUM_DEVICES = 8
STEPS = 2           # the refresh step and an ordinary one
IDLE_S = 20.0       # this long without CPU progress during a step: deadlock
IDLE_CPU_S = 0.2    # "no progress": less CPU time than this in IDLE_S
TIMEOUT_S = 300.0   # backstop for a worker that computes but never ends


# --------------------------------------------------------------------------
# The parent side: run jobs in a subprocess and watch it.


def _child_env() -> dict:
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  # The worker asks for its CPU devices through jax.config; a device count
  # in XLA_FLAGS as well would conflict with it.
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                 env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = (flags + ' --xla_backend_optimization_level=0').strip()
  return env


def _cpu_seconds(pid: int):
  """User + system CPU time of process ``pid`` (all its threads), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return None  # no /proc (not Linux): the wall-clock backstop only


def _describe(job: dict) -> str:
  extra = ''.join(f', {k}={v!r}' for k, v in job['kwargs'].items())
  return (f"optax_fac.{job['name']}(learning_rate=1e-2{extra}) under "
          f"{'jax.pmap' if job['mode'] == 'pmap' else 'a sharded jax.jit'} "
          f"({'rank-1' if job['grads'] == 'rank1' else 'random'} gradients)")


def _run_worker(jobs: list[dict]):
  """Runs ``jobs`` in one worker and watches it.

  Returns (output, exit code, verdict): verdict is None, or why the worker
  was killed (the step it was in is the last 'start' line without 'done').
  """
  cmd = [sys.executable, os.path.abspath(__file__), json.dumps(jobs)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=_child_env())
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout),
                            daemon=True)
  reader.start()
  t0 = time.monotonic()
  last_cpu, last_progress = _cpu_seconds(proc.pid), t0
  verdict = None
  while proc.poll() is None:
    time.sleep(0.5)
    now = time.monotonic()
    cpu = _cpu_seconds(proc.pid)
    if cpu is None or last_cpu is None or cpu - last_cpu >= IDLE_CPU_S:
      last_cpu, last_progress = cpu, now
    marks = [l for l in lines if l.startswith(('start ', 'done ', 'missing '))]
    in_step = bool(marks) and marks[-1].startswith('start ')
    if in_step and now - last_progress > IDLE_S:
      verdict = (f'deadlocked: no CPU progress for {IDLE_S:.0f} s, '
                 f'{now - t0:.0f} s after its worker started')
    elif now - t0 > TIMEOUT_S:
      verdict = f'did not return: its worker ran {TIMEOUT_S:.0f} s'
    if verdict:
      try:
        if hasattr(signal, 'SIGUSR1'):  # the worker dumps its Python stacks
          os.kill(proc.pid, signal.SIGUSR1)
          time.sleep(1.0)
        proc.kill()
      except ProcessLookupError:  # it ended meanwhile
        pass
      break
  proc.wait()
  reader.join(timeout=10)
  return ''.join(lines), proc.returncode, verdict


def run_jobs(jobs: list[dict]) -> dict:
  """Runs ``jobs`` one after the other; fails the test on a hang or an error.

  After a hang the remaining jobs run in a new worker, so that the failure
  lists every step that hangs. Returns {job key: 'done' | 'missing'}
  ('missing': not exported by optax_fac).
  """
  by_key = {j['key']: j for j in jobs}
  finished: dict = {}
  hangs = []
  remaining = list(jobs)
  while remaining:
    out, code, verdict = _run_worker(remaining)
    finished.update(
        {k: v for v, k in re.findall(r'^(done|missing) (\S+)', out, re.M)})
    tail = '\n'.join(out.splitlines()[-60:])
    if verdict is None:
      if code != 0:
        pytest.fail(f'worker failed (exit {code}):\n{tail}', pytrace=False)
      break
    started = [k for k in re.findall(r'^start (\S+)', out, re.M)
               if k not in finished]
    if not started:  # killed before its first step
      pytest.fail(f'worker {verdict} before a step:\n{tail}', pytrace=False)
    hung = started[-1]
    hangs.append((hung, verdict, tail))
    keys = [j['key'] for j in remaining]
    remaining = remaining[keys.index(hung) + 1:]
  if hangs:
    report = '\n'.join(f'  {_describe(by_key[k])}: {v}' for k, v, _ in hangs)
    pytest.fail(
        f'HANG on {NUM_DEVICES} CPU devices, {len(hangs)} of {len(jobs)} '
        f'steps:\n{report}\n'
        f'--- worker output at the first hang (tail) ---\n{hangs[0][2]}',
        pytrace=False)
  not_run = [k for k in by_key if k not in finished]
  assert not not_run, f'jobs not run: {not_run}'
  return finished


def _jobs(mode: str, grads: str, names, **kwargs) -> list[dict]:
  suffix = ''.join(f',{k}={v}' for k, v in kwargs.items())
  return [{'key': f'{mode}:{grads}:{n}{suffix}', 'mode': mode, 'grads': grads,
           'name': n, 'kwargs': kwargs} for n in names]


def _check(jobs: list[dict]) -> None:
  finished = run_jobs(jobs)
  if all(v == 'missing' for v in finished.values()):
    pytest.skip('not exported by optax_fac yet: '
                f"{sorted({j['name'] for j in jobs})}")


# --------------------------------------------------------------------------
# The tests: one worker each (pytest-xdist spreads them; the heaviest first).


# The optimizers with decompositions (eigh / SVD at a refresh), and the rest
# of optax_fac.NAMED_OPTIMIZERS.
ROTATION = ('adadiag', 'adadiag_pp', 'adafac_diag', 'adafac_diag_pp',
            'hfac_diag')
GENERIC_GROUPS = ('rotation', 'others')


def _generic_group(group: str) -> tuple:
  # Imported here: run as a worker, this file configures jax before it
  # imports optax_fac.
  import optax_fac  # pylint: disable=g-import-not-at-top
  named = tuple(optax_fac.NAMED_OPTIMIZERS)
  unknown = sorted(set(ROTATION) - set(named))
  assert not unknown, f'ROTATION: not in optax_fac.NAMED_OPTIMIZERS: {unknown}'
  if group == 'rotation':
    return ROTATION
  return tuple(n for n in named if n not in ROTATION)


def test_generic_groups_cover_every_named_optimizer():
  import optax_fac  # pylint: disable=g-import-not-at-top
  listed = [n for g in GENERIC_GROUPS for n in _generic_group(g)]
  assert sorted(listed) == sorted(optax_fac.NAMED_OPTIMIZERS)


@pytest.mark.slow
@pytest.mark.parametrize('group', GENERIC_GROUPS)  # heaviest first
def test_generic_random_gradients(group):
  names = _generic_group(group)
  _check(_jobs('pmap', 'random', names) + _jobs('mesh', 'random', names))


@pytest.mark.slow
def test_reported_pmap_adadiag_pp_stacked_and_unstacked():
  _check(_jobs('pmap', 'rank1', ['adadiag_pp'])
         + _jobs('pmap', 'rank1', ['adadiag_pp'], stack_leaves=False))


@pytest.mark.slow
def test_reported_mesh_adadiag_pp():
  _check(_jobs('mesh', 'rank1', ['adadiag_pp']))


# --------------------------------------------------------------------------
# The worker side (this file run as a script): the jobs one after the other.

SHAPES = {'emb': (64, 16), 'w1': (16, 48), 'w2': (48, 16)}  # the reported
MORE_SHAPES = {'w3': (48, 16), 'scale': (16,), 'conv': (3, 3, 4, 8)}
SPECS = {'emb': ('model', None), 'w1': (None, 'model'), 'w2': ('model', None),
         'w3': ('model', None), 'scale': (), 'conv': ()}


def _run_job(job, jax, jnp, np, optax, optax_fac):
  """``STEPS`` steps of ``job``. Data from numpy: no eager op to compile."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  tx = getattr(optax_fac, job['name'])(learning_rate=1e-2, **job['kwargs'])
  mode, grads = job['mode'], job['grads']
  rng = np.random.default_rng(0)
  shapes = dict(SHAPES)
  if grads == 'random':  # more leaves: a stacked pair, a vector, a conv
    shapes.update(MORE_SHAPES)
  elif mode == 'mesh':   # the reported mesh leaves
    shapes.update({k: MORE_SHAPES[k] for k in ('scale', 'conv')})
  params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
            for k, s in shapes.items()}
  n = NUM_DEVICES

  def gradients(params, data):
    if grads == 'random':  # full-rank random gradients
      return data
    def loss(params, x):  # the reported loss: rank-1 gradients
      return sum(jnp.mean(jnp.tanh(x[:, :1] * v.reshape(-1)[None, :64] + 0.1)
                          ** 2) for v in jax.tree.leaves(params))
    return jax.grad(loss)(params, data)

  if mode == 'pmap':
    def step(params, state, data):
      g = jax.lax.pmean(gradients(params, data), 'd')
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state

    if grads == 'rank1':  # x: (8, 16) per device
      data = rng.standard_normal((n, 8, 16)).astype(np.float32)
    else:  # different on every device, pmean-ed in the step
      data = {k: rng.standard_normal((n,) + v.shape).astype(np.float32)
              for k, v in params.items()}
    rep = lambda t: jax.tree.map(
        lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a)), t)
    # On the devices as pmap lays out its outputs (host arrays in the first
    # call would compile the step a second time for the next one).
    p, s, data = jax.pmap(lambda t: t, axis_name='d')((rep(params), rep(
        jax.jit(tx.init)(params)), data))
    f = jax.pmap(step, axis_name='d')
  else:  # jit over a (4, 2) ('data', 'model') mesh, sharded params and state
    mesh = jax.make_mesh((4, 2), ('data', 'model'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {k: P(*SPECS[k]) for k in params}
    p_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    s_sh = optax_fac.state_shardings(tx, params, specs, mesh)

    def step(params, state, data):
      u, state = tx.update(gradients(params, data), state, params)
      return optax.apply_updates(params, u), state

    if grads == 'rank1':
      d_sh = NamedSharding(mesh, P('data'))
      data = jax.device_put(rng.standard_normal((32, 16)).astype(np.float32),
                            d_sh)
    else:
      d_sh = p_sh
      data = jax.device_put(
          {k: rng.standard_normal(v.shape).astype(np.float32)
           for k, v in params.items()}, p_sh)
    p = jax.device_put(params, p_sh)
    s = jax.jit(tx.init, out_shardings=s_sh)(p)
    f = jax.jit(step, in_shardings=(p_sh, s_sh, d_sh),
                out_shardings=(p_sh, s_sh))
  for _ in range(STEPS):
    p, s = f(p, s, data)
    jax.block_until_ready((p, s))
  bad = [k for k, v in p.items() if not np.all(np.isfinite(np.asarray(v)))]
  if bad:
    raise AssertionError(f"{job['key']}: non-finite params {bad}")


def _worker(jobs: list[dict]) -> None:
  import faulthandler
  if hasattr(signal, 'SIGUSR1'):  # the parent asks for the stacks of a hang
    faulthandler.register(signal.SIGUSR1, all_threads=True)
  import warnings
  warnings.simplefilter('ignore')
  import jax
  jax.config.update('jax_num_cpu_devices', NUM_DEVICES)
  import jax.numpy as jnp
  import numpy as np
  import optax
  import optax_fac
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  for job in jobs:
    if not hasattr(optax_fac, job['name']):
      print('missing', job['key'], flush=True)
      continue
    t0, c0 = time.monotonic(), time.process_time()
    print('start', job['key'], flush=True)
    _run_job(job, jax, jnp, np, optax, optax_fac)
    print('done', job['key'], f'{time.monotonic() - t0:.1f}s',
          f'(cpu {time.process_time() - c0:.1f}s)', flush=True)


if __name__ == '__main__':
  _worker(json.loads(sys.argv[1]))
