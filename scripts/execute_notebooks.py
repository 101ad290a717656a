"""Executes the notebooks and saves them with their outputs.

    python scripts/execute_notebooks.py                  # every notebooks/*.ipynb
    python scripts/execute_notebooks.py notebooks/{tour,rotation,memory,training}.ipynb
    python scripts/execute_notebooks.py notebooks/tour.ipynb

Each notebook runs in a fresh ``python3`` kernel of this interpreter, in the
``notebooks/`` folder (as ``tests/test_notebooks.py`` runs them), and is
written back in place with its outputs, so that it reads well on a
repository page. Volatile metadata (execution timestamps) is not stored.
Prints each notebook's execution time and its kernel's CPU time.
"""

import argparse
import glob
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def execute(path: str, timeout: int = 300):
  """Runs notebook ``path``; returns (the executed notebook, seconds, CPU s).

  CPU seconds are those of the kernel process (all its threads): on a busy
  machine a steadier measure than the wall time, though still inflated by
  contention (XLA's thread pools spin).

  The cells' metadata gets nbclient's ``execution`` timestamps (see
  :func:`cell_seconds`); :func:`strip_volatile` removes them.
  """
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(path, as_version=4)
  t0, cpu0 = time.time(), _children_cpu_s()
  nbclient.NotebookClient(
      nb, timeout=timeout, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(os.path.abspath(path))}}
  ).execute()
  return nb, time.time() - t0, _children_cpu_s() - cpu0


def cell_seconds(nb) -> list:
  """(cell index, seconds) of each executed code cell, from its timestamps."""
  from datetime import datetime  # pylint: disable=g-import-not-at-top
  out = []
  for i, cell in enumerate(nb.cells):
    ex = cell.metadata.get('execution', {})
    start, end = ex.get('iopub.execute_input'), ex.get('shell.execute_reply')
    if start and end:
      parse = lambda s: datetime.fromisoformat(s.replace('Z', '+00:00'))  # noqa: E731
      out.append((i, (parse(end) - parse(start)).total_seconds()))
  return out


def strip_volatile(nb) -> None:
  """Drops per-cell execution timestamps and kernel-version details."""
  for cell in nb.cells:
    cell.metadata.pop('execution', None)
  nb.metadata['kernelspec'] = {'display_name': 'Python 3',
                               'language': 'python', 'name': 'python3'}
  nb.metadata['language_info'] = {'name': 'python'}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('notebooks', nargs='*',
                      help='notebook files (default: notebooks/*.ipynb)')
  parser.add_argument('--timeout', type=int, default=300,
                      help='seconds per cell')
  parser.add_argument('--cell_times', action='store_true',
                      help='also print the time of each code cell')
  args = parser.parse_args(argv)
  import nbformat  # pylint: disable=g-import-not-at-top
  paths = args.notebooks or sorted(
      glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
  total = 0.0
  for path in paths:
    nb, seconds, cpu = execute(path, args.timeout)
    times = cell_seconds(nb)
    strip_volatile(nb)
    nbformat.write(nb, path)
    total += seconds
    print(f'{os.path.relpath(path, ROOT)}: executed in {seconds:.1f} s '
          f'(kernel CPU time {cpu:.1f} s)', flush=True)
    if args.cell_times:
      print('  cells: ' + ', '.join(f'{i}: {t:.1f} s' for i, t in times))
    text = nbformat.writes(nb)
    if ROOT in text:
      print(f'  warning: the outputs contain this machine\'s path {ROOT}',
            file=sys.stderr)
  print(f'total {total:.1f} s')


if __name__ == '__main__':
  main()
