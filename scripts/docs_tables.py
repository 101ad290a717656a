"""The numbers of docs/guide.md, computed: writes docs/_generated/tables.md.

Nothing in the guide's tables is typed by hand. They come from

* the library itself: ``optax_fac.state_size`` of every optimizer on the
  abstract parameters (``jax.eval_shape`` of ``model.init``, nothing
  allocated) of the experiments' LLaMA-60M/130M/350M/1B and ResNet-50
  (``optax_fac.experiments.models.build_model``), the optax baselines built
  as ``scripts/bench_scale.py`` builds them;
* committed measurements: ``results/bench_scale/*.json`` (one optimizer step
  at 1B on an H200), the training step and the fit of
  ``scripts/bench_train_step.py`` (``TRAIN_STEP``, ``FIT``; its own
  ``--table``) and the training summaries ``results/*/summary.json``
  listed in ``CONVERGENCE``.

    python scripts/docs_tables.py          # rewrite docs/_generated/tables.md
    python scripts/docs_tables.py --check  # exit 1 if the file is stale

The guide includes each table by its markers (``<!-- begin NAME -->`` ...
``<!-- end NAME -->``); tests/test_docs_site.py checks that the committed
file equals what this script writes now. Needs the ``experiments`` extra
(flax, ml_collections).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import optax_fac  # noqa: E402
from optax_fac.experiments import compare  # noqa: E402
from optax_fac.experiments import optimizers  # noqa: E402
from optax_fac.experiments.models import build_model  # noqa: E402
import bench_scale  # noqa: E402
import bench_train_step  # noqa: E402

OUT = os.path.join(ROOT, 'docs', '_generated', 'tables.md')
LR = 1e-3  # any value: the state does not depend on it

# (column title, config.model section, example input of model.init)
MODELS = (
    ('LLaMA-60M', dict(name='llama', size='60m'), ((1, 8), jnp.int32)),
    ('LLaMA-130M', dict(name='llama', size='130m'), ((1, 8), jnp.int32)),
    ('LLaMA-350M', dict(name='llama', size='350m'), ((1, 8), jnp.int32)),
    ('LLaMA-1B', dict(name='llama', size='1b'), ((1, 8), jnp.int32)),
    ('ResNet-50', dict(name='resnet', size='50'),
     ((1, 224, 224, 3), jnp.float32)),
)
# The papers' LLaMA recipe (method_exclude) is read from this config.
RECIPE_CONFIG = os.path.join('configs', 'c4_llama_60m.py')
BENCH_GLOB = os.path.join('results', 'bench_scale', '*.json')
# scripts/bench_train_step.py's runs: the 350M training step, the fit table.
TRAIN_STEP = [os.path.join('results', 'bench_train_step', name)
              for name in ('llama350m_time.json', 'llama350m_time_rest.json')]
FIT = [os.path.join('results', 'bench_train_step', name)
       for name in ('fit_1b_3b_7b.json', 'fit_1b_3b_7b_rest.json')]
BENCH_MODEL = 'llama1b'  # the rows of results/bench_scale the guide shows
# (title, summary.json) of the committed training runs.
CONVERGENCE = (
    ('LLaMA-60M body, byte tokens, Shakespeare (GPU run)',
     os.path.join('results', 'gpu_shakespeare_60m', 'summary.json')),
    ('`make demo`: a small LLaMA on Shakespeare (CPU run)',
     os.path.join('results', 'demo_readme', 'summary.json')),
)


# --------------------------------------------------------------------------
# State bytes, computed.


def abstract_params(section, example):
  """The model's parameters as ``jax.ShapeDtypeStruct`` s (no allocation)."""
  model, _ = build_model(section)
  shape, dtype = example
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
      jax.ShapeDtypeStruct(shape, dtype))
  return variables['params']


def baseline_names():
  return list(bench_scale.BASELINES)


def all_optimizers():
  return baseline_names() + list(optax_fac.NAMED_OPTIMIZERS)


def build_default(name):
  """Every optimizer with its defaults, as scripts/bench_scale.py runs it."""
  return bench_scale.build(name, LR)


