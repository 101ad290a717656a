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

import os
import re
import tempfile

# Compilation is most of the suite's time (with a warm cache it runs ~4x
# faster), so, unless OPTAX_FAC_TEST_FAST_COMPILE=0: XLA's CPU backend
# without LLVM's optimizations (``--xla_backend_optimization_level=0``; the
# HLO passes and the arithmetic are the same, and LLVM keeps IEEE semantics
# at every level, so results do not change, only the machine code's speed),
# and a persistent compilation cache shared by the xdist workers and the
# subprocess tests, so that programs that several tests build alike (the same
# optimizer on the same shapes) compile once. Its key holds the program, the
# flags and the jax/XLA versions: a stale entry cannot be hit.
# JAX_COMPILATION_CACHE_DIR chooses its folder.
if os.environ.get('OPTAX_FAC_TEST_FAST_COMPILE', '1') != '0':
  if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_backend_optimization_level=0').strip()
  os.environ.setdefault(
      'JAX_COMPILATION_CACHE_DIR',
      os.path.join(tempfile.gettempdir(),
                   f'optax_fac_test_jax_cache_{os.getuid()}'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

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
