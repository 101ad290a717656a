"""Contract cases for Subset-Norm / Subspace-Momentum (docs/algorithms.md §5)."""

import optax_fac
from contract import Case

_SN = ()  # 'heuristic' is a string: static for optax
_SNSM = ('rank',)  # an explicit rank decides shapes (jitted init)

CASES = [
    Case('adam_sn', optax_fac.adam_sn,
         dict(learning_rate=1e-2, weight_decay=1e-4), static_args=_SN),
    Case('adam_snsm', optax_fac.adam_snsm,
         dict(learning_rate=1e-2, rank=1, every=5), static_args=_SNSM),
    Case('adam_snsm_faithful_eigh', optax_fac.adam_snsm,
         dict(learning_rate=1e-2, rank=1, every=5, reset='faithful',
              basis='eigh', weight_decay=1e-4), static_args=_SNSM),
    Case('rmsprop_sn_int', optax_fac.rmsprop_sn,
         dict(learning_rate=1e-2, subset_size=3),
         static_args=('subset_size',)),
    Case('adagrad_sn', optax_fac.adagrad_sn, dict(learning_rate=0.5),
         static_args=_SN),
]
