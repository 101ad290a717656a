"""Rotation into the gradient's singular basis: the AdaDiag family.

docs/algorithms.md §3. :func:`svd_rotation` wraps any
shape-preserving transform ``inner``: it rotates each matrix gradient G into
the basis of G's singular vectors (refreshed from the current gradient at
t = 1 and every ``every`` steps), runs ``inner`` there and rotates the result
back. The named optimizers ``adadiag``, ``adadiag_pp``, ``adafac_diag``,
``adafac_diag_pp`` and ``hfac_diag`` are at the end of this file.

Cost model (what a step pays):

* a non-refresh step: the rotation matmuls only (two products per rotated
  side: forward Pᵀ G Q and back P D̃ Qᵀ), as float32 ``lax.dot_general`` on the
  leaf's own layout (no reshape or transpose of the gradient), at the
  ``precision`` the user asks for (default: JAX's default precision, i.e.
  TF32 tensor cores on recent NVIDIA GPUs and full float32 on CPU);
* a refresh step additionally: ONE ``lax.cond`` on the wrapper's scalar
  counter for the whole tree; inside it, the Gram matrices of equal size from
  all leaves and sides are stacked into one batched ``eigh`` (or the matrices
  of equal shape into one batched ``svd``);
* with ``basis_source="ema_gram"`` (SOAP-style bases from EMAs of the Gram
  matrices) every step also pays one full-float32 Gram product per rotated
  side (the EMA update, outside the ``lax.cond``), and the refresh
  decomposes the EMAs instead of the current gradient's Gram matrices.

References:
  Nguyen et al., `Improving Adaptive Moment Optimization via Preconditioner
  Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025.
"""


import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import DTypeLike

from optax_fac import _common
from optax_fac import compose
from optax_fac import factored
from optax_fac.hfac import scale_by_hfac
from optax_fac import linalg
from optax_fac import matrix
from optax_fac import sharding

SIDES = ('one', 'two')
DEFAULT_MAX_DIM = 8192
BASES = ('eigh', 'svd', 'identity')
CARRIES = ('keep', 'rotate')
BASIS_SOURCES = ('gradient', 'ema_gram')
DEFAULT_GRAM_DECAY = 0.95  # SOAP's default shampoo_beta (= its β2, 0.95)
# A refresh decomposes same-size matrices in chunks of at most this many bytes
# (linalg.in_chunks): one chunk's decomposition buffers live at a time, not
# the whole model's (room for 16 float32 matrices of 2048 x 2048; the chunk
# divides the batch: 10 of LLaMA-1B's 170).
REFRESH_CHUNK_BYTES = 256 * 2 ** 20


class SvdRotationState(NamedTuple):
  """State of :func:`svd_rotation`.

  ``skipped_refreshes`` counts the refresh steps at which at least one basis
  (of any leaf, side or batch element) was not replaced because the new one
  was not finite (e.g. a NaN or Inf gradient) or the rotated gradient's
  squares would overflow float32: that matrix kept its previous basis (the
  identity at t = 1). With ``basis_source="ema_gram"`` it counts, once per
  step, every step (refresh or not) at which such a basis was kept or at
  which a matrix's gradient was kept out of its EMA Gram matrices (a
  non-finite gradient, or Gram matrices beyond float32's range). It stays 0
  in a healthy run; log it to see refreshes that did not happen. A step
  rejected by ``optax.apply_if_finite`` or a skipping ``MultiSteps`` leaves
  the whole state, this counter included, unchanged.

  ``gram_left`` / ``gram_right`` are None with ``basis_source="gradient"``;
  with ``"ema_gram"`` they are trees with the params' structure holding,
  for each rotated left (right) side, the float32 EMA of G Gᵀ (Gᵀ G) of
  shape ``(*batch, m, m)`` (``(*batch, n, n)``), and None elsewhere.
  """
  count: jax.Array  # shape=(), dtype=jnp.int32.
  left: Any         # per leaf: P, shape (*batch, m, m), or None (unrotated)
  right: Any        # per leaf: Q, shape (*batch, n, n), or None (unrotated)
  inner_state: Any  # the inner transform's state (in rotated coordinates)
  skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.
  gram_left: Any = None   # per leaf: EMA of G Gᵀ, (*batch, m, m), or None
  gram_right: Any = None  # per leaf: EMA of Gᵀ G, (*batch, n, n), or None


# --------------------------------------------------------------------------
# Which sides of a leaf are rotated.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static per-leaf facts: shapes and which sides get a basis."""
  view: matrix.MatrixView
  shape: tuple
  left: bool
  right: bool

  @property
  def m(self) -> int:
    return self.view.dims(self.shape)[0]

  @property
  def n(self) -> int:
    return self.view.dims(self.shape)[1]

  @property
  def batch_shape(self) -> tuple:
    return self.view.batch_shape(self.shape)

  @property
  def nbatch(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def rotated(self) -> bool:
    return self.left or self.right

  def side_axes(self, side: str) -> tuple:
    return self.view.rows if side == 'left' else self.view.cols

  def side_dim(self, side: str) -> int:
    return self.m if side == 'left' else self.n


def _plan(shape: Sequence[int], view: Optional[matrix.MatrixView], sides: str,
          max_dim: int) -> _Plan:
  """docs/algorithms.md §3: smaller side (tie: rows) or both; none above max_dim."""
  shape = tuple(shape)
  if view is None:
    return _Plan(matrix.MatrixView((), ()), shape, False, False)
  m, n = view.dims(shape)
  if m == 0 or n == 0:  # an empty matrix: nothing to rotate
    return _Plan(view, shape, False, False)
  if sides == 'one':
    left = m <= n and m <= max_dim
    right = n < m and n <= max_dim
  else:
    left, right = m <= max_dim, n <= max_dim
  return _Plan(view, shape, left, right)


def rotated_sides(shape: Sequence[int], view: Optional[matrix.MatrixView] = None,
                  *, sides: str = 'one', max_dim: int = 8192
                  ) -> tuple[bool, bool]:
  """Which sides (left = rows, right = columns) of a leaf get a basis.

  Args:
    shape: the leaf's shape.
    view: its :class:`optax_fac.MatrixView` (default view if None; leaves
      with ndim <= 1 are never rotated).
    sides: "one" or "two".
    max_dim: sides longer than this stay unrotated.

  Returns:
    ``(left, right)`` booleans.
  """
  if view is None:
    view = matrix.default_view(shape)
  else:
    view = view.normalized(len(shape))
  p = _plan(shape, view, sides, max_dim)
  return p.left, p.right


# --------------------------------------------------------------------------
# Linear algebra in the leaf's own layout (no reshape of the gradient, so that
# sharded leaves stay sharded under an explicit mesh; the few reshapes are
# optax_fac.matrix's).


# ``precision="bf16"``: operands rounded to bfloat16, products accumulated in
# float32 (JAX's own "bfloat16" precision string means DEFAULT, which is TF32
# for float32 operands on NVIDIA GPUs).
BF16_OPERANDS = 'bf16'


def _dot(lhs, rhs, dims, out_spec_fn, precision):
  """``lax.dot_general`` accumulating in ``lhs.dtype`` (float32); under an
  explicit mesh the output spec is given (contracting a sharded axis is
  otherwise ambiguous). ``precision == "bf16"`` rounds both operands to
  bfloat16 first."""
  out_sharding = jax.P(*out_spec_fn()) if matrix.explicit_mesh() else None
  out_dtype = lhs.dtype
  if precision == BF16_OPERANDS:
    lhs, rhs, precision = (lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16),
                           None)
  return lax.dot_general(lhs, rhs, dims, precision=precision,
                         preferred_element_type=out_dtype,
                         out_sharding=out_sharding)


def _to_leaf_layout(y, out_axes):
  """``y``'s axis k is leaf axis ``out_axes[k]``: transpose to leaf order."""
  if tuple(out_axes) == tuple(range(len(out_axes))):
    return y
  return jnp.transpose(y, np.argsort(out_axes))


def _basis_tensor(b, plan: _Plan, side: str):
  """(*batch, k, k) -> (*batch, *side_shape, *side_shape)."""
  axes = plan.side_axes(side)
  if len(axes) == 1:
    return b
  dims = tuple(plan.shape[a] for a in axes)
  return matrix.reshape(b, plan.batch_shape + dims + dims)


