"""Decompositions and canonical orthonormal bases (§3 rotation, §5.2).

The decompositions of the library live here: :func:`eigh_descending`,
:func:`svd_vectors`, the sign convention :func:`fix_signs` and the top-r
singular vectors :func:`top_singular_vectors` (Subspace-Momentum's
projector). For the rotation family, :func:`canonical_basis` turns the
output of a decomposition (eigenvectors of G Gᵀ or Gᵀ G with eigenvalues
sorted descending, or singular vectors with σ²) into a full k×k orthonormal
basis that depends only on G, not on the method, the backend or the device
count:

* **kept block**: the vectors whose eigenvalue λ = σ² is above the rank
  tolerance (:func:`rank_rtol`) come from the decomposition, with the sign
  convention of docs/algorithms.md §3 (largest-magnitude entry positive);
* **completion**: the remaining columns (the null space of a non-square
  matrix's longer side, and the numerically zero singular values of a
  rank-deficient G), which eigh and SVD choose arbitrarily, are replaced by
  a canonical orthonormal basis of the orthogonal complement of the kept
  vectors, determined by their span only (:func:`complete_basis`).

Everything is batched over leading axes, jit-able and shape-static (the
tolerance rank is data-dependent: columns are masked, never sliced).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from optax_fac import matrix

# A completion pivot is the first standard basis vector (in index order)
# whose residual squared norm is at least this fraction of the largest one.
# Irrational on purpose: structured gradients (zero rows, equal rows, one-hot
# columns) give residuals that are 0, 1 or rational multiples of each other,
# so no such input sits on the decision boundary, where float32 roundoff
# would pick different pivots for eigh and SVD. It also bounds every pivot's
# residual below by sqrt(PIVOT_FRACTION / k), so Gram-Schmidt stays well
# conditioned.
PIVOT_FRACTION = math.exp(-1.0)

# complete_basis takes the in-order pivots from one QR when the size k is
# above _IN_ORDER_MIN_K (static; below it the sequential loop is cheap and
# the QR path's compile time is not worth it) and some matrix misses more
# than _IN_ORDER_MIN columns.
_IN_ORDER_MIN_K = 64
_IN_ORDER_MIN = 4

_HI = lax.Precision.HIGHEST


def unbatched_on_cpu(decompose, x: jax.Array):
  """``decompose(x)`` for (..., m, n) ``x``; on CPU, one matrix per LAPACK call.

  jaxlib 0.10.0 to 0.11.0 (jaxlib/cpu/lapack_kernels.cc, ParallelBatchMap)
  split a batched CPU LAPACK call whose estimated cost reaches 2e5 flops
  (batch · 5k³ for eigh, batch · 10mn·min(m, n) for svd) into tasks on
  XLA:CPU's intra-op thread pool, and block the calling thread until they are
  done. XLA runs a decomposition on a worker of that same pool when it runs
  independent work concurrently (the size groups of svd_rotation's refresh);
  once every worker is such a waiting call -- one per device under pmap or a
  sharded jit, with a pool of max(#cores, #devices) workers -- nothing runs
  the tasks and the step deadlocks, the process idle. A batch of one runs on
  the calling thread, so on CPU this loops over the batch (lax.map); other
  platforms keep the batched call.
  """
  if math.prod(x.shape[:-2]) <= 1:
    return decompose(x)

  def per_matrix(x):
    batch = x.shape[:-2]
    out = lax.map(decompose, matrix.reshape(
        x, (math.prod(batch),) + x.shape[-2:]))
    return jax.tree.map(
        lambda o: matrix.reshape(o, batch + o.shape[1:]), out)

  loop = per_matrix
  if matrix.explicit_mesh():
    bspec = matrix.sharding_spec(x)[:x.ndim - 2]
    if any(s is not None for s in bspec):
      # lax.map cannot scan an axis sharded under an explicit mesh: loop
      # over each device's own matrices (the matrix axes gathered).
      x = matrix.replicate(x, keep_leading=x.ndim - 2)
      loop = jax.shard_map(per_matrix, in_specs=jax.P(*bspec, None, None),
                           out_specs=jax.P(*bspec))
  return lax.platform_dependent(x, cpu=loop, default=decompose)


def in_chunks(fn, xs: tuple, max_bytes: int):
  """``fn(*xs)`` over the leading (batch) axis, a chunk of matrices at a time.

  A refresh decomposes every same-size matrix of the model in one batched
  call; on a 1B-parameter tree that batch (170 matrices of 2048 x 2048,
  2.9 GB in float32) and the buffers derived from it (the eigenvectors, the
  sign-fixed and completed bases) are each as large, and they live
  together: several GiB of temporary memory. ``in_chunks`` runs ``fn`` on
  chunks of ``c`` matrices in a ``lax.map`` (one chunk's buffers live at a
  time), ``c`` the largest divisor of the batch B with ``c`` x (bytes of
  one ``xs[0]`` matrix) <= ``max_bytes`` (1 if none is), so nothing is
  padded.

  Args:
    fn: batched arrays (c, ...) -> a pytree of batched arrays (c, ...);
      each output row may depend only on the same row of the inputs (a
      batched decomposition) for the result to be the chunking's.
    xs: arrays with the same leading B.
    max_bytes: the largest chunk of ``xs[0]``, in bytes (> 0).

  Raises:
    ValueError: ``max_bytes`` not a positive int.

  Returns:
    ``fn(*xs)``'s pytree, batch B. ``fn(*xs)`` itself when the whole batch
    is within ``max_bytes`` or under an explicit mesh (``lax.map`` cannot
    scan a sharded axis there).

  Example: six 2 x 2 float32 matrices (16 bytes each) with at most 40
  bytes a chunk run as three chunks of two:

  >>> import jax.numpy as jnp
  >>> from optax_fac import linalg
  >>> x = jnp.arange(24.0).reshape(6, 2, 2)
  >>> seen = []
  >>> def traces(x):
  ...   seen.append(x.shape)
  ...   return x.sum(axis=(1, 2))
  >>> linalg.in_chunks(traces, (x,), max_bytes=40)
  Array([ 6., 22., 38., 54., 70., 86.], dtype=float32)
  >>> seen
  [(2, 2, 2)]
  """
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or (
      max_bytes <= 0):
    raise ValueError(f'in_chunks: max_bytes must be a positive int (bytes), '
                     f'got {max_bytes!r}.')
  b = xs[0].shape[0]
  item = xs[0].dtype.itemsize * math.prod(xs[0].shape[1:])
  if b * item <= max_bytes or matrix.explicit_mesh():
    return fn(*xs)
  c = max(d for d in range(1, b + 1) if b % d == 0 and
          (d == 1 or d * item <= max_bytes))
  chunked = tuple(matrix.reshape(x, (b // c, c) + x.shape[1:]) for x in xs)
  out = lax.map(lambda args: fn(*args), chunked)
  return jax.tree.map(lambda o: matrix.reshape(o, (b,) + o.shape[2:]), out)


def over_devices(decompose, x: jax.Array, mesh: Optional[jax.sharding.Mesh]):
  """``decompose(x)`` for a (B, ...) batch, each device of ``mesh`` taking
  its share.

  The batch is padded with zero matrices to a multiple of the mesh's size
  and split over all of its axes (``jax.shard_map``): each device
  decomposes ceil(B / devices) matrices instead of all B, and the outputs
  come back with the batch axis split the same way (XLA gathers them where
  a replicated value is needed). ``mesh`` None: ``decompose(x)``. Each
  matrix is decomposed by the same routine either way, so the results are
  the same.
  """
  if mesh is None:
    return decompose(x)
  b, n = x.shape[0], mesh.size
  pad = -b % n
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  explicit = matrix.explicit_mesh()
  if explicit:  # sharding in types: the split is named, and so is the gather
    x = jax.sharding.reshard(x, spec)
  out = jax.shard_map(decompose, mesh=mesh, in_specs=spec, out_specs=spec,
                      check_vma=False)(x)
  if explicit:
    out = jax.tree.map(
        lambda o: jax.sharding.reshard(o, jax.sharding.PartitionSpec()), out)
  return jax.tree.map(lambda o: o[:b], out)


def fix_signs(vecs: jax.Array) -> jax.Array:
  """Flips each column so that its largest-magnitude entry is positive.

  ``vecs``: (..., k, c), one vector per column; returns the same shape. The
  one sign convention of the library (docs/algorithms.md §3 and §5.2)
  [decided]: deterministic bases across backends, and consecutive refreshes
  do not flip stale momentum. The first largest entry decides a tie; a zero
  column stays as it is.
  """
  idx = jnp.argmax(jnp.abs(vecs), axis=-2)
  pivot = jnp.take_along_axis(vecs, idx[..., None, :], axis=-2)
  return vecs * jnp.where(pivot < 0, -1.0, 1.0).astype(vecs.dtype)


def eigh_descending(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (..., k) and eigenvectors (..., k, k) of symmetric matrices,
  eigenvalues descending."""
  vals, vecs = unbatched_on_cpu(jnp.linalg.eigh, gram)
  return vals[..., ::-1], vecs[..., ::-1]


def svd_vectors(mats: jax.Array, full_matrices: bool = False):
  """Left singular vectors, singular values and right singular vectors (as
  columns) of (..., m, n) matrices, singular values descending."""
  u, s, vh = unbatched_on_cpu(
      lambda a: jnp.linalg.svd(a, full_matrices=full_matrices), mats)
  return u, s, jnp.swapaxes(vh, -1, -2)


def top_singular_vectors(g: jax.Array, r: int, *, left: bool,
                         method: str = 'svd', precision: Any = None
                         ) -> jax.Array:
  """The top-r left or right singular vectors of matrices, sign-fixed.

  Args:
    g: (..., m, n) matrices.
    r: how many vectors, 0 <= r <= min(m, n).
    left: left singular vectors (of G Gᵀ) if True, right (of Gᵀ G) if False.
    method: "svd" (thin SVD, :func:`svd_vectors`) or "eigh"
      (:func:`eigh_descending` of the Gram matrix of that side, computed
      with ``precision``); both sort by descending σ.
    precision: matmul precision of the Gram matrix ("eigh" only).

  Returns:
    (..., m, r) (left) or (..., n, r) (right) in g's dtype, one vector per
    column, with the sign convention of :func:`fix_signs`. An empty matrix
    or r = 0 gives zeros of that shape (no decomposition runs). Under an
    explicit mesh the decompositions need whole matrices: pass g with its
    matrix axes unsharded (:meth:`optax_fac.matrix.MatrixView.to_matrix`).
  """
  k = g.shape[-2] if left else g.shape[-1]
  if r == 0 or g.size == 0:
    return jnp.zeros(g.shape[:-2] + (k, r), g.dtype)
  if method == 'svd':
    u, _, v = svd_vectors(g, False)
    vecs = u if left else v
  else:
    gt = jnp.swapaxes(g, -1, -2)
    gram = (jnp.matmul(g, gt, precision=precision) if left
            else jnp.matmul(gt, g, precision=precision))
    _, vecs = eigh_descending(gram)
  return fix_signs(vecs[..., :, :r])


def rank_rtol(m: int, n: int, dtype: Any = jnp.float32) -> float:
  """Relative tolerance on λ = σ² below which a direction is numerically null.

  λ_i counts as nonzero iff λ_i > max(m, n) · eps(dtype) · λ_max, i.e.
  σ_i > sqrt(max(m, n) · eps) · σ_max (about 1.2e-3 · σ_max for a float32
  12×5 matrix). Why in λ, not σ: the eigh path computes λ from the Gram
  matrix, whose float32 rounding alone is of order max(m, n) · eps · σ_max²
  (γ_n |G||G|ᵀ), and the eigensolver adds c · eps · λ_max; so a zero
  singular value comes out of eigh as |λ| up to about that size (measured:
  at most 0.11 · the tolerance on CPU for shapes from 5×12 to 512×1376,
  0.02 · on an H200 for 5×12 to 64×64), and
  singular directions below that level cannot be resolved by eigh at all.
  The SVD path applies the same test to its σ², so both methods keep the
  same vectors. This is ``numpy.linalg.matrix_rank``'s rule
  (σ_max · max(m, n) · eps) moved to the Gram matrix.
  """
  return max(m, n) * float(jnp.finfo(dtype).eps)


def scale_to_unit_max(x: jax.Array, axes) -> jax.Array:
  """x / max|x| over ``axes`` (per remaining index); zeros stay zero.

  Eigen- and singular vectors are scale-invariant; this keeps the Gram
  matrices of gradients of any finite scale (e.g. 1e18) finite in float32.
  A non-finite x stays non-finite (so the caller's finiteness check fails).
  """
  s = jnp.max(jnp.abs(x), axis=tuple(axes), keepdims=True)
  return x / jnp.where(s > 0, s, jnp.ones_like(s))


# Matrix-vector products as multiply-and-sum: full float32 on every backend
# (a dot would run as TF32 on recent NVIDIA GPUs unless asked otherwise).


def _mv(a, x):
  """a (B, k, c) @ x (B, c) -> (B, k)."""
  return jnp.sum(a * x[:, None, :], axis=2)


def _tmv(a, x):
  """a (B, k, c)ᵀ @ x (B, k) -> (B, c)."""
  return jnp.sum(a * x[:, :, None], axis=1)


def complete_basis(kept: jax.Array, rank: jax.Array) -> jax.Array:
  """Canonical orthonormal completion of the first ``rank`` columns.

  Args:
    kept: (..., k, k); columns ``< rank`` orthonormal, the others zero.
    rank: (...,) int, the number of kept columns.

  Returns:
    (..., k, k): the kept columns, then (columns rank, ..., k − 1) an
    orthonormal basis of their orthogonal complement that depends only on
    their span: pivoted Gram–Schmidt of the projected identity (I − U Uᵀ)
    e_j. Column p takes the first j (in index order) whose residual
    1 − ‖B[j, :]‖² (B: the columns so far) is at least PIVOT_FRACTION of the
    largest; its vector is (I − B Bᵀ) e_j, normalized, with a positive
    entry j. ``rank = 0`` (a zero gradient) gives the identity.

  Computation: while the pivots are 0, 1, 2, ... (the usual case) the
  vectors are the columns of the Householder QR of M = I − U Uᵀ, signed so
  that R's diagonal is positive: one batched QR (run only if some matrix
  misses more than a few columns) gives them, and the residual history
  checks the pivot rule for each. From the first step where the rule picks
  another j, a sequential loop (one pivot per iteration, orthogonalized
  twice) finishes the basis.
  """
  batch = kept.shape[:-2]
  k = kept.shape[-1]
  nbatch = math.prod(batch)
  b = matrix.reshape(kept, (nbatch, k, k))
  rank = matrix.reshape(jnp.broadcast_to(rank, batch), (nbatch,))
  dtype = b.dtype

  def residual(b):
    return 1.0 - jnp.sum(b * b, axis=-1)

  def in_order(_, carry):
    """The columns of the in-order pivots (0, 1, ...), as far as they obey
    the pivot rule; returns the basis and where the sequential loop starts."""
    b, start = carry
    m = jnp.eye(k, dtype=dtype) - jnp.einsum('bic,bjc->bij', b, b,
                                             precision=_HI)
    q, r = unbatched_on_cpu(jnp.linalg.qr, m)
    sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    q = q * sign.astype(dtype)[:, None, :]
    # res[b, i, t]: residual of e_i before column t is added.
    qq = q * q
    res = residual(b)[:, :, None] - (jnp.cumsum(qq, axis=-1) - qq)
    own = jnp.diagonal(res, axis1=-2, axis2=-1)               # (B, t)
    good = own >= PIVOT_FRACTION * jnp.max(res, axis=-2)
    t = lax.broadcasted_iota(jnp.int32, good.shape, 1)
    missing = (k - rank)[:, None]
    bad = ~good & (t < missing)
    t0 = jnp.where(jnp.any(bad, -1), jnp.argmax(bad, -1), k - rank)
    # Column p = rank + t (t < t0) is q[:, :, t].
    src = t - rank[:, None]                                   # (B, p)
    use = (src >= 0) & (src < t0[:, None])
    moved = jnp.take_along_axis(q, jnp.clip(src, 0, k - 1)[:, None, :], -1)
    return jnp.where(use[:, None, :], moved, b), rank + t0

  # The QR costs about a third of an eigh of the same size: only when some
  # matrix misses more than a handful of columns (a loop of 0 or 1 trips).
  start_b = rank
  if k > _IN_ORDER_MIN_K:
    need = jnp.max(k - rank, initial=0) > _IN_ORDER_MIN
    b, start_b = lax.fori_loop(0, need.astype(jnp.int32), in_order,
                               (b, rank))

  def body(p, carry):
    b, res = carry
    active = p >= start_b                                    # (B,)
    best = jnp.max(res, axis=-1, keepdims=True)
    j = jnp.argmax(res >= PIVOT_FRACTION * best, axis=-1)    # first such j
    e = (lax.broadcasted_iota(jnp.int32, res.shape, 1)
         == j[:, None]).astype(dtype)                         # e_j, (B, k)
    v = e - _mv(b, _tmv(b, e))
    v = v - _mv(b, _tmv(b, v))
    # v_j ≈ res_j ≥ PIVOT_FRACTION · max(res) ≥ PIVOT_FRACTION / k > 0 (the
    # residual projector has trace k − p ≥ 1): no sign flip needed.
    v = v * lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True))
    b = b.at[:, :, p].set(jnp.where(active[:, None], v, b[:, :, p]))
    return b, jnp.where(active[:, None], residual(b), res)

  start = jnp.min(start_b, initial=k)
  b, _ = lax.fori_loop(start, k, body, (b, residual(b)))
  return matrix.reshape(b, batch + (k, k))


