"""SMMF (docs/algorithms.md §4): view, float64 transcription, state size."""

import importlib
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
from optax_fac import matrix

# The module (optax_fac.smmf the attribute is the named optimizer).
smmf_lib = importlib.import_module('optax_fac.smmf')


# --------------------------------------------------------------------------
# Square-matricization.


def _official_effective_shape(numel):
  """The official code's ``_get_effective_shape``, transcribed."""
  root = int(numel ** 0.5)
  if root * root == numel:
    return (root, root)
  for i in range(root, 0, -1):
    if numel % i == 0:
      return (numel // i, i)
  return (numel, 1)


@pytest.mark.parametrize('n, want', [
    (512, (32, 16)), (7, (7, 1)), (9408, (98, 96)),
    (2048 * 5461, (4064, 2752)), (32000 * 2048, (8192, 8000)),
    (1, (1, 1)), (2, (2, 1)), (13, (13, 1)), (7919, (7919, 1)),
    (9, (3, 3)), (64, (8, 8)), (768 * 768, (768, 768)), (10**6, (1000, 1000)),
    (1000, (40, 25)), (2 * 7919, (7919, 2)),
])
def test_square_shape_examples(n, want):
  assert matrix.square_shape(n) == want
  n1, n2 = want
  assert n1 * n2 == n and n1 >= n2


def test_square_shape_matches_official_rule():
  for n in range(1, 3000):
    assert matrix.square_shape(n) == _official_effective_shape(n), n


# --------------------------------------------------------------------------
# A float64 NumPy transcription of §4 (the official code, step by step).


def _official_kwargs(kwargs):
  """Our arguments in the official code's terms (its γ = −decay_rate)."""
  out = {k: v for k, v in kwargs.items() if k != 'sign_bits'}
  if 'decay_rate' in out:
    out['decay_rate'] = -out['decay_rate']
  return out


class Float64SMMF:
  """The official SMMF.step in float64 NumPy, one parameter list."""

  def __init__(self, params, lr, b1=0.9, eps=1e-8, weight_decay=0.0,
               decay_rate=-0.5, growth_rate=0.999, vector_reshape=True):
    self.params = [np.array(p, np.float64) for p in params]
    self.lr, self.b1, self.eps, self.wd = lr, b1, eps, weight_decay
    self.decay_rate, self.growth_rate = decay_rate, growth_rate
    self.vector_reshape = vector_reshape
    self.state = [None] * len(params)

  @staticmethod
  def nnmf(a):
    r, c = a.sum(axis=1), a.sum(axis=0)
    if a.shape[0] < a.shape[1]:  # never after square-matricization
      if r.sum() != 0:
        r = r / r.sum()
    elif c.sum() != 0:
      c = c / c.sum()
    return r, c

  def step(self, grads):
    for i, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      p = self.params[i]
      if self.wd:
        p *= 1.0 - self.lr * self.wd
      dense = np.squeeze(g).ndim == 1 and not self.vector_reshape
      if self.state[i] is None:
        if dense:
          self.state[i] = dict(step=1.0, m=np.zeros(g.shape),
                               v=np.zeros(g.shape))
        else:
          shape = _official_effective_shape(g.size)
          self.state[i] = dict(step=1.0, shape=shape,
                               m=(np.zeros(shape[0]), np.zeros(shape[1])),
                               sign=np.zeros(shape, bool),
                               v=(np.zeros(shape[0]), np.zeros(shape[1])))
      st = self.state[i]
      t = st['step']
      b2 = 1.0 - t ** self.decay_rate
      if dense:
        gv = g
        m_hat, v_hat = st['m'], st['v']
      else:
        gv = g.reshape(st['shape'])
        m_hat = np.outer(*st['m'])
        m_hat = np.where(st['sign'], m_hat, -m_hat)
        v_hat = np.outer(*st['v'])
      if self.b1 is not None:
        b1 = self.b1 * self.growth_rate ** (t - 1.0)
        m = b1 * m_hat + (1.0 - b1) * gv
      v = b2 * v_hat + (1.0 - b2) * gv ** 2
      if dense:
        st['m'], st['v'] = (m if self.b1 is not None else None), v
      else:
        if self.b1 is not None:
          st['sign'] = m > 0
          st['m'] = self.nnmf(np.abs(m))
        st['v'] = self.nnmf(v)
      num = m if self.b1 is not None else gv
      update = (num / (np.sqrt(v) + self.eps)).reshape(g.shape)
      p -= self.lr * update
      st['step'] = t + 1.0
    return [p.copy() for p in self.params]


SHAPES = ((3, 3, 4, 8), (8,), (13,), (12, 10))  # conv, bias, prime, matrix
STEPS = 25
LR = 1e-2


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  grads = [rng.normal(size=(STEPS,) + s).astype(np.float32)
           * rng.uniform(0.1, 3.0, size=(STEPS,) + (1,) * len(s))
           for s in SHAPES]
  grads[0][0, 0] = 0.0      # exact zeros at t = 1: they count as negative
  grads[3][0, :, 3] = 0.0
  grads[1][0] = 0.0         # an all-zero leaf at t = 1: no 0/0 in NNMF
  return params, grads


def _run_jax(tx, params, grads):
  params = [jnp.asarray(p) for p in params]

  def body(carry, g):
    p, state = carry
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  _, traj = jax.jit(lambda p, s, g: jax.lax.scan(body, (p, s), g))(
      params, tx.init(params), [jnp.asarray(g) for g in grads])
  return [np.asarray(t) for t in traj]


CONFIGS = {
    'packed': dict(sign_bits=1),
    'bool': dict(sign_bits=8),
    'packed_wd': dict(sign_bits=1, weight_decay=0.1),
    'bool_wd': dict(sign_bits=8, weight_decay=0.1),
    'no_momentum_dense_vectors': dict(b1=None, vector_reshape=False,
                                      decay_rate=0.8, weight_decay=0.05),
    'dense_vectors_other_schedules': dict(b1=0.8, growth_rate=0.99,
                                          decay_rate=0.8,
                                          vector_reshape=False),
}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_matches_float64_transcription(name):
  kwargs = CONFIGS[name]
  params, grads = _problem()
  ref_kwargs = _official_kwargs(kwargs)
  ref = Float64SMMF(params, LR, **ref_kwargs)
  want = [ref.step([g[t] for g in grads]) for t in range(STEPS)]
  got = _run_jax(optax_fac.smmf(LR, **kwargs), params, grads)
  for t in range(STEPS):
    for leaf in range(len(SHAPES)):
      np.testing.assert_allclose(
          got[leaf][t], want[t][leaf], rtol=1e-5, atol=2e-6,
          err_msg=f'{name}: step {t + 1}, leaf {SHAPES[leaf]}')
  # The parameters moved well beyond the tolerance: not a trivial match.
  moved = np.abs(want[-1][0] - params[0]).mean()
  assert moved > LR, moved


def test_sign_of_exact_zero_is_negative_and_zero_sum_is_kept():
  """State after t = 1: [M > 0] bits; NNMF of an all-zero leaf stays 0."""
  g = {'w': jnp.array([[1.0, 0.0, -2.0], [0.0, 3.0, 0.0]]),
       'z': jnp.zeros((5,))}
  tx = optax_fac.scale_by_smmf()
  _, state = jax.jit(lambda g: tx.update(g, tx.init(g)))(g)
  lay = smmf_lib._layout((2, 3), None, True)  # (3, 2)
  bits = np.asarray(smmf_lib._unpack_signs(state.m_sign['w'], lay))
  np.testing.assert_array_equal(bits.reshape(-1),
                                np.asarray(g['w']).reshape(-1) > 0)
  for field in (state.m_row, state.m_col, state.v_row, state.v_col):
    np.testing.assert_array_equal(field['z'], 0.0)
  # Column factor normalised to sum 1 where the sum is nonzero. [decided]
  # The state stores the official c (sum 1) as c̄ = n2 c (mean 1; see
  # SMMFState, overflow-safe storage): convert back to the official factor.
  np.testing.assert_allclose((state.v_col['w'] / lay.n2).sum(), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose((state.m_col['w'] / lay.n2).sum(), 1.0,
                             rtol=1e-6)


def test_pack_unpack_roundtrip():
  rng = np.random.default_rng(3)
  for n in (1, 7, 8, 9, 16, 63, 512):
    lay = smmf_lib._layout((2, n), matrix.MatrixView((), (1,), (0,)), True)
    x = jnp.asarray(rng.random((2, lay.n1, lay.n2)) > 0.5)
    packed, back = jax.jit(lambda x, lay=lay: (
        smmf_lib._pack_signs(x, lay),
        smmf_lib._unpack_signs(smmf_lib._pack_signs(x, lay), lay)))(x)
    assert packed.shape == (2, math.ceil(n / 8)) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(
        packed, np.packbits(np.asarray(x).reshape(2, -1), axis=-1))
    np.testing.assert_array_equal(back, x)


# --------------------------------------------------------------------------
# Batch axes, masks, arguments.


def test_batch_axes_act_like_separate_leaves():
  rng = np.random.default_rng(4)
  stacked = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  grads = jnp.asarray(rng.normal(size=(4, 3, 4, 5)), jnp.float32)
  view = matrix.MatrixView(rows=(1,), cols=(2,), batch=(0,))
  # Per-leaf state (stack_leaves=False); test_stacked_matches_unstacked
  # covers the stacked layout.
  tx_stacked = optax_fac.smmf(1e-2, views={'w': view}, stack_leaves=False)
  tx_split = optax_fac.smmf(1e-2)

  @jax.jit
  def run(p, gs):
    tx = tx_stacked if isinstance(p, dict) else tx_split
    s = tx.init(p)
    for g in gs:
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    return p, s

  p1, s1 = run({'w': stacked}, [{'w': g} for g in grads])
  p2, _ = run([stacked[i] for i in range(3)],
              [[g[i] for i in range(3)] for g in grads])
  np.testing.assert_allclose(p1['w'], jnp.stack(p2), rtol=1e-6, atol=1e-7)
  assert s1[0].m_row['w'].shape == (3, 5)     # (4*5) -> (5, 4) per layer
  assert s1[0].m_sign['w'].shape == (3, 3)    # ceil(20 / 8) bytes per layer
  # Stacked (the default): a group of one, its layer axis a batch axis
  # behind the group axis.
  state = jax.eval_shape(optax_fac.smmf(1e-2, views={'w': view}).init,
                         {'w': stacked})
  assert jax.tree.leaves(state[0].inner.m_row)[0].shape == (1, 3, 5)
  assert jax.tree.leaves(state[0].inner.m_sign)[0].shape == (1, 3, 3)


def test_mask_sends_other_leaves_to_adam():
  params = {'w': jnp.ones((4, 6)), 'b': jnp.ones((6,)), 'e': jnp.ones((5, 3))}
  mask = {'w': True, 'b': True, 'e': False}
  tx = optax_fac.smmf(1e-2, method_mask=mask, stack_leaves=False)
  state = tx.init(params)
  inner = state[0].inner_states
  smmf_state = inner['method'].inner_state
  assert isinstance(smmf_state, optax_fac.SMMFState)
  assert smmf_state.v_row['b'].shape == (3,)  # 1-D leaves get SMMF too
  assert isinstance(smmf_state.v_row['e'], optax.MaskedNode)
  assert inner['fallback'].inner_state.mu['e'].shape == (5, 3)
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('kwargs, name', [
    (dict(b1=1.5), 'b1'), (dict(eps=-1.0), 'eps'),
    (dict(growth_rate=1.5), 'growth_rate'),
    (dict(decay_rate=-0.5), 'decay_rate'), (dict(decay_rate=2.0), 'decay_rate'),
    (dict(sign_bits=4), 'sign_bits'), (dict(vector_reshape=1), 'vector_reshape'),
    (dict(weight_decay=-0.1), 'weight_decay'),
])
def test_bad_hyperparameters_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_fac.smmf(1e-3, **kwargs)


# --------------------------------------------------------------------------
# State size.


def _leaf_bytes(n, sign_bits=1):
  n1, n2 = matrix.square_shape(n)
  return 2 * (n1 + n2) * 4 + (math.ceil(n / 8) if sign_bits == 1 else n)


@pytest.mark.parametrize('sign_bits', [1, 8])
def test_state_size_formula(sign_bits):
  shapes = [(3, 3, 16, 32), (7,), (), (1000,), (64, 96), (2, 3, 5)]
  for shape in shapes:
    params = {'x': jax.ShapeDtypeStruct(shape, jnp.bfloat16)}
    n = math.prod(shape)
    got = optax_fac.state_size(optax_fac.smmf(1e-3, sign_bits=sign_bits),
                               params)
    assert got == _leaf_bytes(n, sign_bits) + 8, shape  # + 2 int32 counters


def resnet50_shapes():
  """torchvision ResNet-50 parameters in Flax layout (kh, kw, cin, cout)."""
  shapes = {'conv1': (7, 7, 3, 64), 'bn1/scale': (64,), 'bn1/bias': (64,)}
  inplanes = 64
  for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6),
                                            (512, 3))):
    for b in range(blocks):
      pre = f'layer{stage + 1}/{b}/'
      convs = [('conv1', (1, 1, inplanes, planes)),
               ('conv2', (3, 3, planes, planes)),
               ('conv3', (1, 1, planes, 4 * planes))]
      if b == 0:
        convs.append(('downsample', (1, 1, inplanes, 4 * planes)))
      for name, shape in convs:
        shapes[pre + name] = shape
        shapes[pre + name + '_bn/scale'] = (shape[-1],)
        shapes[pre + name + '_bn/bias'] = (shape[-1],)
      inplanes = 4 * planes
  shapes['fc/kernel'] = (2048, 1000)
  shapes['fc/bias'] = (1000,)
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def test_resnet50_state_size_matches_paper():
  params = resnet50_shapes()
  n_params = sum(math.prod(p.shape) for p in params.values())
  assert n_params == 25_557_032
  mib = 2.0 ** 20
  smmf_bytes = optax_fac.state_size(optax_fac.smmf(1e-3), params)
  adam_bytes = optax_fac.state_size(optax.adam(1e-3), params)
  # + 8: the int32 step counter and skipped_refreshes.
  want = sum(_leaf_bytes(math.prod(p.shape)) for p in params.values()) + 8
  assert smmf_bytes == want
  assert smmf_bytes < 4 * mib, smmf_bytes / mib        # paper: 3.7 MiB
  assert 194.9 < adam_bytes / mib < 195.1              # paper: 195 MiB
  bool_bytes = optax_fac.state_size(optax_fac.smmf(1e-3, sign_bits=8), params)
  assert bool_bytes > 24 * mib                          # N bytes of bools


