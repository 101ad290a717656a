"""Contract cases for the AdaDiag family (docs/algorithms.md §3, optax_fac.rotation)."""

import optax_fac
from contract import Case

_STATIC = ()  # no structural int is set: nothing needs static_args

CASES = [
    Case('adadiag', optax_fac.adadiag, dict(learning_rate=3e-2),
         static_args=_STATIC),
    Case('adadiag_pp', optax_fac.adadiag_pp, dict(learning_rate=3e-2),
         static_args=_STATIC),
    Case('adafac_diag', optax_fac.adafac_diag, dict(learning_rate=3e-2),
         static_args=_STATIC),
    Case('adafac_diag_pp', optax_fac.adafac_diag_pp, dict(learning_rate=3e-2),
         static_args=_STATIC),
    Case('hfac_diag', optax_fac.hfac_diag, dict(learning_rate=1e-2),
         static_args=_STATIC),
    # basis_source="ema_gram" (SOAP-style EMA-Gram bases; the two-sided
    # form is checked against the float64 transcription in
    # tests/test_rotation_ema.py). The string is static for
    # optax.inject_hyperparams, gram_decay is injected (traced).
    Case('adadiag_ema_gram', optax_fac.adadiag,
         dict(learning_rate=3e-2, basis_source='ema_gram', gram_decay=0.9),
         static_args=_STATIC),
]
