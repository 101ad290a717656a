"""SMMF: square-matricized, rank-1 compressed Adam moments (docs/algorithms.md §4).

Every leaf (1-D and scalars included) is viewed as an (n1, n2) matrix by
square-matricization (:func:`optax_fac.matrix.square_shape`); both moments are
kept only as rank-1 non-negative factors (row and column statistics, stored
as means: see the [decided] deviation below), plus one sign
bit per element for the first moment. Each step decompresses the moments,
updates them with the current gradient, computes the update from the
uncompressed moments and compresses them again. The dense M and V of a step
are temporaries of that step: the persistent state is 2(n1 + n2) float32
values and ceil(N/8) bytes per leaf.

Faithful to the authors' official PyTorch code (eai-lab/SMMF,
``SMMF/SMMF.py``): the β schedules, no bias correction, the column factor
normalised by its sum only when the sum is nonzero, an exact 0 counted as a
negative sign, the ``vector_reshape`` rule on squeezed 1-D leaves, decoupled
weight decay W ← W − ηλW.

[decided] One deviation, in storage only: the factors are stored as row
MEANS r̄ = A 1 / n2 and column means normalised to MEAN 1,
c̄ = (1ᵀA / n1) / mean_j(1ᵀA / n1), not the official row sums r = A 1 and
columns normalised to sum 1, c = 1ᵀA / 1ᵀA1 (the division skipped when the
total is 0, as the official code skips it when the sum is 0). Then
r̄ c̄ᵀ = r cᵀ in exact arithmetic, so the decompressed moments and the update
D are the official ones up to float32 rounding; but every reduction is a sum
of pre-scaled terms (A/n2, A/n1), in the array code and in the GPU kernel, so
no intermediate exceeds max A. The official sums overflow float32 once a
row (or column) sum exceeds 3.4e38: a gradient of scale 1e18 (V = G² ≈ 1e36, n2 >= ~340)
made r = inf, c = inf/inf = NaN and every later step NaN, where Adam's state
stays finite up to |G| ≈ 1.8e19 (G² overflows; the dense
``vector_reshape=False`` path has no reduction and shares that limit).
The reconstruction r̄ c̄ᵀ itself is the official one: like it, it can exceed
max A (by up to a factor n2 for a very uneven A).

[decided] A second deviation, only where the official code would store NaN
or Inf: compressed moments that come out non-finite (a NaN or Inf gradient,
or G² beyond float32) are not stored; that leaf (batch element) keeps its
previous factors and signs, and ``SMMFState.skipped_refreshes`` counts the
step. In the official code one NaN of G reaches every factor of its matrix
through the column normalisation and the leaf stays NaN for the rest of the
run (Adam loses only that element). The step's update D is unchanged (from
this step's uncompressed moments), so a NaN gradient still gives a NaN update,
which ``optax.apply_if_finite`` rejects whole.

References:
  Park & Lee, `SMMF: Square-Matricized Momentum Factorization for
  Memory-Efficient Optimization <https://arxiv.org/abs/2412.08894>`_,
  AAAI 2025. Official code: https://github.com/eai-lab/SMMF.
"""


import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_fac import _common
from optax_fac import compose
from optax_fac import matrix
from optax_fac import sharding
from optax_fac import smmf_kernel

_SIGN_BITS = (1, 8)


class SMMFState(NamedTuple):
  """State of :func:`scale_by_smmf`.

  Per leaf with N elements, square view (n1, n2) and batch shape B (empty
  unless a ``views`` entry names batch axes):

  * ``m_row`` (B, n1), ``m_col`` (B, n2): float32 factors of |M|;
  * ``m_sign``: the signs [M > 0], packed (B, ceil(N/8)) uint8 for
    ``sign_bits=1`` or (B, n1, n2) bool for ``sign_bits=8``;
  * ``v_row`` (B, n1), ``v_col`` (B, n2): float32 factors of V.

  [decided] A ``*_row`` factor holds the row MEANS A 1 / n2 of its matrix A
  (|M| or V) and a ``*_col`` factor its column means normalised to MEAN 1
  (1ᵀA / n1 divided by their mean; left as they are, all 0, when that mean
  is 0), not the official row sums and columns of sum 1: overflow-safe
  storage with the same reconstruction Â = row colᵀ = the official r cᵀ
  (module docstring). To get the official factors: r = n2 · row,
  c = col / n2.

  A leaf kept dense (``vector_reshape=False`` and a 1-D leaf) stores M in
  ``m_row`` and V in ``v_row``, shape (B, N), and empty (B, 0) arrays in
  ``m_col``, ``m_sign`` and ``v_col``. Without a first moment (``b1=None``)
  ``m_row``, ``m_col`` and ``m_sign`` are None.

  ``skipped_refreshes`` counts the steps at which the compressed moments of
  at least one leaf (or batch element) were not replaced because they came
  out non-finite (a NaN or Inf gradient, or G² beyond float32): that leaf
  kept its previous factors and signs ([decided], see :func:`scale_by_smmf`).
  It stays 0 in a healthy run; log it to see steps that did not enter the
  state.
  """
  count: jax.Array  # shape=(), dtype=jnp.int32.
  m_row: Any
  m_col: Any
  m_sign: Any
  v_row: Any
  v_col: Any
  skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.


