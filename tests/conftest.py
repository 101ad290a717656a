"""Test configuration: 8 CPU devices for the sharding/parallel tests.

Must run before JAX initialises its backends, so it lives at import time here.

Also: the ``slow`` marks of tests/test_optax_common.py (its test classes are
generated from optax's source, so they cannot carry decorators), and the
order of the tests, slowest first, for pytest-xdist's work stealing
(``--dist worksteal`` in pyproject.toml): each worker starts on a
contiguous half of the collection, an idle one steals from the other's
queue, so the long subprocess tests at the front run early and the run ends
on short tests instead of waiting for a long one.
"""

import re

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)

# Generated tests marked slow: optax's 30,000-step convergence runs
# (``test_optimizers<N>``) and the 2-D variant's lax.cond state-stability
# test (every named optimizer, four dtypes: compile-bound).
_SLOW_GENERATED = re.compile(
    r'tests/test_optax_common\.py::ContribTest(1D|2D)::test_optimizers\d+$'
    r'|tests/test_optax_common\.py::ContribTest2D::'
    r'test_state_shape_dtype_shard_stability\d+$')

# Slow tests that start first, longest first (measured on 2 cores): the
# multi-process and multi-device ones, which also run subprocesses.
_FIRST = ('tests/test_multihost.py', 'tests/test_parallel.py',
          'tests/test_hang.py', 'tests/test_experiments_train.py',
          'tests/test_flax_integration.py')


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if _SLOW_GENERATED.search(item.nodeid):
      item.add_marker(pytest.mark.slow)

  def rank(item):
    if item.get_closest_marker('slow') is None:
      return len(_FIRST) + 1
    path = item.nodeid.split('::')[0]
    return _FIRST.index(path) if path in _FIRST else len(_FIRST)

  items[:] = sorted(items, key=rank)  # stable: collection order otherwise
