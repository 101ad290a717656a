"""Tests of Subset-Norm / Subspace-Momentum (docs/algorithms.md §5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
from optax_fac import subset


# --------------------------------------------------------------------------
# A float64 NumPy transcription of the official code (GenericOptim.py,
# subset_norm.py, subspace_momentum.py, projectors/svd_projector.py of
# timmytonga/sn-sm), written in PyTorch's (out, in) layout: a matrix parameter
# of ours, (in, out), is transposed before it enters the reference.


def _signed(vecs, axis):
  """The library's sign convention: largest-|.| entry of each vector > 0."""
  idx = np.argmax(np.abs(vecs), axis=axis)
  if axis == 0:
    s = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    return vecs * s[None, :]
  s = np.sign(vecs[np.arange(vecs.shape[0]), idx])
  return vecs * s[:, None]


class RefGenericOptim:
  """GenericOptim for one parameter group of matrices + one regular group."""

  def __init__(self, lr, betas, eps, weight_decay, correct_bias,
               momentum_type, subset_size='heuristics', rank=None, gap=None,
               reset='faithful'):
    self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
    self.correct_bias = correct_bias
    self.momentum_type = momentum_type
    self.subset_size, self.rank, self.gap, self.reset = (
        subset_size, rank, gap, reset)
    self.state = {}

  def step(self, params, grads, sn_group):
    """params, grads: dicts of float64 arrays (PyTorch layout); in place."""
    b1, b2 = self.betas
    for name, p in params.items():
      g = grads[name]
      sn = name in sn_group
      st = self.state.setdefault(name, {'step': 0})
      st['step'] += 1
      t = st['step']
      numerator = self._numerator(st, g, sn, t)
      denominator, shape = self._denominator(st, g, sn, b2)
      step_size = self.lr
      if self.correct_bias:
        step_size = step_size * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
      if shape is not None:
        p -= step_size * (numerator.reshape(shape) / denominator).reshape(
            p.shape)
      else:
        p -= step_size * numerator / denominator
      if self.wd > 0:
        p -= self.lr * self.wd * p

  def _numerator(self, st, g, sn, t):
    b1 = self.betas[0]
    if b1 == 0 or self.momentum_type == 'none':
      return g
    if self.momentum_type == 'sm' and sn:
      if 'proj' not in st or t % self.gap == 0:
        u, _, vh = np.linalg.svd(g, full_matrices=False)
        if g.shape[0] >= g.shape[1]:
          st['proj'], st['right'] = _signed(vh[:self.rank, :], 1), True
        else:
          st['proj'], st['right'] = _signed(u[:, :self.rank], 0), False
      proj, right = st['proj'], st['right']
      pg = g @ proj.T if right else proj.T @ g
      back = (lambda y: y @ proj) if right else (lambda y: proj @ y)
      if 'exp_avg' not in st:
        st['exp_avg'] = np.zeros_like(pg)
      exp_avg = st['exp_avg']
      if t > 1 and t % self.gap == 0:
        if self.reset == 'faithful':  # the code: the buffer is replaced ...
          st['exp_avg'] = np.zeros_like(pg)  # ... after this step's EMA
        elif self.reset == 'clean':
          exp_avg = st['exp_avg'] = np.zeros_like(pg)
      exp_avg *= b1
      exp_avg += (1 - b1) * pg
      return back(exp_avg) + (g - back(pg))
    if 'exp_avg' not in st:
      st['exp_avg'] = np.zeros_like(g)
    st['exp_avg'] = b1 * st['exp_avg'] + (1 - b1) * g
    return st['exp_avg']

  def _denominator(self, st, g, sn, b2):
    shape = None
    if sn and self.subset_size == 'heuristics':
      reduce_dim = 0 if g.shape[0] >= g.shape[1] else 1
      u = np.sum(g ** 2, axis=1 - reduce_dim, keepdims=True)
    elif sn:
      numel = g.size
      k = self.subset_size
      if k < 0:
        k = int(math.sqrt(numel) / abs(k))
      k = max(d for d in range(1, k + 1) if numel % d == 0)
      shape = (numel // k, k)
      u = np.sum(g.reshape(shape) ** 2, axis=1, keepdims=True)
    else:
      u = g ** 2
    if 'exp_avg_sq' not in st:
      st['exp_avg_sq'] = np.zeros_like(u)
    if b2 < 1:
      st['exp_avg_sq'] = b2 * st['exp_avg_sq'] + (1 - b2) * u
    else:
      st['exp_avg_sq'] = st['exp_avg_sq'] + u
    return np.sqrt(st['exp_avg_sq']) + self.eps, shape


# Our layout (in, out). 'sq' is the tie case.
SHAPES = {'tall': (7, 4), 'wide': (4, 7), 'sq': (5, 5), 'b': (3,)}
STEPS = 12


def _gradients(shapes, steps, seed=0):
  """A drifting low-rank signal plus noise, so momentum and subspaces matter."""
  rng = np.random.default_rng(seed)
  out = []
  base = {k: rng.normal(size=s) for k, s in shapes.items()}
  for t in range(steps):
    out.append({k: base[k] * (1 + 0.1 * t) + 0.5 * rng.normal(size=s)
                for k, s in shapes.items()})
  return out


def _compare(tx, ref, shapes=SHAPES, transpose=True, steps=STEPS, rtol=5e-5):
  """Runs tx (float32) and the float64 reference on the same gradients."""
  rng = np.random.default_rng(1)
  p64 = {k: rng.normal(size=s) for k, s in shapes.items()}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in p64.items()}
  lay = lambda x: x.T if (transpose and x.ndim == 2) else x
  ref_params = {k: lay(v).copy() for k, v in p64.items()}
  sn_group = [k for k, s in shapes.items() if len(s) == 2]
  state = tx.init(params)
  update = jax.jit(tx.update)
  worst = 0.0
  for g in _gradients(shapes, steps):
    updates, state = update({k: jnp.asarray(v, jnp.float32)
                             for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    before = {k: v.copy() for k, v in ref_params.items()}
    ref.step(ref_params, {k: lay(v) for k, v in g.items()}, sn_group)
    for k in shapes:
      want = lay(ref_params[k] - before[k])
      got = np.asarray(updates[k], np.float64)
      scale = np.max(np.abs(want))
      err = np.max(np.abs(got - want)) / scale
      worst = max(worst, err)
      assert err < rtol, (k, err)
  for k in shapes:
    np.testing.assert_allclose(np.asarray(params[k]), lay(ref_params[k]),
                               rtol=1e-4, atol=1e-5)
  return worst


LR, WD = 1e-2, 0.1


def test_adam_sn_matches_code():
  _compare(optax_fac.adam_sn(LR, weight_decay=WD),
           RefGenericOptim(LR, (0.9, 0.999), 1e-6, WD, True, 'ema'))


def test_rmsprop_sn_matches_code():
  _compare(optax_fac.rmsprop_sn(LR, weight_decay=WD),
           RefGenericOptim(LR, (0.0, 0.999), 1e-6, WD, False, 'none'))


def test_adagrad_sn_matches_code():
  _compare(optax_fac.adagrad_sn(LR, weight_decay=WD),
           RefGenericOptim(LR, (0.9, 1.0), 1e-6, WD, False, 'ema'))


@pytest.mark.parametrize('reset', ['clean', 'faithful', 'none'])
def test_adam_snsm_matches_code(reset):
  # rank 2, every 3: refreshes at t = 1, 3, 6, 9, 12 inside the run.
  _compare(optax_fac.adam_snsm(LR, weight_decay=WD, rank=2, every=3,
                               reset=reset),
           RefGenericOptim(LR, (0.9, 0.999), 1e-6, WD, True, 'sm', rank=2,
                           gap=3, reset=reset))


def test_adam_snsm_eigh_matches_code():
  _compare(optax_fac.adam_snsm(LR, rank=2, every=3, basis='eigh'),
           RefGenericOptim(LR, (0.9, 0.999), 1e-6, 0.0, True, 'sm', rank=2,
                           gap=3, reset='clean'))


@pytest.mark.parametrize('subset_size', [3, -1])
def test_adam_sn_integer_subsets(subset_size):
  # Our partition flattens the (in, out) view row-major: the reference sees
  # the parameters untransposed (the element-wise momentum is layout-free).
  _compare(optax_fac.adam_sn(LR, weight_decay=WD, subset_size=subset_size),
           RefGenericOptim(LR, (0.9, 0.999), 1e-6, WD, True, 'ema',
                           subset_size=subset_size), transpose=False)


def test_adam_snsm_integer_subsets_code_grouping():
  # With rows/cols swapped, our view is PyTorch's (out, in) layout, so the
  # flattening is the code's; SM agrees on non-square matrices (the tie-break
  # is defined in the (in, out) view).
  shapes = {'tall': (7, 4), 'wide': (4, 6), 'b': (3,)}
  swapped = optax_fac.MatrixView(rows=(1,), cols=(0,))
  views = {'tall': swapped, 'wide': swapped, 'b': None}
  _compare(optax_fac.adam_snsm(LR, weight_decay=WD, rank=2, every=3,
                               reset='faithful', subset_size=5, views=views),
           RefGenericOptim(LR, (0.9, 0.999), 1e-6, WD, True, 'sm',
                           subset_size=5, rank=2, gap=3), shapes=shapes)


# --------------------------------------------------------------------------
# Structure.


def test_refresh_runs_under_cond_on_the_counter():
  tx = subset.scale_by_subspace_momentum(rank=2, every=3)
  params = {'w': jnp.ones((6, 4))}
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params))
  conds = [e for e in jaxpr.eqns if e.primitive.name == 'cond']
  assert len(conds) == 1
  assert 'svd' in str(conds[0].params['branches'])


