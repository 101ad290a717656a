"""Partition specs for optimizer state, derived from the parameters' specs.

``optax.tree_map_params`` maps a function over the param-shaped parts of a
state only (in this library the factored statistics, bases, SMMF factors and
stacked groups are left as they are), so it cannot give a ``(256,)`` row
statistic of a ``(256, 512)`` kernel sharded ``P('data', 'model')`` a spec of
its own. :func:`state_partition_specs`
walks the state of ``tx.init(params)`` instead and gives every array a spec of
its own rank:

==========================================  ==================================
state leaf                                  spec
==========================================  ==================================
param-shaped (Adam ``mu``/``nu``, momentum,  the parameter's spec
rotated-space moments, ``MultiSteps``
accumulators)
row statistic (param shape minus the         the parameter's spec with the
column axes of its ``MatrixView``)           column-axis entries dropped
column statistic (param shape minus rows)    the spec with the row entries
                                             dropped
scalars (counters, hyperparameters)          ``P()``
rotation basis P (``(*batch, m, m)``) /      [decided] batch axes follow the
Q (``(*batch, n, n)``)                       parameter's batch axes, the first
                                             matrix axis (indexed like the
                                             parameter's rows / columns)
                                             follows the parameter's row /
                                             column sharding (mesh axes of
                                             folded axes are merged), the
                                             second (eigenvector) axis is
                                             replicated
SMMF factors and packed sign bits            [decided] replicated (kind
                                             ``'flat'``, registered in
                                             smmf.py)
subset-norm accumulator                      a row or column statistic
                                             (subset.py's rule)
subspace momentum / projector                batch axes as the parameter,
                                             the rest replicated (subset.py)
anything else no rule covers                 replicated, with a warning that
                                             names the leaf
==========================================  ==================================

Rules live in a registry keyed by the state class (``register_state_rule``).
This module imports only the layout module (:mod:`optax_fac.matrix`); every
module that defines a state registers that state's rule at import, as
``jax.tree_util.register_pytree_node`` is used (factored.py, hfac.py,
rotation.py, smmf.py, subset.py, stacking.py). The optax states that appear
in named optimizers (``ScaleByAdamState``, ``PartitionState``, ``MaskedState``,
``InjectHyperparamsState``, ``MultiStepsState``, ``FactoredState`` of
``optax.adafactor``) are covered. A state class without a rule is walked
generically: a leaf with its parameter's shape copies the parameter's spec, a
scalar gets ``P()``, anything else is replicated and reported by a
``UserWarning`` (never silently guessed).

Typical use (big_vision style, shapes first)::

    mesh = jax.make_mesh((4, 2), ('data', 'model'))
    param_specs = {'w': P('data', 'model'), 'b': P('model')}
    shardings = optax_fac.state_shardings(tx, params, param_specs, mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)

How a refreshed basis behaves on sharded parameters: under ``jax.jit`` over a
mesh, XLA gathers the (small, m x m) Gram matrix and computes the
decomposition redundantly; every device holding a copy of a basis block holds
the same values (tested in ``tests/test_parallel.py``). With the rotations'
``split_refresh=mesh`` the batch of decompositions is divided over the
mesh's devices instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import Sharding

from optax_fac import matrix

__all__ = [
    'LeafInfo',
    'register_state_rule',
    'state_partition_report',
    'state_partition_specs',
    'state_shardings',
]

Entry = Union[None, str, tuple]  # one entry of a PartitionSpec


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  """What a per-leaf rule knows about the parameter a state leaf belongs to.

  Attributes:
    path: the parameter's path (for messages).
    shape: the parameter's shape.
    spec: the parameter's spec, one entry per axis (padded with None).
    view: the parameter's resolved :class:`optax_fac.MatrixView` (the default
      view, the user's ``views`` or, for ndim <= 1, the 1 x N vector view).
    explicit_view: True if the view came from the ``views`` argument.
    mesh_shape: mesh axis sizes if known (from ``mesh`` or the params'
      shardings), else None.
  """
  path: str
  shape: tuple
  spec: tuple
  view: Optional[matrix.MatrixView]
  explicit_view: bool
  mesh_shape: Optional[Mapping[str, int]]

  def entries(self, axes: Sequence[int]) -> tuple:
    return tuple(self.spec[a] for a in axes)

  def folded(self, axes: Sequence[int]) -> Entry:
    """The entry for one axis made by folding ``axes`` (row-major).

    Folding axes sharded over mesh axes X and Y gives an axis sharded over
    (X, Y); its size stays divisible because each factor was.
    """
    return _merge_entries(self.entries(axes))


def _merge_entries(entries: Sequence[Entry]) -> Entry:
  names = []
  for e in entries:
    if e is None:
      continue
    names.extend([e] if isinstance(e, str) else list(e))
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


# --------------------------------------------------------------------------
# Per-leaf rules. A rule maps (state leaf or subtree, LeafInfo) -> a spec (or a
# tree of specs with the structure of the state subtree).

FieldRule = Union[str, Callable[[Any, LeafInfo], Any]]


class _SpecError(ValueError):
  pass


def _shape(x) -> tuple:
  return tuple(np.shape(x)) if not hasattr(x, 'shape') else tuple(x.shape)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct)) or (
                            hasattr(x, 'shape') and hasattr(x, 'dtype'))


def _replicated(x) -> P:
  return P(*([None] * len(_shape(x))))


def param_rule(x, info: LeafInfo) -> P:
  """A state leaf with the parameter's shape: copy the parameter's spec."""
  if _shape(x) != info.shape:
    raise _SpecError(
        f'state leaf of shape {_shape(x)} was declared param-shaped but its '
        f'parameter {info.path} has shape {info.shape}')
  return P(*info.spec)


def scalar_rule(x, info: LeafInfo = None) -> P:
  del info
  return _replicated(x)


def replicated_rule(x, info: LeafInfo = None) -> P:
  del info
  return _replicated(x)


def _kept_axes_candidates(pshape: tuple, sshape: tuple) -> list[tuple]:
  """All ways to get ``sshape`` by deleting axes of ``pshape`` (in order)."""
  k = len(sshape)
  out = []
  for kept in itertools.combinations(range(len(pshape)), k):
    if tuple(pshape[a] for a in kept) == sshape:
      out.append(kept)
  return out


def _reduced_rule(which: str):
  """Row ('row') or column ('col') statistic: drop the other side's axes."""

  def rule(x, info: LeafInfo) -> P:
    sshape = _shape(x)
    view = info.view
    if view is not None:
      dropped = view.cols if which == 'row' else view.rows
      expected = tuple(d for a, d in enumerate(info.shape) if a not in dropped)
      if expected == sshape:
        return P(*(info.spec[a] for a in range(len(info.shape))
                   if a not in dropped))
      if info.explicit_view:
        raise _SpecError(
            f'{which} statistic of shape {sshape} does not match parameter '
            f'{info.path} {info.shape} under the given view {view} (expected '
            f'{expected}); pass the same views= the optimizer was built with')
    # The optimizer used a view we were not told about (e.g. a batch axis):
    # infer which axes the statistic kept from the shapes alone.
    cands = _kept_axes_candidates(info.shape, sshape)
    specs = {tuple(info.spec[a] for a in kept) for kept in cands}
    if len(specs) == 1:
      return P(*specs.pop())
    raise _SpecError(
        f'cannot tell which axes of parameter {info.path} {info.shape} its '
        f'{which} statistic of shape {sshape} keeps ({len(cands)} candidates); '
        'pass views= to state_partition_specs (the same views the optimizer '
        'was built with)')

  return rule


