"""Long runs (issue 15, item 5): 20,000 steps of every named optimizer.

Softmax regression (a 64 x 10 matrix and a bias) on scikit-learn's digits
(1,797 8x8 images, shipped with the package), mini-batches of 32, float32 and
bfloat16 params, a warmup + cosine learning-rate schedule that decays to
exactly 0 at the last step. The whole run is one jitted program per
optimizer and dtype (``lax.scan`` over 20 chunks of 1,000 steps, with a
checkpoint after each chunk). A step costs 50-100 us on CPU: the
optimizer's many small operations, not the model, are most of it, and the
compilation about as much again as the 20,000 steps.

Guarantees:

* the loss stays finite at every step and training works (the final loss on
  the whole set is below a quarter of the initial one);
* the state stays bounded: every leaf finite, every ``skipped_refreshes``
  counter 0, and every float leaf at most ``n_max * max(1, G^2)`` in
  magnitude, where ``G`` is the largest gradient Frobenius norm of the run and
  ``n_max`` = 64 the longest axis. Each float leaf of these states is an EMA,
  mean or convex combination of gradient entries (|.| <= G), of rotated or
  projected gradient entries (orthonormal bases: |.| <= G), of squares of
  those (<= G^2), an orthonormal basis (<= 1), or an SMMF column factor
  normalised to mean 1 (<= its length <= n_max);
* no drift of the factored statistics (their references are exact identities
  of the methods, so any drift shows up as a growing error):
  H-Fac's, signFSGD's and LionFactor's factored momentum (u, v) equal the
  row and column means of the full EMA of the gradient that they factor
  (the mean of an EMA is the EMA of the means), and SMMF's second moment
  V = r c^T keeps the row and column sums of the full EMA of G^2 (the rank-1
  NNMF preserves row and column sums, and the EMA is linear), while its
  momentum's absolute row and column sums stay below the EMA of those of
  |G| (triangle inequality). Float32 rounding bounds the error; the bounds
  are derived in the references' ``tolerance`` methods and checked at all
  20 checkpoints.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac

pytestmark = pytest.mark.slow

STEPS = 20_000
CHUNKS = 20
BATCH = 32
EPS32 = float(jnp.finfo(jnp.float32).eps)

# Peak learning rates: the usual Adam-like 3e-3, a smaller one for the sign
# methods (every entry moves by about lr), and the larger ones that the
# Subset-Norm code uses (its denominator is shared by a whole row or column).
PEAK_LR = {
    'hfac': 3e-3, 'sign_fsgd': 3e-3, 'lion_factor': 3e-3,
    'adafactor_momentum': 3e-3, 'adadiag': 3e-3, 'adadiag_pp': 3e-3,
    'adafac_diag': 3e-3, 'adafac_diag_pp': 3e-3, 'hfac_diag': 3e-3,
    'smmf': 3e-3, 'adam_sn': 1e-2, 'adam_snsm': 1e-2, 'rmsprop_sn': 3e-3,
    'adagrad_sn': 0.3,
}
EXTRA = {'adam_snsm': dict(rank=4)}


def schedule(peak):
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=500, decay_steps=STEPS, end_value=0.0)


@functools.lru_cache(maxsize=None)
def digits():
  """Shuffled digits scaled to [0, 1]: 56 batches of 32 (1,792 images)."""
  datasets = pytest.importorskip('sklearn.datasets')
  data = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(data.target))
  n = (len(order) // BATCH) * BATCH
  x = (data.data[order[:n]] / 16.0).astype(np.float32)
  return x, data.target[order[:n]].astype(np.int32)


def init_params(dtype):
  rng = np.random.default_rng(1)
  return {'w': jnp.asarray(rng.normal(size=(64, 10)) / 8.0, dtype),
          'b': jnp.zeros((10,), dtype)}


def loss_fn(params, x, y):
  """Mean cross-entropy, computed in float32 from the params (of either
  dtype: the gradients come back in the params' dtype). XLA's CPU matmul in
  bfloat16 is a slow loop; float32 compute is the usual mixed precision."""
  logits = x @ f32(params['w']) + f32(params['b'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def f32(x):
  return x.astype(jnp.float32)


# --------------------------------------------------------------------------
# References for the factored statistics.


def largest_magnitude(tree):
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0)
                            for x in jax.tree.leaves(tree)]))


def state_nodes(state, cls):
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, cls)) if isinstance(s, cls)]


def square_dims(n):
  """docs/algorithms.md §4: n2 = largest divisor of n <= isqrt(n)."""
  n2 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
  return n // n2, n2


class FactoredMomentumReference:
  """Full EMAs M of each matrix's gradient, with the rule of the factored
  momentum (u, v) of H-Fac (time-corrected b1), signFSGD (plain b1) or
  LionFactor (plain b2): u = row means of M, v = column means of M."""

  def __init__(self, name, kwargs):
    self.name = name
    self.beta = kwargs.get('b2', 0.99) if name == 'lion_factor' else (
        kwargs.get('b1', 0.9))

  def decay(self, t):
    b = jnp.float32(self.beta)
    if self.name != 'hfac':
      return b
    t = f32(t)
    return b * (1 - b ** (t - 1)) / (1 - b ** t)

  def init(self, params):
    return {k: jnp.zeros(p.shape, jnp.float32) for k, p in params.items()
            if p.ndim == 2}

  def update(self, ref, grads, t):
    d = self.decay(t)
    return {k: d * m + (1 - d) * f32(grads[k]) for k, m in ref.items()}

  def errors(self, ref, state, params):
    """max |u - rowmean(M)| and |v - colmean(M)| per matrix (in units of the
    largest gradient entry: divided by the caller)."""
    (node,) = state_nodes(state, (optax_fac.HfacState,
                                  optax_fac.FactoredMomentumState))
    out = []
    for u, v in zip(jax.tree.leaves(node.u), jax.tree.leaves(node.v)):
      (key,) = [k for k, p in params.items() if p.ndim == 2
                and p.shape == (u.shape[-1], v.shape[-1])]
      m = ref[key]
      out.append(jnp.maximum(
          jnp.max(jnp.abs(u.reshape(-1) - jnp.mean(m, axis=1))),
          jnp.max(jnp.abs(v.reshape(-1) - jnp.mean(m, axis=0)))))
    return jnp.max(jnp.stack(out))

  def tolerance(self, params):
    """Each step rounds the EMA (a few float32 operations) and the library's
    mean of n entries: at most (n + 8) eps of the largest gradient entry;
    the EMA multiplies past errors by beta, so they add up to at most
    (n + 8) eps / (1 - beta)."""
    n = max(max(p.shape) for p in params.values())
    return (n + 8) * EPS32 / (1 - self.beta)


class SmmfReference:
  """Full EMAs, in each leaf's square view, of G^2 (SMMF's b2 schedule) and
  of the absolute row and column sums of G (its b1 schedule)."""

  def __init__(self, kwargs):
    self.b1 = kwargs.get('b1', 0.9)
    self.growth = kwargs.get('growth_rate', 0.999)
    self.c = kwargs.get('decay_rate', 0.5)

  def init(self, params):
    out = {}
    for k, p in params.items():
      n1, n2 = square_dims(p.size)
      out[k] = (jnp.zeros((n1, n2), jnp.float32), jnp.zeros(n1, jnp.float32),
                jnp.zeros(n2, jnp.float32))
    return out

  def update(self, ref, grads, t):
    t = f32(t)
    b1 = self.b1 * jnp.float32(self.growth) ** (t - 1)
    b2 = 1 - t ** (-self.c)
    out = {}
    for k, (v, a_row, a_col) in ref.items():
      g = f32(grads[k]).reshape(v.shape)
      out[k] = (b2 * v + (1 - b2) * g * g,
                b1 * a_row + (1 - b1) * jnp.sum(jnp.abs(g), axis=1),
                b1 * a_col + (1 - b1) * jnp.sum(jnp.abs(g), axis=0))
    return out

  def errors(self, ref, state, params):
    """Largest relative error of V's row and column sums, and the largest
    relative excess of |M|'s row and column sums over their EMA bound."""
    (node,) = state_nodes(state, optax_fac.SMMFState)
    v_err, m_excess = [], []
    for v_row, v_col, m_row, m_col in zip(
        *(jax.tree.leaves(x) for x in (node.v_row, node.v_col, node.m_row,
                                       node.m_col))):
      n1, n2 = v_row.shape[-1], v_col.shape[-1]
      (key,) = [k for k, p in params.items()
                if square_dims(p.size) == (n1, n2)]
      v_ref, a_row, a_col = ref[key]
      v_hat = v_row.reshape(n1, 1) * v_col.reshape(1, n2)
      m_hat = m_row.reshape(n1, 1) * m_col.reshape(1, n2)   # |M|
      for got, want in ((v_hat.sum(1), v_ref.sum(1)),
                        (v_hat.sum(0), v_ref.sum(0))):
        v_err.append(jnp.max(jnp.abs(got - want)) / jnp.max(want))
      for got, bound in ((m_hat.sum(1), a_row), (m_hat.sum(0), a_col)):
        m_excess.append(jnp.max(got - bound) / jnp.max(bound))
    return jnp.max(jnp.stack(v_err)), jnp.max(jnp.stack(m_excess))

  def tolerance(self, params):
    """A step rounds the EMA and the factorisation's sums of n1 or n2 terms:
    a relative error of at most (n1 + n2 + 8) eps; the EMA keeps a share
    b2_t of past errors, and 1 / (1 - b2_t) = t^c <= STEPS^c, so they add up
    to at most (n1 + n2 + 8) eps STEPS^c (the momentum's b1_t only shrinks
    over the run, so the same bound holds for it)."""
    n = max(sum(square_dims(p.size)) for p in params.values())
    return (n + 8) * EPS32 * STEPS ** self.c