def recipe_exclude():
  spec = importlib.util.spec_from_file_location(
      'recipe_config', os.path.join(ROOT, RECIPE_CONFIG))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return tuple(module.get_config().method_exclude)


def build_recipe(name, exclude):
  return optimizers.make_optimizer(name, LR, method_exclude=exclude)


def size_cell(size, base):
  return f'{compact_bytes(size)} ({percent(size / base)})'


def compact_bytes(n):
  """Bytes with three significant digits: 443 MiB, 9.98 GiB, 627 KiB."""
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      value = n / size
      digits = 2 if value < 10 else 1 if value < 100 else 0
      return f'{value:.{digits}f} {unit}'
  return f'{n} B'


def percent(ratio):
  value = 100 * ratio
  return f'{value:.2g}%' if value < 10 else f'{value:.0f}%'


def state_tables(trees):
  """Markdown tables of state bytes, defaults and the LLaMA recipe."""
  titles = [title for title, _, _ in MODELS]
  base = {t: optax_fac.state_size(build_default('adamw'), trees[t])
          for t in titles}
  n_params = {t: sum(x.size for x in jax.tree.leaves(trees[t]))
              for t in titles}
  lines = ['| optimizer | ' + ' | '.join(titles) + ' |',
           '|---|' + '---:|' * len(titles),
           '| *parameters* | ' + ' | '.join(
               f'{n_params[t] / 1e6:.1f} M' for t in titles) + ' |']
  for name in all_optimizers():
    tx = build_default(name)
    cells = [size_cell(optax_fac.state_size(tx, trees[t]), base[t])
             for t in titles]
    lines.append(f'| {optimizer_label(name)} | ' + ' | '.join(cells) + ' |')
  defaults = '\n'.join(lines)

  exclude = recipe_exclude()
  llama = [t for t, section, _ in MODELS if section['name'] == 'llama']
  lines = ['| optimizer | ' + ' | '.join(llama) + ' |',
           '|---|' + '---:|' * len(llama),
           '| `adamw` | ' + ' | '.join(
               size_cell(base[t], base[t]) for t in llama) + ' |']
  for name in optax_fac.NAMED_OPTIMIZERS:
    tx = build_recipe(name, exclude)
    cells = [size_cell(optax_fac.state_size(tx, trees[t]), base[t])
             for t in llama]
    lines.append(f'| `{name}` | ' + ' | '.join(cells) + ' |')
  recipe = '\n'.join(lines)
  excluded = (f'Here `method_exclude={exclude!r}`, as in `{RECIPE_CONFIG}`: '
              'the leaves whose names match keep Adam states.')
  return defaults, recipe, excluded


def optimizer_label(name):
  if name in bench_scale.BASELINES:
    return f'`{name}` (optax)'
  return f'`{name}`'


# --------------------------------------------------------------------------
# One step at 1B, measured (results/bench_scale).


def bench_rows():
  """One row per optimizer spec at ``BENCH_MODEL``: its latest measurement.

  Rows are ordered by their run's id (a start time); the latest row with
  status ok wins, else the latest that measured a step (a worker stopped
  after its step was timed keeps its numbers and its status). Ratios are to
  the adamw of the same run (``bench_scale.add_ratios``).

  Returns:
    ``(chosen, order, files)``: spec -> row, the specs in order of first
    appearance, spec -> the repository-relative file of its row.
  """
  rows = []
  for path in sorted(glob.glob(os.path.join(ROOT, BENCH_GLOB))):
    with open(path) as f:
      doc = json.load(f)
    bench_scale.add_ratios(doc['rows'])
    rows += [(row.get('run_id') or '', os.path.relpath(path, ROOT), row)
             for row in doc['rows'] if row.get('model') == BENCH_MODEL]
  rows.sort(key=lambda x: x[0])
  chosen, order, files = {}, [], {}
  for _, path, row in rows:
    name = row['optimizer']
    if name not in order:
      order.append(name)
    if not row.get('device_ms'):
      continue
    if row.get('status') == 'ok' or chosen.get(name, {}).get('status') != 'ok':
      chosen[name], files[name] = row, path
  return chosen, order, files


def gib(x):
  return '—' if x is None else f'{x / 2 ** 30:.2f}'