row_rule = _reduced_rule('row')
col_rule = _reduced_rule('col')


def _basis_rule(which: str):
  """Rotation basis (*batch, k, k) for the rows (P) or columns (Q).

  [decided] Batch axes follow the parameter's batch axes; the first matrix
  axis is indexed like the parameter's rows (P) / columns (Q) and follows
  their (folded) sharding, the second axis (one eigenvector per entry) is
  replicated. The basis thus costs k²/|mesh axes of that side| per device,
  and ``Pᵀ G`` contracts over an axis sharded like G's rows (an FSDP-style
  reduce-scatter), never needing a gathered copy of P.
  """

  def rule(x, info: LeafInfo) -> P:
    sshape = _shape(x)
    if len(sshape) < 2:
      return _replicated(x)  # e.g. an unrotated side stored as a placeholder
    view = info.view or matrix.vector_view(info.shape)
    side = view.rows if which == 'row' else view.cols
    k = int(np.prod([info.shape[a] for a in side], dtype=np.int64))
    batch = view.batch_shape(info.shape)
    if sshape == batch + (k, k):
      return P(*info.entries(view.batch), info.folded(side), None)
    if sshape[-2:] == (k, k):  # e.g. no batch axes kept: replicate the rest
      return P(*([None] * (len(sshape) - 2)), info.folded(side), None)
    # A basis of a size we cannot place (e.g. a view we were not told
    # about): replicated, which is always correct.
    return _replicated(x)

  return rule


