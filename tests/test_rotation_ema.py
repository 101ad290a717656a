"""svd_rotation(basis_source="ema_gram"): SOAP-style EMA-Gram bases (§3).

The reference is the float64 NumPy transcription
``reference_numpy.ema_gram_rotation`` (written from docs/algorithms.md §3):
L ← β L + (1 − β) G Gᵀ, R ← β R + (1 − β) Gᵀ G every step, P and Q the
canonical eigenbases of L and R at t = 1 and every T steps. Compilation is
most of the cost: small shapes, and one jitted update per configuration.
"""

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
import reference_numpy as ref
import test_rotation
import tree_checks

STACKED_VIEW = optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))
# Square, tall, wide, and a stacked leaf (two 4 x 3 matrices on a batch axis).
SHAPES = {'square': (5, 5), 'tall': (7, 4), 'wide': (3, 6),
          'stacked': (2, 4, 3)}
VIEWS = {'square': None, 'tall': None, 'wide': None, 'stacked': STACKED_VIEW}
STEPS = 7


def _matrices(tree):
  """The leaves as float64 (m, n) matrices, a stacked leaf per element."""
  out = []
  for k in SHAPES:
    x = np.asarray(tree[k], np.float64)
    out.extend(list(x) if x.ndim == 3 else [x])
  return out


TRANSCRIPTION_CONFIGS = [
    # (sides, every, carry, gram_decay, inner name)
    ('one', 3, 'keep', 0.95, 'adam'),
    ('two', 2, 'rotate', 0.9, 'adam'),
    ('two', 3, 'keep', 0.95, 'factored_rms'),
]


@pytest.mark.parametrize('sides,every,carry,decay,inner',
                         TRANSCRIPTION_CONFIGS)
def test_matches_float64_numpy_transcription(sides, every, carry, decay,
                                             inner):
  _, ref_step, ref_kwargs, key = test_rotation._INNERS[inner]
  make_inner = {  # the inner transform sees the same views
      'adam': optax.scale_by_adam,
      'factored_rms': lambda: optax_fac.scale_by_factored_rms(
          b1=0.9, views=VIEWS)}[inner]
  grads = test_rotation._grads(STEPS, seed=11, shapes=SHAPES)
  tx = optax_fac.svd_rotation(make_inner(), sides=sides, every=every,
                              carry=carry, precision='highest', views=VIEWS,
                              basis_source='ema_gram', gram_decay=decay)
  got, state = test_rotation._run_jax(tx, grads)
  want = ref.ema_gram_rotation([_matrices(g) for g in grads], sides=sides,
                               every=every, decay=decay, carry=carry,
                               inner=ref_step, inner_kwargs=ref_kwargs,
                               moment_key=key)
  for t in range(STEPS):
    for i, (g, w) in enumerate(zip(_matrices(got[t]), want[t])):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4,
                                 err_msg=f'step {t + 1}, matrix {i}')
  # The EMA of Gᵀ G of the stacked 4 x 3 leaf (its shorter side), per
  # batch element.
  mats = [_matrices(g)[-2:] for g in grads]
  want_r = sum((1 - decay) * decay ** (STEPS - 1 - t) * np.stack(
      [a.T @ a for a in mats[t]]) for t in range(STEPS))
  np.testing.assert_allclose(state.gram_right['stacked'], want_r, rtol=1e-5,
                             atol=1e-6)
  assert int(state.skipped_refreshes) == 0


