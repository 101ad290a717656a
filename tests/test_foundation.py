"""Foundation: matrix view, factored statistics, H-Fac family, accounting.

Each transform is compared with the float64 NumPy transcription in
reference_numpy.py over 20 steps on tall, wide, square, conv, stacked (batch
axis) and 1-D leaves.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
import reference_numpy as ref
from optax_fac import MatrixView
from optax_fac import matrix

SHAPES = {
    'tall': (7, 3),
    'wide': (3, 7),
    'square': (4, 4),
    'conv': (3, 3, 2, 4),      # Flax (kh, kw, cin, cout) -> (18, 4)
    'stacked': (3, 5, 4),      # (L, in, out) with the layer axis as batch
    'bias': (6,),              # 1-D: Adam fallback in named optimizers
}
STACKED_VIEW = MatrixView(batch=(0,), rows=(1,), cols=(2,))
VIEWS = {k: (STACKED_VIEW if k == 'stacked' else None) for k in SHAPES}
STEPS = 20


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _grads(step, seed=1):
  rng = np.random.default_rng(1000 * seed + step)
  # Row/column structure so that the factored terms matter.
  out = {}
  for k, s in SHAPES.items():
    g = rng.normal(size=s) * rng.uniform(0.2, 3.0, size=s[-1])
    out[k] = g + 0.3 * rng.normal(size=s[:-1] + (1,))
  return out


def _as_matrices(key, x):
  """The docs/algorithms.md §0 matrices of a leaf, written independently."""
  if key == 'stacked':
    return [x[i] for i in range(x.shape[0])]
  return [x.reshape(-1, x.shape[-1])]


def _reference_run(step_fn, kwargs, lr, wd, fallback_kwargs, steps=STEPS):
  params = _params()
  states = {k: [{} for _ in _as_matrices(k, params[k])] for k in SHAPES}
  adam_state = {}
  all_updates = []
  for t in range(1, steps + 1):
    grads = _grads(t)
    updates = {}
    for k, g in grads.items():
      if g.ndim < 2:
        d, adam_state = ref.adam_step(g, adam_state, t, **fallback_kwargs)
      else:
        ds = []
        for i, gm in enumerate(_as_matrices(k, g)):
          dm, states[k][i] = step_fn(gm, states[k][i], t, **kwargs)
          ds.append(dm)
        d = np.stack(ds) if k == 'stacked' else ds[0].reshape(g.shape)
      updates[k] = -lr * (d + wd * params[k])
    all_updates.append(updates)
  return all_updates


def _jax_run(tx, steps=STEPS):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params())
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for t in range(1, steps + 1):
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _grads(t))
    updates, state = update(grads, state, params)
    out.append(jax.tree.map(np.asarray, updates))
  return out


def _assert_runs_close(got, want, rtol, atol):
  for t, (g, w) in enumerate(zip(got, want), start=1):
    for k in SHAPES:
      np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol,
                                 err_msg=f'step {t}, leaf {k}')


LR, WD = 1e-2, 0.1
NAMED = [
    ('hfac', optax_fac.hfac, ref.hfac_step, {},
     dict(b1=0.9, b2=0.999)),
    ('hfac_noclip', functools.partial(optax_fac.hfac, clipping_threshold=None,
                                      b1=0.8, b2=0.95),
     functools.partial(ref.hfac_step, b1=0.8, b2=0.95, d=None), {},
     dict(b1=0.8, b2=0.95)),
    ('hfac_clip_0.5', functools.partial(optax_fac.hfac, clipping_threshold=0.5),
     functools.partial(ref.hfac_step, d=0.5), {}, dict(b1=0.9, b2=0.999)),
    ('sign_fsgd', optax_fac.sign_fsgd, ref.sign_fsgd_step, {},
     dict(b1=0.9, b2=0.999)),
    ('lion_factor', optax_fac.lion_factor, ref.lion_factor_step, {},
     dict(b1=0.9, b2=0.999)),
    ('adafactor_momentum', optax_fac.adafactor_momentum,
     functools.partial(ref.factored_rms_step, b1=0.9), {},
     dict(b1=0.9, b2=0.999)),
    ('adafactor_no_momentum',
     functools.partial(optax_fac.adafactor_momentum, b1=None,
                       clipping_threshold=1.0),
     functools.partial(ref.factored_rms_step, b1=None, d=1.0), {},
     dict(b1=0.9, b2=0.999)),
]


@pytest.mark.parametrize('name,make,step_fn,kwargs,fallback', NAMED,
                         ids=[n[0] for n in NAMED])
def test_named_optimizer_matches_numpy_float64(name, make, step_fn, kwargs,
                                               fallback):
  del name
  tx = make(learning_rate=LR, weight_decay=WD, views=VIEWS)
  want = _reference_run(step_fn, kwargs, LR, WD, fallback)
  got = _jax_run(tx)
  _assert_runs_close(got, want, rtol=2e-4, atol=1e-7)


def test_factored_momentum_primitive_matches_numpy():
  params = {k: v for k, v in _params().items() if len(SHAPES[k]) >= 2}
  tx = optax_fac.scale_by_factored_momentum(
      0.9, views={k: VIEWS[k] for k in params})
  state = tx.init(params)
  states = {k: [{} for _ in _as_matrices(k, params[k])] for k in params}
  for t in range(1, STEPS + 1):
    grads = {k: v for k, v in _grads(t).items() if k in params}
    updates, state = jax.jit(tx.update)(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state)
    for k, g in grads.items():
      ds = []
      for i, gm in enumerate(_as_matrices(k, g)):
        dm, states[k][i] = ref.factored_momentum_step(gm, states[k][i], t)
        ds.append(dm)
      want = np.stack(ds) if k == 'stacked' else ds[0].reshape(g.shape)
      np.testing.assert_allclose(updates[k], want, rtol=1e-5, atol=1e-6)


def test_raw_transform_views_vectors_as_rows():
  """A raw transform on a 1-D leaf is unfactored RMSprop (1 x N view)."""
  tx = optax_fac.scale_by_factored_rms(b1=None, b2=0.9)
  g = np.random.default_rng(0).normal(size=(9,))
  state = tx.init(jnp.zeros(9))
  st = {}
  for t in range(1, 6):
    d, state = tx.update(jnp.asarray(g * t, jnp.float32), state)
    want, st = ref.factored_rms_step((g * t)[None, :], st, t, b2=0.9)
    np.testing.assert_allclose(d, want[0], rtol=1e-5)
  v_hat = state.col  # the second moment itself (bias corrected)
  assert v_hat.shape == (9,) and state.row.shape == ()


def test_stacked_leaf_equals_separate_leaves():
  rng = np.random.default_rng(3)
  stacked = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
  tx_stacked = optax_fac.hfac(1e-2, views={'w': STACKED_VIEW})
  tx_sep = optax_fac.hfac(1e-2)
  p_st = {'w': stacked}
  p_sep = {f'w{i}': stacked[i] for i in range(4)}
  s_st, s_sep = tx_stacked.init(p_st), tx_sep.init(p_sep)
  for t in range(5):
    g = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    u_st, s_st = tx_stacked.update({'w': g}, s_st, p_st)
    u_sep, s_sep = tx_sep.update({f'w{i}': g[i] for i in range(4)}, s_sep,
                                 p_sep)
    np.testing.assert_allclose(
        u_st['w'], np.stack([u_sep[f'w{i}'] for i in range(4)]), rtol=1e-6,
        atol=1e-8)


# --------------------------------------------------------------------------
# Matrix view.


@pytest.mark.parametrize('shape,view,mn', [
    ((5, 3), None, (5, 3)),
    ((3, 3, 2, 4), None, (18, 4)),
    ((3, 5, 4), MatrixView(batch=(0,), rows=(1,), cols=(2,)), (5, 4)),
    ((4, 6, 2), MatrixView(rows=(1,), cols=(0, 2)), (6, 8)),
])
def test_to_and_from_matrix_round_trip(shape, view, mn):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  view = (matrix.default_view(shape) if view is None
          else view.normalized(len(shape)))
  y = view.to_matrix(x)
  assert y.shape[-2:] == mn
  np.testing.assert_array_equal(view.from_matrix(y, like=x), x)
  # Row sums in the param layout equal row sums of the explicit matrix.
  np.testing.assert_allclose(view.row_sum(x).reshape(-1),
                             np.asarray(y).sum(-1).reshape(-1))
  np.testing.assert_allclose(np.asarray(view.col_sum(x)).reshape(-1),
                             np.asarray(y).sum(-2).reshape(-1))


def test_default_views_and_vectors():
  params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4), 's': jnp.zeros(())}
  views = matrix.resolve_views(params)
  assert views['w'] == MatrixView(rows=(0,), cols=(1,))
  assert views['b'] is None and views['s'] is None
  views = matrix.resolve_views(params, vectors=True)
  assert views['b'] == MatrixView(rows=(), cols=(0,))
  assert views['s'] == MatrixView(rows=(), cols=())


def test_bad_view_is_named():
  with pytest.raises(ValueError, match=r"\['w'\].*every axis"):
    matrix.resolve_views({'w': jnp.zeros((2, 3, 4))},
                         {'w': MatrixView(rows=(0,), cols=(2,))})
  with pytest.raises(ValueError, match='out of range'):
    matrix.resolve_views({'w': jnp.zeros((2, 3))},
                         {'w': MatrixView(rows=(0,), cols=(5,))})


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('make', [optax_fac.hfac, optax_fac.sign_fsgd,
                                  optax_fac.lion_factor,
                                  optax_fac.adafactor_momentum])
def test_bad_hyperparameters_are_named(make):
  with pytest.raises(ValueError, match='learning_rate'):
    make(learning_rate=-1e-3)
  with pytest.raises(ValueError, match='b1'):
    make(learning_rate=1e-3, b1=1.0)
  with pytest.raises(ValueError, match='b1'):
    make(learning_rate=1e-3, b1=-0.1)
  with pytest.raises(ValueError, match='weight_decay'):
    make(learning_rate=1e-3, weight_decay=-1.0)


@pytest.mark.parametrize('make', [optax_fac.hfac,
                                  optax_fac.adafactor_momentum])
def test_bad_b2_and_eps_are_named(make):
  with pytest.raises(ValueError, match='b2'):
    make(learning_rate=1e-3, b2=1.5)
  with pytest.raises(ValueError, match='eps'):
    make(learning_rate=1e-3, eps=-1e-8)


def test_schedule_is_accepted_and_not_checked_eagerly():
  optax_fac.hfac(learning_rate=optax.linear_schedule(1e-3, 0.0, 10))


def test_mismatched_update_tree_is_named():
  tx = optax_fac.scale_by_hfac()
  state = tx.init({'w': jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match='does not match'):
    tx.update({'w': jnp.zeros((4, 3)), 'v': jnp.zeros((2, 2))}, state)
  with pytest.raises(ValueError, match=r"\['w'\].*\(3, 4\)"):
    tx.update({'w': jnp.zeros((3, 4))}, state)


def test_integer_params_are_named():
  with pytest.raises(TypeError, match=r"\['steps'\].*int32"):
    optax_fac.scale_by_hfac().init({'w': jnp.zeros((4, 3)),
                                    'steps': jnp.zeros((2, 2), jnp.int32)})


# --------------------------------------------------------------------------
# Low precision and degenerate gradients.


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('make', [optax_fac.scale_by_hfac,
                                  optax_fac.scale_by_factored_rms,
                                  optax_fac.scale_by_sign_fsgd,
                                  optax_fac.scale_by_lion_factor])
def test_low_precision_params_keep_dtype_and_stay_finite(make, dtype):
  tx = make()
  params = {'w': jnp.ones((8, 5), dtype)}
  state = tx.init(params)
  for g in (jnp.zeros((8, 5), dtype), jnp.full((8, 5), 1e-4, dtype),
            jnp.zeros((8, 5), dtype)):
    d, state = jax.jit(tx.update)({'w': g}, state)
    assert d['w'].dtype == dtype
    assert bool(jnp.all(jnp.isfinite(d['w'])))
    for leaf in jax.tree.leaves(state):
      assert leaf.dtype in (jnp.float32, jnp.int32)
      assert bool(jnp.all(jnp.isfinite(leaf)))


def test_all_zero_gradient_gives_zero_update():
  tx = optax_fac.hfac(1e-2)
  params = {'w': jnp.ones((6, 4)), 'b': jnp.ones(4)}
  d, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                       params)
  for leaf in jax.tree.leaves(d):
    assert float(jnp.max(jnp.abs(leaf))) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


# --------------------------------------------------------------------------
# State sizes on a LLaMA-60M-shaped tree (GaLore: d 512, ffn 1376, 8 layers).


def llama_tree(d=512, ffn=1376, layers=8, vocab=32000):
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {'embed': f(vocab, d), 'final_norm': f(d), 'lm_head': f(d, vocab)}
  for i in range(layers):
    tree[f'layer{i}'] = {
        'q': f(d, d), 'k': f(d, d), 'v': f(d, d), 'o': f(d, d),
        'gate': f(d, ffn), 'up': f(d, ffn), 'down': f(ffn, d),
        'attn_norm': f(d), 'mlp_norm': f(d)}
  return tree


def _matrices_and_vectors(tree):
  leaves = jax.tree.leaves(tree)
  return ([l.shape for l in leaves if len(l.shape) == 2],
          [l.shape for l in leaves if len(l.shape) < 2])


@pytest.mark.parametrize('make,per_matrix', [
    (optax_fac.hfac, lambda m, n: 2 * (m + n)),
    (optax_fac.sign_fsgd, lambda m, n: m + n),
    (optax_fac.lion_factor, lambda m, n: m + n),
    (functools.partial(optax_fac.adafactor_momentum, b1=None),
     lambda m, n: m + n),
    (optax_fac.adafactor_momentum, lambda m, n: m * n + m + n),
])
def test_state_sizes_llama60m(make, per_matrix):
  tree = llama_tree()
  mats, vecs = _matrices_and_vectors(tree)
  want = (sum(per_matrix(*s) for s in mats)
          + sum(2 * int(np.prod(s)) for s in vecs))  # Adam on vectors
  tx = make(learning_rate=1e-3)
  assert optax_fac.state_elements(tx, tree) == want
  # Bytes: float32 statistics plus int32 step counters.
  extra = optax_fac.state_size(tx, tree) - 4 * want
  assert 0 < extra <= 4 * 4


def test_hfac_state_is_small_fraction_of_adamw():
  tree = llama_tree()
  hfac_bytes = optax_fac.state_size(optax_fac.hfac(1e-3), tree)
  adamw_bytes = optax_fac.state_size(optax.adamw(1e-3), tree)
  n_params = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))
  assert adamw_bytes == 8 * n_params + 4
  # 1.21 MB vs 465 MB: 0.26% of adamw with the embedding and head factored.
  assert hfac_bytes < 0.003 * adamw_bytes


def test_state_report_lists_leaves_and_totals():
  params = {'w': jax.ShapeDtypeStruct((64, 32), jnp.float32),
            'b': jax.ShapeDtypeStruct((32,), jnp.float32)}
  text = optax_fac.state_report(optax_fac.hfac(1e-3), params)
  lines = text.splitlines()
  row_w = next(l for l in lines if l.startswith("['w']"))
  assert '768 B' in row_w        # 2 (64 + 32) float32
  assert '16.00 KiB' in row_w    # adamw: 2 * 64 * 32 float32
  assert lines[-1].startswith('total')


def test_state_size_needs_no_memory():
  big = {'w': jax.ShapeDtypeStruct((200_000, 100_000), jnp.float32)}
  assert optax_fac.state_elements(optax_fac.hfac(1e-3), big) == 600_000