row_basis_rule = _basis_rule('row')
col_basis_rule = _basis_rule('col')


def flat_rule(x, info: LeafInfo) -> P:
  """[decided] A leaf that re-lays the parameter out (flattened / square
  matricized, e.g. SMMF's factors and packed signs): replicated.

  Its axes do not line up with the parameter's, so no spec of the parameter
  carries over; SMMF's factors are O(sqrt(N)) and its packed signs N/8 bytes
  (1/32 of a float32 parameter), so replication costs little.
  """
  return _replicated(x)


_FIELD_KINDS: dict[str, FieldRule] = {
    'param': param_rule,
    'scalar': scalar_rule,
    'replicated': replicated_rule,
    'row': row_rule,
    'col': col_rule,
    'row_basis': row_basis_rule,
    'col_basis': col_basis_rule,
    'flat': flat_rule,
}

# A registered rule is either a mapping field name -> kind (a name in
# _FIELD_KINDS, 'state' to walk a nested optimizer state, 'auto' for the
# generic treatment, or a callable per-leaf rule), or a callable
# (node, walker) -> spec node for full control.
StateRule = Union[Mapping[str, FieldRule], Callable[[Any, 'Walker'], Any]]
_REGISTRY: dict[type, StateRule] = {}


def register_state_rule(cls: type, rule: StateRule) -> None:
  """Registers how the fields of a state class are sharded.

  Args:
    cls: a state NamedTuple class.
    rule: a mapping field name -> kind, where kind is one of ``'param'``,
      ``'row'``, ``'col'``, ``'row_basis'``, ``'col_basis'``, ``'flat'``,
      ``'scalar'``, ``'replicated'`` (per parameter leaf, the field being a
      tree with the params' structure), ``'state'`` (a nested optimizer state,
      walked recursively), ``'auto'`` (generic), or a callable
      ``(state_leaf, LeafInfo) -> PartitionSpec``. Fields not named get
      ``'auto'``. Or a callable ``(node, walker) -> spec node``.
  """
  _REGISTRY[cls] = rule


# --------------------------------------------------------------------------
# The walker.


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


