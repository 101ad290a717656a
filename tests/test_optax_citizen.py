"""optax conventions every named optimizer keeps (defects found by outside testing).

Each test runs over all 14 named optimizers: ``optax.tree_map_params``,
``optax.inject_hyperparams`` with no extra arguments, ``mask`` meaning the
weight-decay mask as in ``optax.adamw``, bad input named by argument and leaf
path, zero-size leaves, callable pytrees as masks and views, flax msgpack,
state specs on an explicit mesh, and gradients of huge scale.
"""

import dataclasses
import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac

NAMED = tuple(optax_fac.NAMED_OPTIMIZERS)


def make(name, **kwargs):
  return getattr(optax_fac, name)(1e-3, **kwargs)


def params_and_grads():
  p = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
  g = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), p)
  return p, g


@functools.cache
def jitted(name):
  """make(name) and its jitted update, made once per optimizer: the tests that
  step it on params_and_grads() share one compiled program (compilation is
  most of this file's cost)."""
  tx = make(name)
  return tx, jax.jit(tx.update)


def test_every_named_optimizer_is_listed():
  import inspect  # pylint: disable=g-import-not-at-top
  # Each entry is exported under its name.
  for name, factory in optax_fac.NAMED_OPTIMIZERS.items():
    assert name in optax_fac.__all__ and getattr(optax_fac, name) is factory
  # Every exported optimizer (a function taking a learning rate, other than
  # the builder and the weight-decay transform) is in NAMED_OPTIMIZERS.
  exported = {n: getattr(optax_fac, n) for n in optax_fac.__all__}
  optimizers = {
      n for n, f in exported.items()
      if callable(f) and not isinstance(f, type)
      and 'learning_rate' in inspect.signature(f).parameters
      and n not in ('named_optimizer', 'add_decayed_updated_weights')}
  assert optimizers == set(NAMED)


# --------------------------------------------------------------------------
# 1. optax.tree_map_params.


@pytest.mark.parametrize('name', NAMED)
def test_tree_map_params_maps_only_param_shaped_state(name):
  tx, update = jitted(name)
  p, g = params_and_grads()
  state = tx.init(p)
  _, state = update(g, state, p)
  same = optax.tree_map_params(tx, lambda x: x, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  # A function of the params is applied only where the state holds a copy of
  # the params' shapes: every mapped leaf has its parameter's shape.
  seen = []

  def tag(x):
    seen.append(x.shape)
    return x

  optax.tree_map_params(tx, tag, state)
  param_shapes = {x.shape for x in jax.tree.leaves(p)}
  assert set(seen) <= param_shapes, (name, seen)
  # transform_non_params reaches the rest (e.g. P() for specs), and the
  # result has the state's structure as a prefix (what out_shardings takes).
  marked = optax.tree_map_params(tx, lambda x: 'param', state,
                                 transform_non_params=lambda _: 'other')
  assert 'other' in jax.tree.leaves(marked)


def test_tree_map_params_maps_adam_moments_of_the_fallback():
  tx = optax_fac.hfac(1e-3, stack_leaves=False)
  p, _ = params_and_grads()
  state = tx.init(p)
  cast = optax.tree_map_params(
      tx, lambda x: x.astype(jnp.bfloat16), state,
      transform_non_params=lambda x: x)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(cast)}
  assert 'bfloat16' in dtypes     # the fallback's Adam moments (param-shaped)
  hstate = cast[0].inner_states['method'].inner_state
  assert hstate.row['w'].dtype == jnp.float32   # statistics left as they are


# --------------------------------------------------------------------------
# 2. optax.inject_hyperparams with no extra arguments.


@pytest.mark.parametrize('name', NAMED)
def test_inject_hyperparams_without_static_args(name):
  p, g = params_and_grads()
  plain, plain_update = jitted(name)
  injected = optax.inject_hyperparams(getattr(optax_fac, name))(
      learning_rate=1e-3)
  injected_update = jax.jit(injected.update)
  # atol: optax's Adam computes 1 − β2 in float64 for a Python-float β2 and in
  # float32 for an injected one (0.999 rounds to 0.99900001); the fallback's
  # first update differs by ~7e-9 in absolute value.
  want, _ = plain_update(g, plain.init(p), p)
  for init in (injected.init, jax.jit(injected.init)):
    state = init(p)
    u, state = injected_update(g, state, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-7), u, want)
  # The learning rate changed through the state, under jit.
  state = jax.jit(injected.init)(p)
  state.hyperparams['learning_rate'] = jnp.asarray(2e-3)
  u2, _ = injected_update(g, state, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-5,
                                                       atol=1e-8), u2, want)


