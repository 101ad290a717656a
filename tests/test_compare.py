"""scripts/compare.py (the convergence benchmark) on a tiny config, on CPU."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import optax
import pytest

pytest.importorskip('sentencepiece')
pytest.importorskip('ml_collections')
if importlib.util.find_spec('mistral_common') is None:
  pytest.skip('the 32000-piece tokenizer ships with mistral-common (pip install '
              '--no-deps mistral-common; make test installs it)',
              allow_module_level=True)

from optax_fac.experiments import compare  # noqa: E402
from optax_fac.experiments import config_lib  # noqa: E402
from optax_fac.experiments import models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'compare_tiny.py')
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import compare as compare_script  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.slow  # ~1 min: four short trainings (make test runs it)
def test_tiny_sweep_end_to_end_and_resume(tmp_path):
  workdir = str(tmp_path)
  argv = [f'--config={TINY}', f'--workdir={workdir}', '--no_progress',
          '--optimizers=adamw,adafactor_momentum_b1none',
          '--lrs=3e-3,1e-2']
  compare_script.main(argv)
  runs = compare.read_runs(workdir)
  assert sorted((r['optimizer'], r['learning_rate']) for r in runs) == [
      ('adafactor_momentum_b1none', 3e-3), ('adafactor_momentum_b1none', 1e-2),
      ('adamw', 3e-3), ('adamw', 1e-2)]
  for r in runs:
    assert len(r['train_loss']) == 20
    assert [e['step'] for e in r['eval']] == [10, 20]
    assert np.all(np.isfinite(r['train_loss']))
    assert r['step_time_s'] > 0 and r['num_params'] > 0
    assert r['corpus']['vocab_size'] == 32000
  variant = next(r for r in runs if r['optimizer'] != 'adamw')
  assert variant['factory'] == 'adafactor_momentum'
  assert variant['optimizer_kwargs'] == {'b1': None}
  # No first moment: far less state than adamw's two moments.
  adamw = next(r for r in runs if r['optimizer'] == 'adamw')
  assert variant['state_bytes'] < adamw['state_bytes']
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert [row['optimizer'] for row in summary['rows']][0] == 'adamw'
  # adamw reaches its own final loss by its last step at the latest.
  assert 0 < summary['rows'][0]['steps_ratio'] <= 1.0
  assert os.path.getsize(os.path.join(workdir, 'valid_loss.png')) > 10_000
  assert '| adamw |' in open(os.path.join(workdir, 'table.md')).read()
  # Same seed, same data, same rate: bitwise the same losses on CPU.
  again = compare.Trainer(config_lib.load_config(TINY), 'adamw',
                          compare.load_corpus(config_lib.load_config(
                              TINY).data, workdir)).run(3e-3, progress=False)
  first = next(r for r in runs if r['optimizer'] == 'adamw'
               and r['learning_rate'] == 3e-3)
  assert again['train_loss'] == first['train_loss']
  # A second call finds every run file and trains nothing.
  mtimes = {f: os.path.getmtime(os.path.join(workdir, 'runs', f))
            for f in os.listdir(os.path.join(workdir, 'runs'))}
  assert compare.run_sweep(config_lib.load_config(TINY), workdir,
                           ['adamw'], {'adamw': [3e-3, 1e-2]},
                           progress=False) == []
  assert mtimes == {f: os.path.getmtime(os.path.join(workdir, 'runs', f))
                    for f in os.listdir(os.path.join(workdir, 'runs'))}
  # Two rates each: every best rate is on an edge, but a passed deadline
  # (--max_seconds=0) starts no edge run either.
  assert compare_script.edge_rates(runs, ['adamw'])
  compare_script.main(argv + ['--extend_edges', '--max_seconds=0'])
  assert mtimes == {f: os.path.getmtime(os.path.join(workdir, 'runs', f))
                    for f in os.listdir(os.path.join(workdir, 'runs'))}


def test_steps_to_reach_interpolates_and_says_none():
  evals = [{'step': 10, 'valid_loss': 5.0}, {'step': 20, 'valid_loss': 3.0},
           {'step': 30, 'valid_loss': 2.0}]
  assert compare.steps_to_reach(evals, 4.0) == 15.0
  assert compare.steps_to_reach(evals, 5.5) == 10.0
  assert compare.steps_to_reach(evals, 2.0) == 30.0
  assert compare.steps_to_reach(evals, 1.9) is None


def test_summary_picks_best_rate_and_flags_edges_and_divergence():
  def run(name, lr, final, steps=100):
    return {'optimizer': name, 'learning_rate': lr, 'steps': steps,
            'final_valid_loss': final, 'diverged': not np.isfinite(final),
            'eval': [{'step': 50, 'valid_loss': final + 1},
                     {'step': 100, 'valid_loss': final}],
            'state_bytes': 100, 'step_time_s': 0.01}
  runs = [run('adamw', 1e-3, 3.0), run('adamw', 3e-3, 2.5),
          run('adamw', 1e-2, 2.7), run('x', 1e-3, 2.0),
          run('x', 3e-3, float('nan'))]
  rows = {r['optimizer']: r for r in compare.summarize(runs)}
  assert rows['adamw']['best_lr'] == 3e-3 and not rows['adamw']['lr_on_edge']
  assert rows['x']['best_lr'] == 1e-3 and rows['x']['lr_on_edge']
  assert rows['x']['diverged_rates'] == [3e-3]
  # x reaches 2.5 between step 50 (3.0) and 100 (2.0): at 75.
  assert rows['x']['steps_to_baseline'] == 75.0
  assert rows['x']['vs_baseline'] == pytest.approx(2.0 / 2.5 - 1)
  assert compare_script.edge_rates(runs, ['adamw', 'x']) == {'x': [3e-4]}


def test_muon_recipe_puts_embedding_head_and_norms_on_adam():
  model, _ = models.build_model(dict(name='llama', vocab_size=64, d_model=16,
                                     ffn_dim=24, num_layers=1, num_heads=2))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.numpy.zeros((1, 4), jax.numpy.int32))['params']
  dims = compare.muon_dimension_numbers(('embed', 'lm_head'))(params)
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(
              dims, is_leaf=lambda x: x is None or isinstance(
                  x, optax.contrib.MuonDimensionNumbers))[0]}
  muon = sorted(k for k, v in flat.items() if v is not None)
  assert all(('attn' in k or 'mlp' in k) and 'kernel' in k for k in muon)
  assert len(muon) == 7  # q, k, v, o, gate, up, down
  assert flat["['embed']['embedding']"] is None
  assert flat["['lm_head']['kernel']"] is None


def test_data_order_is_a_function_of_the_seed():
  a = compare.batch_table(10_000, 16, 8, 50, seed=0)
  assert a.shape == (50, 8)
  np.testing.assert_array_equal(a, compare.batch_table(10_000, 16, 8, 50, 0))
  assert not np.array_equal(a, compare.batch_table(10_000, 16, 8, 50, 1))
  # 624 windows: every window once per epoch.
  epoch = a.reshape(-1)[:624 // 8 * 8]
  assert len(np.unique(epoch)) == len(epoch)


def test_variants_merge_kwargs():
  config = config_lib.load_config(TINY)
  assert compare.resolve(config, 'smmf') == ('smmf', {'decay_rate': 0.8})
  assert compare.resolve(config, 'muon') == ('contrib.muon',
                                             {'consistent_rms': 0.2})
  assert compare.resolve(config, 'adafactor_momentum_b1none') == (
      'adafactor_momentum', {'b1': None})
  assert compare.sweep_rates(config, 'lion_factor') == [1e-4, 3e-4, 1e-3]
  assert compare.sweep_rates(config, 'adam_snsm') == [1e-2, 3e-2, 1e-1]
  assert compare.sweep_rates(config, 'hfac') == [1e-3, 3e-3, 1e-2]


def test_sweep_config_model_size_and_every_label_builds():
  config = config_lib.load_config(os.path.join(ROOT, 'configs',
                                               'compare_sweep.py'))
  model, cfg = models.build_model(dict(config.model.to_dict(),
                                       vocab_size=32000, max_len=256))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.numpy.zeros((1, 256), jax.numpy.int32))['params']
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert n == cfg.num_params() == 22_712_576  # the 22.7 M of its docstring
  assert (config.batch_size, config.data.seq_len, config.num_train_steps) == (
      64, 256, 2000)
  schedule = compare.shape_schedule(config)
  assert float(schedule(200)) == pytest.approx(1.0)
  assert float(schedule(2000)) == pytest.approx(0.1, rel=1e-5)
  assert len(set(config.optimizers)) == len(config.optimizers) == 18
  for label in config.optimizers:
    name, kwargs = compare.resolve(config, label)
    tx = compare.make_tx(config, name, 1e-3, kwargs)
    assert compare.memory.state_size(tx, params) > 0, label


@pytest.mark.parametrize('name', ['compare_ablations.py', 'compare_60m.py'])
def test_ablation_and_confirmation_configs_build(name):
  config = config_lib.load_config(os.path.join(ROOT, 'configs', name))
  model, cfg = models.build_model(dict(config.model.to_dict(),
                                       vocab_size=32000, max_len=256))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.numpy.zeros((1, 8), jax.numpy.int32))['params']
  if name == 'compare_60m.py':
    assert cfg.num_params() == 58_073_600  # GaLore's 60M with 32k vocab
  for label in config.optimizers:
    name_, kwargs = compare.resolve(config, label)
    rates = compare.sweep_rates(config, label)
    assert rates and all(r > 0 for r in rates), label
    tx = compare.make_tx(config, name_, rates[0], kwargs)
    assert compare.memory.state_size(tx, params) > 0, label


def test_table_says_when_a_sweep_is_incomplete():
  config = config_lib.load_config(TINY).to_dict()
  base = {'learning_rate': 1e-3, 'steps': 10, 'diverged': False,
          'eval': [{'step': 10, 'valid_loss': 2.0}], 'final_valid_loss': 2.0,
          'state_bytes': 8, 'step_time_s': 0.01, 'config': config}
  runs = [dict(base, optimizer='adamw', learning_rate=lr)
          for lr in (1e-3, 3e-3, 1e-2)] + [dict(base, optimizer='hfac')]
  rows = compare.summarize(runs)
  assert [r['rates_planned'] for r in rows] == [3, 3]
  table = compare.markdown_table(rows)
  assert table.count('sweep incomplete: 1 of 3 rates') == 1


def test_ablations_get_their_own_table_beside_their_base(tmp_path):
  # Three committed run files of the sweep: adamw, adadiag (swept over three
  # rates) and one ablation of adadiag (one rate).
  src = os.path.join(ROOT, 'results', 'compare_sweep', 'runs')
  os.makedirs(tmp_path / 'runs')
  names = ('adamw__lr3e-3', 'adadiag__lr3e-3', 'adadiag_every20__lr3e-3')
  runs = {}
  for n in names:
    with open(os.path.join(src, n + '.json')) as f:
      runs[n] = json.load(f)
    with open(tmp_path / 'runs' / (n + '.json'), 'w') as f:
      json.dump(runs[n], f)
  assert [compare.ablation_of(runs[n]) for n in names] == [None, None,
                                                          'adadiag']
  compare_script.report(str(tmp_path), 'test')
  table = (tmp_path / 'table.md').read_text()
  assert '| adadiag |' in table and 'adadiag_every20' not in table
  ablations = (tmp_path / 'ablations.md').read_text()
  for label in ('adamw', 'adadiag', 'adadiag_every20'):
    assert f'| {label} |' in ablations
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert [r['optimizer'] for r in summary['rows']] == ['adamw', 'adadiag']
  assert len(summary['ablation_rows']) == 3


def test_runs_on_different_corpora_are_refused(tmp_path):
  def run(name, lr, digest):
    return {'optimizer': name, 'learning_rate': lr, 'steps': 10,
            'final_valid_loss': 2.0, 'diverged': False,
            'eval': [{'step': 10, 'valid_loss': 2.0}], 'state_bytes': 8,
            'step_time_s': 0.01, 'corpus': {'sha256_16': digest}}
  same = [run('adamw', 1e-3, 'aaaa'), run('hfac', 1e-3, 'aaaa')]
  compare.check_one_corpus(same)
  compare.check_one_corpus(same, 'aaaa')
  assert len(compare.summarize(same)) == 2
  mixed = same + [run('smmf', 3e-3, 'bbbb')]
  with pytest.raises(ValueError, match=r'2 different corpora.*bbbb: smmf lr '
                     r'0\.003'):
    compare.summarize(mixed)
  with pytest.raises(ValueError, match=r'cccc: the new run'):
    compare.check_one_corpus(same, 'cccc')
  # A sweep refuses to add a run on another corpus before training anything.
  os.makedirs(tmp_path / 'runs')
  with open(tmp_path / 'runs' / 'adamw__lr1e-3.json', 'w') as f:
    json.dump(run('adamw', 1e-3, 'aaaa'), f)
  config = config_lib.load_config(TINY)
  compare.load_corpus(config.data, str(tmp_path))  # writes tokens.npz
  with pytest.raises(ValueError, match='different corpora'):
    compare.run_sweep(config, str(tmp_path), ['hfac'], {'hfac': [1e-3]},
                      progress=False)
  assert os.listdir(tmp_path / 'runs') == ['adamw__lr1e-3.json']


def test_corpus_records_the_package_versions_it_read():
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import sysconfig  # pylint: disable=g-import-not-at-top
  from optax_fac.experiments.data import text  # pylint: disable=g-import-not-at-top
  root = sysconfig.get_paths()['purelib']
  stdlib = sysconfig.get_paths()['stdlib']
  paths = [os.path.join(root, 'numpy', 'linalg', 'x.py'),
           os.path.join(root, 'optax', '__init__.py'),
           os.path.join(root, 'zz_no_such_module.py'),
           os.path.join(stdlib, 'json', '__init__.py')]
  assert text.package_versions(paths) == {
      'numpy': importlib.metadata.version('numpy'),
      'optax': importlib.metadata.version('optax'),
      'zz_no_such_module': '?'}
  # The tiny config reads the stdlib alone: no package, the Python version.
  config = config_lib.load_config(TINY)
  info = compare.build_corpus(config.data)['info']
  assert info['packages'] == {} and info['python'] and info['train_files']
  *_, kept = text.python_source_split(int(config.data.max_bytes),
                                      int(config.data.every), True)
  assert kept and all(p.startswith(stdlib) for p in kept)


def test_tokens_file_built_with_other_settings_is_refused(tmp_path):
  config = config_lib.load_config(TINY)
  compare.load_corpus(config.data, str(tmp_path))  # builds tokens.npz
  info = compare.load_corpus(config.data, str(tmp_path))['info']
  assert info['tokenizer_sha256_16'] and info['sentencepiece']
  with config.unlocked():
    config.data.max_bytes = int(config.data.max_bytes) // 2
    config.data.every = 7
  with pytest.raises(compare.CorpusMismatch,
                     match=r'tokens\.npz was built with other data settings'
                     r'.*max_bytes: built with 1000000, config says 500000'
                     r'; every: built with \d+, config says 7.*Delete it'):
    compare.load_corpus(config.data, str(tmp_path))
  # On the command line: one error line, no traceback.
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'compare.py'),
       f'--config={TINY}', f'--workdir={tmp_path}', '--prepare_only',
       '--config.data.every=7'],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert proc.stderr.startswith('compare.py: error: ') and (
      'Traceback' not in proc.stderr), proc.stderr[-2000:]
