"""Contract cases for SMMF (docs/algorithms.md §4)."""

import optax_fac
from contract import Case

_STATIC = ()  # bools are static for optax; sign_bits is read from the state

CASES = [
    Case('smmf', optax_fac.smmf, dict(learning_rate=1e-2), static_args=_STATIC),
    Case('smmf_bool_signs_wd', optax_fac.smmf,
         dict(learning_rate=1e-2, sign_bits=8, weight_decay=1e-4),
         static_args=('sign_bits',)),  # an explicit structural int
    Case('smmf_no_momentum', optax_fac.smmf,
         dict(learning_rate=1e-2, b1=None, vector_reshape=False),
         static_args=_STATIC),
]
