"""LLaMA-60M on C4: the H-Fac / AdaDiag / Subset-Norm pre-training recipe.

docs/algorithms.md §6 (GaLore's setup): sequences of 256 tokens, batch
512, 10K steps, linear warmup over 10% of the steps then cosine decay to 10%
of the peak, learning rate chosen from {3e-3, 1e-3, 3e-4, 1e-4}, no weight
decay, the token embedding and LM head excluded from the method (they keep
Adam states). Published validation perplexity: Adam 31.12, AdaDiag 28.71.

    python scripts/train.py --config=configs/c4_llama_60m.py --workdir=DIR \\
        --config.data.data_dir=/path/to/c4/en --config.optimizer=adadiag

Data: the allenai/c4 ``en`` json.gz shards in ``data.data_dir`` (train and
validation), tokenized with a 32000-piece SentencePiece model
(``data.tokenizer``: 'mistral' = the LLaMA-style model shipped by
mistral-common, or any .model path; the papers used the T5 tokenizer).
Evaluation: 76 batches of 512 x 256 ≈ 10M validation tokens (GaLore).
"""

import ml_collections

SIZE = '60m'
STEPS = 10_000


def get_config(size=SIZE, steps=STEPS):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name='llama', size=size, vocab_size=32000, dtype='bfloat16'))
  config.data = ml_collections.ConfigDict(dict(
      name='c4', data_dir='', train_pattern='c4-train.*.json.gz',
      validation_pattern='c4-validation.*.json.gz', tokenizer='mistral',
      seq_len=256, eval_batches=76, prefetch=2))
  config.batch_size = 512
  config.eval_batch_size = 512
  config.microbatches = 1          # raise if 512 x 256 does not fit
  config.num_train_steps = int(steps)
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.optimizer_kwargs = ml_collections.ConfigDict()
  config.weight_decay = 0.0
  config.weight_decay_exclude = ()
  config.method_exclude = ('embed', 'lm_head')
  config.grad_clip = None
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_fraction=0.1, decay='cosine', final_fraction=0.1))
  config.log_every_steps = 1
  config.flush_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.max_checkpoints = 2
  return config
