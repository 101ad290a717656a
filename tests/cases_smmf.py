"""Contract cases for SMMF (../shared/ALGORITHMS.md §4)."""

import optax_fac
from contract import Case

_STATIC = ('vector_reshape', 'sign_bits')

CASES = [
    Case('smmf', optax_fac.smmf, dict(learning_rate=1e-2), static_args=_STATIC),
    Case('smmf_bool_signs_wd', optax_fac.smmf,
         dict(learning_rate=1e-2, sign_bits=8, weight_decay=1e-4),
         static_args=_STATIC),
    Case('smmf_no_momentum', optax_fac.smmf,
         dict(learning_rate=1e-2, b1=None, vector_reshape=False),
         static_args=_STATIC),
]
