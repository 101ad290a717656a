"""optax's own contrib test suite, run on optax_fac's named optimizers.

The installed ``optax/contrib/_common_test.py`` is read as source text, its
optimizer tables (``_MAIN_OPTIMIZERS_UNDER_TEST``, ``_ALL_OPTIMIZERS_UNDER_TEST``)
are replaced by :data:`OPTIMIZERS` and ``_get_opt_factory`` by
``optax_fac.NAMED_OPTIMIZERS[name]``; the result is compiled and executed as a
fresh module, and its ``ContribTest`` is exposed here. Everything else in optax's
test logic is unchanged.

Two variants:

* ``ContribTest1D``: optax's file as-is. Its 1-D targets (parabola,
  Rosenbrock, the vector half of the mixed target, the inline params of
  test_preserve_dtype / test_gradient_accumulation) are not matrices, so our
  named optimizers send them to their fallback (Adam; AdaGrad with momentum
  for adagrad_sn), except smmf, which factorizes vectors too.
* ``ContribTest2D``: the same file with those 1-D params made (1, n) row
  matrices (Rosenbrock's objective reads the flattened params), so the matrix
  method itself runs on them. The inject_hyperparams test's params are
  already (2, 3) and (2, 5, 2), i.e. matrices; they are asserted unchanged.

Every source substitution asserts that its anchor text was found (the expected
number of times), so a changed optax file fails loudly at collection.
"""

import linecache
import os
import sys
import types

import jax
import optax

import optax_fac

SOURCE_PATH = os.path.join(os.path.dirname(optax.__file__), 'contrib',
                           '_common_test.py')

# One entry per named optimizer; only the learning rate (nothing structural)
# is set, so optax's inject_hyperparams test runs as-is (it adds 'rank' to
# static_args itself: adam_snsm has a ``rank`` parameter). test_optimizers
# needs 30,000 steps within rtol = atol = 3e-2 on all four targets, both
# variants:
# * Adam-like methods: 1e-3 (as optax's table for acprop/ademamix).
# * sign_fsgd: a window. Parabola needs lr >~ 4e-4 (the sign step moves at
#   most lr per step, 11 units to go); on the (1, 2) Rosenbrock it settles at
#   a distance ~95 lr from the minimum (plain signum: ~40 lr), i.e. lr <~ 6e-4.
# * lion_factor: settles at ~20 lr on the (1, 2) Rosenbrock; 1e-3 is fine.
# * adagrad_sn: AdaGrad steps shrink like 1/sqrt(t); below ~5e-2 the parabola
#   is not reached in 30,000 steps.
_OPT_KWARGS = {
    'hfac': {'learning_rate': 1e-3},
    'sign_fsgd': {'learning_rate': 5e-4},
    'lion_factor': {'learning_rate': 1e-3},
    'adafactor_momentum': {'learning_rate': 1e-3},
    'adadiag': {'learning_rate': 1e-3},
    'adadiag_pp': {'learning_rate': 1e-3},
    'adafac_diag': {'learning_rate': 1e-3},
    'adafac_diag_pp': {'learning_rate': 1e-3},
    'hfac_diag': {'learning_rate': 1e-3},
    'smmf': {'learning_rate': 1e-3},
    'adam_sn': {'learning_rate': 1e-3},
    'adam_snsm': {'learning_rate': 1e-3},
    'rmsprop_sn': {'learning_rate': 1e-3},
    'adagrad_sn': {'learning_rate': 1e-1},
}
# Exactly the named optimizers: a new one cannot be left out silently.
assert set(_OPT_KWARGS) == set(optax_fac.NAMED_OPTIMIZERS), (
    sorted(set(_OPT_KWARGS) ^ set(optax_fac.NAMED_OPTIMIZERS)))


def _table():
  """A fresh copy of the optimizer table in optax's format."""
  return tuple({'opt_name': name, 'opt_kwargs': dict(kwargs),
                'wrapper_name': None, 'wrapper_kwargs': None}
               for name, kwargs in _OPT_KWARGS.items())


OPTIMIZERS = _table()


# --------------------------------------------------------------------------
# Source substitutions, each checked.


def _expect(src, text, count=1):
  found = src.count(text)
  assert found == count, (
      f'{SOURCE_PATH}: expected {count} occurrence(s) of {text!r}, found '
      f'{found}; optax changed its test file, update {__file__}.')


def _replace(src, old, new, count=1):
  _expect(src, old, count)
  return src.replace(old, new)


def _replace_span(src, start, end, new, must_contain=()):
  """Replaces the unique span from ``start`` up to and including ``end``."""
  assert src.count(start) == 1, f'{SOURCE_PATH}: anchor {start!r} not unique/found'
  i = src.index(start)
  assert src.count(end, i) >= 1, f'{SOURCE_PATH}: anchor {end!r} not found'
  j = src.index(end, i) + len(end)
  span = src[i:j]
  for text in must_contain:
    assert text in span, f'{SOURCE_PATH}: {text!r} not in the replaced span'
  return src[:i] + new + src[j:]


_TABLES_NEW = '''\
_MAIN_OPTIMIZERS_UNDER_TEST = _OPTAX_FAC_OPTIMIZERS
_ALL_OPTIMIZERS_UNDER_TEST = _OPTAX_FAC_OPTIMIZERS
'''

_FACTORY_NEW = '''\
def _get_opt_factory(opt_name):
  """Get optimizer factory (optax_fac's named optimizers)."""
  return optax_fac.NAMED_OPTIMIZERS[opt_name]
'''