# --------------------------------------------------------------------------
# Per-leaf layout: batch axes first, the rest square-matricized, and its
# sharding rule under an explicit mesh: optax_fac.matrix.SquareLayout.

_Layout = matrix.SquareLayout
_layout = matrix.square_layout  # (shape, view, vector_reshape) -> _Layout


# --------------------------------------------------------------------------
# Sign bits: 1 bit per element along the row-major flattened view, padded to
# a multiple of 8 (big-endian in each byte, as jnp.packbits).

_BIT_WEIGHTS = np.array([128, 64, 32, 16, 8, 4, 2, 1], np.uint8)


def _pack_signs(positive, lay: _Layout):
  """(*batch, n1, n2) bool -> (*batch, ceil(N/8)) uint8."""
  nb = len(lay.batch)
  if lay.n % 8:
    flat = lay.reshape(matrix.replicate(positive, nb), (lay.n,))
    pad = [(0, 0)] * nb + [(0, 8 * lay.nbytes - lay.n)]
    flat = jnp.pad(flat, pad)
    groups = matrix.reshape(flat, lay.batch_shape + (lay.nbytes, 8))
  else:
    groups = lay.reshape(positive, (lay.nbytes, 8))
  bits = jnp.where(groups, jnp.asarray(_BIT_WEIGHTS), jnp.uint8(0))
  return jnp.sum(bits, axis=-1, dtype=jnp.uint8)


def _unpack_signs(packed, lay: _Layout):
  """(*batch, ceil(N/8)) uint8 -> (*batch, n1, n2) bool."""
  groups = (packed[..., None] & jnp.asarray(_BIT_WEIGHTS)) != 0
  if lay.n % 8:
    flat = matrix.reshape(matrix.replicate(groups, len(lay.batch)),
                          lay.batch_shape + (8 * lay.nbytes,))[..., :lay.n]
    return lay.reshape(flat, (lay.n1, lay.n2))
  return lay.reshape(groups, (lay.n1, lay.n2))


# --------------------------------------------------------------------------
# Rank-1 NNMF of a non-negative matrix (the official code's _nnmf/_unnmf).


def _nnmf(*mats):
  """Rank-1 NNMF of non-negative (*batch, n1, n2) matrices, n1 >= n2.

  Returns, per matrix A, the row means r̄ = A 1 / n2 and the column means
  normalised to mean 1, c̄ = (1ᵀA / n1) / mean(1ᵀA / n1): r̄ c̄ᵀ is the
  official r cᵀ (r = A 1, c = 1ᵀA / 1ᵀA1) in exact arithmetic. The division
  is skipped when the mean is 0 (official code: when the sum is 0): then
  c̄ = 0 already, and dividing by 1 instead leaves it 0 with no 0/0.

  [decided] Overflow-safe: every reduction is a sum of terms pre-scaled by
  1/n2 (rows) or 1/n1 (columns), so no intermediate exceeds max A; the
  official sums overflow float32 for V = G² ≈ 1e36 (|G| ≈ 1e18) over
  n2 >= ~340 entries, where Adam's state is still finite (module docstring).

  The matrices of one leaf (|M| and V) are normalised together, so each leaf
  costs one tiny reduction and one tiny elementwise kernel for both; the
  barrier keeps XLA from rewriting sum(sum(a, -2)) as an extra full pass over
  the (n1, n2) temporary.
  """
  rows = [jnp.sum(a * _inverse(a.shape[-1]), axis=-1) for a in mats]
  cols = _normalised(jnp.stack([jnp.sum(a * _inverse(a.shape[-2]), axis=-2)
                                for a in mats]))
  return [(r, cols[i]) for i, r in enumerate(rows)]


