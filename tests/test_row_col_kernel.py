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
