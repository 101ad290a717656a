"""Pytree assertions for the tests, on public APIs only (jax.tree_util,
numpy.testing, jax.log_compiles and the standard logging module).

Same checks as the helpers of the same names that the tests used from
optax's private test module (optax._src.test_utils): the tree structures
must be equal, then every pair of leaves is compared with numpy.testing.
"""

import contextlib
import logging
import re

import jax
import numpy as np


def _flatten_pair(actual, desired):
  flat_a, tree_def_a = jax.tree_util.tree_flatten(actual)
  flat_d, tree_def_d = jax.tree_util.tree_flatten(desired)
  if tree_def_a != tree_def_d:
    raise AssertionError(
        f'Trees have different structures:\n{tree_def_a}\n{tree_def_d}')
  return zip(flat_a, flat_d)


def assert_trees_all_close(actual, desired, rtol=1e-6, atol=0.0,
                           err_msg=None):
  """Equal structures, leaves close (``np.testing.assert_allclose``)."""
  for x, y in _flatten_pair(actual, desired):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=err_msg or '')


def assert_trees_all_equal(actual, desired, err_msg=None):
  """Equal structures, leaves equal (``np.testing.assert_array_equal``)."""
  for x, y in _flatten_pair(actual, desired):
    np.testing.assert_array_equal(x, y, err_msg=err_msg or '')


def assert_trees_all_equal_structs(actual, desired):
  """Equal tree structures."""
  if (jax.tree_util.tree_structure(actual)
      != jax.tree_util.tree_structure(desired)):
    raise AssertionError(
        f'Trees have different structures:\n{actual}\n{desired}')


def assert_tree_all_finite(actual, err_msg=None):
  """Every leaf finite."""
  for x in jax.tree_util.tree_leaves(actual):
    if not np.all(np.isfinite(x)):
      raise AssertionError(f'Array {x} is not finite. {err_msg}')


class _ListHandler(logging.Handler):

  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):
    self.records.append(record)


@contextlib.contextmanager
def log_compilations():
  """Yields a list that, on exit, holds the log records of the XLA
  compilations made inside the block (``jax.log_compiles`` logs each one as
  'Finished ... compilation')."""
  handler = _ListHandler()
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  compilations = []
  try:
    with jax.log_compiles():
      yield compilations
  finally:
    logger.removeHandler(handler)
  compilations.extend(
      r for r in handler.records
      if re.search(r'Finished .* compilation', r.getMessage()))