@pytest.mark.slow  # two more compilations: ~5 s on 2 cores
def test_zero_decay_is_the_gradient_basis():
  """β = 0: L = G Gᵀ, so the bases (and the refresh masks) are the gradient
  source's; rank-deficient and two-sided, so the masks matter."""
  rng = np.random.default_rng(12)
  low = lambda m, n: (rng.normal(size=(m, 1)) @ rng.normal(size=(1, n)))
  grads = [{'a': jnp.asarray(low(5, 5), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)}
           for _ in range(4)]
  outs = {}
  for source in ('gradient', 'ema_gram'):
    tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides='two', every=2,
                                precision='highest', basis_source=source,
                                gram_decay=0.0)
    outs[source], _ = test_rotation._run_jax(tx, grads)
  tree_checks.assert_trees_all_close(outs['ema_gram'], outs['gradient'],
                                     rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Named optimizers: pass-through, stacking, state sizes, sharding.


@pytest.mark.slow  # two more compilations: ~5 s on 2 cores
def test_named_optimizers_stacked_equal_per_leaf():
  params = {'a': jnp.zeros((4, 6)), 'b': jnp.zeros((4, 6)),
            'c': jnp.zeros((6, 3)), 'v': jnp.zeros(3)}
  grads = test_rotation._grads(5, seed=13, shapes={
      k: v.shape for k, v in params.items()})
  outs = {}
  for stack in (True, False):
    tx = optax_fac.adadiag_pp(learning_rate=1e-2, every=2,
                              precision='highest', stack_leaves=stack,
                              basis_source='ema_gram')
    outs[stack], state = test_rotation._run_jax(tx, grads, params)
    rot = [s for s in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, optax_fac.SvdRotationState))
           if isinstance(s, optax_fac.SvdRotationState)]
    assert len(rot) == 1
    shapes = sorted(x.shape for x in jax.tree.leaves(
        (rot[0].gram_left, rot[0].gram_right)))
    if stack:  # the (4, 6) group of two, and 'c' alone
      assert shapes == [(1, 3, 3), (1, 6, 6), (2, 4, 4), (2, 6, 6)], shapes
    else:
      assert shapes == [(3, 3), (4, 4), (4, 4), (6, 6), (6, 6), (6, 6)]
  tree_checks.assert_trees_all_close(outs[True], outs[False], rtol=1e-5,
                                     atol=1e-6)


def _two_sided(make):
  sides = inspect.signature(make).parameters.get('sides')
  return sides is not None and sides.default == 'two'


EMA_FORMULAS = [
    # (factory, the gradient source's per-matrix formula, two-sided)
    (make, formula, _two_sided(make))
    for make, formula in test_rotation.STATE_FORMULAS]


@pytest.mark.parametrize('make,per_matrix,two', EMA_FORMULAS)
def test_state_sizes_llama60m(make, per_matrix, two):
  """The gradient source's formula + one Gram matrix per rotated side."""
  tree = test_rotation.llama_tree()
  mask = test_rotation.not_embedding
  want = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    is_embedding = jax.tree_util.keystr(path) in ("['embed']", "['lm_head']")
    if len(leaf.shape) == 2 and not is_embedding:
      m, n = leaf.shape
      sq = test_rotation._sq
      want += per_matrix(m, n) + (sq(m) + sq(n) if two else sq(min(m, n)))
    else:
      want += 2 * int(np.prod(leaf.shape))   # the Adam fallback
  tx = make(learning_rate=1e-3, method_mask=mask, basis_source='ema_gram')
  assert optax_fac.state_elements(tx, tree) == want
  # In bytes: exactly 4 bytes per Gram entry more than the gradient source.
  base = make(learning_rate=1e-3, method_mask=mask)
  extra = want - optax_fac.state_elements(base, tree)
  assert (optax_fac.state_size(tx, tree) - optax_fac.state_size(base, tree)
          == 4 * extra)


def test_state_size_with_max_dim_and_a_stacked_leaf():
  params = {'w': jnp.zeros((2, 4, 6)), 'emb': jnp.zeros((40, 6)),
            'b': jnp.zeros(6)}
  views = {'w': STACKED_VIEW, 'emb': None, 'b': None}
  for sides, floats in (('one', 2 * 16 + 36), ('two', 2 * (16 + 36) + 36)):
    tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides,
                                max_dim=16, views=views,
                                basis_source='ema_gram')
    base = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides,
                                  max_dim=16, views=views)
    assert (optax_fac.state_size(tx, params)
            - optax_fac.state_size(base, params)) == 4 * floats, sides


