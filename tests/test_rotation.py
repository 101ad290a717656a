"""Tests of svd_rotation and the AdaDiag family (docs/algorithms.md §3).

The reference below is an independent float64 NumPy transcription of §3
(full SVD, sign convention, refresh at t = 1 and every T steps, diagonal of
the two-sided rotated gradient at a refresh, optional carry of the first
moment), using the per-matrix inner steps of tests/reference_numpy.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
import reference_numpy as ref
import test_bases
import tree_checks
from optax_fac import rotation

# --------------------------------------------------------------------------
# Float64 NumPy transcription of §3.


def ref_sign_fix(vecs):
  """Flip each column so that its largest-magnitude entry is positive."""
  idx = np.argmax(np.abs(vecs), axis=0)
  pivot = vecs[idx, np.arange(vecs.shape[1])]
  return vecs * np.where(pivot < 0, -1.0, 1.0)


def ref_sides(m, n, sides, max_dim):
  if sides == 'one':
    return (m <= n and m <= max_dim), (n < m and n <= max_dim)
  return m <= max_dim, n <= max_dim


def ref_rotation(grads, *, sides, every, max_dim=8192, carry='keep',
                 inner=ref.adam_step, inner_kwargs=None, moment_key='m',
                 refresh_at=None):
  """Runs §3 on a list (steps) of lists (leaves) of float64 matrices.

  ``refresh_at(t, i)``: whether leaf i refreshes at step t (default: the
  paper's (t − 1) mod every = 0 for every leaf).
  """
  inner_kwargs = inner_kwargs or {}
  n_leaves = len(grads[0])
  bases = [None] * n_leaves
  states = [{} for _ in range(n_leaves)]
  out = []
  for t, step_grads in enumerate(grads, start=1):
    step_out = []
    for i, g in enumerate(step_grads):
      m, n = g.shape
      left, right = ref_sides(m, n, sides, max_dim)
      if bases[i] is None:
        bases[i] = (np.eye(m), np.eye(n))
      p, q = bases[i]
      refresh = (refresh_at(t, i) if refresh_at is not None
                 else (t - 1) % every == 0)
      if refresh:
        # The canonical basis (docs/algorithms.md §3): singular vectors above
        # the rank tolerance, then the canonical completion (test_bases.py).
        new_p, rank_p = (test_bases.np_canonical_basis(g, 'left') if left
                         else (np.eye(m), m))
        new_q, rank_q = (test_bases.np_canonical_basis(g, 'right') if right
                         else (np.eye(n), n))
        if carry == 'rotate' and moment_key in states[i]:
          mom = p @ states[i][moment_key] @ q.T
          states[i][moment_key] = new_p.T @ mom @ new_q
        p, q = new_p, new_q
        bases[i] = (p, q)
      gt = p.T @ g @ q
      if refresh and left and right:
        gt = np.diag(np.diag(gt)) if m == n else _rect_diag(gt)
      if refresh:  # beyond the rank of this G, the rotated G is roundoff
        gt[rank_p:, :] = 0.0
        gt[:, rank_q:] = 0.0
      dt, states[i] = inner(gt, states[i], t, **inner_kwargs)
      step_out.append(p @ dt @ q.T)
    out.append(step_out)
  return out


def _rect_diag(x):
  y = np.zeros_like(x)
  k = min(x.shape)
  y[np.arange(k), np.arange(k)] = x[np.arange(k), np.arange(k)]
  return y


# Tall, wide, square matrices and a conv kernel (viewed as (2*2*3, 4)).
SHAPES = {'tall': (7, 4), 'wide': (3, 6), 'square': (5, 5),
          'conv': (2, 2, 3, 4)}


def _as_matrix(x):
  x = np.asarray(x, np.float64)
  return x.reshape(-1, x.shape[-1])


def _grads(steps, seed=0, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
          for _ in range(steps)]


def _run_jax(tx, grads, params=None):
  params = params or jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = update(g, state, params)
    outs.append(u)
  return outs, state


TRANSCRIPTION_CONFIGS = [
    # (sides, basis, carry, max_dim, inner name)
    ('one', 'svd', 'keep', 8192, 'adam'),
    ('one', 'eigh', 'keep', 8192, 'adam'),
    ('two', 'svd', 'keep', 8192, 'adam'),
    ('one', 'svd', 'rotate', 8192, 'adam'),
    ('two', 'svd', 'rotate', 5, 'adam'),
    ('one', 'eigh', 'keep', 8192, 'factored_rms'),
    ('two', 'svd', 'keep', 8192, 'hfac'),
]

_INNERS = {
    'adam': (lambda: optax.scale_by_adam(), ref.adam_step, {}, 'm'),
    'factored_rms': (lambda: optax_fac.scale_by_factored_rms(b1=0.9),
                     ref.factored_rms_step, dict(b1=0.9), 'M'),
    'hfac': (lambda: optax_fac.scale_by_hfac(), ref.hfac_step, {}, 'u'),
}


@pytest.mark.parametrize('sides,basis,carry,max_dim,inner', TRANSCRIPTION_CONFIGS)
def test_matches_float64_numpy_transcription(sides, basis, carry, max_dim,
                                             inner):
  make_inner, ref_step, ref_kwargs, key = _INNERS[inner]
  grads = _grads(12)
  tx = optax_fac.svd_rotation(make_inner(), sides=sides, every=5,
                              max_dim=max_dim, basis=basis, carry=carry,
                              precision='highest')
  got, _ = _run_jax(tx, grads)
  names = list(SHAPES)
  want = ref_rotation([[_as_matrix(g[k]) for k in names] for g in grads],
                      sides=sides, every=5, max_dim=max_dim, carry=carry,
                      inner=ref_step, inner_kwargs=ref_kwargs, moment_key=key)
  for t in range(12):
    for i, k in enumerate(names):
      np.testing.assert_allclose(_as_matrix(got[t][k]), want[t][i],
                                 rtol=2e-4, atol=2e-4,
                                 err_msg=f'step {t + 1}, leaf {k}')


@pytest.mark.parametrize('sides,carry', [('one', 'keep'), ('two', 'rotate')])
def test_stagger_spreads_refreshes_and_matches_transcription(sides, carry):
  # Four rotated leaves (tree order: conv, square, tall, wide), period 3:
  # offsets floor(r * 3 / 4) = 0, 0, 1, 2, so leaf r refreshes at t = 1 and
  # t = 1 + o_r + 3k.
  every, steps, names = 3, 9, sorted(SHAPES)
  offsets = {k: r * every // len(names) for r, k in enumerate(names)}
  assert list(offsets.values()) == [0, 0, 1, 2]
  grads = _grads(steps, seed=4)
  tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides,
                              every=every, carry=carry, precision='highest',
                              stagger=True)
  got, _ = _run_jax(tx, grads)
  due = lambda t, i: t == 1 or (t - 1 - offsets[names[i]]) % every == 0
  want = ref_rotation([[_as_matrix(g[k]) for k in names] for g in grads],
                      sides=sides, every=every, carry=carry,
                      refresh_at=due)
  for t in range(steps):
    for i, k in enumerate(names):
      np.testing.assert_allclose(_as_matrix(got[t][k]), want[t][i],
                                 rtol=2e-4, atol=2e-4,
                                 err_msg=f'step {t + 1}, leaf {k}')
  # Which bases changed at which step: the schedule itself.
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state, update = tx.init(params), jax.jit(tx.update)
  side = 'left' if sides == 'two' else None
  for t, g in enumerate(grads, start=1):
    before = state
    _, state = update(g, state)
    for k in names:
      b = side or ('left' if state.left[k] is not None else 'right')
      changed = not np.array_equal(getattr(state, b)[k],
                                   getattr(before, b)[k])
      assert changed == due(t, names.index(k)), (t, k)


def test_stagger_off_is_one_cond_and_on_is_one_per_leaf():
  # Three one-sided (8, 16) leaves and a (5, 7): without stagger one cond
  # and two batched decompositions (the three size-8 Gram matrices, the
  # size-5 one); with it a cond and a decomposition per leaf.
  params = {'a': jnp.ones((8, 16)), 'b': jnp.ones((8, 16)),
            'c': jnp.ones((16, 8)), 'e': jnp.ones((5, 7)), 'v': jnp.ones(3)}
  for stagger, conds, calls in ((False, 1, 2), (True, 4, 4)):
    tx = optax_fac.svd_rotation(optax.scale_by_adam(), stagger=stagger)
    text = jax.jit(tx.update).lower(params, tx.init(params)).compile(
        ).as_text()
    assert text.count(' conditional(') == conds, stagger
    assert text.count('syevd') == calls, stagger
    assert _eigh_in_branch_only(text)
  with pytest.raises(ValueError, match='stagger must be a bool'):
    optax_fac.svd_rotation(optax.scale_by_adam(), stagger='yes')


@pytest.mark.slow  # op by op in float64: ~20 s of compiling on 2 cores
def test_two_sided_first_step_is_polar_factor_float64():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    for shape in ((6, 4), (4, 6), (5, 5)):
      g = rng.normal(size=shape)
      u, _, vt = np.linalg.svd(g, full_matrices=False)
      for basis in ('svd', 'eigh'):
        tx = optax_fac.svd_rotation(
            optax.scale_by_adam(eps=1e-30), sides='two', basis=basis,
            basis_dtype=jnp.float64, precision='highest')
        params = jnp.zeros(shape, jnp.float64)
        d, _ = tx.update(jnp.asarray(g), tx.init(params))
        assert d.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(d), u @ vt, atol=1e-9)
  # The named optimizer, float32: the first step is −η U Vᵀ.
  g = rng.normal(size=(6, 4)).astype(np.float32)
  u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  tx = optax_fac.adadiag_pp(learning_rate=1.0, eps=1e-30, precision='highest')
  w = jnp.zeros((6, 4))
  d, _ = tx.update(jnp.asarray(g), tx.init(w), w)
  np.testing.assert_allclose(np.asarray(d), -u @ vt, atol=2e-5)


def test_bf16_precision_rounds_operands_and_accumulates_in_float32():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(64, 48)).astype(np.float32)
  b = rng.normal(size=(48, 32)).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  got = rotation._dot(jnp.asarray(a), jnp.asarray(b), dims,
                      lambda: (None, None), rotation.BF16_OPERANDS)
  assert got.dtype == jnp.float32
  bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(got), bf(a) @ bf(b), rtol=1e-5,
                             atol=1e-5)
  full = a.astype(np.float64) @ b.astype(np.float64)
  assert np.abs(np.asarray(got) - full).max() > 1e-3  # really rounded
  # End to end: the named optimizer's update is close to full float32.
  params = {'w': jnp.zeros((24, 16)), 'b': jnp.zeros((16,))}
  grads = {'w': jnp.asarray(rng.normal(size=(24, 16)), jnp.float32),
           'b': jnp.ones((16,))}
  ups = {}
  for precision in ('highest', 'bf16'):
    tx = optax_fac.adadiag(learning_rate=1.0, precision=precision)
    ups[precision], _ = tx.update(grads, tx.init(params), params)
  w_hi, w_bf = np.asarray(ups['highest']['w']), np.asarray(ups['bf16']['w'])
  assert np.isfinite(w_bf).all()
  np.testing.assert_allclose(w_bf, w_hi, atol=3e-2 * np.abs(w_hi).max())
  assert not np.array_equal(w_bf, w_hi)


@pytest.mark.parametrize('sides', ['one', 'two'])
def test_eigh_and_svd_bases_give_the_same_updates(sides):
  # Two-sided: square matrices only (for m != n the complement of the
  # longer side is an arbitrary basis of a null space, differently chosen by
  # the two methods).
  shapes = (SHAPES if sides == 'one'
            else {'a': (5, 5), 'b': (4, 4), 'conv': (2, 2, 2, 8)})
  grads = _grads(7, seed=4, shapes=shapes)
  outs = {}
  for basis in ('svd', 'eigh'):
    tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides, every=3,
                                basis=basis, precision='highest')
    outs[basis], _ = _run_jax(tx, grads)
  tree_checks.assert_trees_all_close(outs['eigh'], outs['svd'], rtol=1e-4,
                                     atol=1e-4)


# --------------------------------------------------------------------------
# With P = Q = I each named optimizer is its base optimizer, exactly.


def _mixed_params():
  rng = np.random.default_rng(5)
  shapes = {'w': (6, 4), 'wide': (3, 5), 'conv': (2, 2, 3, 4), 'b': (4,),
            's': ()}
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in shapes.items()}


def _trajectory(tx, params, steps=6, jit=True):
  state = tx.init(params)

  def step(params, state, i):
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p * (i + 1.0)) + 0.1 * p,
                         params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  step = jax.jit(step) if jit else step
  out = []
  for i in range(steps):
    params, updates, state = step(params, state, jnp.float32(i))
    out.append(updates)
  return out


IDENTITY_PAIRS = [
    ('adadiag', lambda **k: optax_fac.adadiag(**k),
     lambda **k: optax.adamw(**k)),
    ('adadiag_pp', lambda **k: optax_fac.adadiag_pp(**k),
     lambda **k: optax.adamw(**k)),
    ('adafac_diag', lambda **k: optax_fac.adafac_diag(**k),
     lambda **k: optax_fac.adafactor_momentum(**k)),
    ('adafac_diag_no_momentum',
     lambda **k: optax_fac.adafac_diag(b1=None, **k),
     lambda **k: optax_fac.adafactor_momentum(b1=None, **k)),
    ('adafac_diag_pp', lambda **k: optax_fac.adafac_diag_pp(**k),
     lambda **k: optax_fac.adafactor_momentum(**k)),
    ('hfac_diag', lambda **k: optax_fac.hfac_diag(**k),
     lambda **k: optax_fac.hfac(**k)),
]


@pytest.mark.parametrize('name,rotated,base', IDENTITY_PAIRS,
                         ids=[p[0] for p in IDENTITY_PAIRS])
def test_identity_basis_equals_base_optimizer(name, rotated, base):
  del name
  params = _mixed_params()
  kwargs = dict(learning_rate=1e-2, weight_decay=0.1)
  # Op by op (no jit): XLA fuses the two programs differently, and a fused
  # multiply-add here or there would change the last bit.
  got = _trajectory(rotated(basis='identity', precision='highest', **kwargs),
                    params, jit=False)
  want = _trajectory(base(**kwargs), params, jit=False)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # op by op and jitted: ~10 s a case on 2 cores
@pytest.mark.parametrize('inner', [
    optax.scale_by_adam, optax.scale_by_lion,
    lambda: optax_fac.scale_by_factored_rms(b1=0.9),
    optax_fac.scale_by_hfac])
def test_any_shape_preserving_inner_works(inner):
  params = _mixed_params()
  got = _trajectory(optax_fac.svd_rotation(inner(), basis='identity',
                                           precision='highest'), params, 3,
                    jit=False)
  want = _trajectory(inner(), params, 3, jit=False)
  tree_checks.assert_trees_all_equal(got, want)
  # And with a real basis: finite, and non-matrix leaves are not rotated.
  tx = optax_fac.svd_rotation(inner(), sides='two', every=2)
  tree_checks.assert_tree_all_finite(_trajectory(tx, params, 3))
  grads = jax.tree.map(lambda p: jnp.cos(p), params)
  got, _ = jax.jit(tx.update)(grads, tx.init(params))
  want, _ = jax.jit(inner().update)(grads, inner().init(params))
  for k in ('b', 's'):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  assert not np.allclose(got['w'], want['w'])


# --------------------------------------------------------------------------
# Structure: views with batch axes, refresh schedule, sign convention,
# non-finite decompositions, one cond.


@pytest.mark.parametrize('sides', ['one', 'two'])
def test_stacked_leaf_equals_separate_leaves(sides):
  rng = np.random.default_rng(6)
  stacked = rng.normal(size=(3, 4, 6)).astype(np.float32)
  grads = [jnp.asarray(stacked * (1 + 0.3 * t)) for t in range(4)]
  view = optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))
  tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides, every=2,
                              views=view, precision='highest')
  got, state = _run_jax(tx, grads)
  assert state.left.shape == (3, 4, 4)
  tx1 = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides, every=2,
                               precision='highest')
  sep, _ = _run_jax(tx1, [[g[i] for i in range(3)] for g in grads])
  for t in range(4):
    np.testing.assert_allclose(got[t], np.stack(sep[t]), rtol=1e-5,
                               atol=1e-6)


def test_refresh_schedule_sign_convention_and_orthogonality():
  grads = _grads(8, seed=7, shapes={'w': (4, 6)})
  tx = optax_fac.svd_rotation(optax.scale_by_adam(), every=3)
  params = {'w': jnp.zeros((4, 6))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  prev = state.left['w']
  for t, g in enumerate(grads, start=1):
    _, state = update(g, state)
    p = np.asarray(state.left['w'])
    changed = not np.array_equal(p, prev)
    assert changed == ((t - 1) % 3 == 0), t
    np.testing.assert_allclose(p.T @ p, np.eye(4), atol=1e-5)
    idx = np.argmax(np.abs(p), axis=0)
    assert np.all(p[idx, np.arange(4)] > 0)
    prev = p
  assert state.right['w'] is None


def test_non_finite_decomposition_keeps_previous_basis():
  tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides='two', every=1)
  params = jnp.zeros((4, 3))
  state = tx.init(params)
  bad = jnp.full((4, 3), jnp.nan)
  _, s1 = tx.update(bad, state)      # t = 1: identity kept
  np.testing.assert_array_equal(s1.left, np.eye(4))
  np.testing.assert_array_equal(s1.right, np.eye(3))
  good = jnp.asarray(np.random.default_rng(8).normal(size=(4, 3)),
                     jnp.float32)
  _, s2 = tx.update(good, state)
  _, s3 = tx.update(bad, s2)         # refresh from NaN: s2's basis kept
  np.testing.assert_array_equal(s3.left, s2.left)
  np.testing.assert_array_equal(s3.right, s2.right)


def test_long_sides_stay_unrotated():
  params = {'emb': jnp.zeros((40, 6)), 'w': jnp.zeros((6, 8)),
            'big': jnp.zeros((20, 30))}
  for sides, want in (('one', {'emb': (None, (6, 6)), 'w': ((6, 6), None),
                               'big': (None, None)}),
                      ('two', {'emb': (None, (6, 6)), 'w': ((6, 6), (8, 8)),
                               'big': (None, None)})):
    state = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides,
                                   max_dim=16).init(params)
    for k, (l, r) in want.items():
      assert (None if state.left[k] is None else state.left[k].shape) == l
      assert (None if state.right[k] is None else state.right[k].shape) == r
  assert rotation.rotated_sides((5, 5)) == (True, False)  # tie: rows
  assert rotation.rotated_sides((5,)) == (False, False)


def _eigh_in_branch_only(hlo_text):
  entry = hlo_text[hlo_text.index('ENTRY'):]
  entry = entry[:entry.index('\n}')]
  return 'syevd' not in entry and 'gesdd' not in entry


def test_one_cond_and_batched_decompositions_in_hlo():
  params = {'a': jnp.ones((8, 16)), 'b': jnp.ones((8, 16)),
            'c': jnp.ones((16, 8)), 'd': jnp.ones((8, 8)),
            'e': jnp.ones((5, 7)), 'v': jnp.ones(3)}
  for basis, calls in (('eigh', 2), ('svd', 4), ('identity', 0)):
    tx = optax_fac.adadiag(1e-3, basis=basis)
    text = jax.jit(tx.update).lower(params, tx.init(params),
                                    params).compile().as_text()
    assert text.count(' conditional(') == (basis != 'identity')
    # eigh: the four Gram matrices of size 8 go to one batched call, the
    # (5, 5) one to another; svd batches equal (m, n) shapes.
    assert text.count('syevd') + text.count('gesdd') == calls
    assert _eigh_in_branch_only(text)


def test_multisteps_decomposes_only_on_refresh_real_steps(monkeypatch):
  calls = []
  original = rotation.eigh_descending

  def counted(gram):
    jax.debug.callback(lambda: calls.append(1))
    return original(gram)

  monkeypatch.setattr(rotation, 'eigh_descending', counted)
  k, every = 3, 2
  tx = optax_fac.adadiag(learning_rate=1e-2, every=every,
                         precision='highest')
  ms = optax.MultiSteps(tx, every_k_schedule=k)
  params = {'w': jnp.zeros((4, 6)), 'b': jnp.zeros(3)}
  micro = _grads(4 * k, seed=9, shapes={'w': (4, 6), 'b': (3,)})
  state = ms.init(params)
  update = jax.jit(ms.update)
  plain_state = tx.init(params)
  plain_update = jax.jit(tx.update)
  for real in range(4):
    before = len(calls)
    for j in range(k):
      u, state = update(micro[real * k + j], state, params)
    jax.effects_barrier()
    refresh = real % every == 0
    # The counter advances only on real steps: a refresh real step
    # decomposes on each of its k micro-steps, the others never.
    assert len(calls) - before == (k if refresh else 0), real
    # What MultiSteps keeps is the basis of the full accumulated gradient.
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro[real * k:(real + 1) * k])
    before = len(calls)
    pu, plain_state = plain_update(mean, plain_state, params)
    jax.effects_barrier()
    assert len(calls) - before == (1 if refresh else 0)
    tree_checks.assert_trees_all_close(u, pu, rtol=1e-4, atol=1e-6)


def test_carry_rotate_needs_a_first_moment():
  with pytest.raises(ValueError, match='carry'):
    optax_fac.svd_rotation(optax_fac.scale_by_hfac(), carry='rotate').init(
        jnp.zeros((3, 4)))


@pytest.mark.parametrize('kwargs,name', [
    (dict(sides='three'), 'sides'), (dict(basis='qr'), 'basis'),
    (dict(carry='reset'), 'carry'), (dict(every=0), 'every'),
    (dict(max_dim=-1), 'max_dim'), (dict(precision='fp32'), 'precision')])
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_fac.svd_rotation(optax.scale_by_adam(), **kwargs)


def test_state_partition_specs_cover_the_bases():
  params = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32),
            'b': jax.ShapeDtypeStruct((4,), jnp.float32)}
  specs = {'w': jax.P('data', None), 'b': jax.P()}
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    out = optax_fac.state_partition_specs(optax_fac.adadiag_pp(1e-3), params,
                                          specs)
  flat = [s for s in jax.tree.leaves(
      out, is_leaf=lambda x: isinstance(x, jax.P))]
  # P (1, 8, 8) of the stacked group: rows follow the params', behind the
  # replicated group axis.
  assert jax.P(None, 'data', None) in flat
  out = optax_fac.state_partition_specs(
      optax_fac.adadiag_pp(1e-3, stack_leaves=False), params, specs)
  flat = [s for s in jax.tree.leaves(
      out, is_leaf=lambda x: isinstance(x, jax.P))]
  assert jax.P('data', None) in flat   # P (8, 8): rows follow the params'


# --------------------------------------------------------------------------
# State sizes: LLaMA-60M formulas and the memory table of docs/algorithms.md §6.


def llama_tree(d=512, ffn=1376, layers=8, vocab=32000):
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {'embed': f(vocab, d), 'final_norm': f(d), 'lm_head': f(d, vocab)}
  for i in range(layers):
    tree[f'layer{i}'] = {
        'q': f(d, d), 'k': f(d, d), 'v': f(d, d), 'o': f(d, d),
        'gate': f(d, ffn), 'up': f(d, ffn), 'down': f(ffn, d),
        'attn_norm': f(d), 'mlp_norm': f(d)}
  return tree


def not_embedding(tree):
  """The papers' LLaMA recipe: the embedding and LM head keep Adam."""
  return {k: (jax.tree.map(lambda _: k not in ('embed', 'lm_head'), v))
          for k, v in tree.items()}


def _sq(k, max_dim=8192):
  return k * k if k <= max_dim else 0


STATE_FORMULAS = [
    (optax_fac.adadiag, lambda m, n: 2 * m * n + _sq(min(m, n))),
    (optax_fac.adadiag_pp, lambda m, n: 2 * m * n + _sq(m) + _sq(n)),
    (functools.partial(optax_fac.adafac_diag, b1=None),
     lambda m, n: m + n + _sq(min(m, n))),
    (optax_fac.adafac_diag, lambda m, n: m * n + m + n + _sq(min(m, n))),
    (functools.partial(optax_fac.adafac_diag_pp, b1=None),
     lambda m, n: m + n + _sq(m) + _sq(n)),
    (optax_fac.hfac_diag, lambda m, n: 2 * (m + n) + _sq(min(m, n))),
]


@pytest.mark.parametrize('make,per_matrix', STATE_FORMULAS)
@pytest.mark.parametrize('paper_mask', [False, True])
def test_state_sizes_llama60m(make, per_matrix, paper_mask):
  tree = llama_tree()
  want = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    is_embedding = jax.tree_util.keystr(path) in ("['embed']", "['lm_head']")
    if len(leaf.shape) == 2 and not (paper_mask and is_embedding):
      want += per_matrix(*leaf.shape)
    else:
      want += 2 * int(np.prod(leaf.shape))   # the Adam fallback
  tx = make(learning_rate=1e-3, method_mask=not_embedding if paper_mask else None)
  assert optax_fac.state_elements(tx, tree) == want


# docs/algorithms.md §6: LLaMA 1.3B, BF16 state, the embedding and LM head keep
# Adam states. The published "G" is 1024 MB of 10^6 bytes (1.024e9 bytes):
# with that unit every entry of the table is reproduced to its two decimals.
PUBLISHED_1B = {'adam': 5.23, 'adadiag': 6.61, 'adadiag_pp': 11.59,
                'adafactor_no_momentum': 0.26, 'hfac': 0.52, 'hfac_diag': 1.89}
PAPER_G = 1024 * 10 ** 6


def memory_table_optimizers():
  """The optimizers of the §6 table, with the papers' embedding rule."""
  lr = 1e-3
  m = not_embedding
  return {
      'adam': optax.adamw(lr),
      'adadiag': optax_fac.adadiag(lr, method_mask=m),
      'adadiag_pp': optax_fac.adadiag_pp(lr, method_mask=m),
      # Adafactor without momentum: the embedding keeps Adam's second moment
      # only (no momentum anywhere).
      'adafactor_no_momentum': optax_fac.named_optimizer(
          optax_fac.scale_by_factored_rms(b1=None), learning_rate=lr, method_mask=m,
          fallback=optax_fac.scale_in_float32(optax.scale_by_rms())),
      'hfac': optax_fac.hfac(lr, method_mask=m),
      'hfac_diag': optax_fac.hfac_diag(lr, method_mask=m),
  }


def test_memory_table_llama_1b_bf16():
  tree = llama_tree(d=2048, ffn=5461, layers=24)
  for name, tx in memory_table_optimizers().items():
    got = optax_fac.state_size(tx, tree, dtype_bytes=2) / PAPER_G
    assert round(got, 2) == PUBLISHED_1B[name], (name, got)


@pytest.mark.slow  # six compiled rotation steps: ~20 s
@pytest.mark.parametrize('name', ['adadiag_pp', 'adafac_diag', 'hfac_diag'])
def test_named_rotations_pass_stagger_on(name):
  # (the three builders of the named rotations; adadiag_pp is adadiag's)
  # A stacked group (the (8, 16) pair) and a (5, 7) leaf: one cond per
  # group with stagger, one in all without.
  params = {'a': jnp.ones((8, 16)), 'b': jnp.ones((8, 16)),
            'e': jnp.ones((5, 7)), 'v': jnp.ones(3)}
  for stagger, conds in ((False, 1), (True, 2)):
    tx = optax_fac.NAMED_OPTIMIZERS[name](1e-3, stagger=stagger)
    text = jax.jit(tx.update).lower(params, tx.init(params),
                                    params).compile().as_text()
    assert text.count(' conditional(') == conds, (name, stagger)
