"""Data parallelism and sharded optimizer state, for every named optimizer.

Runs on the 8 CPU devices that conftest.py configures. The equivalence
checks (one device vs ``jax.pmap`` vs ``jax.jit`` over a data mesh vs
``jax.jit`` over a 2-D ('data', 'model') mesh with sharded params and state)
live in optax_fac/experiments/parallel_check.py, shared with
scripts/parallel_check.py (the GPU run).
"""

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_fac
from optax_fac.experiments import parallel_check as pc

NAMED = tuple(optax_fac.NAMED_OPTIMIZERS)

# Families (one compiled program per family and mode; families run in
# parallel under pytest-xdist). Together exactly optax_fac.NAMED_OPTIMIZERS
# (test_every_named_optimizer_is_covered).
FAMILIES = {
    'factored': ('hfac', 'sign_fsgd', 'lion_factor', 'adafactor_momentum'),
    'rotation': ('adadiag', 'adadiag_pp', 'adafac_diag', 'adafac_diag_pp',
                 'hfac_diag'),
    'smmf': ('smmf',),
    'subset': ('adam_sn', 'adam_snsm', 'rmsprop_sn', 'adagrad_sn'),
}


def _is_spec(x):
  return isinstance(x, P)


def test_every_named_optimizer_is_covered():
  listed = [n for names in FAMILIES.values() for n in names]
  assert sorted(listed) == sorted(NAMED)  # each in exactly one family


def test_every_named_optimizer_has_explicit_test_settings():
  """pc.PATH_KWARGS: only named optimizers, only arguments they take."""
  assert set(pc.PATH_KWARGS) <= set(NAMED)
  for name in NAMED:
    kwargs = pc.named_kwargs(name)  # raises on a missing or unset argument
    assert kwargs['views'] is pc.stacked_views
  assert pc.named_kwargs('adam_snsm')['rank'] == 4
  with pytest.raises(KeyError, match='NAMED_OPTIMIZERS'):
    pc.named_kwargs('adamw')


def test_eight_devices():
  if jax.default_backend() == 'cpu':
    assert jax.device_count() >= 8, 'conftest.py must give 8 CPU devices'

# The specs tests need no devices: an abstract (4, 2) mesh.
MESH_4x2 = jax.sharding.AbstractMesh((4, 2), ('data', 'model'))


# --------------------------------------------------------------------------
# state_partition_specs: structure, rank, values.

ABSTRACT = {
    'dense': jax.ShapeDtypeStruct((16, 8), jnp.float32),
    'conv': jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32),
    'stack': jax.ShapeDtypeStruct((2, 8, 4), jnp.float32),
    'bias': jax.ShapeDtypeStruct((8,), jnp.float32),
    'scale': jax.ShapeDtypeStruct((), jnp.float32),
}
SPECS = {
    'dense': P('data', 'model'),
    'conv': P(None, None, 'data', 'model'),
    'stack': P(None, 'model', 'data'),
    'bias': P('model'),
    'scale': P(),
}
STACK_VIEWS = {k: (optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))
                   if k == 'stack' else None) for k in ABSTRACT}


@pytest.mark.parametrize('name', NAMED)
def test_specs_match_state_structure_and_rank(name):
  tx, views = pc.make_named(name)  # views: the stacked leaf's batch axis
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # every leaf is covered by a rule
    specs = optax_fac.state_partition_specs(tx, ABSTRACT, SPECS, views=views)
  state = jax.eval_shape(tx.init, ABSTRACT)
  assert (jax.tree.structure(specs, is_leaf=_is_spec)
          == jax.tree.structure(state))
  spec_leaves = jax.tree.leaves(specs, is_leaf=_is_spec)
  state_leaves = jax.tree.leaves(state)
  assert len(spec_leaves) == len(state_leaves)
  for spec, leaf in zip(spec_leaves, state_leaves):
    assert isinstance(spec, P)
    assert len(spec) == leaf.ndim, (spec, leaf.shape)
  # Every spec is valid for its array on a (4, 2) mesh.
  for spec, leaf in zip(spec_leaves, state_leaves):
    NamedSharding(MESH_4x2, spec).shard_shape(leaf.shape)


def _find(specs, state, predicate):
  """(path, spec, shape) of the state leaves whose path matches."""
  flat_specs = jax.tree.leaves(specs, is_leaf=_is_spec)
  flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
  return [(jax.tree_util.keystr(p), s, x.shape)
          for (p, x), s in zip(flat_state, flat_specs)
          if predicate(jax.tree_util.keystr(p))]