@pytest.mark.parametrize('name, structural', [
    ('adadiag', dict(max_dim=4096)), ('adam_snsm', dict(rank=2)),
    ('smmf', dict(sign_bits=8)), ('rmsprop_sn', dict(subset_size=2))])
def test_explicit_structural_int_under_inject_hyperparams(name, structural):
  p, g = params_and_grads()
  factory = getattr(optax_fac, name)
  injected = optax.inject_hyperparams(factory)(learning_rate=1e-3, **structural)
  want, _ = factory(1e-3, **structural).update(
      g, factory(1e-3, **structural).init(p), p)
  # A concrete init reads the int; the jitted update reads the state.
  u, _ = jax.jit(injected.update)(g, injected.init(p), p)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, u, want)
  # A jitted init cannot know a traced structural int: the error says what
  # to do, with the exact names.
  (arg,) = structural
  with pytest.raises(ValueError, match=rf"static_args=\('{arg}',\)"):
    jax.jit(injected.init)(p)
  static = optax.inject_hyperparams(factory, static_args=(arg,))(
      learning_rate=1e-3, **structural)
  u, _ = jax.jit(static.update)(g, jax.jit(static.init)(p), p)
  jax.tree.map(close, u, want)


# --------------------------------------------------------------------------
# 3. Names mean what they mean in optax.


@pytest.mark.parametrize('name', NAMED)
def test_mask_is_the_weight_decay_mask_as_in_adamw(name):
  p = {'w': jnp.ones((8, 4)), 'b': jnp.ones(4)}
  zeros = jax.tree.map(jnp.zeros_like, p)
  m = {'w': True, 'b': False}
  want, _ = optax.adamw(0.1, weight_decay=0.5, mask=m).update(
      zeros, optax.adamw(0.1, weight_decay=0.5, mask=m).init(p), p)
  tx = getattr(optax_fac, name)(0.1, weight_decay=0.5, mask=m)
  got, _ = jax.jit(tx.update)(zeros, tx.init(p), p)
  np.testing.assert_array_equal(got['b'], 0.0)        # not decayed
  assert float(jnp.max(jnp.abs(want['b']))) == 0.0
  assert float(jnp.min(got['w'])) < -0.01              # decayed


def test_no_argument_shares_an_optax_name_with_another_meaning():
  import inspect  # pylint: disable=g-import-not-at-top
  for name in NAMED:
    sig = inspect.signature(getattr(optax_fac, name)).parameters
    assert 'weight_decay_mask' not in sig and 'clip_threshold' not in sig
    assert 'method' not in sig, name
    assert 'mask' in sig and 'method_mask' in sig, name
  assert 'clipping_threshold' in inspect.signature(optax_fac.hfac).parameters
  sig = inspect.signature(optax_fac.scale_by_subspace_momentum).parameters
  assert 'basis' in sig and 'method' not in sig


def test_method_mask_selects_the_method():
  p = {'w': jnp.ones((8, 4)), 'e': jnp.ones((8, 4))}
  tx = optax_fac.hfac(1e-3, method_mask={'w': True, 'e': False},
                      stack_leaves=False)
  state = tx.init(p)
  inner = state[0].inner_states
  fallback_mu = inner['fallback'].inner_state.mu
  assert isinstance(fallback_mu['e'], jax.Array)
  assert isinstance(fallback_mu['w'], optax.MaskedNode)
  assert isinstance(inner['method'].inner_state.row['w'], jax.Array)
  assert isinstance(inner['method'].inner_state.row['e'], optax.MaskedNode)