def test_refresh_schedule_and_rank_clipping():
  tx = subset.scale_by_subspace_momentum(rank=5, every=4)
  params = {'w': jnp.zeros((6, 3)), 'v': jnp.zeros((2, 8))}
  state = tx.init(params)
  assert state.mu['w'].shape == (6, 3) and state.projector['w'].shape == (3, 3)
  assert state.mu['v'].shape == (2, 8) and state.projector['v'].shape == (2, 2)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  old = state.projector
  for t in range(1, 10):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                           jnp.float32), params)
    _, state = update(g, state)
    changed = not np.allclose(state.projector['v'], old['v'])
    assert changed == (t == 1 or t % 4 == 0), t
    old = state.projector


def test_full_rank_subspace_momentum_is_ema():
  """r = min(m, n): the complement is empty, N is the EMA of G."""
  tx = subset.scale_by_subspace_momentum(b1=0.8, rank=8, every=1000,
                                         reset='none')
  rng = np.random.default_rng(0)
  params = {'w': jnp.zeros((5, 3)), 'b': jnp.zeros(4)}
  state = tx.init(params)
  ema = jax.tree.map(np.zeros_like, params)
  for _ in range(4):
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    out, state = tx.update(jax.tree.map(jnp.asarray, g), state)
    ema = jax.tree.map(lambda m, x: 0.8 * m + 0.2 * x, ema, g)
    for k in params:
      np.testing.assert_allclose(out[k], ema[k], rtol=1e-4, atol=1e-5)