def test_factored_specs_drop_the_other_axes():
  # Per-leaf state (stack_leaves=False); tests/test_stacking.py covers the
  # stacked layout.
  tx = optax_fac.hfac(1e-3, views=STACK_VIEWS, stack_leaves=False)
  specs = optax_fac.state_partition_specs(tx, ABSTRACT, SPECS,
                                          views=STACK_VIEWS)
  state = jax.eval_shape(tx.init, ABSTRACT)
  got = {(path.split('.')[-1], shape): spec for path, spec, shape in
         _find(specs, state, lambda p: "'method'" in p and 'count' not in p)}
  # Row statistics keep the param's row sharding, column ones its columns'.
  assert got[("u['dense']", (16,))] == P('data')
  assert got[("v['dense']", (8,))] == P('model')
  assert got[("row['conv']", (3, 3, 4))] == P(None, None, 'data')
  assert got[("col['conv']", (8,))] == P('model')
  # The stacked leaf: the layer axis is a batch axis of both statistics.
  assert got[("row['stack']", (2, 8))] == P(None, 'model')
  assert got[("col['stack']", (2, 4))] == P(None, 'data')
  # Adam fallback moments copy the param spec.
  fb = _find(specs, state, lambda p: "'fallback'" in p and 'bias' in p)
  assert {s for _, s, _ in fb} == {P('model')}


def test_tree_map_params_is_wrong_and_we_are_not():
  """ECOSYSTEM.md §1.9: tree_map_params copies the 2-D spec onto 1-D stats."""
  params = {'w': jax.ShapeDtypeStruct((16, 8), jnp.float32)}
  specs = {'w': P('data', 'model')}
  # (The raw transform: tree_map_params cannot even walk optax.partition.)
  tx = optax_fac.scale_by_hfac()
  state = jax.eval_shape(tx.init, params)
  naive = optax.tree_map_params(tx, lambda _, s: s, state, specs,
                                transform_non_params=lambda _: P())
  theirs = [s for s, x in zip(jax.tree.leaves(naive, is_leaf=_is_spec),
                              jax.tree.leaves(state)) if len(s) != x.ndim]
  assert theirs, 'optax.tree_map_params got factored specs right after all?'
  ours = optax_fac.state_partition_specs(tx, params, specs)
  assert all(len(s) == x.ndim for s, x in
             zip(jax.tree.leaves(ours, is_leaf=_is_spec),
                 jax.tree.leaves(state)))


def test_rotation_basis_specs():
  if not hasattr(optax_fac, 'adadiag_pp'):
    pytest.skip('rotation not available')
  # Per-leaf state (the stacked layout is covered in tests/test_stacking.py).
  tx = optax_fac.adadiag_pp(1e-3, views=STACK_VIEWS, stack_leaves=False)
  specs = optax_fac.state_partition_specs(tx, ABSTRACT, SPECS,
                                          views=STACK_VIEWS)
  state = jax.eval_shape(tx.init, ABSTRACT)
  got = {path.split('.')[-1]: (spec, shape) for path, spec, shape in
         _find(specs, state, lambda p: '.left[' in p or '.right[' in p)}
  # [decided] first basis axis follows the param's side, second replicated;
  # folded row axes (conv: 3*3*4 = 36 rows) merge their mesh axes.
  assert got["left['dense']"] == (P('data', None), (16, 16))
  assert got["right['dense']"] == (P('model', None), (8, 8))
  assert got["left['conv']"] == (P('data', None), (36, 36))
  assert got["left['stack']"] == (P(None, 'model', None), (2, 8, 8))
  assert got["right['stack']"] == (P(None, 'data', None), (2, 4, 4))


def test_params_with_shardings_need_no_specs():
  params = {'w': jax.ShapeDtypeStruct(
      (16, 8), jnp.float32,
      sharding=NamedSharding(MESH_4x2, P('data', 'model')))}
  tx = optax_fac.adafactor_momentum(1e-3, stack_leaves=False)
  shardings = optax_fac.state_shardings(tx, params)
  got = {s.spec for s in jax.tree.leaves(shardings)}
  assert got == {P(), P('data'), P('model'), P('data', 'model')}
  # Stacked: the same specs behind the (replicated) group axis.
  tx = optax_fac.adafactor_momentum(1e-3)
  shardings = optax_fac.state_shardings(tx, params)
  got = {s.spec for s in jax.tree.leaves(shardings)}
  assert got == {P(), P(None, 'data'), P(None, 'model'),
                 P(None, 'data', 'model')}


