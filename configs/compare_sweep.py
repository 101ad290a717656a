"""The convergence benchmark's sweep: a 22.7 M-parameter LLaMA on Python source.

``scripts/compare.py --config=configs/compare_sweep.py --workdir=results/compare_sweep``
trains every optimizer of ``optimizers`` at each peak rate of its grid and
writes the table and plots (optax_fac/experiments/compare.py has the setup).

Model: LLaMA (GaLore's architecture, docs/algorithms.md §6) with d 256, ffn
688, 8 layers, 4 heads and the 32000-piece SentencePiece vocabulary: 6.3 M
parameters in the hidden matrices, 16.4 M in the embedding and LM head,
22.7 M in all; bfloat16 compute, float32 parameters. Data: Python source
text, the standard library's and then the installed packages' (110 M
characters, exact copies skipped, every 20th file held out), sequences of
256 tokens, batch 64 (16384 tokens a step), 2000 steps (32.8 M tokens, under
one pass), warmup 10% then cosine to 10%, gradients
clipped to norm 1, no weight decay (GaLore's LLaMA recipe).

Grids, three peak rates a factor of ~3 apart, centred where each family's
docs put the rate: Adam-like 1e-3..1e-2; the sign methods (their step is
±1 per entry) and Lion-style 10x lower; the Subset-Norm family 10x higher
(its authors' advice); optax.adafactor scales steps by the parameters' RMS
(~0.02 at initialization), so ~30x higher. An optimizer whose best rate is
on the edge of its grid gets one more rate beyond it
(``scripts/compare.py --extend_edges``).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      name='llama', d_model=256, ffn_dim=688, num_layers=8, num_heads=4,
      dtype='bfloat16'))
  c.data = ml_collections.ConfigDict(dict(
      tokenizer='mistral', max_bytes=110_000_000, every=20, seq_len=256,
      site_packages=True,
      eval_batches=16, tokens_file=''))
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_train_steps = 2000
  c.eval_every_steps = 50
  c.schedule = ml_collections.ConfigDict(dict(
      warmup_fraction=0.1, decay='cosine', final_fraction=0.1))
  c.grad_clip = 1.0
  c.weight_decay = 0.0
  c.method_exclude = ('embed', 'lm_head')
  # In the order runs are started (the headline comparisons first).
  c.optimizers = (
      'adamw', 'muon', 'adafactor', 'hfac', 'adadiag', 'smmf', 'adam_snsm',
      'adafactor_momentum_b1none', 'sign_fsgd', 'lion_factor',
      'adafactor_momentum', 'adadiag_pp', 'adafac_diag', 'adafac_diag_pp',
      'hfac_diag', 'adam_sn', 'rmsprop_sn', 'adagrad_sn')
  # A label that is not an optimizer name: (optimizer, keyword arguments).
  c.variants = ml_collections.ConfigDict(dict(
      adafactor_momentum_b1none=dict(optimizer='adafactor_momentum',
                                     kwargs=dict(b1=None)),
      # optax.contrib.muon: Muon on the hidden matrices, AdamW on the
      # embedding, head and norms at the same rate; consistent_rms=0.2 makes
      # Muon's step RMS AdamW's (Moonlight's recipe).
      muon=dict(optimizer='contrib.muon', kwargs=dict(consistent_rms=0.2)),
  ))
  c.optimizer_kwargs = ml_collections.ConfigDict(dict(
      # SMMF's README: decay-rate 0.8 for Transformers (its gamma = -0.8).
      smmf=dict(decay_rate=0.8),
  ))
  c.sweep = ml_collections.ConfigDict(dict(
      default=(1e-3, 3e-3, 1e-2),
      sign=(1e-4, 3e-4, 1e-3),
      subset_norm=(1e-2, 3e-2, 1e-1),
      adafactor=(1e-2, 3e-2, 1e-1),
  ))
  c.sweep_family = ml_collections.ConfigDict(dict(
      sign='sign_fsgd|lion_factor',
      subset_norm='adam_sn|adam_snsm|rmsprop_sn|adagrad_sn',
  ))
  return c