def nbytes(x):
  return '—' if x is None else compact_bytes(x)


def num(x, fmt):
  return '—' if x is None else format(x, fmt)


BENCH_HEADER = ('| optimizer | step ms | × adamw | pipelined × | state | '
                'transient | peak GiB | refresh s | amortized × | status |\n'
                '|---|' + '---:|' * 8 + '---|')


def bench_line(name, r):
  refresh = r.get('refresh_ms')
  status = r.get('status', '?')
  return '| ' + ' | '.join([
      f'`{name}`', num(r.get('device_ms'), '.2f'),
      num(r.get('device_vs_adamw'), '.2f'),
      num(r.get('pipelined_vs_adamw'), '.2f'), nbytes(r.get('state_bytes')),
      nbytes(r.get('xla_temp_bytes')), gib(r.get('peak_step_bytes')),
      num(None if refresh is None else refresh / 1e3, '.1f'),
      num(r.get('amortized_vs_adamw'), '.1f'), status]) + ' |'


def bench_table():
  """The 1B table, a line on what was measured, one on the sources.

  The table has the optimizers with their defaults (the specs named like an
  optimizer, in the order of ``scripts/bench_scale.py``); specs with
  arguments (``hfac:stack_leaves=False``) are only listed in the notes.
  """
  chosen, order, files = bench_rows()
  shown = [n for n in all_optimizers() if n in chosen]
  variants = [n for n in order if n in chosen and n not in shown]
  lines = [BENCH_HEADER] + [bench_line(n, chosen[n]) for n in shown]
  setups = sorted({(r.get('n_params'), r.get('dtype'), r.get('device_kind'),
                    r.get('jax'), r.get('optax'))
                   for r in (chosen[n] for n in shown)}, key=str)
  context = ('Measured on: ' + '; '.join(
      f'`{BENCH_MODEL}` ({n / 1e9:.2f} B {dtype} params), {device}, jax '
      f'{jax_version}, optax {optax_version}'
      for n, dtype, device, jax_version, optax_version in setups)
      + '. The optax optimizers are '
      + ', '.join(f'`{n}`' for n in baseline_names()) + '.')
  sources = '; '.join(
      f'`{path}`: ' + ', '.join(f'`{n}`' for n in shown if files[n] == path)
      for path in sorted({files[n] for n in shown}))
  stopped = ', '.join(f'`{n}` (phase `{chosen[n].get("phase")}`)'
                      for n in shown if chosen[n].get('status') != 'ok')
  missing = [n for n in all_optimizers() if n not in chosen]
  notes = (f'Each row comes from one file: {sources}. Rows whose status is '
           f'not ok, with the phase their worker was in: {stopped or "none"}.'
           ' Not measured yet at this size: '
           + (', '.join(f'`{n}`' for n in missing) or 'none') + '.'
           + (' Also in these files, with non-default arguments: '
              + ', '.join(f'`{n}`' for n in variants) + '.' if variants
              else ''))
  return '\n'.join(lines), context, notes


# --------------------------------------------------------------------------
# Convergence, measured (training summaries).


