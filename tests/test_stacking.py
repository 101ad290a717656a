"""optax_fac.stack_leaves: same updates as per leaf, stacked state, specs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_fac
from optax_fac import stacking

KEYS = jax.random.split(jax.random.key(0), 8)
# Repeated shapes (a, b, c), a conv kernel, a batch-axis leaf, a bias.
PARAMS = {
    'a': jax.random.normal(KEYS[0], (6, 4)),
    'b': jax.random.normal(KEYS[1], (6, 4)),
    'c': jax.random.normal(KEYS[2], (6, 4)),
    'd': jax.random.normal(KEYS[3], (3, 5)),
    'conv': jax.random.normal(KEYS[4], (2, 2, 3, 4)),
    'stack': jax.random.normal(KEYS[5], (2, 6, 4)),
    'bias': jnp.ones(4),
}
VIEWS = {k: None for k in PARAMS}
VIEWS['stack'] = optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))

# A selection of optax_fac.NAMED_OPTIMIZERS (test_named_are_named_optimizers).
NAMED = ['hfac', 'sign_fsgd', 'lion_factor', 'adafactor_momentum', 'adadiag',
         'hfac_diag']


def test_named_are_named_optimizers():
  assert set(NAMED) <= set(optax_fac.NAMED_OPTIMIZERS)


def _run(tx, steps=4):
  state = tx.init(PARAMS)
  params = PARAMS
  step = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)) + 0.1 * t, params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.slow  # compile-bound: ~30 s in all on 2 cores
@pytest.mark.parametrize('name', NAMED)
def test_stacked_equals_per_leaf(name):
  kwargs = dict(learning_rate=1e-2, weight_decay=0.1, views=VIEWS)
  if name in ('adadiag', 'hfac_diag'):
    kwargs['every'] = 2
  make = getattr(optax_fac, name)
  stacked, s_state = _run(make(**kwargs, stack_leaves=True))
  per_leaf, l_state = _run(make(**kwargs, stack_leaves=False))
  for k in PARAMS:
    np.testing.assert_allclose(stacked[k], per_leaf[k], rtol=2e-6, atol=1e-7,
                               err_msg=f'{name} {k}')
  size = lambda s: sum(x.size for x in jax.tree.leaves(s))
  assert size(s_state) == size(l_state)


def test_groups_and_stacked_state_layout():
  tx = optax_fac.stack_leaves(
      lambda v: optax_fac.scale_by_hfac(views=v), views=VIEWS)
  state = tx.init(PARAMS)
  groups = state.groups
  members = {k: tuple(sorted(PARAMS)[i] for i in idx)
             for k, idx in zip(groups.keys, groups.members)}
  assert ('a', 'b', 'c') in members.values()
  # (2, 6, 4) with a batch view is not grouped with the (6, 4) matrices.
  assert ('stack',) in members.values()
  key_abc = [k for k, m in members.items() if m == ('a', 'b', 'c')][0]
  key_stack = [k for k, m in members.items() if m == ('stack',)][0]
  assert state.inner.row[key_abc].shape == (3, 6)
  assert state.inner.col[key_abc].shape == (3, 4)
  assert state.inner.row[key_stack].shape == (1, 2, 6)   # batch axis kept
  assert state.inner.col[key_stack].shape == (1, 2, 4)


def test_group_cap_splits_groups_and_keeps_updates():
  """stack_leaves=<bytes>: a, b, c (96 bytes each) in groups of <= 200
  bytes are [a, b] and [c]; the updates are the per-leaf ones."""
  kwargs = dict(learning_rate=1e-2, weight_decay=0.1, views=VIEWS)
  capped, c_state = _run(optax_fac.hfac(**kwargs, stack_leaves=200), steps=3)
  per_leaf, _ = _run(optax_fac.hfac(**kwargs, stack_leaves=False), steps=3)
  for k in PARAMS:
    np.testing.assert_allclose(capped[k], per_leaf[k], rtol=2e-6, atol=1e-7,
                               err_msg=k)
  stacked = [s for s in jax.tree.leaves(
      c_state, is_leaf=lambda x: isinstance(x, stacking.StackedState))
             if isinstance(s, stacking.StackedState)][0]
  names = sorted(PARAMS)
  members = [tuple(names[i] for i in idx) for idx in stacked.groups.members]
  assert ('a', 'b') in members and ('c',) in members
  # The default cap (64 MiB) keeps them in one group.
  groups, _ = stacking.group_leaves(PARAMS, VIEWS,
                                    stacking.DEFAULT_MAX_GROUP_BYTES)
  assert (0, 1, 3) in groups.members   # a, b, c (flat order: a, b, bias, c)
  specs = optax_fac.state_partition_specs(
      optax_fac.hfac(**kwargs, stack_leaves=200), PARAMS)
  assert jax.tree.structure(specs) == jax.tree.structure(c_state)


@pytest.mark.parametrize('bad', [0, -3, 1.5, 'yes'])
def test_bad_stack_leaves_is_named(bad):
  with pytest.raises(ValueError, match='stack_leaves'):
    optax_fac.hfac(1e-3, stack_leaves=bad)


def test_split_members_sizes():
  assert stacking.split_members([7], 10**9, 64) == [[7]]  # larger: alone
  assert stacking.split_members([1, 2, 3], 4, None) == [[1, 2, 3]]
  parts = stacking.split_members(list(range(96)), 16 * 2**20, 64 * 2**20)
  assert [len(p) for p in parts] == [4] * 24
  parts = stacking.split_members(list(range(48)), 3, 84)   # 28 a group
  assert [len(p) for p in parts] == [24, 24]
  assert sum(parts, []) == list(range(48))


@pytest.mark.slow  # op by op: ~17 s of compiling on 2 cores
def test_same_as_raw_transform_op_by_op():
  """Eager, one step: the stacked transform is the per-leaf one exactly."""
  raw = optax_fac.scale_by_factored_rms(b1=0.9, clipping_threshold=1.0,
                                        views=VIEWS)
  tx = optax_fac.stack_leaves(
      lambda v: optax_fac.scale_by_factored_rms(b1=0.9, clipping_threshold=1.0,
                                                views=v), views=VIEWS)
  grads = jax.tree.map(jnp.cos, PARAMS)
  want, _ = raw.update(grads, raw.init(PARAMS))
  got, _ = tx.update(grads, tx.init(PARAMS))
  for k in PARAMS:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=k)


def test_init_on_abstract_params_and_mismatch_error():
  tx = optax_fac.hfac(1e-3)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
  shapes = jax.tree.map(lambda x: x.shape, jax.eval_shape(tx.init, abstract))
  assert shapes == jax.tree.map(lambda x: x.shape, tx.init(PARAMS))
  state = tx.init(PARAMS)
  bad = dict(PARAMS, a=jnp.ones((4, 6)))
  with pytest.raises(ValueError, match=r"\['a'\] is 4x6_float32"):
    tx.update(bad, state)


def test_stacked_specs_keep_agreeing_axes_only():
  params = {'q': jax.ShapeDtypeStruct((16, 8), jnp.float32),
            'k': jax.ShapeDtypeStruct((16, 8), jnp.float32),
            'o': jax.ShapeDtypeStruct((16, 8), jnp.float32)}
  specs = {'q': P('data', 'model'), 'k': P('data', 'model'),
           'o': P('data', None)}
  tx = optax_fac.hfac(1e-3)
  out = optax_fac.state_partition_specs(tx, params, specs)
  state = jax.eval_shape(tx.init, params)
  stacked = out[0].inner_states['method'].inner_state
  assert isinstance(stacked, stacking.StackedState)
  # Rows agree on 'data' (kept); columns disagree ('model' vs None): replicated.
  assert set(stacked.inner.row.values()) == {P(None, 'data')}
  assert set(stacked.inner.col.values()) == {P(None, None)}
  # Every spec has the rank of its array.
  flat_specs = jax.tree.leaves(out, is_leaf=lambda s: isinstance(s, P))
  flat_state = jax.tree.leaves(state)
  assert [len(s) for s in flat_specs] == [x.ndim for x in flat_state]
