"""Flax integration: linen TrainState and nnx.Optimizer, every named optimizer.

* ``flax.training.train_state.TrainState`` with each optax_fac optimizer:
  create, ``apply_gradients`` inside ``jax.jit`` (all optimizers in one
  compiled program), the loss goes down.
* ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` on a model with a stacked
  (``nnx.vmap``) and scanned (``nnx.scan``) block: the layer axis is a batch
  axis of the matrix view (``views``), so the stacked kernel (L, d, d) gets
  per-layer statistics, and training it equals training L separate layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.training import train_state

import optax_fac

NAMED = tuple(optax_fac.NAMED_OPTIMIZERS)
LR = 1e-2
STEPS = 15


def _data(n=32, din=4, dout=2, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, din))
  y = jnp.sin(x @ jax.random.normal(kw, (din, dout)))
  return x, y


# --------------------------------------------------------------------------
# linen + TrainState.


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x))
    x = jnp.tanh(nn.Dense(16)(x))
    return nn.Dense(2)(x)


@pytest.mark.slow  # long run: trains with every named optimizer
def test_train_state_with_every_named_optimizer():
  model = MLP()
  x, y = _data()
  params = model.init(jax.random.PRNGKey(1), x)['params']
  states = {name: train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=getattr(optax_fac, name)(learning_rate=LR)) for name in NAMED}

  def loss_fn(params, apply_fn):
    return jnp.mean((apply_fn({'params': params}, x) - y) ** 2)

  @jax.jit
  def train(states):
    def body(_, states):
      out = {}
      for name, st in states.items():
        grads = jax.grad(loss_fn)(st.params, st.apply_fn)
        out[name] = st.apply_gradients(grads=grads)
      return out
    first = {k: loss_fn(s.params, s.apply_fn) for k, s in states.items()}
    states = jax.lax.fori_loop(0, STEPS, body, states)
    last = {k: loss_fn(s.params, s.apply_fn) for k, s in states.items()}
    return states, first, last

  states, first, last = train(states)
  for name in NAMED:
    st = states[name]
    assert int(st.step) == STEPS, name
    assert all(bool(jnp.all(jnp.isfinite(p)))
               for p in jax.tree.leaves(st.params)), name
    assert float(last[name]) < float(first[name]), (name, first[name],
                                                    last[name])
    # The state is the optimizer's own (e.g. shapes of tx.init).
    assert (jax.tree.structure(st.opt_state)
            == jax.tree.structure(st.tx.init(params))), name


# --------------------------------------------------------------------------
# nnx: stacked / scanned layers.

DIM, LAYERS = 8, 2


class Block(nnx.Module):

  def __init__(self, dim, rngs):
    self.linear = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class Scanned(nnx.Module):
  """inp -> LAYERS blocks stacked with nnx.vmap, applied with nnx.scan -> out."""

  def __init__(self, rngs, din=4, dout=2):
    self.inp = nnx.Linear(din, DIM, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(DIM, rngs)

    self.blocks = make(rngs)
    self.out = nnx.Linear(DIM, dout, rngs=rngs)

  def __call__(self, x):
    x = self.inp(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.out(body(x, self.blocks))


class Unrolled(nnx.Module):
  """The same network with LAYERS separate blocks (weights copied)."""

  def __init__(self, scanned: Scanned):
    self.inp = nnx.clone(scanned.inp)
    self.out = nnx.clone(scanned.out)
    blocks = []
    for l in range(LAYERS):
      b = Block(DIM, nnx.Rngs(0))
      b.linear.kernel.value = scanned.blocks.linear.kernel.value[l]
      b.linear.bias.value = scanned.blocks.linear.bias.value[l]
      blocks.append(b)
    self.blocks = nnx.List(blocks) if hasattr(nnx, 'List') else blocks

  def __call__(self, x):
    x = self.inp(x)
    for b in self.blocks:
      x = b(x)
    return self.out(x)


def _stacked(path) -> bool:
  return any(getattr(k, 'key', None) == 'blocks' for k in path)


def layer_views(params):
  """Stacked leaves: axis 0 is a batch axis; the rest the default view."""
  def one(path, x):
    if _stacked(path) and x.ndim >= 3:
      return optax_fac.MatrixView(rows=tuple(range(1, x.ndim - 1)),
                                  cols=(x.ndim - 1,), batch=(0,))
    return None
  return jax.tree_util.tree_map_with_path(one, params)


def layer_mask(params):
  """Stacked biases (L, d) are vectors per layer: leave them to Adam."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: not (_stacked(path) and x.ndim < 3), params)


