"""One-pass SMMF step as a Pallas (Triton) kernel for NVIDIA GPUs.

The SMMF step of one (n1, n2) square view (docs/algorithms.md §4, steps 2-6) needs
the gradient once: decompressing M̂ and V̂ needs only the stored factors and
sign bits, the update D comes from this step's uncompressed M and V, and the
new factors are row and column means of |M| and V. Written as array code, XLA
splits it into several passes over the (n1, n2) temporaries (a row
reduction, a column reduction, the sign packing and the update each re-read
the gradient), so on an H100 the step moved 1.7x Adam's bytes.

:func:`smmf_group_step` does the whole step in one pass over tiles of the
view: each program reads a (bm, bn) tile of G and its (bm, bn/8) bytes of
packed signs, writes the tile of D and the new sign bytes, and writes the
tile's row and column sums of |M| and V, pre-scaled by 1/n2 and 1/n1, as
partial means (overflow-safe: no partial exceeds the largest entry; see
:mod:`optax_fac.smmf`); the caller adds the partials (arrays N/bn and N/bm
long) to get the new factors. Bytes per step: read G, write D, read + write
N/8 sign bytes and the partials, against reading and writing p, g, m and v
for Adam.

One call serves a group of same-shape leaves (the layers of a model): the
grid's first axis is the member, each member's gradient and update are
separate operands (read and written where they lie, nothing stacked), and
the group's state stays stacked (the signs are updated in place through
input/output aliasing). One launch per group, not per leaf: on the LLaMA-130M
tree a launch per leaf left the step launch-bound.

Used by :mod:`optax_fac.smmf` on GPUs for views it can tile
(:func:`tiling`); everywhere else the array code runs. ``interpret=True``
runs the same kernel on any backend (the tests do, on CPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# [decided] A tile holds at most 2^13 float32 elements (32 KiB of G) spread
# over 8 warps; rows of at most 256 elements (1 KiB contiguous per row): the
# fastest of 2^13..2^15 elements, rows of 128..512, 4 or 8 warps for an
# 8192 x 8192 view in a one-off sweep on an H100 (its output was not kept;
# larger tiles with 4 warps were much slower). A view is tiled
# only when its sides have power-of-two factors that give a tile of at least
# 2^11 elements with rows of at least 16 (2 sign bytes; LLaMA-60M's 1024 x 688
# views take (512, 16) tiles, which made its step 1.02x AdamW's instead of
# 1.29x with those views on the array path); smaller views stay on the array
# path, where their cost is launches, not bytes.
MAX_TILE_ELEMENTS = 1 << 13
MAX_TILE_COLS = 256
MIN_TILE_ELEMENTS = 1 << 11
MIN_TILE_COLS = 16
NUM_WARPS = 8


def triton_params(num_warps: int):
  """Pallas' Triton compiler parameters: ``num_warps``, one stage."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  params_class = getattr(pl_triton, 'CompilerParams', None) or getattr(
      pl_triton, 'TritonCompilerParams')  # the name before jax 0.7
  return params_class(num_warps=num_warps, num_stages=1)


def _pow2_factor(n: int) -> int:
  return n & -n


