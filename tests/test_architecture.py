"""The import rules of docs/architecture.md, checked on the source."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'optax_fac'
ALGORITHMS = {'factored', 'hfac', 'rotation', 'smmf', 'subset'}


def _imports(path: pathlib.Path) -> set[str]:
  """Top-level optax_fac modules imported by the file (any nesting)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'optax_fac':
        out.update(a.name for a in node.names)
      elif node.module.startswith('optax_fac.'):
        out.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      out.update(a.name.split('.')[1] for a in node.names
                 if a.name.startswith('optax_fac.'))
  return out


def _graph() -> dict[str, set[str]]:
  modules = {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}
  return {p.stem: _imports(p) & modules for p in PACKAGE.glob('*.py')
          if p.stem != '__init__'}


def test_no_import_cycle():
  graph = _graph()
  state = {}

  def visit(m, path):
    if state.get(m) == 'done':
      return
    assert state.get(m) != 'active', f'import cycle: {" -> ".join(path + [m])}'
    state[m] = 'active'
    for n in sorted(graph[m]):
      visit(n, path + [m])
    state[m] = 'done'

  for m in sorted(graph):
    visit(m, [])


def test_layering():
  graph = _graph()
  assert graph['matrix'] == set()
  assert graph['linalg'] <= {'matrix'}
  assert graph['sharding'] == {'matrix'}
  assert not graph['compose'] & ALGORITHMS, graph['compose']
  for path in PACKAGE.glob('*.py'):  # rules register at import, not lazily
    assert 'import_module' not in path.read_text(), path.name


@pytest.mark.parametrize('where', ['optax_fac', 'tests', 'scripts'])
def test_public_apis_only(where):
  bad = []
  for path in (ROOT / where).rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      for name in names:
        parts = name.split('.')
        if parts[0] in ('optax', 'jax') and any(
            p.startswith('_') for p in parts[1:]):
          bad.append(f'{path.relative_to(ROOT)}: {name}')
  assert not bad, bad