def test_smmf_decay_rate_has_optax_adafactor_sign():
  with pytest.raises(ValueError, match='decay_rate'):
    optax_fac.smmf(1e-3, decay_rate=-0.5)
  optax_fac.smmf(1e-3, decay_rate=0.8)


# --------------------------------------------------------------------------
# 4. Input checks name the argument and the leaf path.


@pytest.mark.parametrize('name', NAMED)
@pytest.mark.parametrize('arg, value', [('b1', 1.5), ('b2', 1.5), ('eps', -1.0),
                                        ('learning_rate', -1.0),
                                        ('weight_decay', -1.0)])
def test_bad_hyperparameters_are_named(name, arg, value):
  import inspect  # pylint: disable=g-import-not-at-top
  factory = getattr(optax_fac, name)
  if arg not in inspect.signature(factory).parameters:
    pytest.skip(f'{name} has no {arg}')
  kwargs = {'learning_rate': 1e-3, arg: value}
  with pytest.raises(ValueError, match=arg):
    factory(**kwargs)


@pytest.mark.parametrize('name', ('adadiag', 'adadiag_pp'))
def test_adadiag_b2_of_one_is_rejected(name):
  with pytest.raises(ValueError, match='b2'):
    getattr(optax_fac, name)(1e-3, b2=1.0)


@pytest.mark.parametrize('name', NAMED)
def test_transposed_gradient_names_the_leaf(name):
  tx = make(name)
  p, _ = params_and_grads()
  state = tx.init(p)
  bad = {'w': jnp.ones((4, 8)), 'b': jnp.ones(4)}
  with pytest.raises(ValueError, match=r"\['w'\]"):
    tx.update(bad, state, p)


@pytest.mark.parametrize('name', NAMED)
def test_mask_tree_missing_a_leaf_names_the_argument(name):
  p, _ = params_and_grads()
  for arg in ('mask', 'method_mask'):
    tx = getattr(optax_fac, name)(1e-3, weight_decay=0.1, **{arg: {'w': True}})
    with pytest.raises(ValueError, match=rf"{arg}.*\['b'\]"):
      tx.init(p)


@pytest.mark.parametrize('name', NAMED)
def test_mask_that_is_not_bools_names_the_argument_and_leaf(name):
  """``...``, a string or an int is truthy but not a mask: refused, not read
  as True (which would give every leaf the method)."""
  p, _ = params_and_grads()
  for arg in ('mask', 'method_mask'):
    for bad, where in ((..., 'the root'), ('x', 'the root'),
                       ({'w': True, 'b': 1}, r"\['b'\]")):
      tx = getattr(optax_fac, name)(1e-3, weight_decay=0.1, **{arg: bad})
      with pytest.raises(ValueError, match=rf'{arg}: a mask holds bools.*'
                         rf'{where}'):
        tx.init(p)


# --------------------------------------------------------------------------
# 5. Zero-size leaves.


@pytest.mark.parametrize('name', NAMED)
def test_zero_size_leaves_are_no_ops(name):
  tx = make(name)
  p = {'w': jnp.ones((8, 16)), 'e': jnp.ones((0, 16)), 'z': jnp.ones((0,))}
  g = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), p)
  state = tx.init(p)
  for _ in range(2):
    u, state = jax.jit(tx.update)(g, state, p)
  assert u['e'].shape == (0, 16) and u['z'].shape == (0,)
  assert bool(jnp.all(jnp.isfinite(u['w'])))
  assert optax_fac.state_size(tx, p) > 0


# --------------------------------------------------------------------------
# 6. Callable pytrees (equinox-style modules) as masks and views.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CallableTree:
  w: object
  b: object

  def __call__(self, x):
    raise AssertionError('a mask tree must not be called')


@pytest.mark.parametrize('name', NAMED)
def test_callable_pytree_masks_are_trees(name):
  p = CallableTree(w=jnp.ones((8, 4)), b=jnp.zeros(4))
  g = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), p)
  tx = getattr(optax_fac, name)(
      1e-3, weight_decay=0.1, mask=CallableTree(w=True, b=False),
      method_mask=CallableTree(w=True, b=True))
  u, _ = jax.jit(tx.update)(g, tx.init(p), p)
  assert u.w.shape == (8, 4)