def test_optax_adafactor_and_wrappers():
  params = {'w': jax.ShapeDtypeStruct((256, 512), jnp.float32)}
  specs = {'w': P('data', 'model')}
  tx = optax.MultiSteps(
      optax.inject_hyperparams(optax.adafactor, static_args=(
          'min_dim_size_to_factor',))(learning_rate=1e-3), 2)
  out = optax_fac.state_partition_specs(tx, params, specs)
  state = jax.eval_shape(tx.init, params)
  by_shape = {x.shape: s for s, x in zip(jax.tree.leaves(out, is_leaf=_is_spec),
                                         jax.tree.leaves(state))}
  assert by_shape[(256,)] == P('data')      # v_row drops the 512 axis
  assert by_shape[(512,)] == P('model')     # v_col drops the 256 axis
  assert by_shape[(256, 512)] == P('data', 'model')  # acc_grads


def test_unregistered_state_is_replicated_visibly():
  class CustomState(NamedTuple):
    count: Any
    sketch: Any

  def init(params):
    return CustomState(jnp.zeros([], jnp.int32),
                       jax.tree.map(lambda p: jnp.zeros((3,) + p.shape[1:]),
                                    params))

  tx = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
  params = {'w': jax.ShapeDtypeStruct((16, 8), jnp.float32)}
  with pytest.warns(UserWarning, match=r"sketch\['w'\]"):
    specs = optax_fac.state_partition_specs(tx, params, {'w': P('data', None)})
  assert specs.sketch['w'] == P(None, None)
  report = optax_fac.state_partition_report(tx, params, {'w': P('data')})
  assert 'replicated: no rule' in report


def test_unknown_view_raises_instead_of_guessing():
  params = {'s': jax.ShapeDtypeStruct((2, 8, 8), jnp.float32)}
  views = {'s': optax_fac.MatrixView(rows=(1,), cols=(2,), batch=(0,))}
  # A stacked state records its views, so it needs no views= (below).
  tx = optax_fac.hfac(1e-3, views=views, stack_leaves=False)
  with pytest.raises(ValueError, match='views='):
    optax_fac.state_partition_specs(tx, params, {'s': P(None, 'a', 'b')})
  specs = optax_fac.state_partition_specs(tx, params,
                                          {'s': P(None, 'a', 'b')},
                                          views=views)
  assert P(None, 'b') in jax.tree.leaves(specs, is_leaf=_is_spec)
  stacked = optax_fac.state_partition_specs(
      optax_fac.hfac(1e-3, views=views), params, {'s': P(None, 'a', 'b')})
  assert P(None, None, 'b') in jax.tree.leaves(stacked, is_leaf=_is_spec)


# --------------------------------------------------------------------------
# One step on one device == pmap == jit over a data mesh == 2-D sharded.


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_parallel_equivalence(family):
  names = FAMILIES[family]
  # Full float32 matmuls (GPUs default to TF32, whose rounding would differ
  # between the single-device and the parallel runs).
  with jax.default_matmul_precision('highest'):
    results = pc.check_group(names, steps=2, devices=jax.devices()[:8])
  failures = [r for r in results if not r.ok]
  assert len(results) == 3 * len(names)
  assert not failures, '\n'.join(
      f'{r.name} {r.mode}: params {r.params_diff:.2e} state '
      f'{r.state_diff:.2e} replicas {r.replica_diff} {r.error}'
      for r in failures)


@pytest.mark.slow
def test_refreshed_basis_is_identical_on_every_device():
  """A basis refreshed from sharded gradients: one basis, on all devices."""
  if not hasattr(optax_fac, 'adadiag_pp'):
    pytest.skip('rotation not available')
  tx, views = pc.make_named('adadiag_pp')
  txs = {'a': tx}
  params, batch = pc.toy_problem()
  devices = jax.devices()[:8]
  with jax.default_matmul_precision('highest'):
    ref_p, ref_s, _ = pc.run_single(txs, params, batch, 1, devices[0])
    _, state, rep, s_sh = pc.run_sharded_2d(txs, params, batch, 1, devices,
                                            views={'a': views})
  assert rep == 0.0
  def method(s):  # the rotation state (inside the stacked state by default)
    st = s['a'][0].inner_states['method'].inner_state
    return st.inner if isinstance(st, optax_fac.StackedState) else st
  copies = 0
  for side in ('left', 'right'):
    for k, basis in getattr(method(state), side).items():
      if isinstance(basis, optax.MaskedNode):  # a bias: not rotated
        continue
      ref = getattr(method(ref_s), side)[k]
      np.testing.assert_allclose(np.asarray(basis), np.asarray(ref),
                                 atol=1e-5)
      # Its sharding is the documented one (first axis follows the param).
      assert basis.sharding.spec == getattr(method(s_sh), side)[k].spec
      groups = {}
      for shard in basis.addressable_shards:
        groups.setdefault(str(shard.index), []).append(np.asarray(shard.data))
      copies = max(copies, *(len(g) for g in groups.values()))
      for g in groups.values():
        for c in g[1:]:
          np.testing.assert_array_equal(c, g[0])
  if len(devices) > 1:
    assert copies >= 2  # some basis block really is held by several devices


