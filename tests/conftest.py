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
# faster), so, unless OPTAX_FAC_TEST_FAST_COMPILE=0, XLA's CPU backend is told
# to compile fast rather than make fast code:
#
# * ``--xla_backend_optimization_level=0``: no LLVM optimizations;
# * ``--xla_cpu_use_fusion_emitters=false``: fusions emitted by XLA's
#   elemental IR emitter instead of the MLIR fusion emitters: about 3x faster
#   compilation of an optimizer step and about 2x of the small programs of an
#   eager run (jaxlib 0.10.2, 2 CPU cores), and the code runs no slower (the
#   long-run and reliability tests of hfac and adadiag_pp: 37 s -> 21 s).
#   Set only where the installed jaxlib knows the flag: XLA aborts at start
#   on an unknown one.
#
# Both change how XLA's CPU backend turns a program into machine code, not
# the program, so results may differ from a default build's in the last bits
# (transcendental functions, FMA contraction; the optimization level alone
# already does), as another CPU's would. The whole suite passes with them,
# tolerances unchanged, and its bitwise comparisons compare two runs of this
# one configuration (subprocesses inherit XLA_FLAGS);
# OPTAX_FAC_TEST_FAST_COMPILE=0 runs the default build.
#
# Also a persistent compilation cache shared by the xdist workers and the
# subprocess tests, so that programs that several tests build alike (the same
# optimizer on the same shapes) compile once. Its key holds the program, the
# flags and the jax/XLA versions: a stale entry cannot be hit.
# JAX_COMPILATION_CACHE_DIR chooses its folder.


def _jaxlib_knows_flag(name: str) -> bool:
  """Whether a shared library of the installed jaxlib names XLA flag ``name``
  (the registry of XLA's flags is compiled into it), without importing jax."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import mmap  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    return False
  for folder in spec.submodule_search_locations:
    for path in glob.glob(os.path.join(folder, '*.so')):
      try:
        with open(path, 'rb') as f, mmap.mmap(
            f.fileno(), 0, access=mmap.ACCESS_READ) as m:
          if m.find(name.encode()) >= 0:
            return True
      except (OSError, ValueError):
        continue
  return False


_FAST_COMPILE_FLAGS = (('--xla_backend_optimization_level', '0'),
                       ('--xla_cpu_use_fusion_emitters', 'false'))

if os.environ.get('OPTAX_FAC_TEST_FAST_COMPILE', '1') != '0':
  for _flag, _value in _FAST_COMPILE_FLAGS:
    _flags = os.environ.get('XLA_FLAGS', '')
    if _flag not in _flags and (_flag == '--xla_backend_optimization_level'
                                or _jaxlib_knows_flag(_flag[2:])):
      os.environ['XLA_FLAGS'] = f'{_flags} {_flag}={_value}'.strip()
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
