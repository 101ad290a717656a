"""Tests of optax_fac.MultiSteps (gradient accumulation, inner update once per
real step) against optax.MultiSteps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_fac
from optax_fac import rotation
import tree_checks

SHAPES = {'w': (4, 6), 'b': (3,)}


def _grads(steps, seed=0, shapes=SHAPES, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
          for _ in range(steps)]


def _run(ms, grads, params, **extra_args):
  """All (updates, state) pairs of ``ms`` over ``grads`` (one jit)."""
  update = jax.jit(ms.update)
  state = ms.init(params)
  out = []
  for g in grads:
    u, state = update(g, state, params, **extra_args)
    out.append((u, state))
  return out


@pytest.fixture
def count_decompositions(monkeypatch):
  calls = []
  original = rotation.eigh_descending

  def counted(gram):
    jax.debug.callback(lambda: calls.append(1))
    return original(gram)

  monkeypatch.setattr(rotation, 'eigh_descending', counted)

  def count():
    jax.effects_barrier()
    return len(calls)

  return count


def test_adadiag_decomposes_once_per_refresh_step(count_decompositions):
  k, every, real_steps = 3, 2, 5
  tx = optax_fac.adadiag(learning_rate=1e-2, every=every, precision='highest')
  params = {k_: jnp.zeros(s) for k_, s in SHAPES.items()}
  micro = _grads(real_steps * k, seed=9)
  refreshes = len(range(0, real_steps, every))

  stock = _run(optax.MultiSteps(tx, every_k_schedule=k), micro, params)
  stock_calls = count_decompositions()
  # Measured: optax.MultiSteps decomposes on each micro-step of a refresh
  # step (the inner counter and so the predicate do not change in between).
  assert stock_calls == k * refreshes

  ours = _run(optax_fac.MultiSteps(tx, every_k_schedule=k), micro, params)
  assert count_decompositions() - stock_calls == refreshes

  # Same results: what optax.MultiSteps keeps is the basis of the full
  # accumulated gradient, which is the only one computed here.
  for (u, s), (su, ss) in zip(ours, stock):
    tree_checks.assert_trees_all_close(u, su, rtol=1e-6, atol=1e-7)
    tree_checks.assert_trees_all_close(s, ss, rtol=1e-6, atol=1e-7)
  # ... and equal to the plain optimizer on the mean gradients.
  state = tx.init(params)
  for real in range(real_steps):
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro[real * k:(real + 1) * k])
    pu, state = jax.jit(tx.update)(mean, state, params)
    tree_checks.assert_trees_all_close(ours[real * k + k - 1][0], pu,
                                       rtol=1e-4, atol=1e-6)
    for j in range(k - 1):
      tree_checks.assert_trees_all_equal(
          ours[real * k + j][0], jax.tree.map(jnp.zeros_like, params))


def _assert_same(ours, stock, exact):
  """Bitwise equal op by op; under jit equal up to float32 rounding (XLA
  fuses the inner update differently inside lax.cond; measured: a few ulp)."""
  for (u, s), (su, ss) in zip(ours, stock):
    if exact:
      tree_checks.assert_trees_all_equal((u, s), (su, ss))
    else:
      tree_checks.assert_trees_all_close((u, s), (su, ss), rtol=1e-6,
                                         atol=1e-8)


@pytest.mark.parametrize('jit', [True, False], ids=['jit', 'eager'])
@pytest.mark.parametrize('name,make,kwargs', [
    ('adamw', lambda: optax.adamw(1e-2, weight_decay=0.1), {}),
    ('hfac_sum_schedule', lambda: optax_fac.hfac(1e-2),
     dict(use_grad_mean=False,
          every_k_schedule=lambda step: jnp.where(step < 1, 2, 3))),
])
def test_same_updates_and_states_as_optax(name, make, kwargs, jit):
  del name
  kwargs = dict(dict(every_k_schedule=3), **kwargs)
  params = {k_: jnp.full(s, 0.5) for k_, s in SHAPES.items()}
  micro = _grads(8, seed=1)
  with jax.disable_jit(not jit):
    ours = _run(optax_fac.MultiSteps(make(), **kwargs), micro, params)
    stock = _run(optax.MultiSteps(make(), **kwargs), micro, params)
  _assert_same(ours, stock, exact=not jit)
  # 3 + 3 + 2 (or 2 + 3 + 3) micro-steps.
  assert int(ours[-1][1].gradient_step) == (2 if kwargs['every_k_schedule']
                                            == 3 else 3)


@pytest.mark.parametrize('jit', [True, False], ids=['jit', 'eager'])
def test_should_skip_update_fn_as_in_optax(jit):
  params = {k_: jnp.ones(s) for k_, s in SHAPES.items()}
  micro = _grads(6, seed=2)
  micro[1] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), micro[1])
  micro[4] = jax.tree.map(lambda g: g.at[0].set(jnp.inf), micro[4])
  kwargs = dict(every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite)
  with jax.disable_jit(not jit):
    ours = _run(optax_fac.MultiSteps(optax.adam(1e-2), **kwargs), micro,
                params)
    stock = _run(optax.MultiSteps(optax.adam(1e-2), **kwargs), micro, params)
  _assert_same(ours, stock, exact=not jit)
  assert int(ours[-1][1].gradient_step) == 2  # 4 finite micro-steps of 6


def test_drop_in_contract():
  tx = optax.inject_hyperparams(optax_fac.adadiag, static_args=(
      'every', 'max_dim', 'basis'))(
      learning_rate=1e-2, every=2)
  ms = optax_fac.MultiSteps(tx, every_k_schedule=2)
  assert isinstance(ms, optax.MultiSteps)
  assert ms.inner_opt is tx
  params = {'w': jnp.ones((4, 3), jnp.bfloat16), 'b': jnp.ones(3, jnp.float32)}
  gt = ms.gradient_transformation()
  state = jax.jit(gt.init)(params)
  assert type(state) is optax.MultiStepsState
  stock_state = optax.MultiSteps(tx, every_k_schedule=2).init(params)
  assert (jax.tree.structure(state) == jax.tree.structure(stock_state))

  traces = []

  def update(g, s, p):
    traces.append(1)
    return gt.update(g, s, p, unknown_extra_arg=1.0)

  update = jax.jit(update)
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  u, state = update(grads, state, params)
  assert not ms.has_updated(state)
  tree_checks.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  u, state = update(grads, state, params)
  assert ms.has_updated(state) and len(traces) == 1
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(u))
  plain, _ = tx.update(grads, tx.init(params), params)
  assert jax.tree.map(jnp.dtype, u) == jax.tree.map(jnp.dtype, plain)

  abstract = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  specs = {'w': P('data', None)}
  assert (optax_fac.state_partition_specs(ms, abstract, specs)
          == optax_fac.state_partition_specs(
              optax.MultiSteps(tx, every_k_schedule=2), abstract, specs))

  with pytest.raises(ValueError, match='reserved'):
    ms.update(grads, state, params, _optax_fac_multisteps_emit=True)
