"""CPU smoke test of scripts/bench_scale.py (the GPU benchmark harness).

One real run on bench_step's 'tiny' tree (adamw and one rotation optimizer,
each in its own worker process, short timings), the JSON's fields and the
``--table`` mode; the merge / ratio / budget logic on synthetic rows.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'bench_scale.py'
sys.path.insert(0, str(ROOT / 'scripts'))
import bench_scale  # noqa: E402  pylint: disable=wrong-import-position


def _run(*args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench_scale')
  proc = _run('--models=tiny', '--dtypes=float32', '--optimizers=adadiag',
              f'--out={out}', '--phase_seconds=0.02', '--iters=3',
              '--loop_steps=2', '--repeats=1', '--refresh_steps=0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = out / 'bench_scale_cpu.json'
  assert path.exists(), (list(out.iterdir()), proc.stderr[-3000:])
  assert proc.stdout.strip().endswith(str(path))
  return path, json.loads(path.read_text()), proc.stderr


def test_rows_and_fields(tiny_run):
  _, doc, log = tiny_run
  rows = {r['optimizer']: r for r in doc['rows']}
  assert list(rows) == ['adamw', 'adadiag'], log[-2000:]  # adamw first
  assert doc['device'] == 'cpu' and doc['schema'] == 'bench_scale/1'
  run = doc['runs'][-1]
  for key in ('jax', 'optax', 'device_kind', 'config'):
    assert run[key], key
  for r in rows.values():
    assert r['status'] == 'ok', (r.get('error'), r.get('traceback'))
    assert r['model'] == 'tiny' and r['dtype'] == 'float32'
    for key in ('device_ms', 'pipelined_ms', 'sync_ms', 'state_bytes',
                'param_bytes', 'ideal_bytes', 'bandwidth_gbs',
                'xla_temp_bytes', 'xla_transient_bytes', 'compile_step_s',
                'compile_loop_s', 'loop_steps'):
      assert r[key] is not None and r[key] >= 0, key
    assert r['device_ms'] > 0 and r['pipelined_ms'] > 0
    # CPU: no memory_stats, so no measured transient (the XLA one is there).
    assert r['transient_bytes'] is None
    assert r['ideal_bytes'] == (3 * r['param_bytes'] + 2 * r['state_bytes']
                                - r['readonly_state_bytes'])
    assert r['n_params'] == bench_scale.n_params('tiny')
  adamw, adadiag = rows['adamw'], rows['adadiag']
  assert adamw['device_vs_adamw'] == 1.0 and adamw['state_vs_adamw'] == 1.0
  # adamw: m and v in float32 (+ a counter): the 7-array model of bench_step.
  n = adamw['n_params']
  assert abs(adamw['ideal_bytes'] - 7 * 4 * n) < 64
  assert not adamw['refresh'] and 'refresh_ms' not in adamw
  # adadiag: non-refresh step timed, one refresh step, amortized at every=200.
  assert adadiag['refresh'] and adadiag['every'] == 200
  assert adadiag['counts_set'] >= 1 and adadiag['readonly_state_bytes'] > 0
  assert adadiag['model_flops'] > 0 and adadiag['tflops'] > 0
  assert len(adadiag['refresh_times_ms']) == 1
  assert adadiag['refresh_first_call_only']
  want = (adadiag['refresh_ms'] + 199 * adadiag['device_ms']) / 200
  assert adadiag['amortized_ms'] == pytest.approx(want)
  assert adadiag['amortized_vs_adamw'] == pytest.approx(
      want / adamw['device_ms'])
  assert adadiag['device_vs_adamw'] == pytest.approx(
      adadiag['device_ms'] / adamw['device_ms'])
  # The rotation products alone, and the target 1.2 x (adamw + products).
  assert adadiag['rotation_products_ms'] > 0
  assert adadiag['rotation_target_ms'] == pytest.approx(
      1.2 * (adamw['device_ms'] + adadiag['rotation_products_ms']))
  assert 'rotation_products_ms' not in adamw


def test_rotation_products_are_the_counted_flops():
  """rotation_groups: the rotated sides in stack_leaves' groups, with the
  flops model_flops counts; rotate_round_trip is X for orthogonal bases."""
  shapes = bench_scale.tree_shapes('tiny')
  groups = bench_scale.rotation_groups('adadiag', shapes)
  assert [(g['shape'], g['members'], g['sides']) for g in groups] == [
      ((256, 64), 1, ['right']), ((172, 64), 2, ['right']),
      ((64, 172), 4, ['left']), ((64, 64), 8, ['left']),
      ((64, 256), 1, ['left'])]
  assert bench_scale.model_flops('adadiag', shapes) == sum(
      4 * g['dims'][0] * g['shape'][0] * g['shape'][1] * g['members']
      for g in groups)
  both = bench_scale.rotation_groups('adadiag_pp', shapes)
  assert all(g['sides'] == ['left', 'right'] for g in both)
  assert bench_scale.rotation_groups('adamw', shapes) == []
  assert len(bench_scale.rotation_groups(
      'adadiag:stack_leaves=False', shapes)) == 16
  key = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key[0], (2, 6, 5))
  p = jnp.linalg.qr(jax.random.normal(key[1], (2, 6, 6)))[0]
  q = jnp.linalg.qr(jax.random.normal(key[2], (2, 5, 5)))[0]
  y = bench_scale.rotate_round_trip(x, [p, q], ['left', 'right'],
                                    jax.lax.Precision.HIGHEST)
  assert jnp.allclose(y, x, atol=1e-5)
  # Not the identity for a non-orthogonal basis: the products are there.
  y = bench_scale.rotate_round_trip(x, [2 * p], ['left'])
  assert jnp.allclose(y, 4 * x, atol=1e-4)


def test_table_mode(tiny_run):
  path, _, _ = tiny_run
  proc = _run(f'--table={path}', timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  header = next(line for line in lines if line.startswith('| optimizer'))
  for col in ('device ms', 'pipelined ms', 'state MiB', 'transient MiB',
              'ideal GB', 'GB/s', 'refresh ms', 'amortized ms', 'status'):
    assert col in header, col
  body = [line for line in lines if line.startswith('| `')]
  assert [b.split('|')[1].strip() for b in body] == ['`adamw`', '`adadiag`']
  ncols = header.count('|')
  assert all(b.count('|') == ncols for b in body)
  assert '| ok |' in body[1] and '| 1.00 |' in body[0]


def test_budget_exhausted_records_skips(tmp_path):
  proc = _run('--models=tiny', '--optimizers=adamw,hfac', f'--out={tmp_path}',
              '--max_seconds=0', timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  doc = json.loads((tmp_path / 'bench_scale_unknown.json').read_text())
  assert [r['status'] for r in doc['rows']] == ['skipped', 'skipped']
  assert 'budget' in doc['rows'][0]['error']


def test_optimizer_list_and_specs():
  names = bench_scale.default_optimizers()
  assert names[:5] == ['adamw', 'adamw_bf16m', 'adafactor', 'lion', 'muon']
  assert set(names[5:]) == set(bench_scale.optax_fac.NAMED_OPTIMIZERS)
  refreshed = [n for n in names if bench_scale.has_refresh(n)]
  assert set(refreshed) == {'adadiag', 'adadiag_pp', 'adafac_diag',
                            'adafac_diag_pp', 'hfac_diag', 'adam_snsm'}
  assert names[-len(refreshed):] == refreshed  # refresh ones last, pp at end
  assert names[-2:] == ['adadiag_pp', 'adafac_diag_pp']
  assert bench_scale.parse_spec("adam_snsm:basis='eigh':rank=64") == (
      'adam_snsm', {'basis': 'eigh', 'rank': 64})
  with pytest.raises(ValueError, match='unknown optimizer'):
    bench_scale.parse_spec('adamw2')
  assert bench_scale.n_params('llama1b') == pytest.approx(1.34e9, rel=0.01)
  assert bench_scale.n_params('llama130m') == pytest.approx(134e6, rel=0.01)
  # One-sided rotation flops: 4 k^2 o per matrix, k the smaller side.
  shapes = {'w': (64, 256), 'b': (256,)}
  assert bench_scale.model_flops('adadiag', shapes) == 4 * 64 * 64 * 256
  assert bench_scale.model_flops('adadiag_pp', shapes) == (
      4 * 64 * 64 * 256 + 4 * 64 * 256 * 256)
  assert bench_scale.model_flops('hfac', shapes) is None


def _row(run, opt, status='ok', device=1.0, **kw):
  return dict(model='m', dtype='float32', optimizer=opt, status=status,
              run_id=run, device_ms=device, pipelined_ms=device,
              sync_ms=device, state_bytes=8, **kw)


def test_merge_keeps_better_rows_and_ratios(tmp_path):
  path = str(tmp_path / 'r.json')
  doc = bench_scale._load_doc(path, True)
  old = [_row('a', 'adamw', device=2.0), _row('a', 'hfac', device=3.0),
         _row('a', 'smmf', device=4.0)]
  bench_scale._save(path, doc, old, 'a', {}, 0.0)
  doc = bench_scale._load_doc(path, False)
  new = [_row('b', 'adamw', device=4.0),
         _row('b', 'hfac', status='timeout', device=None),
         _row('b', 'smmf', device=2.0),
         dict(_row('b', 'lion'), status='skipped')]
  bench_scale._save(path, doc, new, 'b', {}, 0.0)
  rows = {r['optimizer']: r for r in json.loads(open(path).read())['rows']}
  assert rows['adamw']['run_id'] == 'b'
  assert rows['hfac']['run_id'] == 'a'  # a failure does not replace an ok
  assert rows['hfac']['device_vs_adamw'] == 1.5  # its own run's adamw
  assert rows['smmf']['run_id'] == 'b'
  assert rows['smmf']['device_vs_adamw'] == 0.5
  assert rows['lion']['status'] == 'skipped'  # nothing better to keep


def test_xla_memory_names_the_temp_buffers(tmp_path):
  """scripts/xla_memory.py on the tiny tree: one JSON line per spec with the
  compiled step's temp bytes and its largest temp values (from XLA's buffer
  assignment dump), stacked and leaf by leaf."""
  out = tmp_path / 'mem.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'xla_memory.py'),
       '--model=tiny', f'--out={out}', f'--dump={tmp_path / "dump"}',
       'hfac', 'hfac:stack_leaves=False'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['optimizer'] for r in rows] == ['hfac', 'hfac:stack_leaves=False']
  for r in rows:
    assert 'error' not in r, r.get('error')
    assert r['param_bytes'] == 4 * bench_scale.n_params('tiny')
    assert r['temp_bytes'] > 0 and r['kernels'] > 0
    values = r['largest_temp_values']
    assert values and all(v['bytes'] > 0 and v['instruction']
                          for v in values)
    sizes = [v['bytes'] for v in values]
    assert sizes == sorted(sizes, reverse=True)
    assert r['assigned_temp_bytes'] >= sizes[0]
    # The step reads p and g and writes p at least: 3x the params' bytes.
    assert r['hlo_bytes'] >= 3 * r['param_bytes']
    assert r['hlo_vs_ideal'] == r['hlo_bytes'] / r['ideal_bytes']
    moved = [k['read'] + k['written'] for k in r['largest_kernels']]
    assert moved and moved == sorted(moved, reverse=True)
  assert not any((tmp_path / 'dump').iterdir())  # dumps removed by default


def test_temp_values_parses_a_buffer_assignment():
  import xla_memory  # pylint: disable=import-outside-toplevel
  text = '\n'.join([
      'allocation 0: size 64, parameter 0, shape |f32[4,4]| at ShapeIndex {}:',
      ' value: <1 p0 @0> (size=64,offset=0): f32[4,4]{1,0}',
      'allocation 1: size 96, preallocated-temp:',
      ' value: <7 fusion.3 @0> (size=32,offset=0): f32[8]{0}',
      ' value: <9 concatenate_fusion @0> (size=64,offset=32): f32[2,8]{1,0}',
  ])
  total, values = xla_memory.temp_values(text, top=5)
  assert total == 96
  assert values == [('concatenate_fusion', 64, 32, 'f32[2,8]{1,0}'),
                    ('fusion.3', 32, 0, 'f32[8]{0}')]



_HLO = """HloModule jit_step