def _inverse(n: int) -> float:
  """1/n, the pre-scaling of a mean over n terms (1 for an empty axis)."""
  return 1.0 / max(n, 1)


def _normalised(cols):
  """Column means divided by their mean (over the last axis), unless it is 0.

  The mean is a sum of pre-scaled terms (cols / n2), so it never exceeds
  max(cols): overflow-safe (see :func:`_nnmf`).
  """
  scaled = jax.lax.optimization_barrier(cols) * _inverse(cols.shape[-1])
  total = jnp.sum(scaled, axis=-1, keepdims=True)
  return cols / jnp.where(total == 0, 1.0, total)


def _outer(r, c):
  return r[..., :, None] * c[..., None, :]


def _keep_finite(new, old, batch_ndim: int):
  """The new (m_row, m_col, m_sign, v_row, v_col) of a leaf or stacked group,
  with the old ones kept per batch element where a new factor is not finite.

  Returns (fields, skipped: a bool scalar, True if some element kept its old
  fields). [decided] A non-finite value in the state would never leave it:
  one NaN of G reaches every factor of its matrix through the column
  normalisation, so every later step of that leaf would be NaN.
  """
  floats = [x for x in new if x is not None and x.dtype != jnp.uint8
            and x.dtype != jnp.bool_]
  if not floats:
    return new, jnp.zeros((), bool)
  ok = functools.reduce(jnp.logical_and, [
      jnp.all(jnp.isfinite(x), axis=tuple(range(batch_ndim, x.ndim)))
      for x in floats])

  def select(n, o):
    if n is None:
      return None
    keep = jnp.reshape(ok, ok.shape + (1,) * (n.ndim - ok.ndim))
    return jnp.where(keep, n, o)

  return (tuple(select(n, o) for n, o in zip(new, old)),
          ~jnp.all(ok))


# --------------------------------------------------------------------------
# The one-pass GPU kernel (optax_fac.smmf_kernel) on a group of leaves.


def _as_group(lay: _Layout) -> _Layout:
  """The layout of a leaf with no batch axes seen as a group of one."""
  return dataclasses.replace(lay, shape=(1,) + lay.shape, batch=(0,),
                             batch_shape=(1,))


def _kernel_fits(lay: _Layout, momentum: bool, sign_bits: int) -> bool:
  """Whether members of a stacked group (batch axis 0 only) can use the kernel.

  [decided] The kernel needs whole sign bytes per row (n2 % 8 == 0), packed
  signs (or no first moment), a tiling (:func:`smmf_kernel.tiling`) and no
  explicit-sharding mesh (the array path handles those reshapes).
  """
  return (lay.batch == (0,) and not lay.dense and lay.n2 % 8 == 0
          and (sign_bits == 1 or not momentum)
          and smmf_kernel.tiling(lay.n1, lay.n2) is not None
          and not matrix.explicit_mesh())


# The CUDA-or-not choice (module-level, so tests can take the kernel branch).
_on_nvidia_gpu = _common.on_nvidia_gpu