def llama_130m_shapes():
  """GaLore's LLaMA-130M: d 768, ffn 2048, 12 layers, vocab 32000."""
  d, f, vocab = 768, 2048, 32000
  shapes = {'embed': (vocab, d), 'final_norm': (d,), 'lm_head': (d, vocab)}
  for i in range(12):
    for name in ('q', 'k', 'v', 'o'):
      shapes[f'layer{i}/{name}'] = (d, d)
    shapes[f'layer{i}/gate'] = (d, f)
    shapes[f'layer{i}/up'] = (d, f)
    shapes[f'layer{i}/down'] = (f, d)
    shapes[f'layer{i}/attn_norm'] = (d,)
    shapes[f'layer{i}/mlp_norm'] = (d,)
  return {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in shapes.items()}


def test_llama_130m_shapes_only():
  params = llama_130m_shapes()
  tx = optax_fac.smmf(learning_rate=1e-3)
  state = jax.eval_shape(tx.init, params)
  updates, new_state = jax.eval_shape(tx.update, params, state, params)
  assert jax.tree.map(lambda u: (u.shape, u.dtype), updates) == \
      jax.tree.map(lambda p: (p.shape, p.dtype), params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  n = sum(math.prod(p.shape) for p in params.values())
  size = optax_fac.state_size(tx, params)
  assert size < 0.04 * 4 * n  # vs 8 bytes/param for Adam in float32


def test_explicit_mesh_matches_single_device():
  """Sharded leaves (pad path, batch axes) under an explicit mesh."""
  mesh = jax.make_mesh((2, 4), ('x', 'y'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rng = np.random.default_rng(5)
  shapes = {'a': (6, 5), 'b': (8, 12), 'c': (4, 2, 8)}
  specs = {'a': jax.P('x', None), 'b': jax.P(None, 'y'),
           'c': jax.P('x', None, 'y')}
  views = {'a': None, 'b': None, 'c': matrix.MatrixView((1,), (2,), (0,))}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in
            shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in
            shapes.items()} for _ in range(3)]
  tx = optax_fac.smmf(1e-2, views=views)

  def types_of(s):  # (StackedState compares by identity: compare leaves)
    return jax.tree.structure(s), [jax.typeof(x) for x in jax.tree.leaves(s)]

  def run(p, gs):
    s = tx.init(p)
    types = types_of(s)
    for g in gs:
      u, s = jax.jit(tx.update)(g, s, p)
      assert types_of(s) == types
      p = optax.apply_updates(p, u)
    return p

  want = run(jax.tree.map(jnp.asarray, params),
             [jax.tree.map(jnp.asarray, g) for g in grads])
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(v, jax.sharding.NamedSharding(
        mesh, specs[k])) for k, v in t.items()}
    got = run(put(params), [put(g) for g in grads])
    for k in shapes:
      assert jax.typeof(got[k]).sharding.spec == specs[k]
  for k in shapes:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Stacked (stack_leaves=True, the default) vs per-leaf state.

