"""Ablations on the convergence benchmark (configs/compare_sweep.py's setup).

    python scripts/compare.py --config=configs/compare_ablations.py \\
        --workdir=results/compare_sweep

Runs into the sweep's workdir, so that every ablation is compared with the
same adamw runs (the table then holds the sweep's rows and these). Each
variant runs at its optimizer's best peak rate of the sweep (AdaDiag 3e-3,
AdamSNSM 3e-2; README), one change at a time from the defaults:

* AdaDiag's refresh period ``every`` (default 200): 20 and 50;
* ``carry='rotate'`` (the moments rotated into each new basis) instead of
  ``'keep'`` (default, the paper's code);
* rotation matmuls at ``precision='highest'`` (full float32) and at
  ``precision='bf16'`` (bfloat16 operands, float32 accumulation) instead of
  the backend's default (TF32 on NVIDIA GPUs);
* the basis from EMAs of the Gram matrices (``basis_source='ema_gram'``,
  SOAP's idea, β = 0.95) instead of the refresh step's gradient;
* AdamSNSM's rank (default 128 here: 1/2 of d) 32 and 64, and its period
  ``every`` (default 200) 50 and 500.
"""

import os

from optax_fac.experiments import config_lib


BASE = os.path.join(os.path.dirname(__file__), 'compare_sweep.py')

ADADIAG = {
    'adadiag_every20': dict(every=20),
    'adadiag_every50': dict(every=50),
    'adadiag_carry_rotate': dict(carry='rotate'),
    'adadiag_precision_highest': dict(precision='highest'),
    'adadiag_precision_bf16': dict(precision='bf16'),
    'adadiag_ema_gram': dict(basis_source='ema_gram'),
}
ADAM_SNSM = {
    'adam_snsm_rank32': dict(rank=32),
    'adam_snsm_rank64': dict(rank=64),
    'adam_snsm_every50': dict(every=50),
    'adam_snsm_every500': dict(every=500),
}


def get_config():
  c = config_lib.load_config(BASE)
  c.optimizers = tuple(ADADIAG) + tuple(ADAM_SNSM)
  with c.unlocked():
    for label, kwargs in ADADIAG.items():
      c.variants[label] = dict(optimizer='adadiag', kwargs=kwargs)
      c.sweep[label] = (3e-3,)
    for label, kwargs in ADAM_SNSM.items():
      c.variants[label] = dict(optimizer='adam_snsm', kwargs=kwargs)
      c.sweep[label] = (3e-2,)
  return c
