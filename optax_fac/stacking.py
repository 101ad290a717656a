"""Run a transform on same-shape leaves stacked into one array per group.

A model with separate (unscanned) layers has many leaves of a few shapes
(LLaMA-130M: 48 attention matrices of 768 x 768, 24 of 768 x 2048, 12 of
2048 x 768). A factored method run leaf by leaf launches several small
kernels per leaf (row sums, column sums, the clipping RMS, state updates), and
the step becomes launch-bound: on an H100, H-Fac took 1.6x ``optax.adamw``'s
step on that tree, although it moves fewer bytes.

:func:`stack_leaves` wraps a transform so that it sees one leaf per group of
leaves with equal shape, dtype and :class:`~optax_fac.MatrixView`: the group's
gradients stacked along a new leading **batch** axis of the view. Its state is
kept stacked (one row statistic of shape ``(L, m)`` instead of L of shape
``(m,)``), so a step launches a few kernels per group instead of per leaf.
XLA usually fuses the concatenation into the reductions that read it, and the
per-leaf updates are slices that fuse into each leaf's final elementwise pass
(``results/bench_step/``, LLaMA-130M). Not always: on the LLaMA-1B tree it
kept a stacked copy of the 96 attention gradients of 2048 x 2048 (1.5 GiB, 30%
of the params), and the step was slower than leaf by leaf. So same-shape
leaves are split into groups of at most ``max_group_bytes`` (64 MiB by
default), which bounds any such copy and keeps each group's kernels large
(README.md, "At 1B parameters on an H200").

The mathematics is unchanged: every method of the library treats the batch
axes of a view independently, so the stacked transform gives the per-leaf
transform's updates (up to float32 summation order).

[decided] Groups are keyed by (shape, dtype, view) and, under an explicit
sharding mesh, the leaf's sharding, in order of first appearance. The state is
a :class:`StackedState`: a pytree whose static data records the groups, so
:func:`optax_fac.state_partition_specs` can shard it: a group's stacked axis
is replicated and each other axis follows the members' parameter spec where
all members agree on it (replicated where they do not; pass
``stack_leaves=False`` to the named optimizers when same-shape leaves are
sharded differently, e.g. column- and row-parallel layers of one shape).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from optax_fac import _common
from optax_fac import matrix
from optax_fac import sharding


@dataclasses.dataclass(frozen=True)
class Groups:
  """Static description of the grouping: which flat leaves form each group.

  Attributes:
    keys: one name per group (``g{index}_{shape}_{dtype}``).
    members: per group, the indices of its leaves in the flattened tree
      (``optax.MaskedNode`` leaves counted, never grouped).
    views: per group, the members' :class:`~optax_fac.MatrixView` (of one
      unstacked leaf), so the state's sharding rule needs no ``views=``.
    num_leaves: number of leaves of the flattened tree.
  """
  keys: tuple[str, ...]
  members: tuple[tuple[int, ...], ...]
  views: tuple[matrix.MatrixView, ...]
  num_leaves: int


@jax.tree_util.register_pytree_node_class
class StackedState:
  """State of :func:`stack_leaves`: the inner state on the stacked tree.

  ``inner`` is the wrapped transform's state for a tree ``{group key: stacked
  leaf}``; ``groups`` (static) says which parameter leaves each key holds.
  """

  def __init__(self, inner: Any, groups: Groups):
    self.inner = inner
    self.groups = groups

  def tree_flatten(self):
    return (self.inner,), self.groups

  @classmethod
  def tree_unflatten(cls, groups, children):
    return cls(children[0], groups)

  def __eq__(self, other):  # as a NamedTuple state would compare
    return (isinstance(other, StackedState) and self.groups == other.groups
            and self.inner == other.inner)

  __hash__ = None

  def __repr__(self):
    return f'StackedState(inner={self.inner!r}, groups={self.groups.keys})'


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def split_members(members: list[int], leaf_bytes: int,
                  max_group_bytes: Optional[int]) -> list[list[int]]:
  """Splits one key's members into groups of at most ``max_group_bytes``.

  Args:
    members: flat leaf indices of equal shape, dtype and view, in order.
    leaf_bytes: bytes of one member (>= 0).
    max_group_bytes: the cap (None: one group); a group always has at
      least one member, so a leaf larger than the cap is a group alone.

  Returns:
    Consecutive runs of ``members``, as few as the cap allows and of equal
    sizes (they differ by at most one member), so that the groups share few
    stacked shapes (and compiled kernels).

  Examples:
    >>> split_members(list(range(10)), 4, 16)  # at most 4 a group
    [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
  """
  if max_group_bytes is None or leaf_bytes * len(members) <= max_group_bytes:
    return [list(members)]
  per_group = max(1, max_group_bytes // max(leaf_bytes, 1))
  count = -(-len(members) // per_group)
  size, extra = divmod(len(members), count)
  out, start = [], 0
  for g in range(count):
    stop = start + size + (g < extra)
    out.append(list(members[start:stop]))
    start = stop
  return out


def group_leaves(tree: Any, views: matrix.ViewSpec = None,
                 max_group_bytes: Optional[int] = None
                 ) -> tuple[Groups, list]:
  """Groups the leaves of ``tree`` by (shape, dtype, view[, sharding]).

  Args:
    tree: the parameters or updates (arrays or ``jax.ShapeDtypeStruct``;
      ``optax.MaskedNode`` and None leaves are never grouped).
    views: their matrix views.
    max_group_bytes: cap on a group's stacked bytes (see
      :func:`split_members`; None: no cap).

  Returns:
    (groups, flat leaves); views are resolved as the raw transforms do
    (``vectors=True``: ndim <= 1 leaves are 1 x N rows).
  """
  views_tree = matrix.resolve_views(tree, views, vectors=True)
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_masked)
  flat_views = treedef.flatten_up_to(views_tree)
  explicit = matrix.explicit_mesh()
  index: dict[Any, list[int]] = {}
  for i, (x, view) in enumerate(zip(leaves, flat_views)):
    if _is_masked(x) or x is None:
      continue
    key = (tuple(x.shape), jnp.dtype(x.dtype).name, view,
           matrix.sharding_spec(x) if explicit else None)
    index.setdefault(key, []).append(i)
  keys, members, group_views = [], [], []
  for (shape, dtype, view, _), idx in index.items():
    leaf_bytes = math.prod(shape) * jnp.dtype(dtype).itemsize
    for part in split_members(idx, leaf_bytes, max_group_bytes):
      keys.append(f"g{len(keys):03d}_{'x'.join(map(str, shape)) or 'scalar'}"
                  f'_{dtype}')
      members.append(tuple(part))
      group_views.append(view)
  groups = Groups(tuple(keys), tuple(members), tuple(group_views), len(leaves))
  return groups, leaves


def _mismatch_message(updates, groups: Groups, init_groups: Groups) -> str:
  """Names the update leaves whose shape/dtype the state was not built for."""
  def group_of(g: Groups):
    out = {}
    for key, idx in zip(g.keys, g.members):
      for i in idx:
        out[i] = key.split('_', 1)[1]   # '8x4_float32'
    return out
  got, want = group_of(groups), group_of(init_groups)
  paths = [matrix.leaf_path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked)[0]]
  bad = [f'{paths[i]} is {got.get(i)} (at init: {want.get(i)})'
         for i in sorted(set(got) | set(want))
         if got.get(i) != want.get(i) and i < len(paths)]
  detail = '; '.join(bad[:5]) if bad else (
      f'{len(paths)} update leaves, {init_groups.num_leaves} at init')
  return ('optax_fac optimizer update: the updates do not match the params '
          f'the state was built for: {detail}. Every update leaf must have its '
          "parameter's shape and dtype.")


def _stack_one(xs: list):
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in xs):  # abstract init
    return jax.eval_shape(lambda *a: jnp.stack(a), *xs)
  return jnp.stack(xs)


def stack(groups: Groups, leaves: list) -> dict:
  """``{group key: leaves of the group stacked on axis 0}``."""
  return {k: _stack_one([leaves[i] for i in idx])
          for k, idx in zip(groups.keys, groups.members)}


def unstack(groups: Groups, stacked: dict, fill: list) -> list:
  """Flat leaves from a stacked dict; positions of no group keep ``fill``.

  ``stacked[key]`` is a stacked array or the list of the members' leaves.
  """
  out = list(fill)
  for k, idx in zip(groups.keys, groups.members):
    for j, i in enumerate(idx):
      out[i] = stacked[k][j]
  return out


def stacked_views(groups: Groups) -> dict:
  """``{group key: the view of the group's stacked leaf}``."""
  return {k: v.stacked() for k, v in zip(groups.keys, groups.views)}


# [decided] 64 MiB: a group's kernels then move tens of MiB each, far past a
# launch's cost (a few microseconds at the ~3.9 TB/s adamw reaches on an
# H200), while a copy of the group that XLA may keep (it did for 96 stacked
# 2048 x 2048 gradients of LLaMA-1B: 1.5 GiB, 30% of the params) stays small
# beside the params of any model where launches matter. Measured against
# leaf by leaf and uncapped in README.md ("At 1B parameters on an H200").
DEFAULT_MAX_GROUP_BYTES = 64 * 2**20


def stack_leaves(
    make_inner: Callable[[Any], optax.GradientTransformation],
    *,
    views: matrix.ViewSpec = None,
    update_members: Optional[Callable[[Any], Callable[..., Any]]] = None,
    max_group_bytes: Optional[int] = DEFAULT_MAX_GROUP_BYTES,
) -> optax.GradientTransformationExtraArgs:
  """Runs a transform on same-shape leaves stacked along a batch axis.

  Args:
    make_inner: ``views -> transform``: builds the wrapped transform for the
      given ``views`` argument (a callable returning a tree of
      :class:`~optax_fac.MatrixView`), e.g.
      ``lambda v: optax_fac.scale_by_hfac(views=v)``. The transform must
      treat batch axes of a view independently (every transform of this
      library does) and accept ``optax.MaskedNode``-free trees.
    views: the per-leaf views of the unstacked parameters (as for the
      wrapped transform); each group's stacked view adds the new leading
      batch axis.
    update_members: optional ``views -> update_members`` for a
      parameter-free transform that can read each group's leaves where they
      lie: ``update_members({group key: [the group's leaves]}, state)``
      returns ``({group key: [updates]}, state)`` with the state of
      ``make_inner(views)`` on the stacked tree; it is called instead of
      stacking the gradients (SMMF's GPU kernel, which would otherwise read a
      stacked copy of G).
    max_group_bytes: same-shape leaves are split into groups of at most this
      many bytes of gradients (a larger leaf is a group alone), which bounds
      the memory of a stacked copy; None: one group per shape. Default
      64 MiB. Structural: it decides the state's layout.

  Returns:
    A transform with the wrapped transform's updates (per leaf, in the
    input's structure; ``optax.MaskedNode`` leaves pass through) and a
    :class:`StackedState`.

  Examples:
    >>> import jax.numpy as jnp, optax_fac
    >>> params = {'a': jnp.ones((4, 3)), 'b': jnp.ones((4, 3))}
    >>> tx = optax_fac.stack_leaves(lambda v: optax_fac.scale_by_hfac(views=v))
    >>> state = tx.init(params)
    >>> state.inner.row['g000_4x3_float32'].shape
    (2, 4)
  """

  make_inner(views)  # built once now so bad hyperparameters raise here
  if max_group_bytes is not None:
    max_group_bytes = _common.structural_int(
        'max_group_bytes', max_group_bytes, DEFAULT_MAX_GROUP_BYTES,
        where='stack_leaves: ')
  group = functools.partial(group_leaves, views=views,
                            max_group_bytes=max_group_bytes)

  def inner_for(groups):
    stacked = stacked_views(groups)
    return optax.with_extra_args_support(make_inner(lambda _: stacked))

  def init_fn(params):
    if _common.is_params_placeholder(params):
      # optax.tree_map_params: the stacked state is not a copy of the params.
      return _common.NOT_PARAMS
    groups, leaves = group(params)
    inner = inner_for(groups)
    return StackedState(inner.init(stack(groups, leaves)), groups)

  def update_fn(updates, state, params=None, **extra_args):
    groups, leaves = group(updates)
    if groups != state.groups:
      raise ValueError(_mismatch_message(updates, groups, state.groups))
    if update_members is not None:
      # The transform takes each group's leaves as a list (see above).
      stacked = stacked_views(groups)
      out, inner_state = update_members(lambda _: stacked)(
          {k: [leaves[i] for i in idx]
           for k, idx in zip(groups.keys, groups.members)}, state.inner)
    else:
      inner = inner_for(groups)
      stacked_params = None
      if params is not None:
        p_leaves = jax.tree.leaves(params, is_leaf=_is_masked)
        stacked_params = stack(groups, p_leaves)
      out, inner_state = inner.update(stack(groups, leaves), state.inner,
                                      stacked_params, **extra_args)
    flat = unstack(groups, out, leaves)
    treedef = jax.tree.structure(updates, is_leaf=_is_masked)
    return jax.tree.unflatten(treedef, flat), StackedState(inner_state, groups)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _stacked_rule(node: StackedState, walker: sharding.Walker) -> StackedState:
  """Sharding of a StackedState: the inner state walked on the stacked tree.

  A group's stacked parameter has spec (None, *common), ``common`` being each
  axis's entry where all members agree, else None (replicated).
  """
  groups = node.groups
  params, specs = {}, {}
  for key, idx in zip(groups.keys, groups.members):
    infos = [walker.infos[i] for i in idx]
    first = infos[0]
    common = tuple(e if all(i.spec[a] == e for i in infos) else None
                   for a, e in enumerate(first.spec))
    params[key] = jax.ShapeDtypeStruct((len(idx),) + first.shape, jnp.float32)
    specs[key] = jax.P(None, *common)
  inner = walker.walk_subtree(params, specs, stacked_views(groups), node.inner,
                              'state.stacked')
  return StackedState(inner, groups)


def _register_flax_serialization():
  """Lets ``flax.serialization`` (msgpack, TrainState) store a StackedState.

  The groups are static (the state built from the same params has them), so
  only the inner state is serialized; restoring needs a target state, as
  ``flax.serialization.from_bytes`` always does. flax is optional: nothing
  is registered when it is not installed.
  """
  if importlib.util.find_spec('flax') is None:
    return
  from flax import serialization  # pylint: disable=g-import-not-at-top

  def to_state_dict(state):
    return {'inner': serialization.to_state_dict(state.inner)}

  def from_state_dict(target, state_dict):
    return StackedState(
        serialization.from_state_dict(target.inner, state_dict['inner'],
                                      name='inner'), target.groups)

  serialization.register_serialization_state(
      StackedState, to_state_dict, from_state_dict, override=True)


sharding.register_state_rule(StackedState, _stacked_rule)
_register_flax_serialization()