# Repeated shapes: 3 matrices, 2 convs, 2 biases, a prime-length vector, a
# (1,) leaf and a scalar; groups of 3, 2, 2, 1, 1, 1.
STACK_SHAPES = {
    'w0': (6, 4), 'w1': (6, 4), 'w2': (6, 4),
    'c0': (2, 2, 3, 4), 'c1': (2, 2, 3, 4),
    'b0': (5,), 'b1': (5,), 'p': (7,), 'one': (1,), 's': (),
}
STACK_CONFIGS = {
    'packed': dict(),
    'bool_wd': dict(sign_bits=8, weight_decay=0.1),
    'packed_wd': dict(weight_decay=0.1),
    'no_momentum_dense_vectors': dict(b1=None, vector_reshape=False,
                                      weight_decay=0.05),
    'masked': dict(method_mask=lambda p: {k: k not in ('w2', 'b1') for k in p}),
}


def _stack_problem(steps=5, seed=7):
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in STACK_SHAPES.items()}
  grads = {k: jnp.asarray(rng.normal(size=(steps,) + s)
                          * rng.uniform(0.1, 3.0, size=(steps,) + (1,) * len(s)),
                          jnp.float32)
           for k, s in STACK_SHAPES.items()}
  grads['w1'] = grads['w1'].at[0].set(0.0)  # an all-zero member at t = 1
  grads['c0'] = grads['c0'].at[0, 0].set(0.0)  # exact zeros: negative signs
  return params, grads