class Walker:
  """Walks an abstract optimizer state, producing a tree of specs."""

  def __init__(self, params, specs, views, explicit_views, mesh_shape):
    leaves_with_path, self.treedef = jax.tree_util.tree_flatten_with_path(
        params)
    self.infos = []
    flat_specs = self.treedef.flatten_up_to(specs)
    flat_views = self.treedef.flatten_up_to(views)
    for (path, leaf), spec, view in zip(leaves_with_path, flat_specs,
                                        flat_views):
      shape = tuple(leaf.shape)
      self.infos.append(LeafInfo(
          path=matrix.leaf_path_str(path), shape=shape,
          spec=_normalize_spec(spec, len(shape), matrix.leaf_path_str(path)),
          view=view, explicit_view=explicit_views, mesh_shape=mesh_shape))
    self.records: list[tuple[str, tuple, P, str]] = []
    self.unhandled: list[str] = []

  def walk_subtree(self, params, specs, views, state, where: str):
    """Walks ``state`` built on other params (e.g. a stacked tree).

    ``params`` / ``specs`` / ``views`` describe the params ``state`` was
    built on; the records and unhandled leaves join this walker's report.
    """
    mesh_shape = self.infos[0].mesh_shape if self.infos else None
    sub = Walker(params, specs, views, True, mesh_shape)
    out = sub.walk(state, where)
    self.records.extend(sub.records)
    self.unhandled.extend(sub.unhandled)
    return out

  # -- bookkeeping
  def _record(self, where, x, spec, reason):
    spec = P(*spec) if not isinstance(spec, P) else spec
    if len(spec) != len(_shape(x)):
      raise AssertionError(
          f'{where}: spec {spec} has rank {len(spec)} for a state array of '
          f'shape {_shape(x)}')
    self.records.append((where, _shape(x), spec, reason))
    return spec

  # -- per-parameter fields
  def per_leaf(self, value, rule: FieldRule, where: str):
    """Applies a per-leaf rule to a field with the params' structure."""
    try:
      subs = self.treedef.flatten_up_to(value)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f'state_partition_specs: {where} was registered as a per-parameter '
          f'field but does not have the params structure: {e}') from None
    fn = _FIELD_KINDS[rule] if isinstance(rule, str) else rule
    name = rule if isinstance(rule, str) else getattr(rule, '__name__', 'rule')

    def array(sub, info, here):
      try:
        spec = fn(sub, info)
      except _SpecError as e:
        raise ValueError(f'state_partition_specs: {here}: {e}') from None
      return self._record(here, sub, spec, name)

    def subtree(sub, info, here):  # e.g. a tuple of factors: rule per array
      return jax.tree.map(lambda x: self._record(here, x, fn(x, info), name),
                          sub)

    return self._per_param(subs, where, array, subtree)

  def _per_param(self, subs, where, array, subtree):
    """Maps ``array`` / ``subtree`` over a field's per-parameter parts."""
    out = []
    for sub, info in zip(subs, self.infos):
      here = f'{where}{info.path}'
      if sub is None or _is_masked(sub):
        out.append(sub)
      elif _is_array(sub):
        out.append(array(sub, info, here))
      else:
        out.append(subtree(sub, info, here))
    return self.treedef.unflatten(out)

  def auto_leaf(self, x, info: LeafInfo, where: str, registered_cls: str):
    if _shape(x) == info.shape:
      return self._record(where, x, P(*info.spec), 'param-shaped')
    if len(_shape(x)) == 0:
      return self._record(where, x, P(), 'scalar')
    self.unhandled.append(f'{where} {_shape(x)} (in {registered_cls})')
    return self._record(where, x, _replicated(x),
                        'replicated: no rule for this state class')

  def field(self, value, kind: FieldRule, where: str, cls_name: str):
    if value is None or _is_masked(value):
      return value
    if kind == 'state':
      return self.walk(value, where)
    if kind == 'auto':
      try:
        subs = self.treedef.flatten_up_to(value)
      except (ValueError, TypeError):
        return self.walk(value, where)
      return self._per_param(
          subs, where,
          lambda sub, info, here: self.auto_leaf(sub, info, here, cls_name),
          lambda sub, info, here: self.walk(sub, here))
    if kind in ('scalar', 'replicated') and not self._params_structured(value):
      return jax.tree.map(
          lambda x: self._record(where, x, _replicated(x), kind), value)
    return self.per_leaf(value, kind, where)

  def _params_structured(self, value) -> bool:
    try:
      self.treedef.flatten_up_to(value)
      return True
    except (ValueError, TypeError):
      return False

  def walk(self, node, where: str = 'state'):
    if node is None or _is_masked(node):
      return node
    if _is_array(node):
      if len(_shape(node)) == 0:
        return self._record(where, node, P(), 'scalar')
      self.unhandled.append(f'{where} {_shape(node)}')
      return self._record(where, node, _replicated(node),
                          'replicated: array outside any per-parameter field')
    rule = _lookup(type(node))
    if rule is not None and not isinstance(rule, Mapping):
      return rule(node, self)
    if _is_namedtuple(node):
      kinds = rule or {}
      cls_name = type(node).__name__
      return type(node)(*[
          self.field(v, kinds.get(f, 'auto'), f'{where}.{f}', cls_name)
          for f, v in zip(node._fields, node)])
    if isinstance(node, (tuple, list)):
      return type(node)(self.walk(v, f'{where}[{i}]')
                        for i, v in enumerate(node))
    if isinstance(node, dict):
      out = type(node)() if type(node) is not dict else {}
      for k, v in node.items():
        out[k] = self.walk(v, f'{where}[{k!r}]')
      return out
    # Another pytree node type: scalars P(), the rest replicated + reported.
    def other(x):
      if len(_shape(x)) == 0:
        return self._record(where, x, P(), 'scalar')
      self.unhandled.append(f'{where} {_shape(x)} ({type(node).__name__})')
      return self._record(where, x, _replicated(x),
                          f'replicated: unknown node {type(node).__name__}')
    return jax.tree.map(other, node)


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), '_fields')