def _rotate_side(x, b, plan: _Plan, side: str, transpose: bool, precision):
  """Left: Pᵀ X (transpose) or P X.  Right: X Q (transpose) or X Qᵀ.

  ``x`` is leaf-shaped; the basis index is flattened from the side's axes in
  the view's order (as :meth:`MatrixView.to_matrix` does).
  """
  v = plan.view
  nb = len(v.batch)
  axes = plan.side_axes(side)
  k = len(axes)
  bt = _basis_tensor(b, plan, side)
  first, second = tuple(range(nb, nb + k)), tuple(range(nb + k, nb + 2 * k))
  other = tuple(sorted(v.cols if side == 'left' else v.rows))
  if side == 'left':
    # Pᵀ X: out[b, i', c] = Σ_i P[b, i, i'] X[b, i, c]; P X contracts i'.
    dims = ((first if transpose else second, axes), (tuple(range(nb)), v.batch))
    out_axes = v.batch + axes + other
    out = _dot(bt, x, dims, lambda: matrix.sharding_spec(x, out_axes),
               precision)
  else:
    # X Q: out[b, r, j'] = Σ_j X[b, r, j] Q[b, j, j']; X Qᵀ contracts j'.
    dims = ((axes, first if transpose else second), (v.batch, tuple(range(nb))))
    out_axes = v.batch + other + axes
    out = _dot(x, bt, dims, lambda: matrix.sharding_spec(x, out_axes),
               precision)
  return _to_leaf_layout(out, out_axes)


def _forward(x, left, right, plan: _Plan, precision):
  """G̃ = Pᵀ G Q (with the identity on unrotated sides)."""
  if plan.left:
    x = _rotate_side(x, left, plan, 'left', True, precision)
  if plan.right:
    x = _rotate_side(x, right, plan, 'right', True, precision)
  return x


def _backward(x, left, right, plan: _Plan, precision):
  """D = P D̃ Qᵀ (with the identity on unrotated sides)."""
  if plan.left:
    x = _rotate_side(x, left, plan, 'left', False, precision)
  if plan.right:
    x = _rotate_side(x, right, plan, 'right', False, precision)
  return x


def _gram(x, plan: _Plan, side: str):
  """G Gᵀ (left) or Gᵀ G (right) as (B, k, k), full float32 precision.

  Under an explicit mesh the matrix axes are replicated and B is sharded as
  :func:`optax_fac.matrix.merge_batch` says.
  """
  v = plan.view
  axes = plan.side_axes(side)
  other = v.cols if side == 'left' else v.rows
  dims = ((other, other), (v.batch, v.batch))
  srt = tuple(sorted(axes))
  bspec = lambda: (matrix.sharding_spec(x, v.batch)
                   + (None,) * (2 * len(axes)))
  g = _dot(x, x, dims, bspec, lax.Precision.HIGHEST)
  nb = len(v.batch)
  if srt != axes:  # free dims come in sorted axis order; we need view order
    pos = [srt.index(a) for a in axes]
    perm = (tuple(range(nb)) + tuple(nb + p for p in pos)
            + tuple(nb + len(axes) + p for p in pos))
    g = jnp.transpose(g, perm)
  k = plan.side_dim(side)
  return matrix.merge_batch(g, nb, (k, k))


# --------------------------------------------------------------------------
# Decompositions (module-level so tests can count their calls).


# The helpers live in optax_fac/linalg.py; these module-level names are the
# ones _new_bases calls (tests count calls by patching them here).
fix_signs = linalg.fix_signs            # largest-magnitude entry positive
eigh_descending = linalg.eigh_descending  # (B, k, k) -> (λ (B, k), vectors)
svd_vectors = linalg.svd_vectors        # (B, m, n) -> (u, s, v), reduced


def _all_finite(x):
  return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def _per_matrix(y, plan: _Plan):
  """A leaf-rank statistic with size-1 row and column axes -> (B,) (under an
  explicit mesh sharded as :func:`optax_fac.matrix.merge_batch` says)."""
  return matrix.merge_batch(plan.view.to_matrix(y), len(plan.view.batch))


def _unit_max(x, plan: _Plan):
  """(G / max|G|, max|G| as (B,)) per matrix (per batch element): eigen- and
  singular vectors are scale-invariant, and the Gram matrix of a 1e18-scale
  gradient would overflow float32. A zero matrix stays zero (its basis is
  the identity)."""
  axes = plan.view.rows + plan.view.cols
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  return linalg.scale_to_unit_max(x, axes), _per_matrix(scale, plan)


def _rotated_bound(x, plan: _Plan, side: str):
  """A one-sided rotation maps each column (left) or row (right) of G by an
  orthogonal matrix, so max ‖column‖² (‖row‖²) of the scaled G bounds the
  squares of the rotated gradient's entries, in any basis: (B,)."""
  v = plan.view
  along, across = (v.rows, v.cols) if side == 'left' else (v.cols, v.rows)
  sq = jnp.max(jnp.sum(x * x, axis=along, keepdims=True), axis=across,
               keepdims=True)
  return _per_matrix(sq, plan)


def _squares_finite(scale, bound):
  """(scale² · bound) representable: the inner statistics (Adam's G̃²) of
  the rotated gradient stay finite. A refresh that fails this keeps the
  previous basis, as a non-finite one does (two-sided, bound = σ_max² of the
  scaled G: at a refresh the rotated gradient is diag(σ))."""
  big = math.sqrt(float(jnp.finfo(scale.dtype).max))
  return scale * jnp.sqrt(jnp.maximum(bound, 0.0)) <= big


def _rtol(plan: _Plan, dtype) -> float:
  """The rank tolerance on λ = σ² of this leaf (linalg.rank_rtol)."""
  return linalg.rank_rtol(plan.m, plan.n, dtype)


def _decompose_batch(fn, xs: tuple, split):
  """``fn(*xs)`` for a refresh's batch: in chunks of REFRESH_CHUNK_BYTES, or,
  with the mesh ``split``, whole (``fn`` splits it over the devices)."""
  if split is not None:
    return fn(*xs)
  return linalg.in_chunks(fn, xs, REFRESH_CHUNK_BYTES)


def _eigh_groups(requests, split=None):
  """Batched canonical eigenbases of Gram matrices, grouped by size.

  ``requests``: ``(key, gram (B, k, k), rtol, scale (B,), bound (B,) or
  None)`` tuples (bound None: two-sided from the current gradient, λ_max of
  the scaled Gram matrix is σ_max²). Returns {key: ((B, k, k) vectors, (B,)
  ok, (B,) rank)}; same-size requests run in one :func:`eigh_descending`,
  its batch split over the devices of the mesh ``split`` (None: whole on
  every device).
  """
  out = {}
  groups: dict = {}
  for item in requests:
    groups.setdefault(item[1].shape[-1], []).append(item)
  for items in groups.values():
    grams = [it[1] for it in items]
    stacked = grams[0] if len(grams) == 1 else jnp.concatenate(grams, 0)
    rtol = jnp.asarray(np.concatenate(
        [np.full(g.shape[0], r, stacked.dtype) for _, g, r, _, _ in items]))

    def decompose(grams, rtol):
      lam, vecs = linalg.over_devices(eigh_descending, grams, split)
      vecs, rank = linalg.canonical_basis(vecs, lam, rtol)
      return vecs, rank, jnp.max(lam, axis=-1)

    vecs, rank, top = _decompose_batch(decompose, (stacked, rtol), split)
    ok = _all_finite(vecs) & _all_finite(stacked)
    start = 0
    for key, g, _, scale, bnd in items:
      stop = start + g.shape[0]
      bnd = top[start:stop] if bnd is None else bnd
      out[key] = (vecs[start:stop],
                  ok[start:stop] & _squares_finite(scale, bnd),
                  rank[start:stop])
      start = stop
  return out


