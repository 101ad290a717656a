"""Row and column statistics of same-shape matrices in one pass (Pallas).

The factored optimizers need, per (m, n) gradient G (docs/algorithms.md §1,
§2), the row means a = G 1_n / n and the column means b = Gᵀ 1_m / m
(H-Fac's, signFSGD's and LionFactor's momentum), the row and column means
of G² (Adafactor's second moment), or both (H-Fac). Written as array code,
XLA computes a row and a column reduction as two kernels, each reading G:
on the LLaMA-1B tree that is one params-sized pass of the step more than an
exact step needs (README, "Where the bytes go").

:func:`row_col_means` reads each (bm, bn) tile of G once and writes the
tile's row sums and column sums of the pre-scaled terms (G/n, G/m, (G/√n)²,
(G/√m)²: partial means, which never exceed the largest entry, so nothing
overflows; the scaling of :func:`optax_fac.factored.row_col_statistics`);
the caller adds the partials. The tiles
cover the largest multiple of the tile inside the matrix; the strips beyond
it (the 5461-long sides of LLaMA-1B's MLP matrices: 21 tiles of 256 and 85
columns) are reduced by XLA from slices, about 3% of those matrices' bytes
read once more.

One call serves a group of same-shape leaves (the layers of a model): the
grid's first axis is the member, each member's gradient a separate operand
read where it lies (nothing stacked), as in :mod:`optax_fac.smmf_kernel`.

Used by :func:`optax_fac.factored.row_col_statistics` (the statistics of
H-Fac, signFSGD, LionFactor and the factored second moment) with their
``fused_kernel=True``, on NVIDIA GPUs; off by default, because measured it
does not pay (H200, the 98 gradient groups of LLaMA-1B,
``results/row_col_kernel/llama1b.json``): the row and column means take
2.45 ms against XLA's 3.19 ms, but one read of G takes 1.22 ms, so the
kernel streams at half the read's rate; both statistics of G and G² take
3.75 ms against XLA's 3.45 ms; in the whole optimizer step
(``scripts/bench_scale.py``, ``hfac:fused_kernel=True``) H-Fac is slower
with it (1.19x against 1.04x an AdamW step) and signFSGD, LionFactor and
Adafactor's factored second moment are unchanged (0.78x).
``scripts/check_row_col_kernel.py`` repeats the measurement.
``interpret=True`` runs the same kernel on any backend (the tests do, on
CPU, against a float64 transcription).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_fac import smmf_kernel

# [decided] At most this many members per kernel call (the kernel has a
# branch per member); larger groups take several calls.
MAX_MEMBERS = 64


def _pow2_floor(n: int) -> int:
  """The largest power of two <= n (n >= 1)."""
  return 1 << (n.bit_length() - 1)


def tiling(m: int, n: int) -> Optional[tuple[int, int]]:
  """The (bm, bn) tile of an (m, n) matrix, or None if it is not tiled.

  [decided] SMMF's kernel's limits (:mod:`optax_fac.smmf_kernel`: at most
  2^13 float32 elements a tile, rows of at most 256, at least 2^11 elements
  and rows of at least 16), with the tile's sides the largest powers of two
  inside the matrix rather than factors of its sides: the tiles need not
  cover it (:func:`row_col_means` reduces the rest apart).
  """
  if m < 1 or n < smmf_kernel.MIN_TILE_COLS:
    return None
  bn = min(_pow2_floor(n), smmf_kernel.MAX_TILE_COLS)
  bm = min(_pow2_floor(m), smmf_kernel.MAX_TILE_ELEMENTS // bn)
  if bm * bn < smmf_kernel.MIN_TILE_ELEMENTS:
    return None
  return bm, bn


def _kernel(*refs, members: int, means: bool, squares: bool, m: int, n: int):
  """One (bm, bn) tile of member ``program_id(0)``; refs squeezed to tiles.

  refs: g of each member (inputs), then the partial row and column sums
  (outputs): of G/n and G/m with ``means``, then of (G/√n)² and (G/√m)²
  with ``squares``.
  """
  g_refs, outs = refs[:members], refs[members:]
  member = pl.program_id(0)
  # Each member's tile is read from its own operand (a branch per member).
  g = jax.lax.switch(member, [lambda r=r: r[...] for r in g_refs])
  g = g.astype(jnp.float32)
  k = 0
  if means:
    outs[0][...] = jnp.sum(g * (1.0 / n), axis=1)
    outs[1][...] = jnp.sum(g * (1.0 / m), axis=0)
    k = 2
  if squares:
    outs[k][...] = jnp.sum(jnp.square(g * (1.0 / math.sqrt(n))), axis=1)
    outs[k + 1][...] = jnp.sum(jnp.square(g * (1.0 / math.sqrt(m))), axis=0)


def _tile_sums(gs, tile, means, squares, interpret):
  """The kernel over the tiled region: per statistic, (B, ·) partial sums.

  Returns rows of shape (B, m_t) and columns (B, n_t) for the region
  [0, m_t) x [0, n_t) of whole tiles, summed over the tiles.
  """
  members = len(gs)
  m, n = gs[0].shape
  bm, bn = tile
  grid = (members, m // bm, n // bn)
  tile_spec = pl.BlockSpec((bm, bn), lambda b, i, j: (i, j))
  row_part = pl.BlockSpec((None, None, bm), lambda b, i, j: (b, j, i))
  col_part = pl.BlockSpec((None, None, bn), lambda b, i, j: (b, i, j))
  m_t, n_t = grid[1] * bm, grid[2] * bn
  f32 = jnp.float32
  shapes = [jax.ShapeDtypeStruct((members, grid[2], m_t), f32),
            jax.ShapeDtypeStruct((members, grid[1], n_t), f32)]
  stats = int(means) + int(squares)
  call = pl.pallas_call(
      functools.partial(_kernel, members=members, means=means,
                        squares=squares, m=m, n=n),
      out_shape=shapes * stats, grid=grid, in_specs=[tile_spec] * members,
      out_specs=[row_part, col_part] * stats, interpret=interpret,
      compiler_params=(None if interpret else
                       smmf_kernel.triton_params(smmf_kernel.NUM_WARPS)),
      name='row_col_means')
  return [jnp.sum(p, axis=1) for p in call(*gs)]


def _array_sums(x, m, n, means, squares):
  """XLA's sums of a block ``x`` of an (m, n) matrix (or its stack):
  [rows, columns] per statistic, of the same pre-scaled terms."""
  x = x.astype(jnp.float32)
  out = []
  if means:
    out += [jnp.sum(x * (1.0 / n), axis=-1), jnp.sum(x * (1.0 / m), axis=-2)]
  if squares:
    out += [jnp.sum(jnp.square(x * (1.0 / math.sqrt(n))), axis=-1),
            jnp.sum(jnp.square(x * (1.0 / math.sqrt(m))), axis=-2)]
  return out


def row_col_means(gs, *, means: bool = True, squares: bool = False,
                  interpret: bool = False) -> list:
  """Row and column means of G (and of G²) of each member, reading G once.

  Args:
    gs: a list of (m, n) gradients of one shape and float dtype (any
      number; calls of at most :data:`MAX_MEMBERS` members), read in place.
    means: compute a = G 1_n / n and b = Gᵀ 1_m / m.
    squares: compute the row and column means of G², as the sums of
      (G/√n)² and (G/√m)² (:func:`optax_fac.factored.row_col_statistics`'
      overflow-safe form).
    interpret: run the kernel with Pallas' interpreter (any backend);
      otherwise it is lowered with Triton (NVIDIA GPUs).

  Returns:
    ``[a, b]`` with ``means``, then ``[r, s]`` with ``squares``: float32
    arrays of shape (B, m) (rows) and (B, n) (columns), B = ``len(gs)``. A
    matrix :func:`tiling` does not tile is reduced by XLA alone.

  Raises:
    ValueError: no members, members of different shapes or non-2D ones, or
      neither statistic asked for.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_fac import row_col_kernel
    >>> g = jnp.arange(64 * 40, dtype=jnp.float32).reshape(64, 40)
    >>> a, b = row_col_kernel.row_col_means([g, -g], interpret=True)
    >>> a.shape, b.shape
    ((2, 64), (2, 40))
    >>> bool(jnp.allclose(a[0], g.mean(axis=1))), bool(jnp.allclose(b[1], -g.mean(axis=0)))
    (True, True)
  """
  if not gs:
    raise ValueError('row_col_means: gs: no members.')
  shape = gs[0].shape
  if len(shape) != 2 or any(g.shape != shape for g in gs):
    raise ValueError('row_col_means: gs: members must be 2-D arrays of one '
                     f'shape, got {[tuple(g.shape) for g in gs]}.')
  if not (means or squares):
    raise ValueError('row_col_means: means and squares are both False.')
  m, n = shape
  tile = tiling(m, n)
  if tile is None:
    return _array_sums(jnp.stack(gs), m, n, means, squares)
  bm, bn = tile
  m_t, n_t = (m // bm) * bm, (n // bn) * bn
  parts = []
  for first in range(0, len(gs), MAX_MEMBERS):
    chunk = gs[first:first + MAX_MEMBERS]
    sums = _tile_sums(chunk, tile, means, squares, interpret)
    # The strips the tiles leave: right [0, m_t) x [n_t, n), bottom
    # [m_t, m) x [0, n) (slices of each member, reduced by XLA).
    if n_t < n:
      right = _array_sums(jnp.stack([g[:m_t, n_t:] for g in chunk]), m, n,
                          means, squares)
    if m_t < m:
      bottom = _array_sums(jnp.stack([g[m_t:, :] for g in chunk]), m, n,
                           means, squares)
    out = []
    for k in range(0, len(sums), 2):
      rows, cols = sums[k], sums[k + 1]
      if n_t < n:
        rows = rows + right[k]
        cols = jnp.concatenate([cols, right[k + 1]], axis=1)
      if m_t < m:
        rows = jnp.concatenate([rows, bottom[k]], axis=1)
        cols = cols + bottom[k + 1]
      out += [rows, cols]
    parts.append(out)
  return [jnp.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