%fused_slice (param_0: f32[4,8]) -> f32[8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %slice.1 = f32[1,8]{1,0} slice(%param_0), slice={[1:2], [0:8]}
  ROOT %bitcast.2 = f32[8]{0} bitcast(%slice.1)
}

%fused_dus (param_0.1: f32[4,8], param_1.1: f32[1,8]) -> f32[4,8] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  %param_1.1 = f32[1,8]{1,0} parameter(1)
  %c = s32[] constant(0)
  ROOT %dus = f32[4,8]{1,0} dynamic-update-slice(%param_0.1, %param_1.1, %c, %c)
}

%fused_add (param_0.2: f32[4,8], param_1.2: f32[4,8]) -> (f32[4,8], f32[4]) {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %param_1.2 = f32[4,8]{1,0} parameter(1)
  %add.3 = f32[4,8]{1,0} add(%param_0.2, %param_1.2)
  %r = f32[4]{0} reduce(%add.3), dimensions={1}
  ROOT %t = (f32[4,8]{1,0}, f32[4]{0}) tuple(%add.3, %r)
}

ENTRY %main (p0: f32[4,8], p1: f32[4,8], u: f32[1,8]) -> (f32[8], f32[4,8], f32[4,8]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  %u = f32[1,8]{1,0} parameter(2)
  %s = f32[8]{0} fusion(%p0), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/slice"}
  %d = f32[4,8]{1,0} fusion(%p1, %u), kind=kLoop, calls=%fused_dus
  %a = (f32[4,8]{1,0}, f32[4]{0}) fusion(%p0, %p1), kind=kInput, calls=%fused_add
  %g = f32[4,8]{1,0} get-tuple-element(%a), index=0
  %c2 = f32[4,8]{1,0} copy(%g)
  ROOT %out = (f32[8]{0}, f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%s, %d, %c2)
}
"""


def test_hlo_traffic_counts_each_kernel_bytes():
  """xla_memory.hlo_traffic on a hand-written module: a fusion reading one
  row through a slice counts the row, an in-place dynamic-update-slice
  counts its update (read and written), a multi-output fusion both outputs,
  a copy its operand and result; free ops (bitcast, tuple, ...) nothing."""
  import xla_memory  # pylint: disable=import-outside-toplevel
  t = xla_memory.hlo_traffic(_HLO, top=10)
  got = {k['name']: (k['read'], k['written']) for k in t['top']}
  assert got == {'s': (32, 32), 'd': (32, 32), 'a': (256, 144),
                 'c2': (128, 128)}
  assert t['kernels'] == 4 and t['loops'] == 0
  assert t['bytes'] == 32 + 32 + 32 + 32 + 256 + 144 + 256
  assert t['top'][0]['name'] == 'a'
  assert [k['source'] for k in t['top'] if k['name'] == 's'] == [
      'jit(step)/slice']
  assert xla_memory.type_bytes('(f32[2,3]{1,0}, bf16[4]{0}, pred[])') == 33
  assert t['branch_bytes'] == 0 and t['conditionals'] == 0


def test_hlo_traffic_totals_conditional_branches_apart():
  """A compiled lax.cond: each branch's kernel is counted (one 1 MiB
  read + write each) and totalled apart, since a step runs one of them."""
  import xla_memory  # pylint: disable=import-outside-toplevel
  f = lambda x, p: jax.lax.cond(p, lambda: x * 2.0, lambda: x + 1.0)  # noqa: E731
  text = jax.jit(f).lower(jnp.ones((256, 256)), True).compile().as_text()
  t = xla_memory.hlo_traffic(text)
  assert t['conditionals'] == 1
  assert t['branch_bytes'] == 2 * 2 * 256 * 256 * 4
  assert t['bytes'] - t['branch_bytes'] < 64  # the predicate only
  assert all(k['in_branch'] for k in t['top'] if k['read'] > 1024)

@pytest.mark.slow  # a subprocess that compiles two optimizers: ~25 s
def test_refresh_schedule_times_one_period(tmp_path):
  """scripts/bench_refresh_schedule.py on the tiny tree, period 4."""
  out = tmp_path / 'schedule.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'bench_refresh_schedule.py'),
       '--model=tiny', '--optimizer=adadiag:stagger=True', '--every=4',
       '--adamw_steps=2', f'--out={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc['optimizer'] == 'adadiag:stagger=True:every=4'
  assert doc['steps_timed'] == 4 and doc['complete_period']
  assert doc['periods'] == 2 and len(doc['step_ms']) == 4
  assert doc['max_ms'] == max(doc['step_ms']) and doc['adamw_ms'] > 0
  assert doc['amortized_ms'] == pytest.approx(sum(doc['step_ms']) / 4)
  assert doc['rotated_groups'] == {'groups': 5, 'matrices': 16,
                                   'matrices_per_group': {
                                       '1': 2, '2': 1, '4': 1, '8': 1}}


def test_rotated_groups_of_llama1b():
  """The README's count of AdaDiag's staggered groups on the 1B tree: 98
  (74 single matrices, 24 stacks of four), 170 with one matrix per group."""
  import bench_refresh_schedule  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(lambda: bench_scale.make_tree(
      bench_scale.tree_shapes('llama1b'), 'float32', 0, 0.02))
  count = lambda spec: bench_refresh_schedule.rotated_groups(
      jax.eval_shape(bench_scale.build(spec, 1e-3).init, params))
  assert count('adadiag:stagger=True') == {
      'groups': 98, 'matrices': 170, 'matrices_per_group': {'1': 74, '4': 24}}
  assert count('adadiag:stagger=True:stack_leaves=16777216')['groups'] == 170


def test_refresh_schedule_reports_the_last_whole_period():
  import bench_refresh_schedule  # pylint: disable=g-import-not-at-top
  last = bench_refresh_schedule.last_period
  assert last([[9, 1, 1, 1], [2, 2, 2, 2]], 4) == ([2, 2, 2, 2], True)
  # The second period cut by the deadline: the first, whole, is reported.
  assert last([[9, 1, 1, 1], [2, 2]], 4) == ([9, 1, 1, 1], True)
  assert last([[9, 1]], 4) == ([9, 1], False)
  assert last([], 4) == ([], False)


@pytest.mark.slow  # two subprocesses that compile the 60M LLaMA: ~50 s
def test_train_step_bench_times_and_fits(tmp_path):
  """scripts/bench_train_step.py on LLaMA-60M with a tiny batch: the time
  mode's loop of full training steps lowers the loss and its full-depth
  peak equals the fit mode's extrapolation from 1 and 2 layers; the fit
  mode says which sizes fit a given memory."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  script = str(ROOT / 'scripts' / 'bench_train_step.py')
  common = ['--batch=2', '--seq=16']
  time_out, fit_out = tmp_path / 'time.json', tmp_path / 'fit.json'
  proc = subprocess.run(
      [sys.executable, script, '--mode=time', '--model=60m', '--loop_steps=2',
       '--repeats=1', '--optimizers=adamw', '--check_fit', f'--out={time_out}',
       *common], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(time_out.read_text())['rows']
  assert row['status'] == 'ok' and row['phase'] == 'done'
  assert row['device_vs_adamw'] == 1.0
  assert row['n_params'] == 58_073_600
  assert row['final_loss'] < row['loss_after_warmup']
  check = row['fit_check']
  assert abs(check['extrapolated_peak_bytes'] - check['compiled_peak_bytes']
             ) <= 1e-3 * check['compiled_peak_bytes']
  peak = check['compiled_peak_bytes']
  proc = subprocess.run(
      [sys.executable, script, '--mode=fit', '--sizes=60m',
       '--optimizers=adamw,sign_fsgd', f'--bytes_limit={peak + 1024}',
       f'--out={fit_out}', *common], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r['optimizer']: r for r in json.loads(fit_out.read_text())['rows']}
  adamw, sign = rows['adamw']['sizes']['60m_float32'], rows['sign_fsgd'][
      'sizes']['60m_float32']
  # The loop program's peak (its scalar carry too) against the 1- and
  # 2-layer extrapolation: equal up to a few bytes.
  assert abs(adamw['peak_bytes'] - peak) <= 1e-3 * peak and adamw['fits']
  assert adamw['max_layers'] == 8 and adamw['layers'] == 8
  # signFSGD keeps m + n values per matrix instead of Adam's 2mn: deeper.
  assert sign['peak_bytes'] < peak and sign['max_layers'] > 8
  assert sign['max_layers_params'] > adamw['n_params']
  assert '60m_float32' in proc.stdout  # the table
  # A typo is refused before any worker starts.
  proc = subprocess.run(
      [sys.executable, script, '--optimizers=adamw,adamx', f'--out={fit_out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode != 0
  assert "unknown optimizer 'adamx'" in proc.stderr


def test_result_tables_show_ratios_and_failures(tmp_path):
  """xla_memory --table: passes and ratios to adamw's bytes, a failed
  compile with its cause; bench_train_step --table: a failed worker with
  its last phase and error, a fit table of failures only."""
  import xla_memory  # pylint: disable=import-outside-toplevel
  import bench_train_step  # pylint: disable=import-outside-toplevel
  gb = 10 ** 9
  rows = [dict(optimizer='adamw', param_bytes=gb, hlo_bytes=7 * gb,
               ideal_bytes=7 * gb, hlo_kernels=10, temp_bytes=0),
          dict(optimizer='hfac', param_bytes=gb, hlo_bytes=6 * gb,
               ideal_bytes=3 * gb, hlo_kernels=40, temp_bytes=2 ** 20,
               hlo_conditionals=0),
          dict(optimizer='smmf', error='Traceback\nRESOURCE_EXHAUSTED: Out '
               'of memory while trying to allocate 58.66MiB\n    @ 0x1 f()')]
  path = tmp_path / 'traffic.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  lines = xla_memory.table([str(path)]).splitlines()
  assert lines[2].split(' | ')[2:6] == ['7.00', '7.00', '1.000', '7.00']
  assert lines[3].split(' | ')[2:6] == ['6.00', '6.00', '0.857', '3.00']
  assert lines[3].endswith('| 0 |') and lines[2].endswith('| ? |')
  assert 'failed: RESOURCE_EXHAUSTED: Out of memory' in lines[4]
  failed = {'optimizer': 'adamw', 'status': 'error', 'phase': 'compile',
            'error': 'boom\nkilled after 200.0 s'}
  for mode in ('time', 'fit'):
    doc = tmp_path / f'{mode}.json'
    doc.write_text(json.dumps({'mode': mode, 'rows': [failed]}))
    text = bench_train_step.table(str(doc))
    assert '| adamw | error (compile): killed after 200.0 s |' in text
    assert text.splitlines()[1].startswith('|---|')


def test_fit_table_names_the_largest_fitting_model(tmp_path):
  """bench_train_step --table, fit mode: per dtype the largest of the file's
  sizes that fits, and the depth (and params) that fits at the widest."""
  import bench_train_step  # pylint: disable=import-outside-toplevel
  gib = 2 ** 30

  def entry(peak, fits, n_params, max_layers=None, max_params=None):
    e = {'peak_bytes': peak * gib, 'fits': fits, 'n_params': n_params}
    if max_layers:
      e.update(max_layers=max_layers, max_layers_params=max_params)
    return e

  rows = [{'optimizer': 'adamw', 'status': 'ok', 'sizes': {
      '1b_float32': entry(60, True, 1.34e9),
      '7b_float32': entry(180, False, 6.74e9, 24, 5.12e9)}},
          {'optimizer': 'hfac', 'status': 'ok', 'sizes': {
              '1b_float32': entry(50, True, 1.34e9),
              '7b_float32': entry(130, True, 6.74e9, 34, 7.14e9)}},
          {'optimizer': 'big', 'status': 'ok', 'sizes': {
              '1b_float32': entry(200, False, 1.34e9),
              '7b_float32': entry(900, False, 6.74e9)}}]
  doc = tmp_path / 'fit.json'
  doc.write_text(json.dumps({'mode': 'fit', 'rows': rows}))
  lines = bench_train_step.table(str(doc)).splitlines()
  assert lines[0].endswith('| largest fitting, float32 | 7b width, float32: '
                           'layers (B params) |')
  assert lines[2] == ('| adamw | 60.0 | 180.0 ✗ | 1b (1.34 B) | '
                      '24 (5.12 B) |')
  assert lines[3] == '| hfac | 50.0 | 130.0 | 7b (6.74 B) | 34 (7.14 B) |'
  assert lines[4] == '| big | 200.0 ✗ | 900.0 ✗ | none |  |'


def test_train_step_table_of_several_runs(tmp_path):
  """bench_train_step --table with two time files: each row keeps its own
  run's ratio and names its file; files of different modes are refused."""
  import bench_train_step  # pylint: disable=import-outside-toplevel

  def row(name, ms, ratio):
    return {'optimizer': name, 'status': 'ok', 'device_ms': ms,
            'device_vs_adamw': ratio, 'state_bytes': 2 ** 30,
            'step_peak_bytes': 2 ** 31, 'peak_bytes_in_use': 2 ** 31}

  first, second, fit = (tmp_path / n for n in ('a.json', 'b.json', 'f.json'))
  first.write_text(json.dumps({'mode': 'time', 'rows': [
      row('adamw', 100.0, 1.0), row('hfac', 99.0, 0.99)]}))
  second.write_text(json.dumps({'mode': 'time', 'rows': [
      row('adamw', 110.0, 1.0), row('smmf', 121.0, 1.1)]}))
  fit.write_text(json.dumps({'mode': 'fit', 'rows': []}))
  lines = bench_train_step.table(str(first), str(second)).splitlines()
  assert lines[0].endswith('| run |') and lines[1].endswith('---:|---|')
  assert lines[3] == ('| hfac | 99.00 | 0.990 | 1.0 GiB | 2.0 | 2.0 | '
                      '`a.json` |')
  assert lines[5] == ('| smmf | 121.00 | 1.100 | 1.0 GiB | 2.0 | 2.0 | '
                      '`b.json` |')
  assert 'run' not in bench_train_step.table(str(first)).splitlines()[0]
  with pytest.raises(ValueError, match='different modes'):
    bench_train_step.table(str(first), str(fit))
  with pytest.raises(ValueError, match='at least one'):
    bench_train_step.table()


@pytest.mark.slow  # a subprocess with Pallas' interpreter: ~15 s
def test_row_col_kernel_check_runs_on_cpu(tmp_path):
  """scripts/check_row_col_kernel.py on the tiny tree, the kernel
  interpreted: every mode timed three ways, the kernel equal to XLA's."""
  out = tmp_path / 'row_col.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'check_row_col_kernel.py'),
       '--model=tiny', '--interpret', '--loop_steps=2', '--repeats=1',
       f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert sorted(doc['modes']) == ['both', 'means', 'squares']
  assert [b for _, b in doc['groups']] == [1, 2, 4, 8, 1]
  for row in doc['modes'].values():
    assert row['kernel_ms'] > 0 and row['xla_ms'] > 0 and row['read_ms'] > 0
    assert row['max_rel_diff'] < 1e-5


def test_fsdp_specs_and_collective_bytes():
  """--fsdp's layout (the largest axis the devices divide, else
  replicated) and the collectives' bytes read from a compiled module."""
  P = jax.sharding.PartitionSpec
  specs = bench_scale.fsdp_specs(
      {'mlp': (2048, 5461), 'norm': (5461,), 'odd': (3, 7),
       'embed': (32000, 2048)}, 2)
  assert specs == {'mlp': P('fsdp', None), 'norm': P(), 'odd': P(),
                   'embed': P('fsdp', None)}
  assert bench_scale.fsdp_specs({'w': (8, 4)}, 1) == {'w': P()}
  text = '\n'.join([
      '  %ag = f32[4,64,64]{2,1,0} all-gather(%x), dimensions={0}',
      '  ROOT %ar = (f32[8]{0}, bf16[4,2]{1,0}) all-reduce(%a, %b)',
      '  %s = (f32[2,8]{1,0}, f32[4,8]{1,0}) all-gather-start(%y)',
      '  %d = f32[4,8]{1,0} all-gather-done(%s)',
      '  %f = f32[3]{0} add(%p, %q)'])
  got = bench_scale.collective_bytes(text)
  assert got['all-gather'] == 4 * 64 * 64 * 4 + 4 * 8 * 4
  assert got['all-reduce'] == 8 * 4 + 4 * 2 * 2
  assert got['count'] == 3 and got['reduce-scatter'] == 0


@pytest.mark.slow  # a parent and three workers on 4 CPU devices: ~40 s
def test_fsdp_run_on_cpu_devices(tmp_path):
  """bench_scale --fsdp on 4 CPU devices: params, grads and state sharded,
  each step's output fed back (no sharding mismatch), the collectives
  recorded, split_refresh=True given the mesh; its own result file."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4')
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--models=tiny', '--dtypes=float32',
       '--optimizers=adamw,smmf,adadiag:split_refresh=True', '--fsdp',
       f'--out={tmp_path}', '--phase_seconds=0.02', '--iters=3',
       '--loop_steps=2', '--repeats=1', '--refresh_steps=0'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / 'bench_scale_cpu_fsdp4.json').read_text())
  rows = {r['optimizer']: r for r in doc['rows']}
  assert list(rows) == ['adamw', 'smmf', 'adadiag:split_refresh=True']
  for r in rows.values():
    assert r['status'] == 'ok', (r.get('error'), r.get('traceback'))
    assert r['fsdp_devices'] == 4 and r['fsdp_sharded_leaves'] > 0
    assert r['collectives']['count'] >= 0 and r['device_ms'] > 0
  assert rows['adadiag:split_refresh=True']['refresh_ms'] > 0
  assert 'rotation_products_ms' not in rows['adadiag:split_refresh=True']