def reference_for(name, kwargs):
  if name in ('hfac', 'sign_fsgd', 'lion_factor'):
    return FactoredMomentumReference(name, kwargs)
  if name == 'smmf':
    return SmmfReference(kwargs)
  return None


# --------------------------------------------------------------------------
# The run.

# The states with a ``skipped_refreshes`` counter (0 in a healthy run).
SKIP_COUNTED = (optax_fac.SvdRotationState, optax_fac.SubspaceMomentumState,
                optax_fac.SMMFState)


def long_run(name, dtype):
  """The jitted run, its arguments and the drift reference (or None).

  The run returns the initial loss; per chunk: the loss on the whole set,
  whether every loss so far and the state are finite, the largest |state
  leaf|, the largest gradient Frobenius norm so far, the skipped refreshes
  and the drift errors (with the largest gradient entry so far); the final
  params and state."""
  kwargs = dict(EXTRA.get(name, {}))
  tx = optax_fac.NAMED_OPTIMIZERS[name](schedule(PEAK_LR[name]), **kwargs)
  ref_model = reference_for(name, kwargs)
  x_all, y_all = digits()

  @jax.jit
  def run(params, xb, yb):
    x_full, y_full = xb.reshape(-1, 64), yb.reshape(-1)

    def step(carry, t):
      params, state, ref, finite, g_max, g_elem = carry
      i = t % xb.shape[0]
      loss, grads = jax.value_and_grad(loss_fn)(params, xb[i], yb[i])
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      if ref_model is not None:
        ref = ref_model.update(ref, grads, t + 1)
      g32 = jax.tree.map(f32, grads)
      g_max = jnp.maximum(g_max, optax.global_norm(g32))
      g_elem = jnp.maximum(g_elem, largest_magnitude(g32))
      finite = finite & jnp.isfinite(loss)
      return (params, state, ref, finite, g_max, g_elem), None

    def chunk(carry, c):
      carry, _ = jax.lax.scan(
          step, carry, c * (STEPS // CHUNKS) + jnp.arange(STEPS // CHUNKS))
      params, state, ref, finite, g_max, g_elem = carry
      floats = [f32(x) for x in jax.tree.leaves(state)
                if jnp.issubdtype(x.dtype, jnp.floating)]
      record = {
          'loss': loss_fn(params, x_full, y_full),
          'finite': finite & jnp.all(jnp.stack(
              [jnp.all(jnp.isfinite(x)) for x in floats])),
          'state_max': largest_magnitude(floats),
          'g_max': g_max,
          'skipped': sum((jnp.sum(s.skipped_refreshes)
                          for s in state_nodes(state, SKIP_COUNTED)),
                         jnp.int32(0)),
      }
      if ref_model is not None:
        record['drift'] = ref_model.errors(ref, state, params)
        record['g_elem'] = g_elem
      return carry, record

    state = tx.init(params)
    ref = ref_model.init(params) if ref_model is not None else {}
    carry = (params, state, ref, jnp.bool_(True), jnp.float32(0),
             jnp.float32(0))
    (params, state, *_), records = jax.lax.scan(chunk, carry,
                                                jnp.arange(CHUNKS))
    return loss_fn(carry[0], x_full, y_full), records, params, state

  args = (init_params(dtype), jnp.asarray(x_all).reshape(-1, BATCH, 64),
          jnp.asarray(y_all).reshape(-1, BATCH))
  return run, args, ref_model


# --------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', list(PEAK_LR))
def test_long_run(name, dtype):
  """20,000 steps: finite losses and training, a bounded and finite state
  with no skipped refresh, and (H-Fac, signFSGD, LionFactor, SMMF) factored
  statistics that keep their exact relations to the full EMAs."""
  assert set(PEAK_LR) == set(optax_fac.NAMED_OPTIMIZERS)
  run, args, reference = long_run(name, jnp.dtype(dtype))
  init_loss, records, params, state = jax.device_get(run(*args))

  assert bool(np.all(records['finite'])), records['finite']
  assert np.all(np.isfinite(records['loss'])), records['loss']
  assert records['loss'][-1] < 0.25 * init_loss, (init_loss,
                                                   records['loss'])
  for p in jax.tree.leaves(params):
    assert p.dtype == jnp.dtype(dtype) and np.all(np.isfinite(
        p.astype(np.float32)))

  bound = 64 * np.maximum(1.0, records['g_max'] ** 2)
  assert np.all(records['state_max'] <= bound), (records['state_max'],
                                                 bound)
  assert np.all(records['skipped'] == 0), records['skipped']
  for x in jax.tree.leaves(state):   # counters and sign bits
    if not jnp.issubdtype(x.dtype, jnp.floating):
      assert np.all((0 <= x) & (x <= max(STEPS, 255))), x

  if reference is None:
    return
  tol = reference.tolerance(args[0])
  if isinstance(reference, FactoredMomentumReference):
    errors = records['drift'] / records['g_elem']
  else:
    errors = np.max(np.stack(records['drift']), axis=0)
  assert np.all(errors <= tol), (errors, tol)