def _lookup(cls):
  for c in cls.__mro__:
    if c in _REGISTRY:
      return _REGISTRY[c]
  return None


def _normalize_spec(spec, ndim: int, where: str) -> tuple:
  if spec is None:
    return (None,) * ndim
  if isinstance(spec, NamedSharding):
    spec = spec.spec
  elif isinstance(spec, Sharding):
    if spec.is_fully_replicated:
      return (None,) * ndim
    raise ValueError(
        f'state_partition_specs: parameter {where} has a {type(spec).__name__}'
        '; give a PartitionSpec or NamedSharding.')
  if not isinstance(spec, P):
    spec = P(*spec)
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(
        f'state_partition_specs: parameter {where} has spec {spec} with '
        f'{len(entries)} entries for a {ndim}-d array.')
  return entries + (None,) * (ndim - len(entries))


# --------------------------------------------------------------------------
# Public API.


def _specs_from_params(params):
  def one(x):
    s = getattr(x, 'sharding', None)
    if isinstance(s, NamedSharding):
      return s.spec
    return None
  return jax.tree.map(one, params)


def _mesh_from(params, mesh):
  if mesh is not None:
    return mesh
  for x in jax.tree.leaves(params):
    s = getattr(x, 'sharding', None)
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def _abstract_state(tx, abstract, param_specs, mesh):
  """``jax.eval_shape(tx.init, ...)`` as the real init would trace it.

  On a mesh with Explicit axes, ``init`` under ``jax.set_mesh`` sees each
  leaf's sharding (stacking groups same-shape leaves by it), so the params
  are given their shardings and the init is traced under that mesh: the specs
  then have exactly the structure of the real ``tx.init(params)``.
  """
  explicit = mesh is not None and any(
      t == jax.sharding.AxisType.Explicit
      for t in getattr(mesh, 'axis_types', ()))
  if not explicit:
    return jax.eval_shape(tx.init, abstract)
  treedef = jax.tree.structure(abstract)
  flat_specs = treedef.flatten_up_to(param_specs)
  leaves = []
  for x, spec in zip(jax.tree.leaves(abstract), flat_specs):
    entries = _normalize_spec(spec, len(x.shape), 'param')
    leaves.append(jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, P(*entries))))
  with jax.set_mesh(mesh):
    return jax.eval_shape(tx.init, jax.tree.unflatten(treedef, leaves))


def _walk(tx, params, param_specs, views, mesh, warn):
  if param_specs is None:
    param_specs = _specs_from_params(params)
  mesh = _mesh_from(params, mesh)
  mesh_shape = dict(mesh.shape) if mesh is not None else None
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
  state = _abstract_state(tx, abstract, param_specs, mesh)
  views_tree = matrix.resolve_views(abstract, views, vectors=True)
  walker = Walker(abstract, param_specs, views_tree, views is not None,
                   mesh_shape)
  specs = walker.walk(state)
  if warn and walker.unhandled:
    warnings.warn(
        'state_partition_specs: no sharding rule for these state leaves; they '
        'are replicated (correct, but not memory-sharded): '
        + '; '.join(walker.unhandled[:8])
        + (f' ... ({len(walker.unhandled)} in all)'
           if len(walker.unhandled) > 8 else '')
        + '. Register a rule with optax_fac.register_state_rule.',
        stacklevel=3)
  return specs, walker, mesh