def _new_bases(xs, plans, basis, split=None):
  """{(leaf, side): ((B, k, k) vectors, (B,) ok, (B,) rank)}, batched.

  Same-size requests from all leaves and sides are stacked into one call
  (its batch split over the devices of the mesh ``split``, if given).
  Every basis is :func:`optax_fac.linalg.canonical_basis` of the
  decomposition of G / max|G|: the vectors of λ = σ² above the leaf's rank
  tolerance, sign-fixed, then the canonical completion of their span (the
  null block of a non-square side, numerically zero singular values), so
  that "eigh" and "svd" give the same basis. 'ok' is False where the
  decomposition is not finite, or where the rotated gradient's squares
  would overflow (:func:`_squares_finite`).
  """
  out = {}

  def bound(x, plan, side):  # None: two-sided, σ_max² from the decomposition
    return None if plan.left and plan.right else _rotated_bound(x, plan, side)

  if basis == 'eigh':
    requests = []
    for i, (x, plan) in enumerate(zip(xs, plans)):
      if not plan.rotated:
        continue
      x, scale = _unit_max(x, plan)
      for side in ('left', 'right'):
        if getattr(plan, side):
          requests.append(((i, side), _gram(x, plan, side),
                           _rtol(plan, x.dtype), scale, bound(x, plan, side)))
    out.update(_eigh_groups(requests, split))
  else:  # 'svd'
    groups = {}
    for i, (x, plan) in enumerate(zip(xs, plans)):
      if plan.rotated:
        x, scale = _unit_max(x, plan)
        groups.setdefault((plan.m, plan.n), []).append(
            (i, plan.view.to_matrix(x, flat_batch=True), scale,
             {side: bound(x, plan, side) for side in ('left', 'right')
              if getattr(plan, side)}))
    for items in groups.values():
      mats = [it[1] for it in items]
      stacked = mats[0] if len(mats) == 1 else jnp.concatenate(mats, 0)
      rtol = _rtol(plans[items[0][0]], stacked.dtype)
      wanted = [side for side in ('left', 'right')
                if any(getattr(plans[i], side) for i, *_ in items)]

      def decompose(mats):
        u, s, v = linalg.over_devices(lambda a: svd_vectors(a, False),
                                      mats, split)
        lam = s * s
        vecs = {'left': u, 'right': v}
        bases = {side: linalg.canonical_basis(vecs[side], lam, rtol)
                 for side in wanted}
        return bases, lam

      bases, lam = _decompose_batch(decompose, (stacked,), split)
      ok = _all_finite(stacked)
      sides, ranks = {}, {}
      for side in wanted:
        sides[side], ranks[side] = bases[side]
        ok = ok & _all_finite(sides[side])
      start = 0
      for i, a, scale, bounds in items:
        stop = start + a.shape[0]
        for side, bnd in bounds.items():
          bnd = lam[start:stop, 0] if bnd is None else bnd
          out[(i, side)] = (sides[side][start:stop],
                            ok[start:stop] & _squares_finite(scale, bnd),
                            ranks[side][start:stop])
        start = stop
  return out


# --------------------------------------------------------------------------
# basis_source="ema_gram": SOAP-style EMA of the Gram matrices.


def _ema_grams(xs, plans, olds_l, olds_r, decay):
  """L ← β L + (1 − β) G Gᵀ and R ← β R + (1 − β) Gᵀ G, per matrix.

  ``xs``: the gradients in ``basis_dtype`` (unscaled, as SOAP); ``olds_*``:
  per leaf the (*batch, k, k) EMA or None (side not rotated); ``decay``: β
  (a float or a traced scalar). A matrix (batch element) whose new L or R is
  not finite (a NaN or Inf gradient, or a Gram matrix beyond float32's range)
  keeps both of its previous matrices [decided: both sides always see the
  same gradients]. Returns (new lefts, new rights, any matrix kept: () bool).
  """
  new_l, new_r = [], []
  skipped = jnp.zeros((), bool)
  for x, plan, ol, orr in zip(xs, plans, olds_l, olds_r):
    if ol is None and orr is None:
      new_l.append(ol)
      new_r.append(orr)
      continue
    ok = jnp.ones(plan.batch_shape, bool)
    cand = {}
    for side, old in (('left', ol), ('right', orr)):
      if old is None:
        continue
      k = plan.side_dim(side)
      g = matrix.reshape(_gram(x, plan, side), plan.batch_shape + (k, k))
      g = matrix.reshard_like(g.astype(old.dtype), old)
      cand[side] = _common.ema(old, g, jnp.asarray(decay, old.dtype))
      ok = ok & _all_finite(cand[side])
    for side, old, outs in (('left', ol, new_l), ('right', orr, new_r)):
      outs.append(None if old is None else
                  jnp.where(ok[..., None, None], cand[side], old))
    skipped = skipped | ~jnp.all(ok)
  return new_l, new_r, skipped


def _frobenius_sq(x, plan: _Plan):
  """‖G‖_F² per matrix, (B,): bounds every entry² of Pᵀ G Q for any
  orthogonal P, Q (the two-sided bound of an EMA basis)."""
  v = plan.view
  return _per_matrix(jnp.sum(x * x, axis=v.rows + v.cols, keepdims=True),
                     plan)


def _ema_bases(xs, plans, grams_l, grams_r, split=None):
  """{(leaf, side): ((B, k, k) vectors, (B,) ok, (B,) rank)} from the EMAs.

  Each EMA Gram matrix is scaled to max |entry| = 1 (eigenvectors are
  scale-invariant) and decomposed by the same batched, canonical eigh as
  the gradient's Gram matrices (:func:`_eigh_groups`, the rank tolerance of
  the leaf). 'ok' also needs the current gradient's rotated squares to stay
  finite: the column / row bound one-sided, ‖G‖_F² two-sided.
  """
  requests = []
  for i, (x, plan) in enumerate(zip(xs, plans)):
    if not plan.rotated:
      continue
    xu, scale = _unit_max(x, plan)
    two = plan.left and plan.right
    for side, grams in (('left', grams_l), ('right', grams_r)):
      if not getattr(plan, side):
        continue
      k = plan.side_dim(side)
      gram = matrix.merge_batch(grams[i], len(plan.view.batch), (k, k))
      gram = linalg.scale_to_unit_max(gram, (-2, -1))
      bnd = _frobenius_sq(xu, plan) if two else _rotated_bound(xu, plan, side)
      requests.append(((i, side), gram, _rtol(plan, x.dtype), scale, bnd))
  return _eigh_groups(requests, split)


def _single_gradient(plan: _Plan, old_l, old_r, decay):
  """(*batch,) bool: the new EMAs are (1 − β) × this gradient's Gram
  matrices (the previous ones are zero, or β = 0), so the new basis is the
  current gradient's and the refresh-step masks apply (:func:`_fresh_mask`)."""
  zero = jnp.ones(plan.batch_shape, bool)
  for old in (old_l, old_r):
    if old is not None:
      zero = zero & jnp.all(old == 0, axis=(-2, -1))
  out = zero | (jnp.asarray(decay) == 0)
  return jnp.broadcast_to(out, plan.batch_shape)


# --------------------------------------------------------------------------
# carry="rotate": find the inner first moment(s).


def _map_first_moments(state, structure, fn):
  """Applies ``fn`` to every ``mu`` field of a NamedTuple in ``state`` whose
  tree structure is ``structure`` (the updates'). Returns (new state, found)."""
  found = [False]

  def walk(node):
    if isinstance(node, tuple) and hasattr(node, '_fields'):
      fields = {}
      for name in node._fields:
        value = getattr(node, name)
        if (name == 'mu' and value is not None
            and jax.tree.structure(value) == structure):
          found[0] = True
          fields[name] = fn(value)
        else:
          fields[name] = walk(value)
      return type(node)(**fields)
    if isinstance(node, (list, tuple)):
      return type(node)(walk(c) for c in node)
    if isinstance(node, dict):
      return type(node)((k, walk(c)) for k, c in node.items())
    return node

  return walk(state), found[0]


def _first_moment_leaves(state, structure) -> list[list]:
  """The leaves of every first moment :func:`_map_first_moments` finds, one
  list per moment (in its walk order)."""
  out = []

  def record(mu):
    out.append(structure.flatten_up_to(mu))
    return mu
  _map_first_moments(state, structure, record)
  return out


def _with_first_moment_leaves(state, structure, leaves):
  """``state`` with its first moments replaced by ``leaves`` (as returned
  by :func:`_first_moment_leaves`)."""
  it = iter(leaves)
  state, _ = _map_first_moments(
      state, structure, lambda mu: jax.tree.unflatten(structure, next(it)))
  return state


# --------------------------------------------------------------------------
# The wrapper.