def convergence_table(path):
  with open(os.path.join(ROOT, path)) as f:
    doc = json.load(f)
  runs = doc['runs']
  base = next((r for r in runs if r['optimizer'] == 'adamw'), runs[0])
  cfg = doc.get('config', {})
  lines = ['| optimizer | learning rate | steps | train loss | val loss | '
           'state | state vs adamw | step ms |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in runs:
    lines.append('| ' + ' | '.join([
        f'`{r["optimizer"]}`', f'{r["learning_rate"]:g}', str(r['steps']),
        f'{r["final_train_loss"]:.3f}', f'{r["final_eval_loss"]:.3f}',
        compact_bytes(r["opt_state_bytes"]),
        f'{r["opt_state_bytes"] / base["opt_state_bytes"]:.3f}',
        f'{1e3 * r["median_step_time_s"]:.1f}']) + ' |')
  model = runs[0].get('model', {})
  data = cfg.get('data', {})
  setup = (f'Setup: {runs[0]["num_params"] / 1e6:.2f} M params (d_model '
           f'{model.get("d_model")}, {model.get("num_layers")} layers, '
           f'{model.get("dtype")} compute), batch {cfg.get("batch_size")} '
           f'sequences of {data.get("seq_len")} tokens (tokenizer: '
           f'{data.get("tokenizer")}), validation loss on the held-out play '
           f'({data.get("validation_play")}), one learning rate per optimizer '
           '(no sweep).')
  return '\n'.join(lines), setup


# --------------------------------------------------------------------------
# Convergence, learning-rate swept (scripts/compare.py's run files).

SWEEP = 'results/compare_sweep'


def sweep_table():
  """(setup sentence, table) of the committed sweep, as compare.py reports."""
  workdir = os.path.join(ROOT, SWEEP)
  runs = compare.read_runs(workdir)
  rows = compare.summarize(runs, timing=compare.read_timing(workdir))
  first = runs[0]
  cfg, corpus, env = first['config'], first['corpus'], first['environment']
  model = cfg['model']
  setup = (f'Setup (`{SWEEP}/`, {len(runs)} runs of {len(rows)} optimizers, '
           f'{env["device"]}, jax {env["jax"]}): LLaMA d {model["d_model"]}, '
           f'{model["num_layers"]} layers, {first["num_params"] / 1e6:.1f} M '
           f'params ({first["hidden_params"] / 1e6:.1f} M in the hidden '
           f'matrices), {model["dtype"]} compute; {corpus["source"]}, '
           f'{corpus["train_tokens"] / 1e6:.1f} M training tokens '
           f'({corpus["tokenizer"]}, vocabulary {corpus["vocab_size"]}); batch '
           f'{cfg["batch_size"]} x {cfg["data"]["seq_len"]}, '
           f'{cfg["num_train_steps"]} steps, warmup '
           f'{cfg["schedule"]["warmup_fraction"]:.0%} + {cfg["schedule"]["decay"]} '
           f'to {cfg["schedule"]["final_fraction"]:.0%}; each optimizer at its '
           'best peak rate of the sweep (in parentheses: the rates swept).')
  return setup, compare.markdown_table(rows)


# --------------------------------------------------------------------------


def block(name, text):
  return f'<!-- begin {name} -->\n{text}\n<!-- end {name} -->\n'


HEADER = ('<!-- Written by scripts/docs_tables.py with {versions}; do not edit '
          'by hand. -->\n')


def library_versions() -> str:
  """The versions the state sizes depend on (optax's own states, flax's
  model trees), as written in the file's first line."""
  import flax  # pylint: disable=import-outside-toplevel
  return f'jax {jax.__version__}, optax {optax.__version__}, flax {flax.__version__}'


def render():
  trees = {title: abstract_params(section, example)
           for title, section, example in MODELS}
  defaults, recipe, excluded = state_tables(trees)
  bench, context, notes = bench_table()
  parts = [HEADER.format(versions=library_versions()),
           block('state-defaults', defaults),
           block('state-recipe', recipe),
           block('recipe-exclude', excluded),
           block('bench-context', context),
           block('bench-1b', bench),
           block('bench-notes', notes),
           block('train-step', bench_train_step.table(
               *(os.path.join(ROOT, p) for p in TRAIN_STEP))),
           block('fit', bench_train_step.table(
               *(os.path.join(ROOT, p) for p in FIT)))]
  setup, table = sweep_table()
  parts += [block('sweep-setup', setup), block('sweep', table)]
  for i, (title, path) in enumerate(CONVERGENCE):
    table, setup = convergence_table(path)
    parts.append(block(f'convergence-{i}-title', f'**{title}** (`{path}`).'))
    parts.append(block(f'convergence-{i}-setup', setup))
    parts.append(block(f'convergence-{i}', table))
  return '\n'.join(parts)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--check', action='store_true',
                      help='compare with the committed file instead of '
                           'writing it; exit 1 if they differ')
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    with open(args.out) as f:
      current = f.read()
    if current != text:
      print(f'{os.path.relpath(args.out, ROOT)} is stale: run '
            'python scripts/docs_tables.py', file=sys.stderr)
      return 1
    return 0
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  print(f'wrote {os.path.relpath(args.out, ROOT)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
