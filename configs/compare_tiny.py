"""A seconds-long CPU version of configs/compare_sweep.py (tests, smoke runs).

Same pipeline (stdlib source, the 32000-piece SentencePiece model, in-jit
chunks, sweep, summary), a 2-layer d-64 LLaMA, 1 M characters of text,
batch 8 x 32 tokens, 20 steps.
"""

import os

from optax_fac.experiments import config_lib


BASE = os.path.join(os.path.dirname(__file__), 'compare_sweep.py')


def get_config():
  c = config_lib.load_config(BASE)
  c.model.update(d_model=64, ffn_dim=172, num_layers=2, num_heads=2,
                 dtype='float32')
  c.data.update(max_bytes=1_000_000, seq_len=32, eval_batches=2)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 20
  c.eval_every_steps = 10
  return c
