"""Reliability of every named optimizer (issue 15, items 1, 2 and 7).

* Non-finite gradients: inside ``optax.apply_if_finite`` and inside
  ``optax_fac.MultiSteps(..., should_skip_update_fn=optax.skip_not_finite)``
  a NaN/Inf step leaves params and state bit-identical, and the run goes on
  exactly as the run without that step. Without a wrapper, a NaN/Inf gradient
  on a refresh step never enters a rotation basis, a subspace projector or
  SMMF's factors: the previous ones are kept and the state's
  ``skipped_refreshes`` counter says so.
* Degenerate inputs: zero, constant and rank-1 gradients at scales from 1e-30
  to the largest at which ``optax.adamw`` stays finite; scalars, 1 x N, N x 1,
  size-1 axes, 5-D leaves, a 1 x 100000 leaf, leaves longer than ``max_dim``,
  empty pytrees: finite updates and state of the right shapes and dtypes.
* Determinism: two runs from the same seed give bitwise-equal params.

Compilation is most of the cost, so each optimizer's update on the
degenerate tree is jitted once (the module-scoped ``plain`` fixture) and
shared by the tests that use that tree; both wrappers run in one jitted
program per optimizer, shared by the run with the bad steps and the run
without them.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
import tree_checks

NAMES = tuple(optax_fac.NAMED_OPTIMIZERS)

# The states holding a refreshed quantity, and the fields a non-finite
# gradient must never reach.
GUARDED = {
    optax_fac.SvdRotationState: ('left', 'right'),
    optax_fac.SubspaceMomentumState: ('projector',),
    optax_fac.SMMFState: ('m_row', 'm_col', 'm_sign', 'v_row', 'v_col'),
}


def make(name, **overrides):
  """The named optimizer with short refresh periods and a small max_dim."""
  factory = optax_fac.NAMED_OPTIMIZERS[name]
  args = inspect.signature(factory).parameters
  kwargs = {'learning_rate': 1e-2}
  if 'every' in args:
    kwargs['every'] = 2   # refreshes inside a few steps
  if 'rank' in args:
    kwargs['rank'] = 2
  if 'max_dim' in args:
    kwargs['max_dim'] = 8  # 'wide', 'big' and 'long' have longer sides
  kwargs.update(overrides)
  return factory(**kwargs)


def refresh_steps(name):
  """Steps t (1-based) at which ``make(name)`` refreshes, among 1..6."""
  args = inspect.signature(optax_fac.NAMED_OPTIMIZERS[name]).parameters
  if name == 'smmf':
    return (1, 2, 3, 4, 5, 6)        # the factors are recompressed each step
  if 'max_dim' in args:
    return (1, 3, 5)                 # svd_rotation: (t - 1) % every == 0
  if 'rank' in args:
    return (1, 2, 4, 6)              # subspace momentum: t = 1, t % every == 0
  return ()


def guarded_states(state):
  """The states of ``GUARDED`` classes inside ``state``, in tree order."""
  kinds = tuple(GUARDED)
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, kinds)) if isinstance(s, kinds)]


def guarded_fields(state):
  return [[getattr(s, f) for f in GUARDED[type(s)]]
          for s in guarded_states(state)]


def skipped(state):
  return [int(s.skipped_refreshes) for s in guarded_states(state)]


def float_leaves(tree):
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


def assert_finite(tree, what):
  for x in float_leaves(tree):
    assert np.all(np.isfinite(np.asarray(x))), what


def assert_bitwise(a, b, what=''):
  tree_checks.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


# --------------------------------------------------------------------------
# The degenerate tree and its gradients.

SHAPES = {
    'scalar': (),
    'vector': (7,),
    'row': (1, 9),
    'column': (9, 1),
    'one': (1, 1),
    'size1_axis': (4, 1, 3),
    'five_d': (2, 1, 2, 1, 4),
    'w': (6, 4),
    'w2': (6, 4),        # same shape as 'w': a stacked group of two
    'wide': (3, 10),     # its long side is longer than max_dim = 8
    'big': (12, 10),     # both sides longer than max_dim
    'long': (1, 100000),
}


def _params():
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in SHAPES.items()}


def _unit(a):
  a = np.asarray(a, np.float64)
  return a / np.max(np.abs(a))


def _rank1(shape):
  if len(shape) < 2:
    return _unit(np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape))
  rest = int(np.prod(shape[1:]))
  return _unit(np.outer(np.linspace(-1.0, 1.0, shape[0]) + 0.25,
                        np.linspace(0.5, 1.0, rest)).reshape(shape))


def _random(shape, seed):
  return _unit(np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape)
               + 1e-3)


@functools.lru_cache(maxsize=None)
def _unit_gradients(kind, seed):
  out = {}
  for i, (k, s) in enumerate(SHAPES.items()):
    if kind == 'zeros':
      a = np.zeros(s)
    elif kind == 'constant':
      a = np.ones(s)
    elif kind == 'rank1':
      a = _rank1(s)
    else:
      a = _random(s, seed * 1000 + i)
    out[k] = a
  return out


def gradients(kind, scale=1.0, seed=1):
  """Max |G| = ``scale`` per leaf (0 for 'zeros'), float32 NumPy arrays."""
  return {k: (scale * a).astype(np.float32)
          for k, a in _unit_gradients(kind, seed).items()}


@pytest.fixture(scope='module', params=NAMES)
def name(request):
  """Module scope: pytest runs all the tests of one optimizer together (and
  pytest-xdist keeps them on one worker), so its programs compile once."""
  return request.param


@pytest.fixture(scope='module')
def plain(name):
  """(its jitted update, params, initial state) on SHAPES, shared."""
  tx = make(name)
  params = _params()
  return jax.jit(tx.update), params, jax.jit(tx.init)(params)


@functools.lru_cache(maxsize=None)
def adamw_limit():
  """The largest scale of the candidates at which adamw stays finite."""
  tx = optax.adamw(1e-2)
  update = jax.jit(tx.update)
  params = _params()
  best = None
  for scale in (1e18, 3e18, 1e19, 1.5e19, 1.8e19, 1.85e19, 3e19, 1e20):
    state, ok = tx.init(params), True
    for step in range(3):
      u, state = update(gradients('random', scale, seed=step), state, params)
      ok = ok and all(np.all(np.isfinite(np.asarray(x)))
                      for x in float_leaves((u, state)))
    if not ok:
      break
    best = scale
  assert best is not None and best >= 1e19, best   # float32: G² < 3.4e38
  return best


def _check_step(updates, state, state0, params, what):
  tree_checks.assert_trees_all_equal_structs(updates, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert (u.shape, u.dtype) == (p.shape, p.dtype), what
  assert_finite(updates, f'{what}: updates')
  assert_finite(state, f'{what}: state')
  tree_checks.assert_trees_all_equal_structs(state, state0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype), what


def test_degenerate_inputs(name, plain):
  """Zero/constant/rank-1/random gradients of every scale, every shape."""
  update, params, state0 = plain
  scales = (1e-30, 1e-10, 1.0, 1e10, 1e18, adamw_limit())
  cases = [('zeros', 1.0)] + [(kind, s) for kind in
                              ('constant', 'rank1', 'random') for s in scales]
  for kind, scale in cases:
    state = state0
    # Refreshes at t = 1 and t = 3 (rotation) / t = 2 (subspace).
    for step in range(3 if kind == 'random' else 2):
      g = gradients(kind, scale, seed=step)
      updates, state = update(g, state, params)
      _check_step(updates, state, state0, params,
                  f'{name} {kind} x {scale:g}, step {step + 1}')


def test_empty_pytrees(name):
  tx = make(name)
  for params in ({}, [], {'a': {}, 'b': ()}):
    for update in (tx.update, jax.jit(tx.update)):
      state = tx.init(params)
      updates, new_state = update(params, state, params)
      tree_checks.assert_trees_all_equal_structs(updates, params)
      tree_checks.assert_trees_all_equal_structs(new_state, state)
      assert_finite(new_state, name)


def test_zero_gradient_gives_zero_update(name, plain):
  """All-zero gradients move nothing (no weight decay)."""
  update, params, state = plain
  for _ in range(2):
    updates, state = update(gradients('zeros'), state, params)
    for u in jax.tree.leaves(updates):
      assert float(jnp.max(jnp.abs(u))) == 0.0, name


def test_adagrad_running_sum_does_not_overflow():
  """β2 = 1 with |G| near adamw's limit: the sum of G² over steps overflows
  float32 at step 2, the stored mean does not (the update is the same).

  Before the fix the accumulator was the running sum: inf from step 2 on.
  """
  scale = 1.5e19
  params = {'w': jnp.zeros((4, 6)), 'b': jnp.zeros(3)}
  rng = np.random.default_rng(3)
  for sign, tx in ((1.0, optax_fac.scale_by_subset_norm(b2=1.0, eps=1e-6)),
                   (-1.0, optax_fac.adagrad_sn(1.0, b1=0.0))):
    state = tx.init(params)
    sums = {k: 0.0 for k in params}
    for _ in range(4):
      g64 = {k: scale * _unit(rng.uniform(-1, 1, size=p.shape))
             for k, p in params.items()}
      updates, state = jax.jit(tx.update)(
          {k: jnp.asarray(v, jnp.float32) for k, v in g64.items()}, state,
          params)
      assert_finite(state, 'state')
      for k in params:  # 'w': one subset per column (4 < 6); 'b': per element
        sq = g64[k] ** 2
        sums[k] = sums[k] + (np.sum(sq, axis=0) if k == 'w' else sq)
        want = sign * g64[k] / (np.sqrt(sums[k]) + 1e-6)
        np.testing.assert_allclose(np.asarray(updates[k], np.float64), want,
                                   rtol=1e-5)


def test_subspace_eigh_projector_at_large_scale():
  """basis='eigh' at |G| = 1e18: the Gram matrix of G itself overflows
  (512 entries of 1e36), the projector comes from G / max|G|.

  Before the fix the refresh failed, the projector stayed zero (no momentum
  at all) and nothing showed it.
  """
  tx = optax_fac.scale_by_subspace_momentum(0.9, rank=2, basis='eigh')
  noise = np.random.default_rng(7).uniform(size=(4, 512))
  g = {'w': jnp.asarray(1e18 * _unit(0.9 + 0.1 * noise), jnp.float32)}
  _, state = jax.jit(tx.update)(g, tx.init(g))
  assert int(state.skipped_refreshes) == 0
  p = np.asarray(state.projector['w'])
  np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-5)


# --------------------------------------------------------------------------
# Non-finite gradients inside the wrappers.

SMALL = {'v': (5,), 'w': (6, 4)}


def _small_params():
  rng = np.random.default_rng(5)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in SMALL.items()}


def _small_sequence(bad_slots, length, seed=6):
  """(T, ...) gradients; the slots in ``bad_slots`` hold NaN / +Inf / -Inf:
  one element, every element, one element, in turn."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(length):
    g = {k: rng.normal(size=s) for k, s in SMALL.items()}
    if t in bad_slots:
      j = bad_slots.index(t) % 3
      value = (np.nan, np.inf, -np.inf)[j]
      if j == 1:
        g = {k: np.full(s, value) for k, s in SMALL.items()}
      else:
        g['w'][1, 2] = value
    seq.append(g)
  return {k: jnp.asarray(np.stack([g[k] for g in seq]), jnp.float32)
          for k in SMALL}