def _make(name, stacked=True):
  fn = getattr(optax_fac, name)
  if not stacked:
    return fn(learning_rate=LR)
  try:
    return fn(learning_rate=LR, views=layer_views, method_mask=layer_mask)
  except TypeError:  # SMMF: its own (square) view of every leaf, no views
    return fn(learning_rate=LR)


def _nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_step(pairs, x, y):
  """One step for every (model, optimizer) pair: one compiled program."""
  losses = {}
  for name, (model, opt) in pairs.items():
    losses[name], grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
    opt.update(model, grads)
  return losses


def _nnx_train(pairs, x, y):
  """STEPS steps (the jitted step is compiled once); first and last loss."""
  first = _nnx_step(pairs, x, y)
  for _ in range(STEPS - 1):
    _nnx_step(pairs, x, y)
  last = {k: _nnx_loss(m, x, y) for k, (m, _) in pairs.items()}
  return first, last


@pytest.mark.slow  # long run: trains with every named optimizer
def test_nnx_optimizer_with_every_named_optimizer():
  x, y = _data()
  pairs = {}
  for name in NAMED:
    model = Scanned(nnx.Rngs(0))
    pairs[name] = (model, nnx.Optimizer(model, _make(name), wrt=nnx.Param))
  first, last = _nnx_train(pairs, x, y)
  for name in NAMED:
    model, opt = pairs[name]
    assert float(last[name]) < float(first[name]), (name, first[name],
                                                    last[name])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in
               jax.tree.leaves(nnx.state(model, nnx.Param))), name
    assert int(opt.step.value) == STEPS


def test_nnx_stacked_kernel_gets_per_layer_statistics():
  model = Scanned(nnx.Rngs(0))
  tx = optax_fac.hfac(learning_rate=LR, views=layer_views, method_mask=layer_mask,
                      stack_leaves=False)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  hstate = opt.opt_state[0].inner_states['method'].inner_state
  kernel = lambda tree: tree['blocks']['linear']['kernel'].value.shape
  assert kernel(hstate.row) == (LAYERS, DIM)  # per layer, per row
  assert kernel(hstate.col) == (LAYERS, DIM)  # per layer, per column
  # Stacked (the default): the kernel is a group of one, its layer axis
  # still a batch axis behind the group axis.
  opt = nnx.Optimizer(model, _make('hfac'), wrt=nnx.Param)
  stacked = opt.opt_state[0].inner_states['method'].inner_state
  shapes = {x.shape for x in jax.tree.leaves(stacked.inner.row)}
  assert (1, LAYERS, DIM) in shapes
  # state_partition_specs works on the nnx state too (a tree of Variables).
  params = nnx.state(model, nnx.Param)
  specs = jax.tree.map(lambda x: jax.sharding.PartitionSpec(
      *([None] * (x.ndim - 1) + ['model'])), params)
  out = optax_fac.state_partition_specs(_make('hfac'), params, specs,
                                        views=layer_views)
  flat = jax.tree.leaves(out, is_leaf=lambda s: isinstance(
      s, jax.sharding.PartitionSpec))
  assert all(isinstance(s, jax.sharding.PartitionSpec) for s in flat)


EQUIV = [n for n in ('hfac', 'adadiag_pp', 'adafac_diag', 'adam_snsm')
         if hasattr(optax_fac, n)]


@pytest.mark.parametrize('name', EQUIV)
def test_nnx_stacked_equals_separate_layers(name):
  """docs/algorithms.md §0: a stacked (L, in, out) leaf with a batch axis behaves
  exactly like L separate (in, out) leaves — here through nnx.Optimizer."""
  x, y = _data()
  scanned = Scanned(nnx.Rngs(0))
  unrolled = Unrolled(scanned)
  pairs = {
      's': (scanned, nnx.Optimizer(scanned, _make(name), wrt=nnx.Param)),
      'u': (unrolled, nnx.Optimizer(unrolled, _make(name, stacked=False),
                                    wrt=nnx.Param)),
  }
  with jax.default_matmul_precision('highest'):  # no TF32 on GPUs
    _nnx_train(pairs, x, y)
  for l in range(LAYERS):
    np.testing.assert_allclose(
        scanned.blocks.linear.kernel.value[l],
        unrolled.blocks[l].linear.kernel.value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        scanned.blocks.linear.bias.value[l],
        unrolled.blocks[l].linear.bias.value, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scanned.inp.kernel.value,
                             unrolled.inp.kernel.value, rtol=1e-4, atol=1e-5)