def test_batch_axes_are_independent():
  """A stacked (L, in, out) leaf with a batch view = L separate leaves."""
  rng = np.random.default_rng(0)
  stacked = {'w': jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)}
  view = {'w': optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))}
  separate = {str(i): stacked['w'][i] for i in range(3)}
  for kw in (dict(subset_size='heuristic'), dict(subset_size=5)):
    tx_b = optax_fac.adam_snsm(1e-2, rank=2, every=2, views=view, **kw)
    tx_s = optax_fac.adam_snsm(1e-2, rank=2, every=2, **kw)
    sb, ss = tx_b.init(stacked), tx_s.init(separate)
    for _ in range(3):
      g = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
      ub, sb = tx_b.update({'w': g}, sb, stacked)
      us, ss = tx_s.update({str(i): g[i] for i in range(3)}, ss, separate)
      for i in range(3):
        np.testing.assert_allclose(ub['w'][i], us[str(i)], rtol=1e-5,
                                   atol=1e-7)


def test_decay_of_updated_weights_with_schedule():
  sched = optax.linear_schedule(0.1, 0.05, 10)
  tx = optax.chain(optax.scale_by_learning_rate(sched),
                   subset.add_decayed_updated_weights(0.5, sched))
  params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array([3.0])}
  d = {'w': jnp.array([0.5, 0.25]), 'b': jnp.array([1.0])}
  state = tx.init(params)
  for t in range(3):
    u, state = tx.update(d, state, params)
    eta = float(sched(t))
    for k in params:
      stepped = params[k] - eta * d[k]
      np.testing.assert_allclose(params[k] + u[k],
                                 stepped - eta * 0.5 * stepped, rtol=1e-6)
  masked = subset.add_decayed_updated_weights(0.5, 0.1, {'w': True,
                                                         'b': False})
  u, _ = masked.update(d, masked.init(params), params)
  np.testing.assert_array_equal(u['b'], d['b'])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='subset_size'):
    optax_fac.adam_sn(1e-2, subset_size=0)
  with pytest.raises(ValueError, match='subset_size'):
    optax_fac.adam_sn(1e-2, subset_size='rows')
  with pytest.raises(ValueError, match='reset'):
    optax_fac.adam_snsm(1e-2, reset='always')
  with pytest.raises(ValueError, match='rank'):
    optax_fac.adam_snsm(1e-2, rank=0)
  with pytest.raises(ValueError, match='every'):
    optax_fac.adam_snsm(1e-2, every=1.5)
  with pytest.raises(ValueError, match='b2'):
    optax_fac.adam_sn(1e-2, b2=1.0)
  with pytest.raises(ValueError, match='basis'):
    optax_fac.adam_snsm(1e-2, basis='qr')


def test_subset_length():
  assert subset.subset_length(28, 3) == 2
  assert subset.subset_length(28, -1) == 4   # floor(sqrt(28)) = 5 -> 4
  assert subset.subset_length(25, 100) == 25
  assert subset.subset_length(7, -5) == 1


