"""Precision (issue 15, item 3): every parameter dtype, and ``mu_dtype``.

The documented policy (docs/algorithms.md, "Notation and conventions", §1 and
§5): statistics are computed and kept in float32 whatever the parameter dtype
-- float16, bfloat16, float32, and float64 under ``jax_enable_x64`` alike --
unless a ``*_dtype`` argument says otherwise; updates come back in the
parameter dtype. Checked on two small matrices (a stacked group) and a
vector, over a few steps (one with |G| ~ 1e-4, whose G² is below float16's
smallest subnormal), for every named optimizer (``NAMED_OPTIMIZERS``) and
every public ``scale_by_*`` transform (with ``svd_rotation`` and
``scale_in_float32``) on its own (vectors as 1 x N matrices, no wrapper):

* dtypes, at all four parameter dtypes and for every one of them: each
  update has the parameter's dtype and shape, every floating state leaf is
  float32, and the state keeps its types through the steps (the carry of a
  ``lax.scan``). Read from ``jax.eval_shape`` of init and the steps: exact
  for dtypes and shapes, and nothing to compile.
* values (no NaN/Inf in updates or state, updates not all zero), compiled
  and run: named optimizers at float64 (x64), ``scale_by_*`` at float16
  (the narrowest range). Compilation is most of the cost (one program per
  case, about a second for a rotated optimizer), so the other pairs are
  left to where they already run: tests/test_contract.py runs every named
  optimizer's values at bfloat16, float16 and float32 (zero gradients
  included), tests/test_foundation.py the factored transforms' at bfloat16
  and float16. Every parameter dtype meets the same code (a cast to
  float32 at the input, float32 arithmetic, a cast back at the output), so
  a raw transform's float64 run differs from its float16 one only in those
  two casts; its dtypes under x64 are checked above, and its arithmetic
  runs inside the named optimizers' float64 runs.

``mu_dtype`` (``adafactor_momentum``, ``adam_sn``, ``adagrad_sn``,
``scale_by_factored_rms``): ``state_size`` drops by exactly 2 bytes per
momentum element with bfloat16; the updates follow the float32-momentum run
within the bound that rounding the stored buffer allows; and the stored
buffer is the float32 EMA rounded once (a float64 NumPy check).

x64 is switched on only inside ``jax.enable_x64()`` blocks (thread-local,
restored on exit): safe under pytest-xdist, other tests keep the default.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac

DTYPES = ('float16', 'bfloat16', 'float32', 'float64')
STEPS = 4
SHAPES = {'w': (5, 3), 'w2': (5, 3), 'vector': (4,)}

# bfloat16 keeps 8 significant bits: round-to-nearest has unit roundoff
# u = 2^-8 (the relative error of one rounding is at most u).
BF16_U = 2.0 ** -8


def make(name, **overrides):
  """The named optimizer with refreshes inside the first steps."""
  factory = optax_fac.NAMED_OPTIMIZERS[name]
  args = inspect.signature(factory).parameters
  kwargs = {'learning_rate': 1e-2}
  if 'every' in args:
    kwargs['every'] = 2
  if 'rank' in args:
    kwargs['rank'] = 2
  kwargs.update(overrides)
  return factory(**kwargs)


# Every public transform, built with its state-holding options on (momentum,
# short refresh periods).
TRANSFORMS = {
    'scale_by_factored_rms': lambda: optax_fac.scale_by_factored_rms(b1=0.9),
    'scale_by_factored_momentum': optax_fac.scale_by_factored_momentum,
    'scale_by_hfac': optax_fac.scale_by_hfac,
    'scale_by_sign_fsgd': optax_fac.scale_by_sign_fsgd,
    'scale_by_lion_factor': optax_fac.scale_by_lion_factor,
    'scale_by_smmf': optax_fac.scale_by_smmf,
    'scale_by_subset_norm': lambda: optax_fac.scale_by_subset_norm(
        momentum=optax.ema(0.9, debias=False, accumulator_dtype=jnp.float32)),
    'scale_by_subspace_momentum': lambda: (
        optax_fac.scale_by_subspace_momentum(rank=2, every=2)),
    'scale_by_bias_correction': optax_fac.scale_by_bias_correction,
    # The documented way to run an optax transform with float32 statistics.
    'svd_rotation': lambda: optax_fac.scale_in_float32(
        optax_fac.svd_rotation(optax.scale_by_adam(), every=2)),
    'scale_in_float32': lambda: optax_fac.scale_in_float32(
        optax.scale_by_adam()),
}
CASES = {**{n: lambda n=n: make(n) for n in optax_fac.NAMED_OPTIMIZERS},
         **TRANSFORMS}


def test_every_public_transform_is_covered():
  public = {n for n in optax_fac.__all__ if n.startswith('scale_by_')}
  assert public <= set(TRANSFORMS), public - set(TRANSFORMS)
  assert len(optax_fac.NAMED_OPTIMIZERS) == 14


def _gradients(step_scales=(1.0, 1e-4, 0.3, 1.0)):
  """(steps, ...) float64 gradients per leaf, max |G| of step t the scale."""
  rng = np.random.default_rng(0)
  return {k: np.stack([s * rng.uniform(-1.0, 1.0, size=shape)
                       for s in step_scales])
          for k, shape in SHAPES.items()}


def _params(dtype):
  rng = np.random.default_rng(1)
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def _steps(tx, keep_states=False):
  """params, grads -> (final state, stacked updates[, stacked states]):
  init and one update per gradient, under ``lax.scan``."""
  def go(params, grads):
    def body(state, g):
      u, state = tx.update(g, state, params)
      return state, ((u, state) if keep_states else u)
    return jax.lax.scan(body, tx.init(params), grads)
  return go


def _inputs(dtype):
  return _params(dtype), {k: jnp.asarray(g, dtype)
                          for k, g in _gradients().items()}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', tuple(CASES))
def test_dtypes(name, dtype):
  """Updates in the parameter dtype, every floating state leaf float32."""
  with jax.enable_x64(dtype == 'float64'):
    params, grads = _inputs(dtype)
    state, updates = jax.eval_shape(_steps(CASES[name]()), params, grads)
  for k, u in updates.items():
    assert (u.dtype, u.shape) == (jnp.dtype(dtype), (STEPS,) + SHAPES[k]), k
  floats = [(jax.tree_util.keystr(path), x.dtype) for path, x in
            jax.tree_util.tree_flatten_with_path(state)[0]
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats or name == 'scale_by_bias_correction'  # (a counter only)
  assert all(d == jnp.float32 for _, d in floats), floats


def _check_values(tx, dtype):
  with jax.enable_x64(dtype == 'float64'):
    params, grads = _inputs(dtype)
    state, updates = jax.jit(_steps(tx))(params, grads)
    updates = {k: np.asarray(u, np.float64) for k, u in updates.items()}
    state = [np.asarray(x, np.float64) for x in jax.tree.leaves(state)
             if jnp.issubdtype(x.dtype, jnp.floating)]
  for k, u in updates.items():
    assert np.all(np.isfinite(u)), k
  assert any(np.any(u != 0) for u in updates.values())
  for x in state:
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize('name', tuple(optax_fac.NAMED_OPTIMIZERS))
def test_named_optimizer_values_float64(name):
  _check_values(make(name), 'float64')


@pytest.mark.parametrize('name', tuple(TRANSFORMS))
def test_transform_values_float16(name):
  _check_values(TRANSFORMS[name](), 'float16')


# --------------------------------------------------------------------------
# mu_dtype: a first-moment buffer in another dtype.

# name -> (mu_dtype -> transform, the leaves with a full momentum buffer).
MU = {
    'adafactor_momentum': (lambda mu, **kw: optax_fac.adafactor_momentum(
        1e-2, mu_dtype=mu, **kw), tuple(SHAPES)),
    'adafactor_momentum_b1_none': (  # the fallback's only
        lambda mu, **kw: optax_fac.adafactor_momentum(
            1e-2, b1=None, mu_dtype=mu, **kw), ('vector',)),
    'adam_sn': (lambda mu, **kw: optax_fac.adam_sn(1e-2, mu_dtype=mu),
                tuple(SHAPES)),
    'adagrad_sn': (lambda mu, **kw: optax_fac.adagrad_sn(1e-2, mu_dtype=mu),
                   tuple(SHAPES)),
    'scale_by_factored_rms': (lambda mu, **kw: optax_fac.scale_by_factored_rms(
        b1=0.9, mu_dtype=mu), tuple(SHAPES)),
    # The rotated inner Adam's μ (mn per matrix) and the fallback's.
    'adadiag': (lambda mu, **kw: optax_fac.adadiag(1e-2, mu_dtype=mu, **kw),
                tuple(SHAPES)),
    'adadiag_pp': (lambda mu, **kw: optax_fac.adadiag_pp(1e-2, mu_dtype=mu,
                                                         **kw),
                   tuple(SHAPES)),
    'adafac_diag': (lambda mu, **kw: optax_fac.adafac_diag(
        1e-2, mu_dtype=mu, **kw), tuple(SHAPES)),
}
# Run step by step below; scale_by_factored_rms is adafactor_momentum's
# method (stack_leaves=False), whose buffers the runs read directly.
MU_RUNS = ('adafactor_momentum', 'adafactor_momentum_b1_none', 'adam_sn',
           'adagrad_sn')


@pytest.mark.parametrize('name', tuple(MU))
def test_mu_dtype_state_size_formula(name):
  """bfloat16: exactly 2 bytes less per momentum element; float32 = None."""
  build, leaves = MU[name]
  params = {'w': jnp.zeros((512, 256)), 'w2': jnp.zeros((64, 300)),
            'vector': jnp.zeros(256)}
  momentum = sum(int(np.prod(params[k].shape)) for k in leaves)
  f32 = optax_fac.state_size(build(None), params)
  assert optax_fac.state_size(build(jnp.bfloat16), params) == (
      f32 - 2 * momentum)
  assert optax_fac.state_size(build(jnp.float32), params) == f32
  shapes = optax_fac.state_shapes(build(jnp.bfloat16), params)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)
             if x.dtype == jnp.bfloat16) == momentum


def test_mu_dtype_must_be_floating():
  for build, _ in MU.values():
    with pytest.raises(ValueError, match='mu_dtype'):
      build(jnp.int32)


def _momentum_buffers(state):
  """{(kind, i, leaf key): stored buffer} of the first moments in a state.

  FactoredRmsState.mu (time-corrected decay β̂_t, §1), the Subset-Norm
  code's EMA momentum (optax.EmaState, plain β1, §5.3) and the fallback
  Adam's μ (plain β1).
  """
  kinds = {optax_fac.FactoredRmsState: 'mu', optax.EmaState: 'ema',
           optax.ScaleByAdamState: 'mu'}
  nodes = [n for n in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, tuple(kinds)))
           if isinstance(n, tuple(kinds))]
  out = {}
  for i, node in enumerate(nodes):
    for path, x in jax.tree_util.tree_flatten_with_path(
        getattr(node, kinds[type(node)]))[0]:
      key = jax.tree_util.keystr(path).strip("[]'")
      out[(type(node).__name__, i, key)] = np.asarray(x)
  return out


def _decay(kind, t, b1=0.9):
  """The decay the transform applies at step t (float64)."""
  if kind == 'FactoredRmsState':  # β̂_t = β(1 − β^{t−1}) / (1 − β^t)
    return b1 * (1.0 - b1 ** (t - 1)) / (1.0 - b1 ** t)
  return b1


MU_SCALES = (1.0, 0.8, 1.0, 0.9, 1.0, 0.8)  # a stationary gradient scale


@pytest.fixture(scope='module')
def mu_runs():
  """{name: (float32-momentum run, bfloat16-momentum run)}: for each, the
  per-step updates and states (six steps, float32 params)."""
  params = _params('float32')
  grads = {k: jnp.asarray(g, jnp.float32)
           for k, g in _gradients(MU_SCALES).items()}
  runs = {}
  for name in MU_RUNS:
    build = MU[name][0]
    kw = {'stack_leaves': False} if name.startswith('adafactor') else {}
    runs[name] = tuple(
        jax.tree.map(np.asarray, jax.jit(_steps(
            build(mu, **kw), keep_states=True))(params, grads)[1])
        for mu in (None, jnp.bfloat16))
  return runs


@pytest.mark.parametrize('name', MU_RUNS)
def test_mu_dtype_updates_follow_float32_run(name, mu_runs):
  """Updates with a bfloat16 buffer stay within its rounding of float32's.

  Step t uses the float32 EMA of the stored buffer, and the buffer is the
  only thing bfloat16 changes (second moments and preconditioner come from
  G alone). Its stored value differs from the float32 run's by one rounding
  per step, |ρ_k| <= u |M_k|; the EMA carries that with a decay <= 1, so
  |ΔM_t| <= u Σ_{k<t} |M_k| (to first order in u), and the step's
  preconditioner P_t maps it to the update: |ΔD_t| <= u Σ_{k<t} P_t |M_k|.
  At a stationary gradient scale P_t |M_k| is |D_k| up to the change of the
  preconditioner (and of the bias correction) between steps, which the
  factor 2 allows for; the learning rate scales both sides alike. Step 1
  has nothing rounded yet: equal to float32 precision.
  """
  (ref, _), (got, _) = mu_runs[name]
  differs = False
  for k in SHAPES:
    a = np.asarray(ref[k], np.float64)
    b = np.asarray(got[k], np.float64)
    for t in range(a.shape[0]):
      bound = (2 * BF16_U * np.sum(np.abs(a[:t]), axis=0)
               + 1e-6 * np.max(np.abs(a[t])))
      assert np.all(np.abs(b[t] - a[t]) <= bound), (
          k, t + 1, np.max(np.abs(b[t] - a[t]) - bound))
    differs |= bool(np.any(b != a))
  assert differs  # the buffer really is bfloat16


def _bf16(x):
  return np.asarray(x, np.float64).astype(jnp.bfloat16).astype(np.float64)


@pytest.mark.parametrize('name', MU_RUNS)
def test_stored_momentum_is_rounded_float32_ema(name, mu_runs):
  """Float64 NumPy: stored M_t = bf16(β_t M_{t−1} + (1 − β_t) G_t).

  §1 and §5 compute the EMA from the stored buffer in float32 and round it
  once to ``mu_dtype``. The float64 value is rounded to nearest; where it
  lies so close to a bfloat16 rounding boundary that the float32
  arithmetic may fall on either side, the bfloat16 values within that
  error are accepted (few such elements). The float32 error is a few
  roundings of the terms (relative 6e-8 each) plus β̂_t's own float32
  rounding, which 1 − β̂_t magnifies to at most about 1e-6 for β1 = 0.9:
  2e-6 of the terms bounds both.
  """
  grads = _gradients(MU_SCALES)
  _, (_, states) = mu_runs[name]
  buffers = _momentum_buffers(states)  # (steps, ...) per buffer
  seen, ambiguous, total = set(), 0, 0
  for (kind, _, key), stored in buffers.items():
    assert stored.dtype == jnp.bfloat16, (kind, key)
    seen.add(key)
    got = stored.astype(np.float64)
    for t in range(1, got.shape[0] + 1):
      decay = _decay(kind, t)
      old = got[t - 2] if t > 1 else np.zeros_like(got[0])
      g = grads[key][t - 1].astype(np.float32).astype(np.float64)
      want = decay * old + (1.0 - decay) * g
      slack = 2e-6 * (decay * np.abs(old) + (1.0 - decay) * np.abs(g))
      lo, hi = _bf16(want - slack), _bf16(want + slack)
      sure = lo == hi
      np.testing.assert_array_equal(got[t - 1][sure], _bf16(want)[sure],
                                    err_msg=f'{kind} {key} t={t}')
      assert np.all((lo <= got[t - 1]) & (got[t - 1] <= hi)), (kind, key, t)
      ambiguous += int(np.sum(~sure))
      total += sure.size
  assert seen == set(MU[name][1]), seen
  assert ambiguous <= 0.02 * total, (ambiguous, total)


@pytest.mark.parametrize('carry', ['keep', 'rotate'])
def test_adadiag_bfloat16_moment_follows_float32(carry):
  """AdaDiag with a bfloat16 first moment, across a refresh (every=2, both
  carries): the stored μ is bfloat16 and the updates stay within a few
  bfloat16 roundings of the float32-moment run's (relative 2^-6 of the
  largest update, far above float32 noise, far below a wrong moment)."""
  params = _params('float32')
  grads = {k: jnp.asarray(g, jnp.float32)
           for k, g in _gradients(MU_SCALES).items()}
  runs = [jax.tree.map(np.asarray, jax.jit(_steps(optax_fac.adadiag(
      1e-2, every=2, carry=carry, mu_dtype=mu), keep_states=True))(
          params, grads)[1]) for mu in (None, jnp.bfloat16)]
  (ref, _), (got, states) = runs
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(states))
  for k in SHAPES:
    a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(b, a, rtol=0, atol=2**-6 * np.max(np.abs(a)))
