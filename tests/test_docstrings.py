"""Every docstring example of the library runs (doctest), module by module."""

import doctest
import importlib
import pkgutil

import pytest

import optax_fac

# The library proper; optax_fac.experiments (models, data, training loop) has
# its own tests.
MODULES = sorted(
    m.name for m in pkgutil.iter_modules(optax_fac.__path__, 'optax_fac.')
    if m.name != 'optax_fac.experiments')


def test_the_library_has_examples():
  finder = doctest.DocTestFinder()
  examples = sum(len(t.examples) for name in MODULES
                 for t in finder.find(importlib.import_module(name)))
  assert examples >= 40, examples


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  runner = doctest.DocTestRunner(
      optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in doctest.DocTestFinder().find(module):
    runner.run(test)
  assert runner.failures == 0, f'{runner.failures} failing example(s) in {name}'