def _trajectory(tx, params, grads, skip):
  """Params and state after each slot; a slot with ``skip`` is not run."""

  def body(carry, xs):
    g, skip_now = xs

    def step(p, s):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    carry = jax.lax.cond(skip_now, lambda p, s: (p, s), step, *carry)
    return carry, carry

  return jax.lax.scan(body, (params, tx.init(params)), (grads, skip))[1]


def _check_runs(bad, clean, bad_slots, inner):
  """Bad run (the wrapper saw the bad slots) vs clean run (the bad slots were
  not run at all): the same params and (``inner``) state at every slot."""
  (bad_params, bad_state), (clean_params, clean_state) = bad, clean
  assert_bitwise(bad_params, clean_params, 'params')
  assert_bitwise(inner(bad_state), inner(clean_state), 'state')
  for t in bad_slots:  # a bad step changes nothing
    prev = jax.tree.map(lambda x: x[t - 1], (bad_params, inner(bad_state)))
    now = jax.tree.map(lambda x: x[t], (bad_params, inner(bad_state)))
    assert_bitwise(now, prev, f'slot {t}')
  assert_finite((bad_params, inner(bad_state)), 'finite')


# optax.apply_if_finite: inner steps t = 1..5; the bad slots would have been
# t = 2 (a subspace refresh), t = 3 (a rotation refresh) and t = 4.
IF_FINITE_BAD, IF_FINITE_LENGTH = [1, 3, 5], 8
# MultiSteps (k = 2): bad micro-steps first in their group (slots 2 and 5)
# and at the emitting position (slot 7); three real steps.
MULTI_BAD, MULTI_LENGTH = [2, 5, 7], 9


