"""Contract cases for the foundation optimizers (H-Fac family, factored RMS)."""

import optax_fac
from contract import Case

CASES = [
    Case('hfac', optax_fac.hfac, dict(learning_rate=1e-2)),
    Case('hfac_wd', optax_fac.hfac, dict(learning_rate=1e-2, weight_decay=1e-4)),
    Case('sign_fsgd', optax_fac.sign_fsgd, dict(learning_rate=1e-2)),
    Case('lion_factor', optax_fac.lion_factor, dict(learning_rate=1e-2)),
    Case('adafactor_momentum', optax_fac.adafactor_momentum,
         dict(learning_rate=1e-2)),
    Case('adafactor_no_momentum', optax_fac.adafactor_momentum,
         dict(learning_rate=1e-2, b1=None)),
]