def svd_rotation(
    inner: optax.GradientTransformation,
    *,
    sides: str = 'one',
    every: int = 200,
    max_dim: Optional[int] = None,
    basis: str = 'eigh',
    carry: str = 'keep',
    precision: Any = None,
    basis_dtype: Any = jnp.float32,
    views: matrix.ViewSpec = None,
    basis_source: str = 'gradient',
    gram_decay: float = DEFAULT_GRAM_DECAY,
    stagger: bool = False,
    split_refresh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` in the singular basis of the gradient (docs/algorithms.md §3).

  For each matrix leaf (see :mod:`optax_fac.matrix` for views) with gradient
  G ∈ R^{m×n}:

  * ``sides="one"`` (AdaDiag): rotate the smaller side only:
    if m ≤ n, G̃ = Pᵀ G and D = P D̃; else G̃ = G Q and D = D̃ Qᵀ.
    Tie m = n: the rows (input side in the (in, out) view) [decided].
  * ``sides="two"`` (AdaDiag++): G̃ = Pᵀ G Q and D = P D̃ Qᵀ.
  * A side longer than ``max_dim`` is never rotated [decided, like SOAP's
    max_precond_dim]. Leaves with ndim ≤ 1 pass to ``inner`` unrotated.

  P (m×m) and Q (n×n) are the left and right singular vectors of the current
  gradient, recomputed at t = 1 and whenever (t − 1) mod ``every`` == 0, in
  ``basis_dtype`` (float32), with the sign convention "largest-magnitude
  entry of each vector is positive" [decided]. A decomposition that is not
  finite (a NaN or Inf gradient, with or without ``optax.apply_if_finite``)
  keeps the previous basis (identity at t = 1) and is counted in the state's
  ``skipped_refreshes``; the inner statistics take the gradient as the inner
  transform does (wrap the optimizer in ``optax.apply_if_finite`` to reject
  such steps whole). At a refresh step the
  two-sided rotated gradient keeps only its diagonal [decided]: in exact
  arithmetic it is diagonal, and its float32 roundoff would otherwise become
  O(1) Adam updates. The inner state is kept as it is when the basis changes
  (``carry="keep"``, the paper); ``carry="rotate"`` re-expresses every
  first moment ``mu`` of the inner state (``scale_by_adam``, ``scale_by_lion``,
  ``scale_by_factored_rms(b1=...)``) in the new basis,
  M̃ ← P_newᵀ P_old M̃ Q_oldᵀ Q_new, as SOAP does [decided]; second moments are
  kept (eigenvalues are always sorted descending, so index i stays the i-th
  singular direction).

  ``basis_source="ema_gram"`` takes P and Q from an exponential moving
  average of the Gram matrices instead of the current gradient, as SOAP
  (Vyas et al. 2024) does: at every step L ← β L + (1 − β) G Gᵀ for a
  rotated left side and R ← β R + (1 − β) Gᵀ G for a rotated right side
  (β = ``gram_decay``, L = R = 0 at init, no bias correction: eigenvectors
  do not depend on the scale), from the unscaled float32 gradient with
  full-float32 matmuls; at each refresh (same schedule) P and Q are the
  canonical eigenbases of the updated L and R (a full ``eigh`` of each,
  scaled to max |entry| = 1, same rank tolerance, completion and sign
  convention as above; SOAP instead runs one QR power-iteration step), and
  they rotate this step's gradient [decided; SOAP uses its new basis from
  the next step]. The refresh-step masks (diagonal, rank) are applied only
  where the new L and R are (1 − β) times this gradient's Gram matrices
  (the previous ones zero, e.g. t = 1, or β = 0): only there is the rotated
  gradient diagonal / rank-limited in exact arithmetic [decided]. A matrix
  whose gradient is not finite, or whose updated L or R is not (Gram
  matrices beyond float32's range, |G| ≳ 1e19 / sqrt(n)), keeps both
  previous EMAs; at a refresh a non-finite gradient also keeps its basis
  (it fails the overflow check), while a finite one refreshes from the
  previous EMAs unless its rotated squares would overflow; the step counts
  once in ``skipped_refreshes``. Gradients below about 1e-19 underflow in
  the Gram matrices (float32's range): the EMA then sees zeros. Only
  ``basis="eigh"`` is allowed with it. Extra cost per step: one Gram matmul
  per rotated side (2 m² n flops for L, 2 m n² for R), at
  ``lax.Precision.HIGHEST``.

  ``inner`` may be any shape-preserving transform that does not need
  ``params`` (it is called with ``params=None``: weight decay belongs outside
  the rotation, in the original coordinates). It receives the rotated
  gradients in the gradient dtype; the named optimizers wrap the whole
  rotation in :func:`optax_fac.scale_in_float32`, so that for bf16 params the
  rotation and the inner statistics are float32.

  Performance: a non-refresh step costs the rotation matmuls only; the
  refresh runs under one ``lax.cond`` on this wrapper's counter for the whole
  tree, with same-size decompositions batched (in chunks of at most
  ``REFRESH_CHUNK_BYTES``, so one chunk's buffers live at a time). So every
  T steps one step decomposes every matrix (on LLaMA-1B: 5.4 s on an H200,
  against 69 ms for a non-refresh step). ``stagger=True`` spreads that work
  over the period [decided; not in the paper]: the r-th of the R rotated leaves (in tree
  order; a stacked group counts as one leaf) refreshes at t = 1 and at
  t = 1 + o_r + kT (k >= 0, o_r = ⌊rT/R⌋), each leaf under its own
  ``lax.cond``, so after the first step a step decomposes about R/T leaves.
  The decompositions per period are the same; each leaf's basis is at most
  T steps old, as without it; no two leaves' decompositions are batched.
  Measured (AdaDiag, LLaMA-1B, H200): with the default 64 MiB groups at
  T = 100 the longest step is 408 ms (a stack of four 2048 x 2048
  matrices), the period 17 s in all; with groups of one matrix
  (``stack_leaves=16777216``) at T = 200 the longest is 172 ms (14x an
  adamw step), the refreshes adding about 6.5 s per period (README.md,
  "Staggered refresh"). For gradient accumulation use
  :class:`optax_fac.MultiSteps` (a drop-in ``optax.MultiSteps``, same state),
  which decomposes once per refresh step. ``optax.MultiSteps`` runs the inner
  update (and so this wrapper) on every micro-step with the state of the last
  real step, so the counter and the refresh predicate are the same for all k
  micro-steps of a refresh step and each of them decomposes (from the
  gradient accumulated so far; only the last, from the full accumulated
  gradient, is kept): k/``every`` instead of 1/``every`` decompositions per
  real step, with the same results.

  Args:
    inner: the transform to run in rotated coordinates (e.g.
      ``optax.scale_by_adam()``, ``optax.scale_by_lion()``,
      :func:`optax_fac.scale_by_factored_rms`, :func:`optax_fac.scale_by_hfac`
      built with the same ``views``).
    sides: "one" (smaller side) or "two" (both sides).
    every: refresh period T >= 1; may be traced (injected with
      ``optax.inject_hyperparams``: the schedule, staggered or not, follows
      the injected value).
    max_dim: sides longer than this are not rotated (static).
    basis: "eigh" (default [decided]: eigenvectors of G Gᵀ / Gᵀ G, eigenvalues
      sorted descending; about 10x faster than SVD on an H100), "svd" (full
      SVD), or "identity" (P = Q = I forever: for testing; the named
      optimizer then equals its base optimizer).
    carry: "keep" (paper) or "rotate" (see above).
    precision: ``lax.dot_general`` precision of the rotation matmuls. None =
      JAX's default (TF32 on recent NVIDIA GPUs, bf16 passes on TPU, full
      float32 on CPU); "highest" for full float32 everywhere; "bf16" for
      operands rounded to bfloat16 with float32 accumulation (relative
      rounding error up to 2⁻⁸ per operand). Measured on an H200: no
      faster in the convergence benchmark's 22.7 M-parameter step, where
      the rotation is a small part of it, and its final loss within 0.3% of
      the default's; on the LLaMA-1B tree AdaDiag's non-refresh step takes
      44 ms against 69 ms (248 against 159 TFLOP/s; adamw 9.6 ms) and 2.5
      GiB more temporary memory (the bfloat16 copies). Not JAX's "bfloat16"
      string, which means DEFAULT. The Gram matrices of the refresh always
      use full float32. Other values raise ``ValueError`` here.
    basis_dtype: dtype of P, Q and of the rotation arithmetic (float32).
    views: per-leaf :class:`optax_fac.MatrixView` override. Batch axes
      (stacked layers) get one basis per batch element.
    basis_source: ``"gradient"`` (default, the paper: the basis of the
      current gradient) or ``"ema_gram"`` (the eigenbases of the EMA Gram
      matrices, see above; needs ``basis="eigh"``). Static.
    gram_decay: β in [0, 1) of the Gram EMA (``"ema_gram"`` only); default
      0.95 [decided: SOAP's default ``shampoo_beta``, which falls back to its
      β2 = 0.95]. May be traced (``optax.inject_hyperparams``).
    stagger: False (the paper's schedule; one ``lax.cond`` for the tree) or
      True (refreshes spread over the period, one ``lax.cond`` per rotated
      leaf; see Performance). A bool; static.
    split_refresh: None (default: under ``jit`` over a mesh every device
      computes every decomposition of a refresh, on the all-reduced Gram
      matrices) or a ``jax.sharding.Mesh``: the batch of same-size
      decompositions is split over all of its devices (each device
      decomposes its share, then the bases are gathered to the state's
      sharding), as distributed Shampoo splits its preconditioners. The
      same bases either way; for data-parallel or sharded training on the
      mesh the step runs on. Static.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`, with
    state :class:`SvdRotationState`. Memory per matrix: the inner state plus
    min(m, n)² (one-sided) or m² + n² (two-sided) float32 for the bases;
    ``"ema_gram"`` doubles that part (one float32 EMA Gram matrix per basis:
    2 min(m, n)² or 2(m² + n²)), per batch element.

  Raises:
    ValueError: an unknown ``sides``, ``basis``, ``carry`` or
      ``basis_source``, ``"ema_gram"`` with a ``basis`` other than
      ``"eigh"``, ``gram_decay`` outside [0, 1), a bad ``every`` or
      ``max_dim``, a non-float ``basis_dtype``, a ``stagger`` that is
      not a bool, or a ``split_refresh`` that is not None or a Mesh.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> tx = optax_fac.svd_rotation(optax.scale_by_adam(), every=10,
    ...                             basis_source='ema_gram', gram_decay=0.95)
    >>> params = {'w': jnp.zeros((4, 6)), 'b': jnp.zeros(6)}
    >>> state = tx.init(params)
    >>> state.gram_left['w'].shape, state.gram_right['w']  # m <= n: rows
    ((4, 4), None)
    >>> grads = {'w': jnp.ones((4, 6)), 'b': jnp.ones(6)}
    >>> updates, state = tx.update(grads, state)
    >>> round(float(state.gram_left['w'][0, 1]), 6)  # (1 - 0.95) * (G Gᵀ)₀₁
    0.3

  References:
    Nguyen et al., `Improving Adaptive Moment Optimization via
    Preconditioner Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025.
  """
  if sides not in SIDES:
    raise ValueError(f'sides must be one of {SIDES}, got {sides!r}.')
  if basis not in BASES:
    raise ValueError(f'basis must be one of {BASES}, got {basis!r}.')
  if carry not in CARRIES:
    raise ValueError(f'carry must be one of {CARRIES}, got {carry!r}.')
  if basis_source not in BASIS_SOURCES:
    raise ValueError(f'basis_source must be one of {BASIS_SOURCES}, got '
                     f'{basis_source!r}.')
  _common.check_static_bool('stagger', stagger, 'svd_rotation: ')
  if split_refresh is not None and not isinstance(split_refresh,
                                                  jax.sharding.Mesh):
    raise ValueError('svd_rotation: split_refresh must be None or a '
                     f'jax.sharding.Mesh, got {split_refresh!r}.')
  ema = basis_source == 'ema_gram'
  if ema and basis != 'eigh':
    raise ValueError(
        "svd_rotation: basis_source='ema_gram' decomposes the EMA Gram "
        f"matrices with eigh; it needs basis='eigh', got basis={basis!r}.")
  _common.check_unit_interval('gram_decay', gram_decay)
  _common.check_dynamic_int('every', every, 'svd_rotation: ')
  max_dim = _common.structural_int('max_dim', max_dim, DEFAULT_MAX_DIM,
                                   where='svd_rotation: ')
  if precision is not None and precision != BF16_OPERANDS:
    try:  # one precision, or lax's (lhs, rhs) pair
      for p in (precision if isinstance(precision, (tuple, list))
                else (precision,)):
        lax.Precision(p)
    except ValueError:
      raise ValueError(
          f'svd_rotation: precision must be None, {BF16_OPERANDS!r} or a '
          f'jax.lax.Precision (e.g. "highest"), got {precision!r}.') from None
  basis_dtype = jnp.dtype(basis_dtype)
  if not jnp.issubdtype(basis_dtype, jnp.floating):
    raise ValueError(f'basis_dtype must be a float dtype, got {basis_dtype}.')
  inner = optax.with_extra_args_support(inner)

  def plans_from_state(tree, state):
    """The plans of ``tree``'s leaves, with the sides the state rotates.

    Which sides have a basis is read from the state (so a traced
    ``max_dim`` under ``optax.inject_hyperparams`` is never needed here).
    """
    views_tree = matrix.resolve_views(tree, views, vectors=False)
    treedef = jax.tree.structure(tree)
    try:
      lefts = treedef.flatten_up_to(state.left)
      rights = treedef.flatten_up_to(state.right)
      if ema:
        grams = (treedef.flatten_up_to(state.gram_left),
                 treedef.flatten_up_to(state.gram_right))
    except (ValueError, TypeError) as e:
      raise ValueError(
          'svd_rotation: the updates tree does not match the tree the '
          f'optimizer was initialised with: {e}') from None
    if not ema:
      grams = ([None] * len(lefts), [None] * len(rights))
    plans = []
    for (path, leaf), view, l, r, gl, gr in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0],
        treedef.flatten_up_to(views_tree), lefts, rights, *grams):
      plan = _plan(leaf.shape, view, sides, max(leaf.shape, default=1))
      plan = dataclasses.replace(plan, left=l is not None, right=r is not None)
      if ema and ((gl is None) != (l is None) or (gr is None) != (r is None)):
        raise ValueError(
            f'svd_rotation: the state of update {matrix.leaf_path_str(path)} '
            'has EMA Gram matrices on other sides than its bases.')
      for side, b in (('left', l), ('right', r), ('left', gl), ('right', gr)):
        if b is None:
          continue
        want = plan.batch_shape + (plan.side_dim(side),) * 2
        if view is None or tuple(b.shape) != want:
          raise ValueError(
              f'svd_rotation: update {matrix.leaf_path_str(path)} has shape '
              f'{tuple(leaf.shape)}, which does not match the state built at '
              f'init ({side} basis of shape {tuple(b.shape)}).')
      plans.append(plan)
    return plans, lefts, rights, list(grams[0]), list(grams[1])

  def plans_for(tree):
    views_tree = matrix.resolve_views(tree, views, vectors=False)
    treedef = jax.tree.structure(tree)
    return [_plan(leaf.shape, view, sides, max_dim) for leaf, view in
            zip(jax.tree.leaves(tree), treedef.flatten_up_to(views_tree))]

  def init_fn(params):
    if _common.is_params_placeholder(params):  # optax.tree_map_params
      marker = _common.NOT_PARAMS if ema else None
      return SvdRotationState(count=_common.zero_count(),
                              left=_common.NOT_PARAMS,
                              right=_common.NOT_PARAMS,
                              inner_state=inner.init(params),
                              skipped_refreshes=_common.zero_count(),
                              gram_left=marker, gram_right=marker)
    _common.check_float_params(params, 'svd_rotation')
    if max_dim is None:
      raise _common.traced_structural_error(['max_dim'], 'svd_rotation')
    treedef = jax.tree.structure(params)
    plans = plans_for(params)

    def eye(plan, side):
      if not getattr(plan, side):
        return None
      k = plan.side_dim(side)
      return jnp.broadcast_to(jnp.eye(k, dtype=basis_dtype),
                              plan.batch_shape + (k, k))

    def zeros(plan, side):
      if not getattr(plan, side):
        return None
      k = plan.side_dim(side)
      return jnp.zeros(plan.batch_shape + (k, k), basis_dtype)

    left = jax.tree.unflatten(treedef, [eye(p, 'left') for p in plans])
    right = jax.tree.unflatten(treedef, [eye(p, 'right') for p in plans])
    gram_left = gram_right = None
    if ema:
      gram_left = jax.tree.unflatten(treedef,
                                     [zeros(p, 'left') for p in plans])
      gram_right = jax.tree.unflatten(treedef,
                                      [zeros(p, 'right') for p in plans])
    inner_state = inner.init(params)
    if carry == 'rotate':
      _, found = _map_first_moments(inner_state, treedef, lambda x: x)
      if not found:
        raise ValueError(
            "svd_rotation(carry='rotate') found no first moment `mu` with the "
            'params\' structure in the inner state; use carry="keep" or an '
            'inner transform with a full first moment (e.g. scale_by_adam).')
    return SvdRotationState(count=_common.zero_count(), left=left,
                            right=right, inner_state=inner_state,
                            skipped_refreshes=_common.zero_count(),
                            gram_left=gram_left, gram_right=gram_right)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    treedef = jax.tree.structure(updates)
    plans, lefts, rights, gram_l, gram_r = plans_from_state(updates, state)
    grads = jax.tree.leaves(updates)

    count = _common.increment(state.count)
    xs = [g.astype(basis_dtype) if p.rotated else None
          for g, p in zip(grads, plans)]
    inner_state = state.inner_state
    fresh = [None] * len(plans)
    skipped_refreshes = state.skipped_refreshes
    grams, ema_skipped = None, jnp.zeros((), bool)
    if ema and any(p.rotated for p in plans):
      # Every step, before the refresh: the new basis sees this gradient.
      new_gl, new_gr, ema_skipped = _ema_grams(xs, plans, gram_l, gram_r,
                                               gram_decay)
      grams = (gram_l, gram_r, new_gl, new_gr)
      gram_l, gram_r = new_gl, new_gr

    if basis != 'identity' and any(p.rotated for p in plans):
      # carry="rotate": the inner first moment(s), leaf by leaf.
      mus = (_first_moment_leaves(inner_state, treedef)
             if carry == 'rotate' else [])

      def refresh_fn(idx, xs, lefts, rights, mus, grams):
        """New bases of the plans ``idx`` (static; the lists align with it)."""
        sub = [plans[i] for i in idx]
        if grams is None:
          new = _new_bases(xs, sub, basis, split_refresh)
        else:
          new = _ema_bases(xs, sub, grams[2], grams[3], split_refresh)
        new_l, new_r, fresh = [], [], []
        skipped = jnp.zeros((), bool)  # some basis kept its old value
        for i, plan in enumerate(sub):
          if not plan.rotated:
            new_l.append(lefts[i])
            new_r.append(rights[i])
            fresh.append(None)
            continue
          ok_all, ranks = jnp.ones(plan.batch_shape, bool), {}
          for side, olds, outs in (('left', lefts, new_l),
                                   ('right', rights, new_r)):
            if not getattr(plan, side):
              outs.append(None)
              continue
            vecs, ok, rank = new[(i, side)]
            k = plan.side_dim(side)
            old = olds[i]
            vecs = matrix.reshape(vecs, plan.batch_shape + (k, k))
            vecs = matrix.reshard_like(vecs.astype(old.dtype), old)
            ok = matrix.reshape(ok, plan.batch_shape)
            outs.append(jnp.where(ok[..., None, None], vecs, old))
            ok_all = ok_all & ok
            ranks[side] = matrix.reshape(rank, plan.batch_shape)
          masked = ok_all
          if grams is not None:  # masks only where the basis is G's own
            masked = ok_all & _single_gradient(plan, grams[0][i], grams[1][i],
                                               gram_decay)
          fresh.append((masked, ranks.get('left'), ranks.get('right')))
          skipped = skipped | ~jnp.all(ok_all)

        def rotate(m, plan, ol, orr, nl, nr):
          if not plan.rotated:
            return m
          y = _backward(m.astype(basis_dtype), ol, orr, plan,
                        lax.Precision.HIGHEST)
          y = _forward(y, nl, nr, plan, lax.Precision.HIGHEST)
          return y.astype(m.dtype)

        mus = [[rotate(*a) for a in zip(field, sub, lefts, rights, new_l,
                                         new_r)] for field in mus]
        return new_l, new_r, fresh, mus, skipped

      def keep_fn(idx, xs, lefts, rights, mus, grams):
        del xs, grams
        def stale(p):
          if not p.rotated:
            return None
          zero = jnp.zeros(p.batch_shape, jnp.int32)
          return (jnp.zeros(p.batch_shape, bool), zero if p.left else None,
                  zero if p.right else None)
        return (list(lefts), list(rights), [stale(plans[i]) for i in idx],
                mus, jnp.zeros((), bool))

      def refresh_where(due, idx):
        """One ``lax.cond`` on ``due`` for the plans ``idx``."""
        take = lambda xs: [xs[i] for i in idx]
        sub_grams = None if grams is None else tuple(take(g) for g in grams)
        return lax.cond(
            due, functools.partial(refresh_fn, idx),
            functools.partial(keep_fn, idx), take(xs), take(lefts),
            take(rights), [take(field) for field in mus], sub_grams)

      if not stagger:
        lefts, rights, fresh, mus, skipped = refresh_where(
            (count - 1) % every == 0, tuple(range(len(plans))))
      else:
        # The r-th of R rotated plans: t = 1 and t = 1 + o_r + kT, k >= 0,
        # o_r = floor(r T / R).
        rotated_idx = [i for i, p in enumerate(plans) if p.rotated]
        skipped = jnp.zeros((), bool)
        for r, i in enumerate(rotated_idx):
          offset = (r * every) // len(rotated_idx)
          due = (count == 1) | ((count - 1 - offset) % every == 0)
          (lefts[i],), (rights[i],), (fresh[i],), sub_mus, sk = refresh_where(
              due, (i,))
          for field, (m,) in zip(mus, sub_mus):
            field[i] = m
          skipped = skipped | sk
      if carry == 'rotate':
        inner_state = _with_first_moment_leaves(inner_state, treedef, mus)
      skipped_refreshes = jnp.where(
          skipped | ema_skipped, _common.increment(skipped_refreshes),
          skipped_refreshes)

    rotated = []
    for g, x, plan, l, r, f in zip(grads, xs, plans, lefts, rights, fresh):
      if not plan.rotated:
        rotated.append(g)
        continue
      y = _forward(x, l, r, plan, precision)
      if f is not None:
        y = jnp.where(_fresh_mask(plan, *f), y, 0.0)
      rotated.append(y.astype(g.dtype))
    rotated = jax.tree.unflatten(treedef, rotated)

    inner_out, inner_state = inner.update(rotated, inner_state, None,
                                          **extra_args)
    outs = []
    for d, g, plan, l, r in zip(treedef.flatten_up_to(inner_out), grads, plans,
                                lefts, rights):
      if not plan.rotated:
        outs.append(d)
        continue
      y = _backward(d.astype(basis_dtype), l, r, plan, precision)
      outs.append(y.astype(g.dtype))
    new_state = SvdRotationState(
        count=count, left=jax.tree.unflatten(treedef, lefts),
        right=jax.tree.unflatten(treedef, rights), inner_state=inner_state,
        skipped_refreshes=skipped_refreshes,
        gram_left=jax.tree.unflatten(treedef, gram_l) if ema else None,
        gram_right=jax.tree.unflatten(treedef, gram_r) if ema else None)
    return jax.tree.unflatten(treedef, outs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _fresh_mask(plan: _Plan, fresh, rank_left, rank_right) -> jax.Array:
  """Which rotated-gradient entries to keep (leaf layout), from iotas.

  [decided] At a refresh step the basis comes from this very G, so in exact
  arithmetic the rotated gradient vanishes beyond the rank r of G (rows
  i >= r of Pᵀ G, columns j >= r of G Q) and, two-sided, off the diagonal of
  Pᵀ G Q. Computed in float32 those entries are roundoff (~1e-7·|G|), which
  Adam's first step with a tiny ε would blow up into O(1) updates that depend
  on the decomposition method; they are set to 0. Where the refresh failed
  (``fresh`` False: the old basis was kept) nothing is masked. Built from
  iotas (fused by XLA, never stored).
  """
  v = plan.view
  shape = plan.shape

  def flat_index(axes):
    idx, stride = 0, 1
    for a in reversed(axes):
      idx = idx + lax.broadcasted_iota(jnp.int32, shape, a) * stride
      stride *= shape[a]
    return idx

  def per_matrix(x):  # (*batch,) -> broadcastable against the leaf
    srt = tuple(sorted(v.batch))
    x = jnp.transpose(x, [v.batch.index(a) for a in srt])
    return jnp.expand_dims(x, tuple(sorted(v.rows + v.cols)))

  rows, cols = flat_index(v.rows), flat_index(v.cols)
  keep = jnp.ones(shape, bool)
  if plan.left and plan.right:
    keep = rows == cols
  if rank_left is not None:
    keep = keep & (rows < per_matrix(rank_left))
  if rank_right is not None:
    keep = keep & (cols < per_matrix(rank_right))
  return keep | ~per_matrix(fresh)


# [decided] An EMA Gram matrix L (R) is laid out like the basis P (Q) of
# its side: its first axis follows the parameter's rows (columns).
sharding.register_state_rule(SvdRotationState, {
    'count': 'scalar', 'left': 'row_basis', 'right': 'col_basis',
    'inner_state': 'state', 'skipped_refreshes': 'scalar',
    'gram_left': 'row_basis', 'gram_right': 'col_basis'})


# --------------------------------------------------------------------------
# Named optimizers (docs/algorithms.md §3).


def _rotated_named(make_inner, *, sides, every, max_dim, basis, carry,
                   precision, views, stack_leaves, fallback, basis_source,
                   gram_decay, stagger, split_refresh, **named):
  """``make_inner(views)`` rotated on the matrices, as a named optimizer."""
  _common.check_dynamic_int('every', every)
  _common.structural_int('max_dim', max_dim, DEFAULT_MAX_DIM)
  method = compose.matrix_method(
      lambda v: compose.scale_in_float32(svd_rotation(
          make_inner(v), sides=sides, every=every, max_dim=max_dim, basis=basis,
          carry=carry, precision=precision, views=v,
          basis_source=basis_source, gram_decay=gram_decay,
          stagger=stagger, split_refresh=split_refresh)),
      views, stack_leaves)
  return compose.named_optimizer(method, views=views, fallback=fallback,
                                 **named)


def adadiag(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    sides: str = 'one',
    every: int = 200,
    max_dim: Optional[int] = None,
    basis: str = 'eigh',
    carry: str = 'keep',
    views: matrix.ViewSpec = None,
    precision: Any = None,
    stack_leaves: compose.StackLeaves = True,
    basis_source: str = 'gradient',
    gram_decay: float = DEFAULT_GRAM_DECAY,
    stagger: bool = False,
    split_refresh: Optional[jax.sharding.Mesh] = None,
    mu_dtype: Optional[DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaDiag: Adam in the gradient's singular basis (docs/algorithms.md §3).

  ``svd_rotation(scale_by_adam(b1, b2, eps), sides)`` on matrices (float32
  statistics), Adam with the same β1, β2, ε on the other leaves; then
  decoupled weight decay (in the original coordinates) and the learning
  rate. With ``basis="identity"`` it equals ``optax.adamw`` with float32
  moments. Memory per (m, n) matrix: 2mn + min(m, n)² (``sides="one"``) or
  2mn + m² + n² (``"two"``, :data:`adadiag_pp`); ``basis_source="ema_gram"``
  adds the EMA Gram matrices: 2mn + 2 min(m, n)² or 2mn + 2(m² + n²).

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: Adam's β1 in [0, 1) (rotated coordinates).
    b2: Adam's β2 in [0, 1).
    eps: Adam's ε >= 0.
    weight_decay: λ >= 0 of W ← W − η(D + λW).
    mask: which leaves decay, as ``optax.adamw``'s ``mask``; None = all.
    method_mask: which matrices are rotated (bool tree or function; None =
      every ndim >= 2 leaf; the paper's LLaMA recipe excludes the token
      embedding, which then gets the Adam fallback).
    sides: ``"one"`` (AdaDiag: the smaller side, ties = rows) or ``"two"``
      (AdaDiag++: both sides).
    every: basis refresh period T >= 1 (steps 1, 1 + T, ...); a traced int
      is fine (``optax.inject_hyperparams``).
    max_dim: sides longer than this are not rotated; None = 8192
      (structural: decides the state's shapes).
    basis: ``"eigh"`` of the Gram matrix (default), ``"svd"`` or
      ``"identity"`` (static; see :func:`svd_rotation`).
    carry: the first moment at a refresh: ``"keep"`` (paper) or
      ``"rotate"`` into the new basis.
    views: :class:`optax_fac.MatrixView` overrides (tree, view, function).
    precision: ``jax.lax.Precision`` of the rotation matmuls (None = the
      backend default), or ``"bf16"`` (bfloat16 operands, float32
      accumulation); see :func:`svd_rotation`.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    basis_source: ``"gradient"`` (the paper: P, Q from the current
      gradient) or ``"ema_gram"`` (SOAP-style: from an EMA of G Gᵀ and
      Gᵀ G; memory + one float32 Gram matrix per rotated side; see
      :func:`svd_rotation`). Static.
    gram_decay: β in [0, 1) of the Gram EMA (``"ema_gram"`` only; 0.95).
    stagger: False (the paper): every basis refreshes at the same steps;
      True: the refreshes of the matrices (stacked groups) are spread over
      the period, so after the first no step decomposes them all (see
      :func:`svd_rotation`). Static.
    split_refresh: None, or the ``jax.sharding.Mesh`` the step runs on: a
      refresh's decompositions are split over its devices instead of each
      device computing them all (see :func:`svd_rotation`). Static.
    mu_dtype: floating dtype of the stored first moments (the rotated
      Adam's and the fallback's; e.g. ``jnp.bfloat16`` saves 2 bytes per
      parameter); None = float32. Each step reads it as float32 and stores
      the new EMA rounded once (``optax.adamw``'s name; there None means
      the parameter dtype).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> params = {'w': jnp.ones((512, 256)), 'b': jnp.zeros(256)}
    >>> tx = optax_fac.adadiag(learning_rate=1e-3, every=100)
    >>> optax_fac.state_size(tx, params)  # 2mn + 256² floats; adamw: 1050628
    1312784
    >>> tx = optax_fac.adadiag(learning_rate=1e-3, basis_source='ema_gram')
    >>> optax_fac.state_size(tx, params)  # + the EMA of Gᵀ G: 256² floats
    1574928

  References:
    Nguyen et al., `Improving Adaptive Moment Optimization via
    Preconditioner Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025.
  """
  compose.check_moments(b1, b2, eps)

  def inner(_):
    if mu_dtype is None:
      return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    return compose.first_moment_read_in_float32(optax.scale_by_adam(
        b1=b1, b2=b2, eps=eps,
        mu_dtype=_common.moment_dtype(mu_dtype, 'adadiag: ')))
  return _rotated_named(
      inner, sides=sides,
      every=every, max_dim=max_dim, basis=basis, carry=carry,
      precision=precision, views=views, stack_leaves=stack_leaves,
      fallback=compose.adam_fallback(b1, b2, eps, mu_dtype=mu_dtype),
      learning_rate=learning_rate,
      weight_decay=weight_decay, mask=mask, method_mask=method_mask,
      basis_source=basis_source, gram_decay=gram_decay,
      stagger=stagger, split_refresh=split_refresh)


adadiag_pp = functools.partial(adadiag, sides='two')
adadiag_pp.__doc__ = r"""AdaDiag++: :func:`adadiag` with ``sides="two"`` (docs/algorithms.md §3).

  Adam in the two-sided singular basis G̃ = Pᵀ G Q on every matrix, Adam
  elsewhere. At t = 1 (with a tiny ε) the step is the polar factor U Vᵀ of
  the gradient. Memory 2mn + m² + n² per (m, n) matrix. Every argument is
  :func:`adadiag`'s.

  References:
    Nguyen et al., `Improving Adaptive Moment Optimization via
    Preconditioner Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025.
  """


def adafac_diag(
    learning_rate: optax.ScalarOrSchedule,
    b1: Optional[float] = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = None,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    sides: str = 'one',
    every: int = 200,
    max_dim: Optional[int] = None,
    basis: str = 'eigh',
    carry: str = 'keep',
    views: matrix.ViewSpec = None,
    precision: Any = None,
    fallback_eps: float = 1e-8,
    stack_leaves: compose.StackLeaves = True,
    basis_source: str = 'gradient',
    gram_decay: float = DEFAULT_GRAM_DECAY,
    stagger: bool = False,
    split_refresh: Optional[jax.sharding.Mesh] = None,
    mu_dtype: Optional[DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdafacDiag: the factored second moment in the singular basis (§3).

  ``svd_rotation(scale_by_factored_rms(b1, b2, eps, clipping_threshold),
  sides)`` on matrices; ``b1=None`` is AdafacDiag without momentum (memory
  m + n + min(m, n)² per matrix with ``sides="one"``), a float adds momentum
  on the rotated gradient (+ mn); ``basis_source="ema_gram"`` adds
  min(m, n)² (two-sided: m² + n²) for the EMA Gram matrices. Other leaves
  get Adam (β1 = ``b1`` or 0.9, β2, ``fallback_eps``). With ``basis="identity"`` it equals
  :func:`optax_fac.adafactor_momentum`; ``sides="two"`` is
  :data:`adafac_diag_pp`.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: momentum decay in [0, 1), or None (no first moment).
    b2: second-moment decay in [0, 1).
    eps: ε₁ >= 0 added to the rotated G² (float32).
    clipping_threshold: update clipping threshold d > 0 (None = off).
    weight_decay: λ >= 0, decoupled, in the original coordinates.
    mask: the weight-decay mask (``optax.adamw``'s meaning).
    method_mask: the matrices that are rotated (None = every ndim >= 2
      leaf).
    sides: ``"one"`` (the smaller side) or ``"two"`` (both).
    every: refresh period T >= 1 (traced ints allowed).
    max_dim: longest rotated side; None = 8192 (structural).
    basis: ``"eigh"``, ``"svd"`` or ``"identity"`` (static).
    carry: ``"keep"`` (paper) or ``"rotate"`` the first moment at a refresh
      (needs ``b1``).
    views: per-leaf :class:`optax_fac.MatrixView`.
    precision: precision of the rotation matmuls.
    fallback_eps: Adam's ε on the non-matrix leaves.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    basis_source: ``"gradient"`` (the paper: P, Q from the current
      gradient) or ``"ema_gram"`` (SOAP-style: from an EMA of G Gᵀ and
      Gᵀ G; memory + one float32 Gram matrix per rotated side; see
      :func:`svd_rotation`). Static.
    gram_decay: β in [0, 1) of the Gram EMA (``"ema_gram"`` only; 0.95).
    stagger: False (the paper): every basis refreshes at the same steps;
      True: the refreshes of the matrices (stacked groups) are spread over
      the period, so after the first no step decomposes them all (see
      :func:`svd_rotation`). Static.
    split_refresh: None, or the ``jax.sharding.Mesh`` the step runs on: a
      refresh's decompositions are split over its devices instead of each
      device computing them all (see :func:`svd_rotation`). Static.
    mu_dtype: floating dtype of the stored first moments (the rotated
      momentum, with ``b1``, and the fallback's); None = float32 (as
      :func:`optax_fac.adafactor_momentum`'s ``mu_dtype``).

  Returns:
    The AdafacDiag ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> params = {'w': jnp.ones((512, 256))}
    >>> tx = optax_fac.adafac_diag(learning_rate=1e-3, b1=None)
    >>> optax_fac.state_size(tx, params) // 4  # m + n + 256² + 4 counters
    66308

  References:
    Nguyen et al., `Improving Adaptive Moment Optimization via
    Preconditioner Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025.
  """
  def inner(v):
    return factored.scale_by_factored_rms(b1, b2, eps, clipping_threshold,
                                          views=v, mu_dtype=mu_dtype)
  return _rotated_named(
      inner, sides=sides, every=every, max_dim=max_dim, basis=basis,
      carry=carry, precision=precision, views=views, stack_leaves=stack_leaves,
      fallback=compose.adam_fallback(0.9 if b1 is None else b1, b2,
                                     fallback_eps, mu_dtype=mu_dtype),
      learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
      method_mask=method_mask, basis_source=basis_source,
      gram_decay=gram_decay, stagger=stagger, split_refresh=split_refresh)


adafac_diag_pp = functools.partial(adafac_diag, sides='two')
adafac_diag_pp.__doc__ = r"""AdafacDiag++: :func:`adafac_diag` with ``sides="two"`` (§3).

  The factored second moment in the two-sided basis: memory (m + n, or
  mn + m + n with momentum) + m² + n² per (m, n) matrix. Every argument is
  :func:`adafac_diag`'s.

  References:
    Nguyen et al., `Improving Adaptive Moment Optimization via
    Preconditioner Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025.
  """


def hfac_diag(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    weight_decay: float = 0.0,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    every: int = 200,
    max_dim: Optional[int] = None,
    basis: str = 'eigh',
    views: matrix.ViewSpec = None,
    precision: Any = None,
    fallback_eps: float = 1e-8,
    stack_leaves: compose.StackLeaves = True,
    basis_source: str = 'gradient',
    gram_decay: float = DEFAULT_GRAM_DECAY,
    stagger: bool = False,
    split_refresh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HfacDiag: H-Fac in the one-sided singular basis (docs/algorithms.md §3).

  ``svd_rotation(scale_by_hfac(b1, b2, eps, clipping_threshold), sides="one")``
  on matrices, Adam (β1, β2, ``fallback_eps``) elsewhere. With
  ``basis="identity"`` it equals :func:`optax_fac.hfac`. Memory
  2(m + n) + min(m, n)² per matrix (+ min(m, n)² with
  ``basis_source="ema_gram"``). H-Fac's momentum is factored, so there
  is no ``carry="rotate"`` option.

  Args:
    learning_rate: η >= 0, a float or an optax schedule.
    b1: H-Fac's momentum decay β1 in [0, 1).
    b2: H-Fac's second-moment decay β2 in [0, 1).
    eps: ε₁ >= 0 added to G² (float32).
    clipping_threshold: d > 0 of the update clipping (None = off).
    weight_decay: λ >= 0 (decoupled).
    mask: decay mask as in ``optax.adamw``.
    method_mask: rotated matrices (None = every ndim >= 2 leaf).
    every: basis refresh period (>= 1; may be traced).
    max_dim: sides above it stay unrotated (None = 8192; structural).
    basis: ``"eigh"`` | ``"svd"`` | ``"identity"``.
    views: leaf views (:class:`optax_fac.MatrixView`).
    precision: rotation matmul precision.
    fallback_eps: ε of the Adam fallback.
    stack_leaves: True: same-shape leaves stacked in groups of at most
      64 MiB (:func:`optax_fac.stack_leaves`; same updates, fewer
      kernels); an int: groups of at most that many bytes; False: leaf
      by leaf.
    basis_source: ``"gradient"`` (the paper: P, Q from the current
      gradient) or ``"ema_gram"`` (SOAP-style: from an EMA of G Gᵀ and
      Gᵀ G; memory + one float32 Gram matrix per rotated side; see
      :func:`svd_rotation`). Static.
    gram_decay: β in [0, 1) of the Gram EMA (``"ema_gram"`` only; 0.95).
    stagger: False (the paper): every basis refreshes at the same steps;
      True: the refreshes of the matrices (stacked groups) are spread over
      the period, so after the first no step decomposes them all (see
      :func:`svd_rotation`). Static.
    split_refresh: None, or the ``jax.sharding.Mesh`` the step runs on: a
      refresh's decompositions are split over its devices instead of each
      device computing them all (see :func:`svd_rotation`). Static.

  Returns:
    HfacDiag as an ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> tx = optax_fac.hfac_diag(learning_rate=1e-3, every=50)
    >>> params = {'w': jnp.ones((64, 32))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)  # a refresh step

  References:
    Nguyen et al., `Improving Adaptive Moment Optimization via
    Preconditioner Diagonalization <https://arxiv.org/abs/2502.07488>`_, 2025;
    Nguyen et al., `H-Fac <https://arxiv.org/abs/2406.09958>`_, AISTATS 2025.
  """
  def inner(v):
    return scale_by_hfac(b1, b2, eps, clipping_threshold, views=v)
  return _rotated_named(
      inner, sides='one', every=every, max_dim=max_dim, basis=basis,
      carry='keep', precision=precision, views=views,
      stack_leaves=stack_leaves,
      fallback=compose.adam_fallback(b1, b2, fallback_eps),
      learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
      method_mask=method_mask, basis_source=basis_source,
      gram_decay=gram_decay, stagger=stagger, split_refresh=split_refresh)