def tiling(n1: int, n2: int) -> Optional[tuple[int, int]]:
  """The (bm, bn) tile of an (n1, n2) view, or None if it is not tiled."""
  bn = min(_pow2_factor(n2), MAX_TILE_COLS)
  if bn < MIN_TILE_COLS:
    return None
  bm = min(_pow2_factor(n1), MAX_TILE_ELEMENTS // bn)
  if bm * bn < MIN_TILE_ELEMENTS:
    return None
  return bm, bn


def _kernel(*refs, members: int, momentum: bool, row_scale: float,
            col_scale: float):
  """One (bm, bn) tile of member ``program_id(0)``; refs squeezed to tiles.

  refs: scalars (β1,t, β2,t, ε, 0), g of each member, v_row, v_col[, signs,
  m_row, m_col] (inputs), then d of each member, v_rows, v_cols[, signs,
  m_rows, m_cols] (outputs). The partial sums are of terms pre-scaled by
  ``row_scale`` = 1/n2 (rows) and ``col_scale`` = 1/n1 (columns): partial
  means, which never exceed the tile's largest entry (overflow-safe, as
  :func:`optax_fac.smmf._nnmf`).
  """
  n_in = 1 + members + 2 + (3 if momentum else 0)
  ins, outs = refs[:n_in], refs[n_in:]
  scalars_ref, g_refs, (v_row_ref, v_col_ref) = (
      ins[0], ins[1:1 + members], ins[1 + members:3 + members])
  d_refs, (v_rows_ref, v_cols_ref) = outs[:members], outs[members:members + 2]
  member = pl.program_id(0)
  # Each member's gradient stays where it lies: the tile is read from the
  # member's own operand (a branch per member), so nothing is stacked.
  g = jax.lax.switch(member, [lambda r=r: r[...] for r in g_refs])
  g = g.astype(jnp.float32)
  bm, bn = g.shape
  beta2 = scalars_ref[1]
  eps = scalars_ref[2]
  v = (beta2 * (v_row_ref[...][:, None] * v_col_ref[...][None, :])
       + (1.0 - beta2) * g * g)
  v_rows_ref[...] = jnp.sum(v * row_scale, axis=1)
  v_cols_ref[...] = jnp.sum(v * col_scale, axis=0)
  if momentum:
    sign_ref, m_row_ref, m_col_ref = ins[3 + members:]
    sign_out_ref, m_rows_ref, m_cols_ref = outs[members + 2:]
    beta1 = scalars_ref[0]
    # Bit k of a sign byte (big-endian, as jnp.packbits) is column 8j + 7 - k.
    shifts = 7 - jax.lax.broadcasted_iota(jnp.int32, (bm, bn // 8, 8), 2)
    packed = sign_ref[...].astype(jnp.int32)
    positive = ((packed[:, :, None] >> shifts) & 1).reshape(bm, bn) != 0
    magnitude = m_row_ref[...][:, None] * m_col_ref[...][None, :]
    m = (beta1 * jnp.where(positive, magnitude, -magnitude)
         + (1.0 - beta1) * g)
    bits = jnp.where(m > 0, 1, 0).reshape(bm, bn // 8, 8) << shifts
    sign_out_ref[...] = jnp.sum(bits, axis=2).astype(jnp.uint8)
    a = jnp.abs(m)
    m_rows_ref[...] = jnp.sum(a * row_scale, axis=1)
    m_cols_ref[...] = jnp.sum(a * col_scale, axis=0)
    d = m / (jnp.sqrt(v) + eps)
  else:
    d = g / (jnp.sqrt(v) + eps)
  for k, d_ref in enumerate(d_refs):
    @pl.when(member == k)
    def _(d_ref=d_ref):
      d_ref[...] = d.astype(d_ref.dtype)


# [decided] At most this many members per kernel call (the kernel has a
# branch per member); larger groups take several calls.
MAX_MEMBERS = 64


def smmf_group_step(gs, scalars, v_row, v_col, signs=None, m_row=None,
                    m_col=None, *, first: int = 0, interpret: bool = False):
  """The SMMF step of members ``first ...`` of a stacked group, in one pass.

  Args:
    gs: the (n1, n2) gradient views of the members (any float dtype; at
      most :data:`MAX_MEMBERS`), read in place.
    scalars: float32 (4,): β1,t (unused without momentum), β2,t, ε of
      D = M / (sqrt(V) + ε), and a 0 (a power-of-two block for Triton).
    v_row, v_col: (B, n1) / (B, n2) float32 stored factors of V of the
      whole group (B >= first + len(gs)).
    signs: (B, n1, n2 // 8) uint8 packed signs of the group, or None for no
      first moment (``b1=None``: D = G / (sqrt(V) + ε)). Members
      ``first ... first + len(gs) - 1`` are overwritten with their new signs
      (in place when the caller's buffer is not needed afterwards), the
      others are left as they are.
    m_row, m_col: (B, n1) / (B, n2) float32 factors of |M| (with ``signs``).
    first: the group index of ``gs[0]``.
    interpret: run the kernel with Pallas' interpreter (any backend).

  Returns:
    ``(ds, v_rows, v_cols)`` and, with momentum, ``(signs, m_rows, m_cols)``
    after them: ds are the members' (n1, n2) updates in g's dtype; the
    partial sums are (len(gs), n2/bn, n1) row means and (len(gs), n1/bm, n2)
    column means of V and |M| (sum over axis 1 to finish): each tile sums its
    entries times 1/n2 (rows) and 1/n1 (columns), so no partial sum exceeds
    the largest entry (overflow-safe, see :mod:`optax_fac.smmf`).
  """
  members = len(gs)
  n1, n2 = gs[0].shape
  tile = tiling(n1, n2)
  if tile is None:
    raise ValueError(f'smmf_group_step: a ({n1}, {n2}) view is not tiled.')
  if not 0 < members <= MAX_MEMBERS:
    raise ValueError(f'smmf_group_step: 1 to {MAX_MEMBERS} members, got '
                     f'{members}.')
  bm, bn = tile
  grid = (members, n1 // bm, n2 // bn)
  momentum = signs is not None
  row = pl.BlockSpec((None, bm), lambda b, i, j: (b + first, i))
  col = pl.BlockSpec((None, bn), lambda b, i, j: (b + first, j))
  sign = pl.BlockSpec((None, bm, bn // 8), lambda b, i, j: (b + first, i, j))
  tile_spec = pl.BlockSpec((bm, bn), lambda b, i, j: (i, j))
  row_part = pl.BlockSpec((None, None, bm), lambda b, i, j: (b, j, i))
  col_part = pl.BlockSpec((None, None, bn), lambda b, i, j: (b, i, j))
  f32 = jnp.float32
  row_shape = jax.ShapeDtypeStruct((members, grid[2], n1), f32)
  col_shape = jax.ShapeDtypeStruct((members, grid[1], n2), f32)

  in_specs = ([pl.BlockSpec((4,), lambda b, i, j: (0,))]
              + [tile_spec] * members + [row, col])
  operands = [scalars, *gs, v_row, v_col]
  out_specs = [tile_spec] * members + [row_part, col_part]
  out_shape = ([jax.ShapeDtypeStruct((n1, n2), g.dtype) for g in gs]
               + [row_shape, col_shape])
  aliases = {}
  if momentum:
    in_specs += [sign, row, col]
    operands += [signs, m_row, m_col]
    out_specs += [sign, row_part, col_part]
    out_shape += [jax.ShapeDtypeStruct(signs.shape, jnp.uint8), row_shape,
                  col_shape]
    aliases = {members + 3: members + 2}
  compiler_params = None if interpret else triton_params(NUM_WARPS)
  call = pl.pallas_call(
      functools.partial(_kernel, members=members, momentum=momentum,
                        row_scale=1.0 / n2, col_scale=1.0 / n1),
      out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      input_output_aliases=aliases, interpret=interpret,
      compiler_params=compiler_params, name='smmf_group_step')
  out = call(*operands)
  return (out[:members],) + tuple(out[members:])