@pytest.mark.slow  # ~7 s a case on 2 cores (compiling)
@pytest.mark.parametrize('name', list(STACK_CONFIGS))
def test_stacked_matches_unstacked(name):
  kwargs = STACK_CONFIGS[name]
  tx_stack = optax_fac.smmf(LR, **kwargs)
  tx_leaf = optax_fac.smmf(LR, stack_leaves=False, **kwargs)
  params, grads = _stack_problem()

  def traj(tx, p, gs):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), u
    return jax.lax.scan(body, (p, tx.init(p)), gs)

  @jax.jit
  def both(p, gs):
    return traj(tx_stack, p, gs), traj(tx_leaf, p, gs)

  ((p1, s1), u1), ((p2, _), u2) = both(params, grads)
  for k in STACK_SHAPES:
    np.testing.assert_allclose(u1[k], u2[k], rtol=2e-6, atol=1e-7,
                               err_msg=f'{name}: {k}')
    np.testing.assert_allclose(p1[k], p2[k], rtol=2e-6, atol=1e-7)
    assert u1[k].dtype == jnp.float32 and u1[k].shape[1:] == STACK_SHAPES[k]
  # The state is stacked: one (3, n1) row factor for the three (6, 4) leaves.
  stacked = jax.tree.leaves(
      s1, is_leaf=lambda x: isinstance(x, optax_fac.StackedState))
  stacked = [x for x in stacked if isinstance(x, optax_fac.StackedState)]
  assert len(stacked) == 1
  v_rows = {x.shape for x in jax.tree.leaves(stacked[0].inner.v_row)}
  n_w = 2 if 'method_mask' in kwargs else 3                 # w2 masked out
  assert (n_w, 6) in v_rows                          # 24 -> (6, 4)
  # Same total state size, element for element.
  assert (optax_fac.state_size(tx_stack, params)
          == optax_fac.state_size(tx_leaf, params))