def _kernel_group_step(members, lay: _Layout, fields, beta1, beta2, eps):
  """One kernel call per group (of up to MAX_MEMBERS); state stays stacked.

  Args:
    members: the B gradient leaves of the group (shape ``lay.shape[1:]``).
    lay: the group's layout (batch axis 0 of size B).
    fields: stacked (m_row, m_col, m_sign, v_row, v_col); the m fields are
      None without a first moment.
    beta1, beta2, eps: this step's β1,t (None: no first moment), β2,t, ε.

  Returns:
    (the members' updates D, new fields), as the array path's.
  """
  m_row, m_col, m_sign, v_row, v_col = fields
  momentum = beta1 is not None
  n1, n2 = lay.n1, lay.n2
  scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                       (beta1 if momentum else 0.0, beta2, eps, 0.0)])
  signs = (matrix.reshape(m_sign, m_sign.shape[:1] + (n1, n2 // 8))
           if momentum else None)
  updates, partials = [], []
  for first in range(0, len(members), smmf_kernel.MAX_MEMBERS):
    chunk = members[first:first + smmf_kernel.MAX_MEMBERS]
    ds, *out = smmf_kernel.smmf_group_step(
        [matrix.reshape(g, (n1, n2)) for g in chunk], scalars, v_row, v_col,
        signs,
        m_row, m_col, first=first)
    updates += [matrix.reshape(d, g.shape) for d, g in zip(ds, chunk)]
    if momentum:
      signs = out[2]
    partials.append(out[:2] + out[3:])
  # (v rows, v cols[, m rows, m cols]) of the members: row means and column
  # means, the tiles' partial sums of pre-scaled terms (A/n2, A/n1) summed
  # over tiles, so no intermediate exceeds max A (overflow-safe, as _nnmf).
  sums = [jnp.sum(jnp.concatenate([p[k] for p in partials]), axis=1)
          for k in range(len(partials[0]))]
  if not momentum:
    return updates, (None, None, None, sums[0], _normalised(sums[1]))
  m_col, v_col = _normalised(jnp.stack([sums[3], sums[1]]))
  return updates, (sums[2], m_col, matrix.reshape(signs, m_sign.shape), sums[0],
                   v_col)


# --------------------------------------------------------------------------
# The transform.


def _check_decay_rate(decay_rate):
  v = _common._concrete(decay_rate)  # pylint: disable=protected-access
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(
        f'decay_rate must be in [0, 1] (β2,t = 1 − t^(−decay_rate), as in '
        f'optax.adafactor), got {decay_rate!r}.')


def _check_static(vector_reshape, sign_bits, fused_kernel):
  """Returns sign_bits as an int (None if traced: read from the state)."""
  _common.check_static_bool('vector_reshape', vector_reshape)
  _common.check_static_bool('fused_kernel', fused_kernel)
  bits = _common.structural_int('sign_bits', sign_bits, 1)
  if bits is not None and bits not in _SIGN_BITS:
    raise ValueError(
        f'sign_bits must be 1 (packed) or 8 (bool), got {sign_bits!r}.')
  return bits


def _packed(m_sign) -> bool:
  """Whether stored signs are packed bits (uint8) or one bool per element."""
  return m_sign is not None and m_sign.dtype == jnp.uint8


def scale_by_smmf(
    b1: Optional[float] = 0.9,
    eps: float = 1e-8,
    growth_rate: float = 0.999,
    decay_rate: float = 0.5,
    vector_reshape: bool = True,
    sign_bits: Optional[int] = None,
    *,
    views: matrix.ViewSpec = None,
    fused_kernel: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""SMMF direction (docs/algorithms.md §4), faithful to the official code.

  Each leaf of N elements is viewed as (n1, n2) =
  :func:`optax_fac.matrix.square_shape` (N) (row-major). At step t (t = 1
  first), with β1,t = β1·λ^(t−1) (λ = ``growth_rate``) and
  β2,t = 1 − t^(−c) (c = ``decay_rate``; β2,1 = 0, so V = G² at t = 1):

  1. decompress M̂ = (2S − 1) ⊙ r_M c_Mᵀ and V̂ = r_V c_Vᵀ (zero at t = 1);
  2. M = β1,t M̂ + (1 − β1,t) G;  V = β2,t V̂ + (1 − β2,t) G²;
  3. compress: S = [M > 0] (an exact 0 is negative), (r_M, c_M) = NNMF(|M|),
     (r_V, c_V) = NNMF(V), with NNMF(A) = (A 1, 1ᵀA / 1ᵀA1) (the division
     skipped when the sum is 0);
  4. D = M / (sqrt(V) + ε) from the **uncompressed** M and V, reshaped back
     (D = G / (sqrt(V) + ε) with ``b1=None``).

  [decided] Deviation in storage only: the state holds r̄ = r / n2 (row
  means) and c̄ = n2 c (columns of mean 1), computed as sums of pre-scaled
  terms so that no intermediate exceeds max A; r̄ c̄ᵀ = r cᵀ, so D is the
  official one up to float32 rounding, but the statistics stay finite where
  the official float32 sums overflow (e.g. |G| ≈ 1e18: V ≈ 1e36 summed over
  n2 >= ~340 entries) and Adam's state does not (module docstring).

  [decided] Where the compressed moments of a leaf (per batch element) are
  not finite (a NaN or Inf gradient, or G² beyond float32), the previous
  factors and signs are kept and ``skipped_refreshes`` is incremented (the
  official code would store them and stay NaN); D is this step's (module
  docstring).

  No bias correction. The dense M and V exist only inside a step; the state
  is 2(n1 + n2) float32 values and ceil(N/8) bytes per leaf (``sign_bits=1``)
  or N bytes (``sign_bits=8``, the official code's bool storage); both give
  identical updates.

  Args:
    b1: first-moment decay β1, or None to turn the first moment off.
    eps: ε added to sqrt(V).
    growth_rate: λ in β1,t = β1 λ^(t−1), in [0, 1].
    decay_rate: c in β2,t = 1 − t^(−c), in [0, 1], with the sign convention
      of ``optax.adafactor``'s ``decay_rate`` (the official code writes
      γ = −c; the authors recommend c = 0.5 for CNNs, 0.8 for Transformers).
    vector_reshape: square-matricize 1-D leaves too (default, official). If
      False, leaves that are 1-D after squeezing keep dense M and V with the
      same schedules (scalars are still factorized, as in the official code).
    sign_bits: 1 = signs packed 8 per byte (the paper's memory accounting);
      8 = one bool per element (the official code's storage); None = 1.
      Structural: ``update`` reads it from the state's sign dtype, so under
      ``optax.inject_hyperparams`` only a jitted ``init`` needs it static.
    views: optional per-leaf :class:`optax_fac.MatrixView`; [decided] only its
      ``batch`` axes are used: each batch element (e.g. one layer of a
      stacked (L, in, out) leaf) is square-matricized separately, so a
      stacked leaf behaves as L separate leaves (this is what
      :func:`optax_fac.stack_leaves` relies on: its stacking axis is a batch
      axis). Row/column axes are ignored (SMMF has its own view).
    fused_kernel: on NVIDIA GPUs, run the step of each leaf whose square
      view the kernel can tile (sides with power-of-two factors, n2 a
      multiple of 8; not under an explicit-sharding mesh) as one pass of
      :func:`optax_fac.smmf_kernel.smmf_group_step`. Same equations; sums are
      added in another order (float32 rounding). Other backends and leaves
      always run the array code. The kernel is opaque to XLA's automatic
      partitioner: with gradients sharded under ``jit`` (not just
      replicated, as in data parallelism) pass False.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Park & Lee, `SMMF <https://arxiv.org/abs/2412.08894>`_, AAAI 2025.
  """
  return _smmf(b1, eps, growth_rate, decay_rate, vector_reshape, sign_bits,
               views, fused_kernel).transform


class _SmmfFns(NamedTuple):
  """scale_by_smmf and its members update for stack_leaves (see below)."""
  transform: optax.GradientTransformationExtraArgs
  update_members: Callable[..., Any]


def _smmf(b1, eps, growth_rate, decay_rate, vector_reshape, sign_bits, views,
          fused_kernel) -> _SmmfFns:
  """:func:`scale_by_smmf` (same arguments) and its ``update_members``."""
  _common.check_unit_interval('b1', b1, allow_none=True, closed=True)
  _common.check_nonnegative('eps', eps)
  _common.check_unit_interval('growth_rate', growth_rate, closed=True)
  _check_decay_rate(decay_rate)
  sign_bits = _check_static(vector_reshape, sign_bits, fused_kernel)
  momentum = b1 is not None

  def layouts(tree):
    views_tree = matrix.resolve_views(tree, views, vectors=True)
    treedef = jax.tree.structure(tree)
    return [_layout(x.shape, v, vector_reshape) for x, v in
            zip(treedef.flatten_up_to(tree), treedef.flatten_up_to(views_tree))]

  def leaf_step(g, lay, m_row, m_col, m_sign, v_row, v_col, beta1, beta2):
    """One leaf: returns (D, m_row, m_col, m_sign, v_row, v_col)."""
    g_view = lay.to_square(_common.f32(g))
    if lay.dense:
      if momentum:
        m = beta1 * m_row + (1.0 - beta1) * g_view
      v = beta2 * v_row + (1.0 - beta2) * g_view * g_view
      d = (m if momentum else g_view) / (jnp.sqrt(v) + eps)
      new = ((matrix.replicate(m), m_col, m_sign) if momentum
             else (None, None, None))
      return ((lay.from_square(d, like=g).astype(g.dtype),) + new
              + (matrix.replicate(v), v_col))
    if momentum:
      magnitude = _outer(m_row, m_col)
      packed = _packed(m_sign)
      positive = _unpack_signs(m_sign, lay) if packed else m_sign
      m = beta1 * jnp.where(positive, magnitude, -magnitude) + (
          1.0 - beta1) * g_view
    v = beta2 * _outer(v_row, v_col) + (1.0 - beta2) * g_view * g_view
    d = (m if momentum else g_view) / (jnp.sqrt(v) + eps)
    if momentum:
      (m_row, m_col), (v_row, v_col) = _nnmf(jnp.abs(m), v)
      m_sign = _pack_signs(m > 0, lay) if packed else m > 0
    else:
      m_row = m_col = m_sign = None
      ((v_row, v_col),) = _nnmf(v)
    m_row, m_col, m_sign, v_row, v_col = (
        matrix.replicate(x) for x in (m_row, m_col, m_sign, v_row, v_col))
    return (lay.from_square(d, like=g).astype(g.dtype), m_row, m_col, m_sign,
            v_row, v_col)

  def init_leaf(lay):
    """Zero state of one leaf (replicated under an explicit mesh)."""
    b = lay.batch_shape
    f32 = _common.zeros
    if lay.dense:
      empty = f32(b + (0,))
      m = (f32(b + (lay.n,)), empty, jnp.zeros(b + (0,), jnp.uint8))
      v = (f32(b + (lay.n,)), empty)
    else:
      sign = (jnp.zeros(b + (lay.nbytes,), jnp.uint8) if sign_bits == 1
              else jnp.zeros(b + (lay.n1, lay.n2), jnp.bool_))
      m = (f32(b + (lay.n1,)), f32(b + (lay.n2,)), sign)
      v = (f32(b + (lay.n1,)), f32(b + (lay.n2,)))
    if not momentum:
      m = (None, None, None)
    return m + v

  def init_fn(params):
    if _common.is_params_placeholder(params):  # optax.tree_map_params
      return SMMFState(_common.zero_count(), *([None if not momentum else
                                                 _common.NOT_PARAMS] * 3),
                       _common.NOT_PARAMS, _common.NOT_PARAMS,
                       _common.zero_count())
    _common.check_float_params(params, 'scale_by_smmf')
    if sign_bits is None:
      raise _common.traced_structural_error(['sign_bits'], 'scale_by_smmf')
    return new_state(jax.tree.structure(params), _common.zero_count(),
                     [init_leaf(lay) for lay in layouts(params)],
                     _common.zero_count())

  def schedules(count):
    """β1,t (None without a first moment) and β2,t of step ``count``."""
    t = count.astype(jnp.float32)
    beta1 = (jnp.asarray(b1, jnp.float32)
             * jnp.asarray(growth_rate, jnp.float32) ** (t - 1.0)
             if momentum else None)
    beta2 = 1.0 - t ** -jnp.asarray(decay_rate, jnp.float32)
    return beta1, beta2

  def group_step(members, lay, fields, beta1, beta2):
    """Step of same-layout leaves whose state is stacked on batch axis 0.

    On an NVIDIA GPU, where the layout fits, one fused kernel call for the
    group (:mod:`optax_fac.smmf_kernel`); elsewhere the array code on the
    stacked gradients. Returns (the members' updates, the new stacked fields).
    """
    def arrays(members, fields):
      d, *new = leaf_step(jnp.stack(members), lay, *fields, beta1, beta2)
      return [d[i] for i in range(len(members))], tuple(new)

    bits = 1 if (not momentum or _packed(fields[2])) else 8
    if not (fused_kernel and _kernel_fits(lay, momentum, bits)):
      return arrays(members, fields)

    def kernel(members, fields):
      return _kernel_group_step(members, lay, fields, beta1, beta2, eps)

    return _on_nvidia_gpu(kernel, arrays, members, fields)

  def check_tree(treedef, state):
    ref = jax.tree.structure(state.v_row)
    if treedef != ref:
      raise ValueError(
          'scale_by_smmf: the updates tree does not match the tree the '
          f'optimizer was initialised with.\n  init:   {ref}\n  update: '
          f'{treedef}')

  def check_shapes(paths, lays, v_rows):
    for path, lay, v_row in zip(paths, lays, v_rows):
      want = lay.batch_shape + ((lay.n,) if lay.dense else (lay.n1,))
      if tuple(v_row.shape) != want:
        raise ValueError(
            f'scale_by_smmf: update {path} has shape {lay.shape}, which does '
            'not match the state built at init.')

  def flat_fields(treedef, state):
    """Per leaf: (m_row, m_col, m_sign, v_row, v_col), None where absent."""
    fields = [None if f is None else treedef.flatten_up_to(f)
              for f in (state.m_row, state.m_col, state.m_sign, state.v_row,
                        state.v_col)]
    return [tuple(None if f is None else f[i] for f in fields)
            for i in range(treedef.num_leaves)]

  def new_state(treedef, count, new_fields, skipped_refreshes):
    """The state from per-leaf (m_row, m_col, m_sign, v_row, v_col)."""
    trees = [jax.tree.unflatten(treedef, [f[i] for f in new_fields])
             for i in range(5)]
    if not momentum:
      trees[0] = trees[1] = trees[2] = None
    return SMMFState(count, *trees, skipped_refreshes)

  def count_skipped(state, skips):
    """``state.skipped_refreshes`` + 1 if any leaf kept its old factors."""
    skipped = functools.reduce(jnp.logical_or, skips, jnp.zeros((), bool))
    return jnp.where(skipped, _common.increment(state.skipped_refreshes),
                     state.skipped_refreshes)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lays = layouts(updates)
    treedef = jax.tree.structure(updates)
    check_tree(treedef, state)
    check_shapes([matrix.leaf_path_str(p) for p, _ in
                  jax.tree_util.tree_flatten_with_path(updates)[0]], lays,
                 treedef.flatten_up_to(state.v_row))
    count = _common.increment(state.count)
    beta1, beta2 = schedules(count)
    outs, new_fields, skips = [], [], []
    for g, lay, fields in zip(treedef.flatten_up_to(updates), lays,
                              flat_fields(treedef, state)):
      if lay.batch or lay.dense:
        d, *new = leaf_step(g, lay, *fields, beta1, beta2)
      else:  # a group of one, so that the kernel can take it
        ds, new = group_step(
            [g], _as_group(lay),
            tuple(None if f is None else f[None] for f in fields),
            beta1, beta2)
        d, new = ds[0], [None if f is None else f[0] for f in new]
      new, skipped = _keep_finite(tuple(new), fields, len(lay.batch_shape))
      outs.append(d)
      new_fields.append(new)
      skips.append(skipped)
    return (jax.tree.unflatten(treedef, outs),
            new_state(treedef, count, new_fields, count_skipped(state, skips)))

  def update_members(members, state):
    """The update of :func:`optax_fac.stack_leaves` without stacking.

    ``members``: ``{group key: [the group's gradient leaves]}``; ``state``:
    this transform's state on the stacked tree ``{group key: stacked
    leaf}``. Returns (``{group key: [updates]}``, new state). The stacking
    wrapper calls this instead of stacking the gradients, so the kernel reads
    every leaf where it lies (stacking them first would add a copy of G).
    """
    keys = sorted(members)
    shapes = {k: jax.ShapeDtypeStruct((len(members[k]),) + members[k][0].shape,
                                      members[k][0].dtype) for k in keys}
    treedef = jax.tree.structure(shapes)
    check_tree(treedef, state)
    lays = layouts(shapes)
    check_shapes(keys, lays, treedef.flatten_up_to(state.v_row))
    count = _common.increment(state.count)
    beta1, beta2 = schedules(count)
    outs, new_fields, skips = {}, [], []
    for k, lay, fields in zip(keys, lays, flat_fields(treedef, state)):
      outs[k], new = group_step(members[k], lay, fields, beta1, beta2)
      new, skipped = _keep_finite(tuple(new), fields, len(lay.batch_shape))
      new_fields.append(new)
      skips.append(skipped)
    return outs, new_state(treedef, count, new_fields,
                           count_skipped(state, skips))

  return _SmmfFns(optax.GradientTransformationExtraArgs(init_fn, update_fn),
                  update_members)


def smmf(
    learning_rate: optax.ScalarOrSchedule,
    b1: Optional[float] = 0.9,
    eps: float = 1e-8,
    growth_rate: float = 0.999,
    decay_rate: float = 0.5,
    weight_decay: float = 0.0,
    vector_reshape: bool = True,
    sign_bits: Optional[int] = None,
    mask: compose.MaskOrFn = None,
    *,
    method_mask: compose.MaskOrFn = None,
    views: matrix.ViewSpec = None,
    fallback: Optional[optax.GradientTransformation] = None,
    stack_leaves: compose.StackLeaves = True,
    fused_kernel: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""SMMF (docs/algorithms.md §4): square-matricized factored Adam moments.

  ``scale_by_smmf`` on every leaf, then decoupled weight decay and the
  learning rate: W ← W − η(D + λW), which is the official code's default
  ``weight_decay_mode='adamw'`` (W ← (1 − ηλ)W, then W ← W − ηD). The
  official ``'adam'`` mode is a no-op bug and is not offered; for coupled
  decay chain ``optax.add_decayed_weights`` before ``scale_by_smmf``.

  [decided] SMMF factorizes every leaf, so by default (``method_mask=None``) this is
  just ``chain(scale_by_smmf, add_decayed_weights, scale_by_learning_rate)``
  with no fallback and no partition (``scale_by_smmf`` run on same-shape
  leaves stacked, see ``stack_leaves``). A ``method_mask`` (bool tree or callable)
  selects the leaves that get SMMF, 1-D leaves included; the others go to
  ``fallback`` (default Adam with β1 = ``b1`` (0.9 if None), β2 = 0.999,
  ε = ``eps``, float32 moments) through
  :func:`optax_fac.named_optimizer`, given views that make every leaf
  eligible.

  Memory per leaf of N elements: 2(n1 + n2) float32 values + ceil(N/8)
  bytes (ResNet-50: about 3.7 MiB against 195 MiB for Adam).

  Learning rate: AdamW's. In the README's swept benchmark (a 22.7 M LLaMA
  on Python source, 2000 steps, ``decay_rate=0.8``, the embedding and head
  on the Adam fallback) the best peak rate was 3e-3, as AdamW's; 1e-3
  ended 6% worse and 1e-2 did not train (final loss 3.38, finite); at 3e-3 SMMF ended 1.05% below
  AdamW's validation loss. On GaLore's LLaMA-60M the best rate was AdamW's
  again, 1e-3 (3e-3 ended 1.5% worse, 3e-4 23% worse), 0.3% below AdamW
  with 1.9% of its state on the hidden matrices. Range that works: AdamW's
  best rate to 3x it; below it SMMF loses fast.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1: first-moment decay β1, or None for no first moment.
    eps: ε in D = M / (sqrt(V) + ε).
    growth_rate: λ in β1,t = β1 λ^(t−1).
    decay_rate: c in β2,t = 1 − t^(−c), in [0, 1] (0.5 for CNNs, 0.8 for
      Transformers; the official code's γ = −c).
    weight_decay: λ_wd of the decoupled decay (>= 0).
    vector_reshape: square-matricize 1-D leaves too (else dense M, V there).
    sign_bits: 1 = packed sign bits (None: the default), 8 = bool signs.
    mask: which leaves are decayed, as in ``optax.adamw`` (a bool tree or
      prefix, or a function of the params); None = every leaf.
    method_mask: which leaves get SMMF (1-D ones included); None = all (no
      fallback).
    views: per-leaf :class:`optax_fac.MatrixView`; only batch axes are used
      (see :func:`scale_by_smmf`).
    fallback: transform for leaves outside ``mask``.
    stack_leaves: run ``scale_by_smmf`` on same-shape leaves stacked into one
      array per group (:func:`optax_fac.stack_leaves`): each member is still
      square-matricized on its own (the stacking axis is a batch axis), so the
      updates and the state's total size are unchanged, but the state is
      stacked per group (groups of at most 64 MiB of gradients; an int: of
      at most that many bytes) and a step launches a few kernels per group
      instead of per leaf. False keeps one :class:`SMMFState` entry per leaf.
    fused_kernel: on NVIDIA GPUs, one Pallas kernel pass over the leaves
      whose square view can be tiled (see :func:`scale_by_smmf`); the gradients
      are then read in place, not stacked.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_fac
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
    >>> tx = optax_fac.smmf(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Park & Lee, `SMMF <https://arxiv.org/abs/2412.08894>`_, AAAI 2025.
  """
  def make(v):
    return scale_by_smmf(b1, eps, growth_rate, decay_rate, vector_reshape,
                         sign_bits, views=v, fused_kernel=fused_kernel)

  def members(v):
    return _smmf(b1, eps, growth_rate, decay_rate, vector_reshape, sign_bits,
                 v, fused_kernel).update_members

  every_leaf = method_mask is None
  if not every_leaf:
    leaf_views = views

    def views(params):  # every leaf, 1-D ones included, may get SMMF
      return matrix.resolve_views(params, leaf_views, vectors=True)

    if fallback is None:
      fallback = compose.adam_fallback(0.9 if b1 is None else b1, 0.999, eps)
  return compose.named_optimizer(
      compose.matrix_method(make, views, stack_leaves, update_members=members),
      learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
      method_mask=method_mask, views=views, fallback=fallback,
      partition=not every_leaf)


# Every SMMF state leaf re-lays the parameter out (square-matricized factors,
# packed signs): replicated, the same rule the update applies under an
# explicit mesh (see optax_fac.matrix.replicate).
sharding.register_state_rule(SMMFState, {
    'count': 'scalar', 'm_row': 'flat', 'm_col': 'flat', 'm_sign': 'flat',
    'v_row': 'flat', 'v_col': 'flat', 'skipped_refreshes': 'scalar'})