def _trip_counts(text):
  """The known trip counts of a compiled program's while loops."""
  import re  # pylint: disable=g-import-not-at-top
  return sorted(int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)',
                                           text))


@pytest.mark.parametrize('basis', ['eigh', 'svd'])
def test_split_refresh_shares_the_decompositions_out(basis):
  """split_refresh=mesh: each of 8 devices decomposes ceil(B/8) of a
  refresh's B same-size matrices (on CPU, a loop of that many LAPACK calls
  per device), and the step equals the unsplit one bit for bit."""
  devices = jax.devices()[:8]
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  rep = NamedSharding(mesh, P())
  shapes = {**{f'w{i:02d}': (16, 24) for i in range(16)}, 'e': (40, 16),
            'b': (16,)}
  keys = jax.random.split(jax.random.key(0), len(shapes))
  grads = jax.device_put({k: jax.random.normal(key, s) for key, (k, s) in
                          zip(keys, shapes.items())}, rep)
  params = jax.device_put({k: jnp.zeros(s) for k, s in shapes.items()}, rep)
  outs, loops = [], []
  for split in (None, mesh):
    tx = optax_fac.adadiag(1e-2, basis=basis, split_refresh=split)
    state = jax.jit(tx.init, out_shardings=rep)(params)
    update = jax.jit(tx.update)
    loops.append(_trip_counts(
        update.lower(grads, state, params).compile().as_text()))
    outs.append(update(grads, state, params))  # t = 1: a refresh
  # eigh: 16 Gram matrices of the stacked w's (rows, 16 <= 24) and e's
  # (columns) in one batch of 17; svd: the 16 (16, 24) w's in one batch
  # (e's single (40, 16) is one call, no loop).
  whole = 17 if basis == 'eigh' else 16
  assert loops[0] == [whole]
  assert loops[1] == [-(-whole // 8)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_split_refresh_under_an_explicit_mesh_and_staggered():
  """The same bases with sharding in types (params sharded over a 2-D
  explicit mesh) and with staggered refreshes."""
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                       devices=jax.devices()[:8])
  shapes = {**{f'w{i}': (16, 24) for i in range(6)}, 'e': (40, 16)}
  keys = jax.random.split(jax.random.key(1), len(shapes))
  for stagger in (False, True):
    outs = []
    for split in (None, mesh):
      with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P('data',
                                                                'model')))
        grads = {k: put(jax.random.normal(key, s))
                 for key, (k, s) in zip(keys, shapes.items())}
        params = {k: put(jnp.zeros(s)) for k, s in shapes.items()}
        tx = optax_fac.adadiag(1e-2, every=4, stagger=stagger,
                               split_refresh=split)
        state = jax.jit(tx.init)(params)
        update = jax.jit(tx.update)
        for _ in range(3):
          u, state = update(grads, state, params)
        outs.append((u, state))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize('basis', ['eigh', 'svd'])
def test_chunked_refresh_with_sharded_params(basis, monkeypatch):
  """The refresh's chunks (rotation.REFRESH_CHUNK_BYTES) with params and
  gradients sharded over 8 devices under jit: the same step as the whole
  batch, bit for bit, over steps with refreshes."""
  from optax_fac import rotation  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  sharded = NamedSharding(mesh, P('data'))
  shapes = {**{f'w{i:02d}': (16, 24) for i in range(15)}, 'e': (40, 16)}
  keys = jax.random.split(jax.random.key(2), len(shapes))
  grads = jax.device_put({k: jax.random.normal(key, s) for key, (k, s) in
                          zip(keys, shapes.items())}, sharded)
  params = jax.device_put({k: jnp.zeros(s) for k, s in shapes.items()},
                          sharded)
  outs, scans = [], []
  for chunk_bytes in (2 ** 40, 4 * 16 * 24 * 4):  # whole; 4 matrices a chunk
    monkeypatch.setattr(rotation, 'REFRESH_CHUNK_BYTES', chunk_bytes)
    tx = optax_fac.adadiag(1e-2, every=2, basis=basis,
                           stack_leaves=False)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    scans.append(str(jax.make_jaxpr(tx.update)(grads, state, params))
                 .count('scan'))
    for _ in range(3):
      u, state = update(grads, state, params)
    outs.append((u, state))
  assert scans[1] > scans[0]  # the chunks ran as a lax.map
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_split_refresh_must_be_a_mesh():
  with pytest.raises(ValueError, match='split_refresh must be None or a '
                     'jax.sharding.Mesh'):
    optax_fac.svd_rotation(optax.scale_by_adam(), split_refresh=('data',))
  with pytest.raises(ValueError, match='split_refresh'):
    optax_fac.adadiag(1e-3, split_refresh='data')