def test_stacked_state_partition_specs():
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32)
              for k, s in STACK_SHAPES.items()}
  specs = {k: jax.P() for k in STACK_SHAPES}
  specs.update(w0=jax.P('data', 'model'), w1=jax.P('data', 'model'),
               w2=jax.P(None, 'model'), c0=jax.P(None, None, 'data', 'model'),
               b0=jax.P('model'))
  mesh = jax.sharding.AbstractMesh((4, 2), ('data', 'model'))
  for kwargs in (dict(), dict(b1=None, vector_reshape=False, sign_bits=8)):
    tx = optax_fac.smmf(1e-3, **kwargs)
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # every leaf is covered by a rule
      got = optax_fac.state_partition_specs(tx, abstract, specs)
    state = jax.eval_shape(tx.init, abstract)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    assert (jax.tree.structure(got, is_leaf=is_spec)
            == jax.tree.structure(state))
    spec_leaves = jax.tree.leaves(got, is_leaf=is_spec)
    state_leaves = jax.tree.leaves(state)
    assert len(spec_leaves) == len(state_leaves)
    for spec, leaf in zip(spec_leaves, state_leaves):
      assert len(spec) == leaf.ndim, (spec, leaf.shape)
      assert all(e is None for e in spec), spec  # [decided] replicated
      jax.sharding.NamedSharding(mesh, spec).shard_shape(leaf.shape)


