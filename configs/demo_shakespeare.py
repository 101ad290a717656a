"""Demo: a tiny LLaMA on Shakespeare (byte-level), several optimizers, CPU.

``scripts/demo.py`` (``make demo``) trains this config once per name in
``demo.optimizers`` and prints a comparison table; ``scripts/train.py
--config=configs/demo_shakespeare.py`` trains one optimizer (``optimizer``).
Data: the 42 Gutenberg texts of the ``shakespeare`` package, Hamlet held out
for validation, UTF-8 bytes as tokens (vocab 256, no tokenizer file).
Sized to run every optimizer in about a minute on 2 CPU cores.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name='llama', vocab_size=256, d_model=128, ffn_dim=344, num_layers=2,
      num_heads=4, dtype='float32'))
  config.data = ml_collections.ConfigDict(dict(
      name='shakespeare', tokenizer='bytes', seq_len=128,
      validation_play='hamlet', text_dir='', eval_batches=8))
  config.batch_size = 16
  config.eval_batch_size = 32
  config.microbatches = 1
  config.num_train_steps = 300
  config.optimizer = 'adamw'
  config.learning_rate = 2e-3
  config.optimizer_kwargs = ml_collections.ConfigDict()
  config.weight_decay = 0.0
  config.weight_decay_exclude = ()
  config.method_exclude = ('embed', 'lm_head')
  config.grad_clip = 1.0
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_fraction=0.1, decay='cosine', final_fraction=0.1))
  config.log_every_steps = 1
  config.flush_every_steps = 25
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 0
  config.max_checkpoints = 2
  # scripts/demo.py: the optimizers compared (names that do not exist in this
  # installation are skipped with a note), and per-optimizer learning rates /
  # keyword arguments (default: learning_rate above). Each learning rate is
  # the best validation loss of a sweep at this config (300 steps) over
  # {1e-3, 2e-3 (adamw), 3e-3, 1e-2}, and {1e-2, 3e-2, 1e-1} for adam_sn
  # (whose code uses ~10x an Adam learning rate).
  config.demo = ml_collections.ConfigDict(dict(
      optimizers=('adamw', 'hfac', 'sign_fsgd', 'adadiag', 'smmf', 'adam_sn'),
      learning_rates=ml_collections.ConfigDict(dict(
          adamw=2e-3, hfac=3e-3, sign_fsgd=3e-3, adadiag=3e-3, smmf=3e-3,
          adam_sn=3e-2)),
      optimizer_kwargs=ml_collections.ConfigDict(dict(
          smmf=dict(decay_rate=0.8))),  # SMMF README: 0.8 for Transformers (its gamma = -0.8)
  ))
  return config