def test_callable_pytree_views_are_trees():
  p = CallableTree(w=jnp.ones((2, 8, 4)), b=jnp.zeros(4))
  views = CallableTree(w=optax_fac.MatrixView(rows=(1,), cols=(2,),
                                              batch=(0,)), b=None)
  tx = optax_fac.hfac(1e-3, views=views, stack_leaves=False)
  state = tx.init(p)
  assert state[0].inner_states['method'].inner_state.row.w.shape == (2, 8)


# --------------------------------------------------------------------------
# 7. flax msgpack.


@pytest.mark.parametrize('name', NAMED)
def test_flax_msgpack_round_trip(name):
  tx, update = jitted(name)
  p, g = params_and_grads()
  state = tx.init(p)
  _, state = update(g, state, p)
  restored = flax.serialization.from_bytes(tx.init(p),
                                           flax.serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  u1, _ = update(g, state, p)
  u2, _ = update(g, restored, p)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


# --------------------------------------------------------------------------
# 8. Specs on an explicit mesh have the structure of tx.init(params).


@pytest.mark.parametrize('name', NAMED)
def test_specs_match_init_on_explicit_mesh(name):
  mesh = jax.make_mesh((2,), ('x',),
                       axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:2])
  specs = {'a': jax.P('x', None), 'c': jax.P(None, 'x'), 'b': jax.P()}
  tx = make(name)
  with jax.set_mesh(mesh):
    p = {k: jax.device_put(jnp.ones(s), jax.NamedSharding(mesh, specs[k]))
         for k, s in (('a', (8, 6)), ('c', (8, 6)), ('b', (6,)))}
    shardings = optax_fac.state_shardings(tx, p, mesh=mesh, warn=False)
    state = jax.jit(tx.init, out_shardings=shardings)(p)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(p))


# --------------------------------------------------------------------------
# 10. Huge gradients do not poison the state.


@pytest.mark.parametrize('name', NAMED)
def test_huge_gradients_keep_the_state_finite(name):
  tx = make(name)
  p = {"w": jnp.ones((384, 768)), "b": jnp.zeros(768)}  # old sums overflowed
  adam = optax.adamw(1e-3)
  for scale in (1e18,):
    # A full-rank gradient. (A low-rank one concentrates its norm on a few
    # rotated coordinates: Adam in AdaDiag's basis then sees entries up to
    # sqrt(m) times larger, which overflow G̃² at this scale as plain Adam's
    # G² would at that larger scale.)
    g = jax.tree.map(lambda x, s=scale: s * jax.random.normal(
        jax.random.key(0), x.shape), p)
    ua, sa = adam.update(g, adam.init(p), p)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(sa))
    state = tx.init(p)
    step = jax.jit(tx.update)
    u, state = step(g, state, p)
    normal = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), p)
    for _ in range(2):
      u, state = step(normal, state, p)
    for x in jax.tree.leaves((u, state)):
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert bool(jnp.all(jnp.isfinite(x))), name


# --------------------------------------------------------------------------
# Inside optax's own wrappers: leaves masked out arrive as optax.MaskedNode.


@pytest.mark.parametrize('name', NAMED)
def test_inside_optax_masked_and_multi_transform(name):
  params = {'w': jnp.ones((8, 4)), 'bias': jnp.zeros(4),
            'step': jnp.zeros((), jnp.int32)}
  grads = {'w': jnp.ones((8, 4)), 'bias': jnp.ones(4),
           'step': jnp.zeros((), jnp.int32)}
  factory = getattr(optax_fac, name)
  tx = optax.masked(factory(1e-3, weight_decay=0.1),
                    {'w': True, 'bias': True, 'step': False})
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert u['w'].shape == (8, 4) and float(jnp.min(u['w'])) < 0
  mt = optax.multi_transform(
      {'train': factory(1e-3), 'frozen': optax.set_to_zero()},
      {'w': 'train', 'bias': 'frozen', 'step': 'frozen'})
  u, _ = jax.jit(mt.update)(grads, mt.init(params), params)
  assert float(jnp.max(jnp.abs(u['bias']))) == 0.0
  assert float(jnp.min(u['w'])) < 0
