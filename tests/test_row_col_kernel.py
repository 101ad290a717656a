"""optax_fac.row_col_kernel against a float64 NumPy transcription (Pallas'
interpreter on CPU: the same kernel the GPU lowers with Triton)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_fac import row_col_kernel


def reference(g):
  """Row and column means of G and of G², in float64."""
  g = np.asarray(g, np.float64)
  return [g.mean(axis=1), g.mean(axis=0), (g * g).mean(axis=1),
          (g * g).mean(axis=0)]


def check(gs, got, means=True, squares=True):
  want = [reference(g) for g in gs]
  keep = ([0, 1] if means else []) + ([2, 3] if squares else [])
  assert len(got) == len(keep)
  for out, k in zip(got, keep):
    assert out.dtype == jnp.float32
    stacked = np.stack([w[k] for w in want])
    assert out.shape == stacked.shape
    scale = max(np.abs(w[k]).max() for w in want)
    np.testing.assert_allclose(np.asarray(out, np.float64), stacked,
                               rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize('shape', [
    (64, 256),   # whole tiles (32 x 256)
    (64, 300),   # a right strip of 44 columns
    (100, 64),   # a bottom strip of 36 rows
    (85, 90),    # both strips
    (8, 8),      # not tiled: XLA alone
])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_matches_float64(shape, dtype):
  keys = jax.random.split(jax.random.key(sum(shape)), 3)
  # Nonzero means, so that the row and column means are not all noise.
  gs = [(jax.random.normal(k, shape) + 0.5 * i).astype(dtype)
        for i, k in enumerate(keys)]
  check(gs, row_col_kernel.row_col_means(gs, squares=True, interpret=True))


def test_one_statistic_at_a_time_and_jit():
  gs = [jax.random.normal(jax.random.key(i), (48, 200)) for i in range(2)]
  means = jax.jit(lambda gs: row_col_kernel.row_col_means(
      gs, interpret=True))(gs)
  check(gs, means, squares=False)
  squares = row_col_kernel.row_col_means(gs, means=False, squares=True,
                                         interpret=True)
  check(gs, squares, means=False)


def test_groups_larger_than_one_call(monkeypatch):
  monkeypatch.setattr(row_col_kernel, 'MAX_MEMBERS', 2)
  gs = [jax.random.normal(jax.random.key(i), (40, 72)) * (i + 1)
        for i in range(5)]
  check(gs, row_col_kernel.row_col_means(gs, squares=True, interpret=True))


def test_squares_do_not_overflow():
  """Entries of 1.5e19: G² (2.25e38) is finite, a row's plain sum of it is
  not; the pre-scaled sums are the means."""
  g = jnp.full((64, 512), 1.5e19, jnp.float32)
  r, s = row_col_kernel.row_col_means([g], means=False, squares=True,
                                      interpret=True)
  assert np.isfinite(np.asarray(r)).all() and np.isfinite(np.asarray(s)).all()
  np.testing.assert_allclose(np.asarray(r, np.float64), 2.25e38, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s, np.float64), 2.25e38, rtol=1e-5)


def test_tiling():
  assert row_col_kernel.tiling(2048, 5461) == (32, 256)
  assert row_col_kernel.tiling(5461, 2048) == (32, 256)
  assert row_col_kernel.tiling(32000, 2048) == (32, 256)
  assert row_col_kernel.tiling(8, 8) is None
  assert row_col_kernel.tiling(4096, 8) is None  # rows shorter than 16


def test_bad_input_names_the_argument():
  g = jnp.ones((32, 64))
  with pytest.raises(ValueError, match='gs: no members'):
    row_col_kernel.row_col_means([])
  with pytest.raises(ValueError, match='one shape'):
    row_col_kernel.row_col_means([g, jnp.ones((32, 65))])
  with pytest.raises(ValueError, match='2-D'):
    row_col_kernel.row_col_means([jnp.ones((2, 32, 64))])
  with pytest.raises(ValueError, match='both False'):
    row_col_kernel.row_col_means([g], means=False)


# --------------------------------------------------------------------------
# The optimizers' fused_kernel=True path: the kernel branch taken on CPU,
# the kernel interpreted, against the default path (XLA's reductions).

import optax  # noqa: E402  pylint: disable=g-import-not-at-top
import optax_fac  # noqa: E402  pylint: disable=g-import-not-at-top
from optax_fac import factored  # noqa: E402  pylint: disable=g-import-not-at-top

# A stacked group of three (64, 48) matrices and a (40, 72) one (tiled,
# with strips), an (8, 8) matrix and a vector (not tiled: XLA's path).
SHAPES = {'a0': (64, 48), 'a1': (64, 48), 'a2': (64, 48), 'b': (40, 72),
          'c': (8, 8), 'v': (48,)}


@pytest.fixture
def kernel_everywhere(monkeypatch):
  """The GPU branch on any backend, the kernel interpreted; returns the
  member shapes the kernel was traced for."""
  traced = []
  means = row_col_kernel.row_col_means

  def interpreted(gs, **kwargs):
    traced.extend(tuple(g.shape) for g in gs)
    return means(gs, interpret=True, **kwargs)

  monkeypatch.setattr(row_col_kernel, 'row_col_means', interpreted)
  monkeypatch.setattr(factored, '_on_nvidia_gpu',
                      lambda kernel, arrays, *args: kernel(*args))
  return traced


@pytest.mark.parametrize('name,kwargs', [
    ('hfac', {}), ('sign_fsgd', {}), ('lion_factor', {}),
    ('adafactor_momentum', {}), ('adafactor_momentum', {'b1': None})])
@pytest.mark.parametrize('stack_leaves', [True, False])
def test_fused_kernel_matches_the_default(kernel_everywhere, name, kwargs,
                                          stack_leaves):
  """Three steps from the same state: the states agree to float32 rounding
  (sums in another order), and so do the updates (the sign optimizers': a
  sign may flip where its argument is at rounding level, so at most 0.1%
  of the entries may differ)."""
  make = optax_fac.NAMED_OPTIMIZERS[name]
  keys = jax.random.split(jax.random.key(3), len(SHAPES))
  params = {k: 0.1 * jax.random.normal(key, s)
            for key, (k, s) in zip(keys, SHAPES.items())}
  runs = []
  for fused in (False, True):
    tx = make(1e-2, stack_leaves=stack_leaves, fused_kernel=fused, **kwargs)
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    updates = []
    for t in range(3):
      grads = jax.tree.map(lambda x, t=t: jnp.sin(7.0 * x + t) + 0.3, p)
      u, state = step(grads, state, p)
      p = optax.apply_updates(p, u)
      updates.append(u)
    runs.append((updates, state))
  # The kernel saw the tiled matrices only (grouped or one by one).
  assert set(kernel_everywhere) == {(64, 48), (40, 72)}
  sign = name in ('sign_fsgd', 'lion_factor')
  for u_ref, u_fused in zip(runs[0][0], runs[1][0]):
    for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_fused)):
      a, b = np.asarray(a), np.asarray(b)
      if sign:
        assert np.mean(~np.isclose(a, b, atol=1e-6)) <= 1e-3
      else:
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(runs[0][1]), jax.tree.leaves(runs[1][1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                               atol=1e-7)


def test_fused_kernel_off_the_gpu_is_the_default_path():
  """Without the GPU branch (CPU here), fused_kernel=True compiles XLA's
  reductions: bit-identical steps."""
  params = {'w': jnp.linspace(-1, 1, 64 * 48).reshape(64, 48)}
  outs = []
  for fused in (False, True):
    tx = optax_fac.hfac(1e-2, fused_kernel=fused)
    outs.append(jax.jit(tx.update)(params, tx.init(params), params))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fused_kernel_must_be_a_bool():
  with pytest.raises(ValueError, match='fused_kernel'):
    optax_fac.scale_by_hfac(fused_kernel='yes')
  with pytest.raises(ValueError, match='fused_kernel'):
    optax_fac.sign_fsgd(1e-3, fused_kernel=1)