def test_state_partition_specs_cover_the_gram_matrices():
  params = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32),
            'b': jax.ShapeDtypeStruct((4,), jnp.float32)}
  specs = {'w': jax.P('data', None), 'b': jax.P()}
  for stack, want_l, want_r in ((True, jax.P(None, 'data', None),
                                 jax.P(None, None, None)),
                                (False, jax.P('data', None),
                                 jax.P(None, None))):
    tx = optax_fac.adadiag_pp(1e-3, stack_leaves=stack,
                              basis_source='ema_gram')
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # no state leaf without a rule
      out = optax_fac.state_partition_specs(tx, params, specs)
    rot = [s for s in jax.tree.leaves(
        out, is_leaf=lambda x: isinstance(x, optax_fac.SvdRotationState))
           if isinstance(s, optax_fac.SvdRotationState)][0]
    is_p = lambda x: isinstance(x, jax.P)
    assert jax.tree.leaves(rot.gram_left, is_leaf=is_p) == [want_l]
    assert jax.tree.leaves(rot.gram_right, is_leaf=is_p) == [want_r]
    assert (jax.tree.leaves(rot.gram_left, is_leaf=is_p)
            == jax.tree.leaves(rot.left, is_leaf=is_p))


# --------------------------------------------------------------------------
# Non-finite gradients, one cond, argument checks.


@functools.lru_cache(maxsize=None)
def _nonfinite_setup():
  params = {'w': jnp.zeros((4, 3)), 's': jnp.zeros((2, 3, 5))}
  tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides='two', every=2,
                              views={'w': None, 's': STACKED_VIEW},
                              basis_source='ema_gram')
  return params, tx, jax.jit(tx.update)


def test_nonfinite_gradient_never_enters_the_ema():
  params, tx, update = _nonfinite_setup()
  good = test_rotation._grads(5, seed=14, shapes={'w': (4, 3),
                                                  's': (2, 3, 5)})
  fields = lambda s: (s.gram_left, s.gram_right, s.left, s.right)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: np.full_like(x, np.nan), good[0])
  _, s1 = update(bad, state)           # t = 1 (a refresh), all NaN
  tree_checks.assert_trees_all_equal(fields(s1), fields(state))
  assert int(s1.skipped_refreshes) == 1
  _, s2 = update(good[1], s1)          # t = 2: the EMA starts from zero
  _, s3 = update(good[2], s2)          # t = 3: a refresh
  assert int(s3.skipped_refreshes) == 1
  _, s4 = update(bad, s3)              # t = 4, not a refresh: all kept
  tree_checks.assert_trees_all_equal(fields(s4), fields(s3))
  assert int(s4.skipped_refreshes) == 2
  one = {k: np.array(v) for k, v in good[3].items()}
  one['s'][1, 2, 0] = np.inf           # one batch element of 's'
  _, s5 = update(one, s4)              # t = 5, a refresh
  assert int(s5.skipped_refreshes) == 3  # once for the step
  for f5, f4 in zip(fields(s5), fields(s4)):
    np.testing.assert_array_equal(f5['s'][1], f4['s'][1])
    assert not np.array_equal(f5['s'][0], f4['s'][0])
    assert not np.array_equal(f5['w'], f4['w'])
  tree_checks.assert_tree_all_finite(fields(s5))
  _, s6 = update(good[4], s5)
  assert int(s6.skipped_refreshes) == 3


def test_one_cond_and_eigh_only_in_the_branch():
  params = {'a': jnp.ones((8, 16)), 'b': jnp.ones((8, 16)),
            'd': jnp.ones((8, 8)), 'v': jnp.ones(3)}
  tx = optax_fac.adadiag(1e-3, basis_source='ema_gram', stack_leaves=False)
  text = jax.jit(tx.update).lower(params, tx.init(params),
                                  params).compile().as_text()
  assert text.count(' conditional(') == 1
  assert text.count('syevd') == 1   # the three 8 x 8 EMAs in one call
  assert test_rotation._eigh_in_branch_only(text)


@pytest.mark.parametrize('kwargs,name', [
    (dict(basis_source='soap'), 'basis_source'),
    (dict(basis_source='ema_gram', basis='svd'), 'eigh'),
    (dict(basis_source='ema_gram', basis='identity'), 'eigh'),
    (dict(basis_source='ema_gram', gram_decay=1.0), 'gram_decay'),
    (dict(basis_source='ema_gram', gram_decay=-0.1), 'gram_decay')])
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_fac.svd_rotation(optax.scale_by_adam(), **kwargs)
  with pytest.raises(ValueError, match=name):
    optax_fac.adadiag(1e-3, **kwargs)


def test_default_state_has_no_gram_matrices():
  state = optax_fac.svd_rotation(optax.scale_by_adam()).init(
      {'w': jnp.zeros((4, 6))})
  assert state.gram_left is None and state.gram_right is None
