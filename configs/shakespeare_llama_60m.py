"""LLaMA-60M (GaLore's 60M body) on Shakespeare, byte-level, for one GPU.

The demo comparison at the papers' smallest model size: d 512, ffn 1376, 8
layers, 8 heads (docs/algorithms.md §6), bfloat16 compute, sequences of
256 bytes, batch 64, 500 steps (≈ 2 passes over the 4.9 MB of training text),
warmup 10% + cosine to 10%, embedding and LM head kept on Adam. With byte
tokens (vocab 256) the model has 25.6 M parameters (58.1 M with a 32000
vocabulary: the embedding and head make the difference).

    python scripts/demo.py --config=configs/shakespeare_llama_60m.py \\
        --workdir=results/gpu_shakespeare_60m
    # without the shakespeare package: --config.data.text_dir=DIR/texts
    # or the stdlib source instead:   --config.data.name=stdlib
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'demo_shakespeare',
    os.path.join(os.path.dirname(__file__), 'demo_shakespeare.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  config = _base.get_config()
  config.model.d_model = 512
  config.model.ffn_dim = 1376
  config.model.num_layers = 8
  config.model.num_heads = 8
  config.model.dtype = 'bfloat16'
  config.data.seq_len = 256
  config.data.eval_batches = 20
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_train_steps = 500
  config.learning_rate = 1e-3
  config.eval_every_steps = 50
  config.flush_every_steps = 50
  # Not swept at this size: GaLore's Adam rate for LLaMA-60M (1e-3) for every
  # method, and adam_sn at ~10x as in the demo sweep and the sn-sm code.
  config.demo.learning_rates = dict(
      adamw=1e-3, hfac=1e-3, sign_fsgd=1e-3, adadiag=1e-3, smmf=1e-3,
      adam_sn=1e-2)
  return config