def test_nonfinite_steps_inside_wrappers(name):
  """Both wrappers in one jitted program (one compilation per optimizer)."""
  if_finite = optax.apply_if_finite(make(name), max_consecutive_errors=3)
  multi = optax_fac.MultiSteps(make(name), every_k_schedule=2,
                               should_skip_update_fn=optax.skip_not_finite)

  @jax.jit
  def runs(params, grads, skip_if_finite, skip_multi):
    return (_trajectory(if_finite, params, grads[0], skip_if_finite),
            _trajectory(multi, params, grads[1], skip_multi))

  def skips(bad, length):
    return np.isin(np.arange(length), bad)

  params = _small_params()
  grads = (_small_sequence(IF_FINITE_BAD, IF_FINITE_LENGTH),
           _small_sequence(MULTI_BAD, MULTI_LENGTH))
  bad = runs(params, grads, skips([], IF_FINITE_LENGTH),
             skips([], MULTI_LENGTH))
  clean = runs(params, grads, skips(IF_FINITE_BAD, IF_FINITE_LENGTH),
               skips(MULTI_BAD, MULTI_LENGTH))
  _check_runs(bad[0], clean[0], IF_FINITE_BAD, lambda s: s.inner_state)
  assert int(bad[0][1].total_notfinite[-1]) == 3
  _check_runs(bad[1], clean[1], MULTI_BAD,
              lambda s: (s.mini_step, s.gradient_step, s.inner_opt_state,
                         s.acc_grads))
  assert int(bad[1][1].gradient_step[-1]) == 3   # three real steps