def canonical_basis(vecs: jax.Array, values: jax.Array, rtol: Any
                    ) -> tuple[jax.Array, jax.Array]:
  """Full canonical orthonormal basis from a decomposition.

  Args:
    vecs: (..., k, c), c ≤ k orthonormal columns (eigenvectors of the Gram
      matrix, or the reduced singular vectors of one side).
    values: (..., c) their eigenvalues λ = σ², sorted descending.
    rtol: relative tolerance on λ (scalar or (...,)), see :func:`rank_rtol`.

  Returns:
    ``(basis, rank)``: (..., k, k) with the ``rank`` columns of λ > rtol ·
    λ_max sign-fixed (:func:`fix_signs`) first, then the canonical
    completion (:func:`complete_basis`); and the (...,) int32 rank.
  """
  k, c = vecs.shape[-2:]
  top = jnp.max(values, axis=-1, keepdims=True)
  rtol = jnp.asarray(rtol, values.dtype)
  rtol = rtol[..., None] if rtol.ndim else rtol
  keep = values > rtol * top        # False for λ_max = 0 and for NaN
  keep = jnp.cumsum(~keep, axis=-1) == 0  # a prefix
  rank = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  kept = jnp.where(keep[..., None, :], fix_signs(vecs), jnp.zeros((), vecs.dtype))
  if c < k:
    pad = [(0, 0)] * (kept.ndim - 1) + [(0, k - c)]
    kept = jnp.pad(kept, pad)
  return complete_basis(kept, rank), rank