def state_partition_specs(tx: optax.GradientTransformation, params: Any,
                          param_specs: Any = None, *,
                          views: matrix.ViewSpec = None,
                          mesh: Optional[jax.sharding.Mesh] = None,
                          warn: bool = True) -> Any:
  """PartitionSpecs for ``tx.init(params)``, from the parameters' specs.

  Args:
    tx: any optax transformation built from optax_fac and/or optax parts.
    params: parameters or ``jax.ShapeDtypeStruct`` s (nothing is allocated:
      the state is traced with ``jax.eval_shape``).
    param_specs: a tree with the params' structure of ``PartitionSpec``,
      ``NamedSharding`` or None (replicated) leaves. If None, taken from the
      params' ``NamedSharding`` s (e.g. ``ShapeDtypeStruct(..., sharding=)``).
    views: the ``views`` the optimizer was built with, if any. Without it the
      default view is assumed and, where a statistic's shape shows another
      view was used (e.g. a batch axis), the kept axes are inferred from the
      shapes (an ambiguous case raises ValueError asking for ``views``).
    mesh: optional mesh (only for rules that need axis sizes).
    warn: warn about state leaves no rule covers (they are replicated).

  Returns:
    A tree with the structure of ``tx.init(params)`` (``optax.MaskedNode`` and
    None kept as they are) whose leaves are ``PartitionSpec`` s, each with
    exactly one entry per axis of the array it describes.
  """
  specs, _, _ = _walk(tx, params, param_specs, views, mesh, warn)
  return specs


def state_shardings(tx: optax.GradientTransformation, params: Any,
                    param_specs: Any = None,
                    mesh: Optional[jax.sharding.Mesh] = None, *,
                    views: matrix.ViewSpec = None, warn: bool = True) -> Any:
  """Like :func:`state_partition_specs` but returns ``NamedSharding`` s.

  Use as ``jax.jit(tx.init, out_shardings=state_shardings(...))`` and as the
  state's in/out shardings of the training step. ``mesh`` may be omitted when
  the params carry ``NamedSharding`` s.
  """
  specs, _, mesh = _walk(tx, params, param_specs, views, mesh, warn)
  if mesh is None:
    raise ValueError('state_shardings: give mesh= (or params with '
                     'NamedShardings).')
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def state_partition_report(tx: optax.GradientTransformation, params: Any,
                           param_specs: Any = None, *,
                           views: matrix.ViewSpec = None,
                           mesh: Optional[jax.sharding.Mesh] = None) -> str:
  """A table: every state array, its shape, its spec and the rule used."""
  _, walker, _ = _walk(tx, params, param_specs, views, mesh, warn=False)
  rows = [f'{"state leaf":<70} {"shape":<16} {"spec":<28} rule']
  for where, shape, spec, reason in walker.records:
    rows.append(f'{where[-70:]:<70} {str(shape):<16} {str(spec):<28} {reason}')
  return '\n'.join(rows)


# --------------------------------------------------------------------------
# Rules for optax containers and optax_fac states.


register_state_rule(optax.MaskedState, {'inner_state': 'state'})
register_state_rule(optax.ScaleByAdamState,
                    {'count': 'scalar', 'mu': 'param', 'nu': 'param'})
register_state_rule(optax.EmptyState, {})
register_state_rule(optax.ScaleByScheduleState, {'count': 'scalar'})
register_state_rule(optax.MultiStepsState, {
    'inner_opt_state': 'state', 'acc_grads': 'param'})
if hasattr(optax, 'InjectHyperparamsState'):
  register_state_rule(optax.InjectHyperparamsState, {
      'count': 'scalar', 'hyperparams': 'scalar', 'inner_state': 'state'})
register_state_rule(optax.transforms.PartitionState, {'inner_states': 'state'})


def _optax_factored_rule(field: str):
  """optax.adafactor's FactoredState: v_row drops d0, v_col drops d1."""

  def rule(x, info: LeafInfo) -> P:
    sshape = _shape(x)
    if sshape == info.shape:
      return P(*info.spec)
    if len(info.shape) >= 2:
      order = np.argsort(info.shape)
      d1, d0 = int(order[-2]), int(order[-1])
      drop = d0 if field == 'v_row' else d1
      if sshape == tuple(np.delete(np.asarray(info.shape), drop)):
        return P(*(info.spec[a] for a in range(len(info.shape)) if a != drop))
    return _replicated(x)  # the (1,) placeholders

  return rule


register_state_rule(optax.FactoredState, {
    'count': 'scalar', 'v_row': _optax_factored_rule('v_row'),
    'v_col': _optax_factored_rule('v_col'), 'v': _optax_factored_rule('v')})
