"""The notebooks in notebooks/: committed executed, and they still execute.

Every notebook except ``factored_momentum.ipynb`` (executed by
``tests/test_experiments_train.py``) is checked twice:

* as committed: every code cell was executed, in order, in one run (execution
  counts 1, 2, ...), no cell holds an error, and the notebook has outputs
  (text and at least one PNG plot), so nobody commits it unexecuted
  (``python scripts/execute_notebooks.py`` refreshes them);
* executed now in a fresh ``python3`` kernel (jupyter_client starts it with
  this interpreter, so it sees the same packages), in the notebooks' folder,
  with a timeout per cell: no cell may raise. The execution time is printed
  (``pytest -s``).
"""

import glob
import os
import time

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, 'notebooks')
TESTED_ELSEWHERE = ('factored_momentum.ipynb',)
NOTEBOOKS = sorted(os.path.basename(p) for p in
                   glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb'))
                   if os.path.basename(p) not in TESTED_ELSEWHERE)
# Notebooks that take more than ~15 s on 2 CPU cores: run by `make test`,
# skipped by `make test-fast`.
SLOW = ('memory.ipynb', 'rotation.ipynb', 'training.ipynb')
CELL_TIMEOUT_S = 300


def _param(name):
  marks = [pytest.mark.slow] if name in SLOW else []
  return pytest.param(name, marks=marks, id=name)


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


def _errors(nb):
  return [(i, o.get('ename'), o.get('evalue'))
          for i, c in enumerate(nb.cells) if c.cell_type == 'code'
          for o in c.get('outputs', []) if o.output_type == 'error']


def test_there_are_notebooks():
  assert {'tour.ipynb', 'rotation.ipynb', 'memory.ipynb',
          'training.ipynb'} <= set(NOTEBOOKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_notebook_is_executed(name):
  nb = _read(name)
  cells = _code_cells(nb)
  assert cells, f'{name} has no code cells'
  counts = [c.execution_count for c in cells]
  assert counts == list(range(1, len(cells) + 1)), (
      f'{name}: execution counts {counts}: not executed in order in one run; '
      'refresh it with python scripts/execute_notebooks.py')
  assert not _errors(nb), f'{name} was committed with errors: {_errors(nb)}'
  outputs = [o for c in cells for o in c.outputs]
  assert any(o.output_type == 'stream' for o in outputs), f'{name}: no text output'
  assert any('image/png' in o.get('data', {}) for o in outputs), (
      f'{name}: no PNG plot in the outputs')
  text = nbformat.writes(nb)
  assert ROOT not in text, f'{name} holds this machine\'s path {ROOT}'


@pytest.mark.parametrize('name', [_param(n) for n in NOTEBOOKS])
def test_notebook_executes(name):
  nb = _read(name)
  for cell in _code_cells(nb):  # run it from nothing
    cell.outputs, cell.execution_count = [], None
  t0 = time.time()
  nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name='python3', record_timing=False,
      resources={'metadata': {'path': NOTEBOOK_DIR}}).execute()
  seconds = time.time() - t0
  print(f'\n{name}: executed in {seconds:.1f} s')
  assert not _errors(nb)
  outputs = [o for c in _code_cells(nb) for o in c.outputs]
  assert any('image/png' in o.get('data', {}) for o in outputs), (
      f'{name}: the executed notebook shows no plot')
