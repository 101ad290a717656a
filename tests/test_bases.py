"""Bases of svd_rotation that depend on G only (optax_fac/linalg.py, §3).

* eigh and SVD give the same updates, also where a basis has a null block
  (two-sided non-square leaves) or numerically zero singular values
  (rank-deficient gradients): those columns are a canonical completion of
  the kept vectors' span, not the decomposition's arbitrary choice;
* every basis is orthogonal (Pᵀ P = P Pᵀ = I), a zero gradient's is I;
* 1e18-scale gradients: the Gram matrices are formed from G / max|G|, so the
  refresh is finite and equals the refresh of G;
* an independent float64 NumPy construction of the canonical basis.

Compiles are the cost here (one while loop per basis size): the tests share
a few trees and one jitted update per configuration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_fac
from optax_fac import linalg

import reference_numpy

EPS32 = float(np.finfo(np.float32).eps)


def _low_rank(rng, shape, rank):
  """A float32 gradient of rank ``rank`` in the default (rows, last) view."""
  m, n = int(np.prod(shape[:-1])), shape[-1]
  g = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n))
  return g.reshape(shape).astype(np.float32)


@functools.cache
def _tx(sides, basis, every):
  tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides=sides, every=every,
                              basis=basis, precision='highest')
  return tx, jax.jit(tx.update)


def _run(sides, basis, every, grads):
  tx, update = _tx(sides, basis, every)
  state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
  outs, states = [], []
  for g in grads:
    u, state = update(g, state)
    outs.append(jax.tree.map(np.asarray, u))
    states.append(jax.tree.map(np.asarray, state))
  return outs, states


# --------------------------------------------------------------------------
# (1) eigh == svd, over 5 steps with refreshes at steps 1, 3 and 5.

FULL = {'tall': (12, 5), 'wide': (5, 12), 'conv': (3, 3, 4, 8)}
LOW = {'rank1_tall': ((12, 5), 1), 'rank2_wide': ((5, 12), 2)}
# One-sided only (its two-sided σ_max² at 1e18 overflows Adam itself, see
# (3)): a Gram matrix that overflowed float32 at 1e18 before the rescaling.
LONG = {'long': (4, 512)}
EVERY = 2


def _changing_grads(sides, steps=5, seed=0):
  """Random gradients, new at every step. The low-rank leaves are low-rank
  from step 3 on (the refreshes at steps 3 and 5). Not at step 1: Adam's
  first step is m / (sqrt(v) + ε) with no history, so the float32 roundoff
  left in the null rows of Pᵀ G (≈ eps·|G| ≫ ε) would come out as ±1
  updates whatever the basis; with a history that roundoff is negligible."""
  rng = np.random.default_rng(seed)
  full = dict(FULL, **(LONG if sides == 'one' else {}))
  out = []
  for t in range(1, steps + 1):
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in full.items()}
    for k, (s, r) in LOW.items():
      g[k] = (_low_rank(rng, s, r) if t >= 3
              else rng.normal(size=s).astype(np.float32))
    out.append(g)
  return out


@pytest.mark.parametrize('sides', ['one', 'two'])
def test_eigh_and_svd_give_the_same_updates(sides):
  grads = _changing_grads(sides)
  outs = {b: _run(sides, b, EVERY, grads)[0] for b in ('eigh', 'svd')}
  for t in range(len(grads)):
    for k in grads[0]:
      # Updates are O(1) (Adam); the float32 vectors of eigh and SVD agree
      # to ~eps · λ_max / gap.
      np.testing.assert_allclose(outs['eigh'][t][k], outs['svd'][t][k],
                                 rtol=1e-4, atol=1e-4,
                                 err_msg=f'{sides}-sided, step {t + 1}, {k}')


# --------------------------------------------------------------------------
# (2) and (4): one refresh of structured and random leaves, two-sided; basis
# sizes 3 and 8 only.


def _structured(rng):
  """Column space span{e_0, x} with x on rows 2..7; row 1 is zero."""
  g = np.zeros((8, 8))
  g[0] = rng.normal(size=8)
  g[2:] = np.outer(rng.normal(size=6), rng.normal(size=8))
  return g


def _refresh_leaves():
  rng = np.random.default_rng(3)
  mats = {'tall': rng.normal(size=(8, 3)), 'wide': rng.normal(size=(3, 8)),
          'conv': rng.normal(size=(2, 2, 2, 3)),   # seen as 8 x 3
          'rank2': _low_rank(rng, (8, 8), 2), 'structured': _structured(rng),
          'ones': np.ones((3, 8)), 'zero': np.zeros((8, 3))}
  return {k: np.asarray(v, np.float32) for k, v in mats.items()}


@functools.cache
def _refreshed(basis):
  g = _refresh_leaves()
  (u,), (state,) = _run('two', basis, 1, [g])
  return g, u, state


@pytest.mark.parametrize('basis', ['eigh', 'svd'])
def test_bases_are_orthogonal_and_zero_gradient_gives_identity(basis):
  _, u, state = _refreshed(basis)
  for side in ('left', 'right'):
    for k, p in getattr(state, side).items():
      p = np.asarray(p, np.float64)
      eye = np.eye(p.shape[0])
      np.testing.assert_allclose(p.T @ p, eye, atol=2e-6, err_msg=(side, k))
      np.testing.assert_allclose(p @ p.T, eye, atol=2e-6, err_msg=(side, k))
  np.testing.assert_array_equal(state.left['zero'], np.eye(8))
  np.testing.assert_array_equal(state.right['zero'], np.eye(3))
  np.testing.assert_array_equal(u['zero'], 0.0)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))


def np_sign_fix(vecs):
  idx = np.argmax(np.abs(vecs), axis=0)
  pivot = vecs[idx, np.arange(vecs.shape[1])]
  return vecs * np.where(pivot < 0, -1.0, 1.0)


def np_canonical_basis(g, side):
  """Float64, from the spec in linalg's docstrings: the singular vectors of
  λ = σ² > max(m, n) · eps32 · λ_max, sign-fixed; then, while columns are
  missing, Gram–Schmidt of (I − B Bᵀ) e_j for the first j whose residual
  1 − ‖B[j, :]‖² is ≥ e⁻¹ × the largest, positive at j. Returns (basis,
  rank)."""
  g = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
  m, n = g.shape
  u, s, vt = np.linalg.svd(g, full_matrices=False)
  vecs = u if side == 'left' else vt.T
  k = vecs.shape[0]
  lam = s ** 2
  rank = int(np.sum(lam > max(m, n) * EPS32 * lam[0])) if lam[0] > 0 else 0
  return np_complete(np_sign_fix(vecs[:, :rank]), k), rank


def np_complete(kept, k):
  """The kept (k, r) orthonormal columns, then their canonical completion."""
  return reference_numpy.canonical_completion(kept, k)


@pytest.mark.parametrize('basis', ['eigh', 'svd'])
def test_canonical_basis_matches_float64_numpy(basis):
  g32, _, state = _refreshed(basis)
  ranks = {}
  for k, g in g32.items():
    a64 = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    scale = max(np.abs(a64).max(), 1e-30)
    for side in ('left', 'right'):
      want, rank = np_canonical_basis(g, side)
      ranks[k, side] = rank
      got = np.asarray(getattr(state, side)[k], np.float64)
      np.testing.assert_allclose(got, want, atol=2e-5, err_msg=(k, side))
      # The kept block spans G's column (row) space; the completion is
      # orthogonal to it.
      a = a64 if side == 'left' else a64.T
      kept, rest = got[:, :rank], got[:, rank:]
      np.testing.assert_allclose(kept @ (kept.T @ a), a, atol=1e-5 * scale)
      np.testing.assert_allclose(rest.T @ a, 0.0, atol=1e-5 * scale)
  assert ranks['tall', 'left'] == 3 and ranks['rank2', 'right'] == 2
  assert ranks['ones', 'left'] == 1 and ranks['zero', 'left'] == 0
  # Structured: e_0 is in the column space (skipped), e_1 ⊥ it (taken as is).
  assert ranks['structured', 'left'] == 2
  np.testing.assert_allclose(state.left['structured'][:, 2], np.eye(8)[1],
                             atol=1e-6)


def test_complete_basis_batched_with_mixed_ranks():
  """k = 80: the QR path for the in-order pivots, then the loop."""
  k = 80
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(4, k, k)))
  ranks = np.array([0, 8, k, 3])
  # Structured span: e_0, e_5 and (e_1 + e_2) / sqrt(2) (pivots 1, 2 skip).
  q[3, :, :3] = 0.0
  q[3, 0, 0] = q[3, 5, 1] = 1.0
  q[3, 1, 2] = q[3, 2, 2] = np.sqrt(0.5)
  kept = np.where(np.arange(k)[None, None, :] < ranks[:, None, None], q, 0.0)
  got = np.asarray(jax.jit(linalg.complete_basis)(
      jnp.asarray(kept, jnp.float32), jnp.asarray(ranks)), np.float64)
  np.testing.assert_array_equal(got[0], np.eye(k))
  np.testing.assert_array_equal(got[2], np.float32(q[2]))
  for i in (1, 3):
    want = np_complete(q[i][:, :ranks[i]], k)
    np.testing.assert_allclose(got[i], want, atol=1e-5, err_msg=i)
    np.testing.assert_allclose(got[i].T @ got[i], np.eye(k), atol=2e-6)
  np.testing.assert_allclose(got[3][:, 3], (np.eye(k)[1] - np.eye(k)[2])
                             / np.sqrt(2.0), atol=1e-6)
  np.testing.assert_allclose(got[3][:, 4], np.eye(k)[3], atol=1e-6)


# --------------------------------------------------------------------------
# (3) Gradients of scale 1e18 (the trees and jitted updates of (1)).


@pytest.mark.parametrize('basis', ['eigh', 'svd'])
@pytest.mark.parametrize('sides', ['one', 'two'])
def test_huge_gradients_give_finite_updates_state_and_the_same_basis(
    sides, basis):
  grads = _changing_grads(sides, seed=2)
  huge = [jax.tree.map(lambda g: g * np.float32(1e18), g) if t < 2 else g
          for t, g in enumerate(grads)]
  outs, states = _run(sides, basis, EVERY, huge)
  for t, (u, s) in enumerate(zip(outs, states)):
    for x in jax.tree.leaves((u, s)):
      assert np.all(np.isfinite(x)), f'step {t + 1}'
  # The refresh at t = 1 is the refresh of the unscaled gradient (before the
  # rescaling the (4, 512) Gram matrix overflowed: no refresh, P stayed I).
  _, unscaled = _run(sides, basis, EVERY, grads[:1])
  for side in ('left', 'right'):
    for k, p in getattr(states[0], side).items():
      if p is None:
        continue
      want = getattr(unscaled[0], side)[k]
      # 5e-5: the scaled inputs differ by float32 rounding, and the GPU's
      # SVD (cuSOLVER gesvdj, Jacobi) is only ~1e-5 accurate (measured 2e-5
      # on an H200; CPU LAPACK, and eigh anywhere, agree to ~1e-6).
      np.testing.assert_allclose(p, want, atol=5e-5, err_msg=(side, k))
      assert not np.allclose(want, np.eye(want.shape[0])), (side, k)


def test_scale_to_unit_max():
  x = jnp.asarray([[[0.0, 0.0], [0.0, 0.0]], [[1e18, -3e18], [2.0, 0.0]],
                   [[jnp.inf, 1.0], [0.0, 0.0]]], jnp.float32)
  y = np.asarray(linalg.scale_to_unit_max(x, (1, 2)))
  np.testing.assert_array_equal(y[0], 0.0)
  np.testing.assert_allclose(y[1], [[1 / 3, -1.0], [2 / 3e18, 0.0]], rtol=1e-6)
  assert not np.all(np.isfinite(y[2]))   # non-finite stays non-finite


# --------------------------------------------------------------------------
# A refresh decomposes same-size matrices a chunk at a time
# (rotation.REFRESH_CHUNK_BYTES, linalg.in_chunks).


def test_in_chunks_picks_the_largest_dividing_chunk():
  seen = []

  def fn(x, y):
    seen.append(x.shape)
    return {'sum': x.sum(axis=(1, 2)) + y, 'x': 2 * x}

  for b, max_bytes, chunk in ((6, 40, 2), (7, 40, 1), (6, 10 ** 6, 6),
                              (6, 8, 1)):
    seen.clear()
    x = jnp.arange(b * 4, dtype=jnp.float32).reshape(b, 2, 2)  # 16 B each
    y = jnp.arange(b, dtype=jnp.float32)
    out = linalg.in_chunks(fn, (x, y), max_bytes)
    assert seen == [(chunk, 2, 2)], (b, max_bytes, seen)
    np.testing.assert_array_equal(out['sum'], x.sum(axis=(1, 2)) + y)
    np.testing.assert_array_equal(out['x'], 2 * x)
  for bad in (0, -5, 2.5, True):
    with pytest.raises(ValueError, match='max_bytes must be a positive int'):
      linalg.in_chunks(fn, (x, y), bad)


@pytest.mark.parametrize('basis', ['eigh', 'svd'])
def test_chunked_refresh_equals_the_whole_batch(basis, monkeypatch):
  """Six same-size matrices (two of them rank-deficient, so the canonical
  completion runs) refreshed in chunks of a few matrices give the updates
  and bases of one batched refresh."""
  from optax_fac import rotation  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  shapes = {f'w{i}': (8, 6) for i in range(6)}
  shapes['b'] = (8,)

  def grads(t):
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    if t >= 3:
      g['w0'], g['w1'] = _low_rank(rng, (8, 6), 1), _low_rank(rng, (8, 6), 2)
    return g

  steps = [grads(t) for t in range(1, 6)]

  def run(chunk_bytes):
    monkeypatch.setattr(rotation, 'REFRESH_CHUNK_BYTES', chunk_bytes)
    tx = optax_fac.svd_rotation(optax.scale_by_adam(), sides='two', every=2,
                                basis=basis, precision='highest')
    update = jax.jit(tx.update)
    jaxpr = str(jax.make_jaxpr(tx.update)(steps[0], tx.init(steps[0])))
    state, outs = tx.init(jax.tree.map(jnp.zeros_like, steps[0])), []
    for g in steps:
      u, state = update(g, state)
      outs.append(jax.tree.map(np.asarray, (u, state)))
    return outs, jaxpr.count('scan')

  whole, scans_whole = run(2 ** 40)
  chunked, scans_chunked = run(2 * 8 * 8 * 4)  # 2 Gram (or 8 x 6) matrices
  assert scans_chunked > scans_whole  # the chunks are a lax.map
  for t, (a, b) in enumerate(zip(whole, chunked)):
    jax.tree.map(lambda x, y, t=t: np.testing.assert_array_equal(
        x, y, err_msg=f'step {t + 1}'), a, b)