# --------------------------------------------------------------------------
# Non-finite gradients without a wrapper: refreshed state is never poisoned.


def _poison(g, kind):
  if kind == 'nan_all':
    return jax.tree.map(lambda x: np.full_like(x, np.nan), g)
  g = dict(g)
  if kind == 'inf_one':     # in a stacked group (shape of 'w2' too)
    g['w'][2, 1] = np.inf
  else:                     # '-inf_one', a leaf rotated on one side only
    g['wide'][0, 3] = -np.inf
  return g


@pytest.mark.parametrize('kind', ['nan_all', 'inf_one', '-inf_one'])
def test_nonfinite_refresh_keeps_previous_state(name, plain, kind):
  update, params, state0 = plain
  if not refresh_steps(name):  # no basis, projector or SMMF factors
    assert not guarded_states(state0), name
    return
  assert guarded_states(state0), name
  assert set(skipped(state0)) == {0}
  for at in refresh_steps(name)[:2]:  # t = 1 and the next refresh
    state = state0
    for t in range(1, at):
      _, state = update(gradients('random', seed=t), state, params)
    before = guarded_fields(state)
    _, state = update(_poison(gradients('random', seed=at), kind), state,
                      params)
    after = guarded_fields(state)
    assert skipped(state) == [1] * len(after), (name, kind, at)
    assert_finite(after, f'{name} {kind} at t = {at}')
    if kind == 'nan_all':  # every matrix kept what it had
      assert_bitwise(after, before, f'{name} at t = {at}')
    else:  # the other leaves did refresh
      assert any(not np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(after),
                                 jax.tree.leaves(before)) if a.size)
    # A finite step after it: the refreshed fields stay finite, the counter
    # stays (SMMF, whose whole state is its factors, is wholly finite again).
    _, state = update(gradients('random', seed=at + 1), state, params)
    assert_finite(guarded_fields(state), 'after')
    assert skipped(state) == [1] * len(after)
    if name == 'smmf':
      assert_finite(state, 'smmf state after a finite step')


def test_finite_runs_never_skip(name, plain):
  """The counter stays 0 on ordinary gradients."""
  update, params, state = plain
  for t in range(4):
    _, state = update(gradients('random', seed=t), state, params)
  assert set(skipped(state)) <= {0}, name


# --------------------------------------------------------------------------
# Determinism.


@functools.lru_cache(maxsize=None)
def _random_gradients():
  keys = {k: i for i, k in enumerate(SHAPES)}

  @jax.jit
  def draw(seed, step):
    key = jax.random.fold_in(jax.random.key(seed), step)
    return {k: jax.random.normal(jax.random.fold_in(key, i), SHAPES[k])
            for k, i in keys.items()}

  return draw


def test_same_seed_same_bits(name, plain):
  """Two runs (two optimizer objects, two jits) from one seed: equal bits."""
  draw = _random_gradients()

  def run(update, state, params):
    for step in range(3):
      updates, state = update(draw(0, step), state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  update, params, state = plain
  first = run(update, state, params)
  tx = make(name)
  second = run(jax.jit(tx.update), jax.jit(tx.init)(params), params)
  assert_bitwise(first, second, name)
  assert_finite(first, name)