# --------------------------------------------------------------------------
# Memory.


@pytest.mark.parametrize('shape', [(6, 4), (4, 6), (5, 5), (9, 2)])
def test_state_sizes_equal_the_formulas(shape):
  m, n = shape
  params = {'w': jax.ShapeDtypeStruct(shape, jnp.float32)}
  r = 3
  assert optax_fac.state_elements(optax_fac.adam_sn(1e-2), params) == (
      m * n + max(m, n))
  rr = min(r, m, n)
  assert optax_fac.state_elements(optax_fac.adam_snsm(1e-2, rank=r),
                                  params) == (rr * max(m, n) + rr * min(m, n)
                                              + max(m, n))
  assert optax_fac.state_elements(optax_fac.rmsprop_sn(1e-2), params) == (
      max(m, n))
  assert optax_fac.state_elements(
      optax_fac.adam_sn(1e-2, subset_size=4), params) == m * n + (
          m * n // subset.subset_length(m * n, 4))


def llama_1b_params():
  """LLaMA-1B (GaLore config: d 2048, ffn 5461, 24 layers, vocab 32000)."""
  d, f, v = 2048, 5461, 32000
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  layer = {'q': s(d, d), 'k': s(d, d), 'v': s(d, d), 'o': s(d, d),
           'gate': s(d, f), 'up': s(d, f),
           'down': s(f, d), 'attn_norm': s(d), 'mlp_norm': s(d)}
  return {'embed': s(v, d), 'layers': [dict(layer) for _ in range(24)],
          'final_norm': s(d), 'lm_head': s(d, v)}


def _not_embedding(params):
  """The code's recipe: every nn.Linear (lm_head included), not nn.Embedding."""
  mask = jax.tree.map(lambda _: True, params)
  mask['embed'] = False
  return mask


def test_llama_1b_published_memory():
  """Adam 4.99 GB, AdamSN 2.62 GB, AdamSNSM (r = 512) 0.84 GB, bf16 states.

  "GB" in the paper is GiB (2^30 bytes): in 1e9 bytes Adam would be 5.36.
  The token embedding keeps Adam (it is an nn.Embedding, not nn.Linear); the
  lm_head is an nn.Linear and gets SN/SM; AdamSNSM's figure excludes the
  r x min(m, n) projector.
  """
  params = llama_1b_params()
  gib = lambda b: round(b / 2 ** 30, 2)
  adam = optax_fac.state_size(optax.adam(1e-3), params, dtype_bytes=2)
  sn = optax_fac.state_size(optax_fac.adam_sn(1e-2, method_mask=_not_embedding),
                            params, dtype_bytes=2)
  snsm_tx = optax_fac.adam_snsm(1e-2, rank=512, method_mask=_not_embedding)
  snsm = optax_fac.state_size(snsm_tx, params, dtype_bytes=2)
  shapes = optax_fac.state_shapes(snsm_tx, params)
  projectors = [
      x for s in jax.tree.leaves(
          shapes, is_leaf=lambda x: isinstance(x, subset.SubspaceMomentumState))
      if isinstance(s, subset.SubspaceMomentumState)
      for x in jax.tree.leaves(s.projector)]
  projector_bytes = sum(2 * math.prod(x.shape) for x in projectors)
  assert (gib(adam), gib(sn), gib(snsm - projector_bytes)) == (4.99, 2.62,
                                                                 0.84)
  assert round(adam / 1e9, 2) == 5.36


def test_state_specs_match_runtime_sharding_on_explicit_mesh():
  """state_partition_specs agrees with the state an update produces."""
  mesh = jax.make_mesh((8,), ('x',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  P = jax.P
  specs = {'w': P('x', None), 'v': P(None, 'x'), 's': P('x', None, None),
           'b': P('x')}
  views = {'w': None, 'v': None, 'b': None,
           's': optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))}
  shapes = {'w': (16, 4), 'v': (4, 16), 's': (8, 4, 6), 'b': (8,)}
  for tx in (optax_fac.adam_snsm(1e-2, rank=2, views=views),
             optax_fac.adam_sn(1e-2, subset_size=3, views=views)):
    with jax.set_mesh(mesh):
      params = {k: jnp.ones(s, jnp.float32,
                            out_sharding=jax.sharding.NamedSharding(
                                mesh, specs[k])) for k, s in shapes.items()}
      want = optax_fac.state_partition_specs(tx, params, specs, views=views)
      _, state = jax.jit(tx.update)(params, jax.jit(tx.init)(params), params)
    got = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, state)
    norm = lambda s: tuple(s) + (None,) * 4
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(
        want, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
      assert norm(g)[:4] == norm(w)[:4], (g, w)