# (old, new, count) for the 2-D variant.
_TWO_D = (
    # parabola: (3,) -> (1, 3)
    ('initial_params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)',
     'initial_params = jnp.array([[-1.0, 10.0, 1.0]], dtype=dtype)', 1),
    ('final_params = jnp.array([1.0, -1.0, 1.0], dtype=dtype)',
     'final_params = jnp.array([[1.0, -1.0, 1.0]], dtype=dtype)', 1),
    # rosenbrock: (2,) -> (1, 2), the objective reads the flattened params
    ('initial_params = jnp.array([0.0, 0.0], dtype=dtype)',
     'initial_params = jnp.array([[0.0, 0.0]], dtype=dtype)', 1),
    ('final_params = jnp.array([a, a**2], dtype=dtype)',
     'final_params = jnp.array([[a, a**2]], dtype=dtype)', 1),
    ('  def obj_fn(params):\n    return numerics.abs_sq(a - params[0])',
     '  def obj_fn(params):\n    params = params.reshape(-1)\n'
     '    return numerics.abs_sq(a - params[0])', 1),
    # mixed target: its 1-D part (3,) -> (1, 3)
    ('initial_1d_params = jnp.zeros((3,), dtype=dtype)',
     'initial_1d_params = jnp.zeros((1, 3), dtype=dtype)', 1),
    ('final_1d_params = jnp.array([1.0, -1.0, 2.0], dtype=dtype)',
     'final_1d_params = jnp.array([[1.0, -1.0, 2.0]], dtype=dtype)', 1),
    # test_preserve_dtype and test_gradient_accumulation: (2,) -> (1, 2)
    ('params = jnp.array([1.0, 2.0], dtype=dtype)',
     'params = jnp.array([[1.0, 2.0]], dtype=dtype)', 2),
)

# The inject_hyperparams test's params, already matrices in optax's file.
_INJECT_PARAMS = (
    '    params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]\n'
    '    grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]\n')


def _source(two_d: bool) -> str:
  with open(SOURCE_PATH, encoding='utf-8') as f:
    src = f.read()
  src = _replace_span(
      src,
      '# Testing contributions coded as GradientTransformations\n'
      '_MAIN_OPTIMIZERS_UNDER_TEST = [\n',
      '_MAIN_OPTIMIZERS_UNDER_TEST = tuple(_MAIN_OPTIMIZERS_UNDER_TEST)\n',
      _TABLES_NEW,
      must_contain=('_ALL_OPTIMIZERS_UNDER_TEST = tuple(',))
  for name in ('_MAIN_OPTIMIZERS_UNDER_TEST', '_ALL_OPTIMIZERS_UNDER_TEST'):
    # No other definition of the tables may remain.
    _expect(src, f'{name} =', 1)
    _expect(src, f'{name} +=', 0)
  src = _replace_span(
      src, 'def _get_opt_factory(opt_name):\n',
      "  raise ValueError(f'Unknown optimizer: {opt_name}')\n", _FACTORY_NEW,
      must_contain=('getattr(contrib, opt_name)',))
  _expect(src, _INJECT_PARAMS, 1)
  if two_d:
    for old, new, count in _TWO_D:
      src = _replace(src, old, new, count)
  return src


def _build(variant: str):
  two_d = variant == '2d'
  src = _source(two_d)
  name = f'optax_fac_optax_common_test_{variant}'
  filename = f'<optax/contrib/_common_test.py on optax_fac, {variant}>'
  # Tracebacks show the substituted source.
  linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
  module = types.ModuleType(name)
  module.__file__ = filename
  module._OPTAX_FAC_OPTIMIZERS = _table()
  module.optax_fac = optax_fac
  sys.modules[name] = module
  exec(compile(src, filename, 'exec'), module.__dict__)  # pylint: disable=exec-used
  targets = (module._setup_parabola, module._setup_rosenbrock,
             module._setup_matrix_parabola, module._setup_mixed_tensor_target)
  if two_d:  # every target's params are now matrices
    for target in targets:
      initial, final, _ = target('float32')
      for leaf in jax.tree.leaves((initial, final)):
        assert leaf.ndim >= 2, (target.__name__, leaf.shape)
  return module


_MODULE_1D = _build('1d')
_MODULE_2D = _build('2d')


class ContribTest1D(_MODULE_1D.ContribTest):
  """optax's ContribTest on optax_fac, optax's targets as-is."""


class ContribTest2D(_MODULE_2D.ContribTest):
  """optax's ContribTest on optax_fac, 1-D targets made (1, n) matrices."""


# Time budget of the test command (2 CPU cores). In the 2-D variant three of
# optax's tests are left to the 1-D variant and to tests/test_contract.py:
# inject_hyperparams builds its own params ((2, 3) and (2, 5, 2) matrices), so
# it is the same test in both variants; the extra-args and learning-rate
# schedule tests step eagerly (tens of seconds for the rotation optimizers)
# and are covered on matrices by test_contract.py's
# test_extra_args_and_no_recompilation and test_converges_with_schedule.
# OPTAX_FAC_FULL_COMMON=1 runs all of them (all pass; last full run: 1-D and
# 2-D, every test, 14 optimizers).
_LEFT_TO_1D = ('test_optimizers_can_be_wrapped_in_inject_hyperparams',
               'test_optimizers_accept_extra_args',
               'test_optimizers_accept_learning_rate_schedule')
if not os.environ.get('OPTAX_FAC_FULL_COMMON'):
  for _name in dir(ContribTest2D):
    if _name.startswith(_LEFT_TO_1D):
      setattr(ContribTest2D, _name, None)
  del _name
