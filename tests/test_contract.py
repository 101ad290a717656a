"""The DESIGN.md contract, run on every case of every tests/cases_*.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import contract
import optax_fac
import tree_checks

CASES = contract.all_cases()
ids = [c.name for c in CASES]


def _run(opt, target, steps, dtype=jnp.float32):
  x0, xs, f = target(dtype)

  def body(carry, _):
    params, state = carry
    grads = jax.grad(f)(params)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(
      lambda p, s: jax.lax.scan(body, (p, s), length=steps))(x0, opt.init(x0))
  return params, xs


# The parabola, Rosenbrock and matrix parabola run for every named optimizer,
# with 1-D and with 2-D params, in optax's own suite (tests/test_optax_common.py);
# here every case (variants included) runs the mixed 1-D + 2-D target and the
# least-squares problem.
_TARGETS = (contract.mixed_target, contract.matrix_least_squares)


@pytest.mark.parametrize('case', CASES, ids=ids)
@pytest.mark.parametrize('target', _TARGETS,
                         ids=[t.__name__ for t in _TARGETS])
def test_converges(case, target):
  params, xs = _run(case.make(**case.kwargs), target, case.steps)
  tree_checks.assert_trees_all_close(params, xs, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_converges_with_schedule(case):
  kwargs = dict(case.kwargs)
  lr = kwargs.pop('learning_rate')
  sched = optax.cosine_decay_schedule(lr, case.steps, alpha=0.1)
  params, xs = _run(case.make(learning_rate=sched, **kwargs),
                    contract.matrix_least_squares, case.steps)
  tree_checks.assert_trees_all_close(params, xs, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_extra_args_and_no_recompilation(case):
  opt = case.make(**case.kwargs)
  x0, _, f = contract.matrix_least_squares(jnp.float32)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(f)(params), state, params,
                                unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  params, state = step(x0, opt.init(x0))
  with tree_checks.log_compilations() as logs:
    step(params, state)
  assert not logs, 'recompiled on the second call'


# Compilation is most of this file's cost. The three tests below step each
# case on the same small tree (its structure, shapes and dtype decide the
# compiled program, its values do not) through one jitted init and update per
# case, made once: test_inject_hyperparams' plain optimizer,
# test_zero_gradient_first_step and the float32 run of
# test_preserves_dtype_and_is_finite share one program per case instead of
# compiling three.


def _tree(dtype, w, b, c):
  """The small mixed tree: a (6, 4) matrix, a (2,) vector, a (2, 5, 3) stack."""
  return {'w': jnp.asarray(w, dtype).reshape(6, 4),
          'b': jnp.asarray(b, dtype).reshape(2),
          'c': jnp.asarray(c, dtype).reshape(2, 5, 3)}


@functools.cache
def _compiled(case_name):
  """(opt, jitted init, jitted update) of one case, shared by the tests."""
  (case,) = [c for c in CASES if c.name == case_name]
  opt = case.make(**case.kwargs)
  return opt, jax.jit(opt.init), jax.jit(opt.update)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_inject_hyperparams(case):
  _, init, update = _compiled(case.name)
  injected = optax.inject_hyperparams(case.make, static_args=case.static_args)(
      **case.kwargs)
  rng = np.random.default_rng(1)
  params = _tree(jnp.float32, rng.normal(size=24), rng.normal(size=2),
                 rng.normal(size=30))
  grads = jax.tree.map(lambda p: jnp.sin(3 * p) + 0.1, params)
  state, istate = init(params), jax.jit(injected.init)(params)
  iupdate = jax.jit(injected.update)
  for _ in range(3):
    u, state = update(grads, state, params)
    iu, istate = iupdate(grads, istate, params)
    tree_checks.assert_trees_all_close(iu, u, rtol=1e-5, atol=1e-6)
  tree_checks.assert_trees_all_close(istate.inner_state, state, rtol=1e-5,
                                     atol=1e-6)


@pytest.mark.parametrize('case', CASES, ids=ids)
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32'])
def test_preserves_dtype_and_is_finite(case, dtype):
  """Updates keep the param dtype; no NaN from eps underflow; zero grads ok."""
  _, init, update = _compiled(case.name)
  params = _tree(dtype, jnp.linspace(-1, 1, 24), [1.0, 2.0],
                 jnp.linspace(-2, 1, 30))
  state = init(params)
  grads = jax.tree.map(lambda p: 1e-3 * p, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for g in (grads, zeros, zeros, grads):
    updates, state = update(g, state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype
    tree_checks.assert_tree_all_finite(updates)
    tree_checks.assert_tree_all_finite(state)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_zero_gradient_first_step(case):
  _, init, update = _compiled(case.name)
  params = _tree(jnp.float32, np.ones(24), np.ones(2), np.ones(30))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = update(zeros, init(params), params)
  tree_checks.assert_tree_all_finite((updates, state))
  for u in jax.tree.leaves(updates):
    assert float(jnp.max(jnp.abs(u))) < 1e-3


# optax's own suite (tests/test_optax_common.py) runs MultiSteps and the
# lax.cond state-stability check for every named optimizer with its default
# settings, on 1-D and 2-D params; here they run for the variant cases.
VARIANTS = [c for c in CASES if c.name not in optax_fac.__all__]
variant_ids = [c.name for c in VARIANTS]


@pytest.mark.parametrize('case', VARIANTS, ids=variant_ids)
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_multisteps(case, dtype):
  opt = optax.MultiSteps(case.make(**case.kwargs), every_k_schedule=4)
  params = {'w': jnp.ones((4, 3), dtype), 'b': jnp.ones(3, dtype)}
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  state = jax.jit(opt.init)(params)
  # Jitted once: opt.update is a bound method, a new object at each access,
  # so jax.jit(opt.update) in the loop would trace and compile every time.
  update = jax.jit(opt.update)
  updates, state = update(grads, state, params)
  tree_checks.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like,
                                                           params))
  for _ in range(3):
    updates, state = update(grads, state, params)
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('case', VARIANTS, ids=variant_ids)
def test_state_stable_through_cond(case):
  """State shape/dtype survive lax.cond for f16/bf16/f32/f64 params."""
  for dtype in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      opt = case.make(**case.kwargs)
      x0, _, f = contract.mixed_target(dtype)

      @jax.jit
      def step(params, state):
        grads = jax.grad(f)(params)
        pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        updates, new_state = jax.lax.cond(
            pred, lambda: opt.update(grads, state, params),
            lambda: (params, state))
        return optax.apply_updates(params, updates), new_state

      params, state = x0, opt.init(x0)
      for _ in range(2):
        params, state = step(params, state)
        assert all(p.dtype == dtype for p in jax.tree.leaves(params))


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_init_on_abstract_params(case):
  opt = case.make(**case.kwargs)
  params = {'w': jax.ShapeDtypeStruct((2, 4, 8), jnp.float32),
            'b': jax.ShapeDtypeStruct((8,), jnp.bfloat16)}
  from_abstract = opt.init(params)
  concrete = opt.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   params))
  tree_checks.assert_trees_all_equal_structs(from_abstract, concrete)
  for a, c in zip(jax.tree.leaves(from_abstract), jax.tree.leaves(concrete)):
    assert (a.shape, a.dtype) == (c.shape, c.dtype)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_state_sharding_types_on_explicit_mesh(case):
  mesh = jax.make_mesh((8,), ('x',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P(None, 'x'))
  opt = case.make(**case.kwargs)
  with jax.set_mesh(mesh):
    params = jnp.ones((2, 8, 4), jnp.float32, out_sharding=sharding) * 0.5
    state0 = opt.init(params)
    _, state1 = opt.update(params, state0, params)
    tree_checks.assert_trees_all_equal(jax.tree.map(jax.typeof, state0),
                                       jax.tree.map(jax.typeof, state1))
    state2 = jax.jit(opt.init)(params)
    tree_checks.assert_trees_all_equal(jax.tree.map(jax.typeof, state0),
                                       jax.tree.map(jax.typeof, state2))
    _, state3 = jax.jit(opt.update)(params, state0, params)
    tree_checks.assert_trees_all_equal(jax.tree.map(jax.typeof, state1),
                                       jax.tree.map(jax.typeof, state3))


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_bad_input_is_named(case):
  kwargs = dict(case.kwargs)
  with pytest.raises(ValueError, match='learning_rate'):
    case.make(**{**kwargs, 'learning_rate': -1.0})
  opt = case.make(**kwargs)
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
  state = opt.init(params)
  with pytest.raises(ValueError):
    opt.update({'w': jnp.ones((4, 3))}, state, {'w': jnp.ones((4, 3))})
  with pytest.raises(TypeError, match=r"\['i'\]"):
    opt.init({'w': jnp.ones((4, 3)), 'i': jnp.ones((3,), jnp.int32)})
