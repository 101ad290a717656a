"""The convergence benchmark on GaLore's LLaMA-60M (confirmation runs).

    python scripts/compare.py --config=configs/compare_60m.py \\
        --workdir=results/compare_60m

configs/compare_sweep.py's data, schedule and recipes on GaLore's 60M
configuration (d 512, ffn 1376, 8 layers, 8 heads, vocabulary 32000: 58.1 M
parameters, 25.3 M in the hidden matrices). Not a full sweep: each
optimizer runs at three rates around its best of the small sweep, the plan
the benchmark's issue sets (sweep small, confirm the best settings larger).
"""

import os

from optax_fac.experiments import config_lib


BASE = os.path.join(os.path.dirname(__file__), 'compare_sweep.py')

# Three rates each, the one expected best first (a call cut short by its
# deadline has then run it): the small sweep's best and its closer
# neighbour, and a third rate where the better of those two at 60M was on
# the edge. One Trainer per
# optimizer compiles once for all its rates.
RATES = {
    'adamw': (1e-3, 3e-3, 3e-4),
    'muon': (3e-3, 1e-2, 1e-3),
    'adam_snsm': (3e-2, 1e-2, 1e-1),
    'adadiag': (1e-3, 3e-3, 3e-4),
    'smmf': (1e-3, 3e-3, 3e-4),
    'adafactor_momentum': (1e-3, 3e-3, 3e-4),
    'hfac': (1e-3, 3e-3, 3e-4),
}


def get_config():
  c = config_lib.load_config(BASE)
  c.model.update(d_model=512, ffn_dim=1376, num_layers=8, num_heads=8)
  c.optimizers = tuple(RATES)
  with c.unlocked():
    for label, rates in RATES.items():
      c.sweep[label] = rates
  return c
