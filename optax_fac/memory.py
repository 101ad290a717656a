"""Optimizer-state size accounting, with ``jax.eval_shape`` (nothing allocated).

    >>> import jax, jax.numpy as jnp, optax_fac
    >>> params = {'w': jax.ShapeDtypeStruct((512, 1376), jnp.float32)}
    >>> optax_fac.state_size(optax_fac.hfac(1e-3), params)  # 2(m + n) floats
    15112

``state_size`` counts bytes of every array in ``tx.init(params)`` (step
counters included); ``state_report`` breaks them down per parameter leaf and
compares with ``optax.adamw``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _abstract(params: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)


def state_shapes(tx: optax.GradientTransformation, params: Any) -> Any:
  """The optimizer state as a tree of ``jax.ShapeDtypeStruct``."""
  return jax.eval_shape(tx.init, _abstract(params))


def state_size(tx: optax.GradientTransformation, params: Any, *,
               dtype_bytes: Optional[int] = None) -> int:
  """Bytes of optimizer state ``tx.init(params)`` would allocate.

  Args:
    tx: any optax transformation.
    params: parameters or ``jax.ShapeDtypeStruct`` s (nothing is allocated).
    dtype_bytes: if given, count every floating-point array at this many bytes
      per element (e.g. 2 for the papers' "bf16 accounting"); integer and
      boolean arrays keep their own size.

  Returns:
    The number of bytes.
  """
  return sum(_leaf_bytes(x, dtype_bytes)
             for x in jax.tree.leaves(state_shapes(tx, params)))


def state_elements(tx: optax.GradientTransformation, params: Any) -> int:
  """Number of floating-point elements in the state (counters excluded)."""
  return sum(int(np.prod(x.shape, dtype=np.int64))
             for x in jax.tree.leaves(state_shapes(tx, params))
             if jnp.issubdtype(x.dtype, jnp.floating))


def _leaf_bytes(x, dtype_bytes):
  if dtype_bytes is not None and jnp.issubdtype(x.dtype, jnp.floating):
    return int(np.prod(x.shape, dtype=np.int64)) * dtype_bytes
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass
class LeafRow:
  path: str
  shape: tuple
  bytes: int
  adamw_bytes: int


def _per_param_bytes(tx, params, dtype_bytes):
  """Bytes of state attributable to each parameter leaf.

  Computed by differences: the state of ``tx`` on ``params`` minus the state
  with that leaf replaced by an empty (0,) vector, so the tree keeps its
  structure (masks still apply). Shared counters belong to no leaf.
  """
  abstract = _abstract(params)
  total = state_size(tx, abstract, dtype_bytes=dtype_bytes)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for i, (path, leaf) in enumerate(leaves_with_path):
    leaves = [l for _, l in leaves_with_path]
    leaves[i] = jax.ShapeDtypeStruct((0,), leaf.dtype)
    without = state_size(tx, jax.tree.unflatten(treedef, leaves),
                         dtype_bytes=dtype_bytes)
    out.append((jax.tree_util.keystr(path), tuple(leaf.shape),
                total - without))
  return out


def state_report(tx: optax.GradientTransformation, params: Any, *,
                 dtype_bytes: Optional[int] = None,
                 baseline: Optional[optax.GradientTransformation] = None,
                 max_rows: int = 40) -> str:
  """A readable per-leaf table of state bytes, compared with ``optax.adamw``.

  Per-leaf bytes are found by removing one leaf at a time (``eval_shape``
  only), so the report costs one trace per leaf; ``max_rows`` limits the
  table (the totals always cover every leaf).
  """
  baseline = optax.adamw(1e-3) if baseline is None else baseline
  rows = _per_param_bytes(tx, params, dtype_bytes)
  base_rows = {p: b for p, _, b in _per_param_bytes(baseline, params,
                                                    dtype_bytes)}
  total = state_size(tx, params, dtype_bytes=dtype_bytes)
  base_total = state_size(baseline, params, dtype_bytes=dtype_bytes)
  lines = [f'{"leaf":<48} {"shape":<20} {"state":>12} {"adamw":>12} '
           f'{"ratio":>7}']
  for path, shape, b in rows[:max_rows]:
    ab = base_rows.get(path, 0)
    ratio = f'{b / ab:7.3f}' if ab else '      -'
    lines.append(f'{path[:48]:<48} {str(shape):<20} {format_bytes(b):>12} '
                 f'{format_bytes(ab):>12} {ratio}')
  if len(rows) > max_rows:
    lines.append(f'... {len(rows) - max_rows} more leaves')
  lines.append(f'{"total":<48} {"":<20} {format_bytes(total):>12} '
               f'{format_bytes(base_total):>12} '
               f'{total / base_total if base_total else float("nan"):7.3f}')
  return '\n'.join(lines)


def format_bytes(n: int) -> str:
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n} B'