def test_stacked_explicit_mesh_matches_single_device():
  """Same-shape leaves sharded alike are stacked under an explicit mesh."""
  mesh = jax.make_mesh((2, 4), ('x', 'y'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  shapes = {'a0': (8, 12), 'a1': (8, 12), 'a2': (8, 12), 'v0': (12,),
            'v1': (12,), 'p': (7,)}
  specs = {'a0': jax.P('x', 'y'), 'a1': jax.P('x', 'y'), 'a2': jax.P(None, 'y'),
           'v0': jax.P('y'), 'v1': jax.P('y'), 'p': jax.P(None)}
  rng = np.random.default_rng(8)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in
            shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in
            shapes.items()} for _ in range(2)]
  tx = optax_fac.smmf(1e-2, weight_decay=0.1)

  def run(p, gs):
    s = tx.init(p)
    for g in gs:
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    return p, s

  want, _ = run(jax.tree.map(jnp.asarray, params),
                [jax.tree.map(jnp.asarray, g) for g in grads])
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(v, jax.sharding.NamedSharding(
        mesh, specs[k])) for k, v in t.items()}
    got, state = run(put(params), [put(g) for g in grads])
    for k in shapes:
      assert jax.typeof(got[k]).sharding.spec == specs[k]
  # a0, a1 (same sharding) form one group; a2 (other sharding) another.
  members = state[0].groups.members
  assert sorted(len(m) for m in members) == [1, 1, 2, 2]
  for k in shapes:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# The one-pass GPU kernel (optax_fac.smmf_kernel), run by Pallas' interpreter.

smmf_kernel = importlib.import_module('optax_fac.smmf_kernel')

# Square views (128, 64), (144, 128) and (256, 128) are tiled; (64,) -> (8, 8)
# is not and takes the array path in the same step. Two leaves share a shape,
# so a stacked group has two members (the second updates signs in place).
KERNEL_SHAPES = ((128, 64), (3, 3, 64, 32), (64,), (128, 64), (256, 128))


@pytest.fixture
def kernel_everywhere(monkeypatch):
  """Takes the GPU branch on any backend, with the kernel interpreted.

  Returns the list of (n1, n2) member views the kernel was traced for.
  """
  traced = []
  step = smmf_kernel.smmf_group_step

  def interpreted(gs, *args, **kwargs):
    traced.extend(g.shape for g in gs)
    return step(gs, *args, interpret=True, **kwargs)

  monkeypatch.setattr(smmf_kernel, 'smmf_group_step', interpreted)
  monkeypatch.setattr(smmf_lib, '_on_nvidia_gpu',
                      lambda kernel, arrays, *args: kernel(*args))
  return traced


def test_kernel_tiling_rule():
  assert smmf_kernel.tiling(8192, 8192) == (32, 256)
  assert smmf_kernel.tiling(768, 768) == (32, 256)
  assert smmf_kernel.tiling(5120, 4800) == (128, 64)
  assert smmf_kernel.tiling(128, 64) == (128, 64)
  assert smmf_kernel.tiling(1024, 688) == (512, 16)  # LLaMA-60M's FFN
  assert smmf_kernel.tiling(1024, 344) is None      # rows of 8: too short
  assert smmf_kernel.tiling(32, 24) is None         # 1-D 768: too small
  assert smmf_kernel.tiling(16, 64) is None         # tile of 2^11 needed
  for n1, n2 in ((8192, 8192), (5120, 4800), (1536, 1024)):
    bm, bn = smmf_kernel.tiling(n1, n2)
    assert n1 % bm == 0 and n2 % bn == 0 and bn % 8 == 0


def test_kernel_group_step_matches_numpy():
  """Members 1 and 2 of a group of 4: D, the partial sums, the bits."""
  rng = np.random.default_rng(0)
  members, n1, n2, first = 4, 256, 128, 1
  gs = rng.normal(size=(2, n1, n2)).astype(np.float32)
  gs[0, 0, :5] = 0.0  # exact zeros where M = 0: negative
  signs = rng.integers(0, 256, size=(members, n1, n2 // 8), dtype=np.uint8)
  m_row, v_row = rng.random((2, members, n1), dtype=np.float32)
  m_col, v_col = rng.random((2, members, n2), dtype=np.float32)
  m_row[1, 0] = 0.0
  b1, b2, eps = 0.85, 0.3, 1e-3
  ds, v_rows, v_cols, new_signs, m_rows, m_cols = smmf_kernel.smmf_group_step(
      [jnp.asarray(g) for g in gs], jnp.array([b1, b2, eps, 0.0], jnp.float32),
      v_row, v_col, jnp.asarray(signs), m_row, m_col, first=first,
      interpret=True)
  bm, bn = smmf_kernel.tiling(n1, n2)  # (64, 128): a 4 x 1 grid of tiles
  assert v_rows.shape == (2, n2 // bn, n1) and v_cols.shape == (2, n1 // bm, n2)
  assert v_cols.shape[1] > 1
  for k, g in enumerate(gs):
    b = first + k
    g64 = g.astype(np.float64)
    positive = np.unpackbits(signs[b].reshape(-1)).reshape(n1, n2) > 0
    magnitude = np.outer(m_row[b], m_col[b]).astype(np.float64)
    m = b1 * np.where(positive, magnitude, -magnitude) + (1 - b1) * g64
    v = b2 * np.outer(v_row[b], v_col[b]) + (1 - b2) * g64 ** 2
    np.testing.assert_allclose(ds[k], m / (np.sqrt(v) + eps), rtol=2e-6,
                               atol=1e-6)
    # [decided] The partials are of pre-scaled terms (overflow-safe): they
    # add up to row means (sums / n2) and column means (sums / n1).
    np.testing.assert_allclose(np.sum(v_rows[k], 0), v.sum(1) / n2, rtol=1e-5)
    np.testing.assert_allclose(np.sum(v_cols[k], 0), v.sum(0) / n1, rtol=1e-5)
    np.testing.assert_allclose(np.sum(m_rows[k], 0), np.abs(m).sum(1) / n2,
                               rtol=1e-5)
    np.testing.assert_allclose(np.sum(m_cols[k], 0), np.abs(m).sum(0) / n1,
                               rtol=1e-5)
    np.testing.assert_array_equal(
        np.unpackbits(np.asarray(new_signs[b]).reshape(-1)).reshape(n1, n2),
        m > 0)
  # The other members' signs are untouched.
  np.testing.assert_array_equal(np.asarray(new_signs)[[0, 3]], signs[[0, 3]])


def test_kernel_calls_split_large_groups(kernel_everywhere, monkeypatch):
  """A group larger than MAX_MEMBERS takes several calls, same updates."""
  monkeypatch.setattr(smmf_kernel, 'MAX_MEMBERS', 2)
  rng = np.random.default_rng(1)
  params = {f'w{i}': jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
            for i in range(5)}
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]

  def run(kernel):
    tx = optax_fac.smmf(1e-2, fused_kernel=kernel)
    state = tx.init(params)
    for g in grads:
      updates, state = jax.jit(tx.update)(g, state, params)
    return updates

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               run(True), run(False))
  assert len(kernel_everywhere) == 5


KERNEL_CONFIGS = {
    'packed': dict(),
    'packed_wd_stacked_off': dict(weight_decay=0.1, stack_leaves=False),
    'no_momentum': dict(b1=None, decay_rate=0.8),
    'other_schedules': dict(b1=0.8, growth_rate=0.99, eps=1e-6),
}


@pytest.mark.parametrize('name', list(KERNEL_CONFIGS))
def test_kernel_path_matches_float64_transcription(name, kernel_everywhere):
  kwargs = dict(KERNEL_CONFIGS[name])
  steps = 12
  rng = np.random.default_rng(3)
  params = [rng.normal(size=s).astype(np.float32) for s in KERNEL_SHAPES]
  grads = [rng.normal(size=(steps,) + s).astype(np.float32)
           * rng.uniform(0.1, 3.0, size=(steps,) + (1,) * len(s))
           for s in KERNEL_SHAPES]
  grads[0][0, 0] = 0.0
  ref_kwargs = _official_kwargs({k: v for k, v in kwargs.items() if k != 'stack_leaves'})
  ref = Float64SMMF(params, LR, **ref_kwargs)
  want = [ref.step([g[t] for g in grads]) for t in range(steps)]
  got = _run_jax(optax_fac.smmf(LR, **kwargs), params, grads)
  # The kernel ran on every tiled view, once per member of each group.
  want_views = [(128, 64), (144, 128), (128, 64), (256, 128)]
  assert sorted(kernel_everywhere) == sorted(want_views), kernel_everywhere
  for t in range(steps):
    for leaf, shape in enumerate(KERNEL_SHAPES):
      np.testing.assert_allclose(
          got[leaf][t], want[t][leaf], rtol=1e-5, atol=2e-6,
          err_msg=f'{name}: step {t + 1}, leaf {shape}')
  moved = np.abs(want[-1][0] - params[0]).mean()
  assert moved > LR / 2, moved  # far beyond the tolerance


def test_kernel_path_state_equals_array_path(kernel_everywhere):
  """Same state layout and values (up to summation order) as the arrays."""
  rng = np.random.default_rng(5)
  params = {f'w{i}': jnp.asarray(rng.normal(size=s), jnp.float32)
            for i, s in enumerate(KERNEL_SHAPES)}
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]

  def run(kernel):
    tx = optax_fac.smmf(1e-2, fused_kernel=kernel)
    state = tx.init(params)
    for g in grads:
      updates, state = jax.jit(tx.update)(g, state, params)
    return updates, state

  u_kernel, s_kernel = run(True)
  u_arrays, s_arrays = run(False)
  assert kernel_everywhere  # the kernel did run for fused_kernel=True
  assert (jax.tree.structure(s_kernel) == jax.tree.structure(s_arrays))
  for a, b in zip(jax.tree.leaves(s_kernel), jax.tree.leaves(s_arrays)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == jnp.uint8:
      # Signs may differ only where M is within rounding of 0: none here.
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               u_kernel, u_arrays)


def test_kernel_branch_is_not_lowered_for_cpu():
  """Without the fixture: the CPU module has no Triton call in it."""
  params = {'w': jnp.ones((128, 64))}
  tx = optax_fac.smmf(1e-2)
  state = tx.init(params)
  text = jax.jit(tx.update).lower(params, state, params).as_text()
  assert 'triton' not in text
  cuda = jax.jit(tx.update).trace(params, state, params).lower(
      lowering_platforms=('cuda',)).as_text()
  assert 'triton' in cuda


# --------------------------------------------------------------------------
# Overflow-safe storage [decided]: row means and columns normalised to mean 1.


def test_mean_factors_reconstruct_official_factors():
  """r̄ c̄ᵀ (row means, columns of mean 1) equals the official r cᵀ."""
  rng = np.random.default_rng(11)
  mats = [rng.random((40, 25)) ** 3,                     # one (n1, n2) view
          rng.random((2, 3, 16, 8)) * 10.0 ** rng.integers(-6, 6, (2, 3, 1, 1)),
          rng.random((7, 1)), rng.random((1, 1)),
          np.zeros((12, 10)),                            # sum 0: kept as is
          # V = G² of a 1e18-scale gradient: the official float32 row sums
          # (512 terms of about 1e36) overflow; the means do not.
          (1e18 * rng.normal(size=(1024, 512))) ** 2]
  mats = [np.asarray(a, np.float32) for a in mats]
  for a in mats:
    ((row, col),) = jax.jit(smmf_lib._nnmf)(jnp.asarray(a))
    row, col = np.asarray(row, np.float64), np.asarray(col, np.float64)
    assert np.all(np.isfinite(row)) and np.all(np.isfinite(col))
    a64 = a.astype(np.float64).reshape((-1,) + a.shape[-2:])
    row, col = row.reshape(a64.shape[:2]), col.reshape(a64[:, 0].shape)
    for b in range(a64.shape[0]):
      r, c = Float64SMMF.nnmf(a64[b])
      np.testing.assert_allclose(np.outer(row[b], col[b]), np.outer(r, c),
                                 rtol=1e-5, atol=0, err_msg=str(a.shape))
      # What is stored: row means, and columns of mean 1 (unless all 0).
      np.testing.assert_allclose(row[b], a64[b].mean(axis=1), rtol=1e-5)
      np.testing.assert_allclose(col[b].mean(), 1.0 if c.any() else 0.0,
                                 rtol=1e-5)


def _float64_updates(shapes, grads, **kwargs):
  """The official updates D_t (float64), from zero parameters and lr = 1."""
  ref = Float64SMMF([np.zeros(s) for s in shapes], 1.0, **kwargs)
  prev, out = [np.zeros(s) for s in shapes], []
  for g in grads:
    new = ref.step(g)
    out.append([p - q for p, q in zip(prev, new)])
    prev = new
  return out


@pytest.mark.parametrize('path', ['arrays', 'kernel'])
def test_huge_gradient_keeps_state_finite(path, request):
  """A 1e18-scale gradient, then normal ones: finite, and still official.

  V = G² ≈ 1e36: row sums of V over n2 >= ~340 entries overflow float32
  (the old storage gave c = inf / inf = NaN and NaN from then on), while
  Adam's state is finite up to |G| ≈ 1.8e19. The kernel runs interpreted,
  so its leaf is the smallest tiled one that overflowed the old sums.
  """
  if path == 'kernel':
    request.getfixturevalue('kernel_everywhere')
    shapes, kwargs = [(512, 512)], dict()              # view (512, 512)
  else:                                                # views (2048, 1024)
    shapes, kwargs = [(1024, 2048), (640,)], dict(vector_reshape=False)
  rng = np.random.default_rng(12)
  grads = [[(1e18 * rng.normal(size=s)).astype(np.float32) for s in shapes]]
  grads += [[rng.normal(size=s).astype(np.float32) for s in shapes]
            for _ in range(2)]
  want = _float64_updates(shapes, grads, **_official_kwargs(kwargs))
  tx = optax_fac.scale_by_smmf(**kwargs)
  state = tx.init([jnp.zeros(s) for s in shapes])
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    updates, state = step([jnp.asarray(x) for x in g], state)
    for x in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(x, np.float64))), (t, x.shape)
    for leaf, (u, w) in enumerate(zip(updates, want[t])):
      assert np.all(np.isfinite(u))
      np.testing.assert_allclose(u, w, rtol=1e-5, atol=2e-6,
                                 err_msg=f'{path}: step {t + 1}, leaf {leaf}')
