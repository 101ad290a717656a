"""optax_fac: memory-efficient and preconditioned optimizers for Optax.

Composable ``scale_by_*`` transforms and named optimizers (see README.md and
docs/algorithms.md for the math of each).
"""

from optax_fac.accumulation import MultiSteps
from optax_fac.compose import adam_fallback
from optax_fac.compose import exclude_by_name
from optax_fac.compose import named_optimizer
from optax_fac.compose import scale_in_float32
from optax_fac.factored import adafactor_momentum
from optax_fac.factored import FactoredMomentumState
from optax_fac.factored import FactoredRmsState
from optax_fac.factored import scale_by_factored_momentum
from optax_fac.factored import scale_by_factored_rms
from optax_fac.hfac import HfacState
from optax_fac.hfac import hfac
from optax_fac.hfac import lion_factor
from optax_fac.hfac import sign_fsgd
from optax_fac.hfac import scale_by_hfac
from optax_fac.hfac import scale_by_lion_factor
from optax_fac.hfac import scale_by_sign_fsgd
from optax_fac.matrix import MatrixView
from optax_fac.memory import state_elements
from optax_fac.memory import state_report
from optax_fac.memory import state_shapes
from optax_fac.memory import state_size
from optax_fac.rotation import SvdRotationState
from optax_fac.rotation import adadiag
from optax_fac.rotation import adadiag_pp
from optax_fac.rotation import adafac_diag
from optax_fac.rotation import adafac_diag_pp
from optax_fac.rotation import hfac_diag
from optax_fac.rotation import svd_rotation
from optax_fac.sharding import LeafInfo
from optax_fac.stacking import StackedState
from optax_fac.stacking import stack_leaves
from optax_fac.sharding import register_state_rule
from optax_fac.sharding import state_partition_report
from optax_fac.sharding import state_partition_specs
from optax_fac.sharding import state_shardings
from optax_fac.smmf import SMMFState
from optax_fac.smmf import scale_by_smmf
from optax_fac.smmf import smmf
from optax_fac.subset import BiasCorrectionState
from optax_fac.subset import SubspaceMomentumState
from optax_fac.subset import SubsetNormState
from optax_fac.subset import adagrad_sn
from optax_fac.subset import adam_sn
from optax_fac.subset import adam_snsm
from optax_fac.subset import add_decayed_updated_weights
from optax_fac.subset import rmsprop_sn
from optax_fac.subset import scale_by_bias_correction
from optax_fac.subset import scale_by_subset_norm
from optax_fac.subset import scale_by_subspace_momentum

__version__ = '0.1.0'

# The one list of named optimizers (name -> factory), in the order of
# docs/algorithms.md: §1-2 factored, §3 rotated, §4 SMMF, §5 subset-norm.
NAMED_OPTIMIZERS = {
    'hfac': hfac,
    'sign_fsgd': sign_fsgd,
    'lion_factor': lion_factor,
    'adafactor_momentum': adafactor_momentum,
    'adadiag': adadiag,
    'adadiag_pp': adadiag_pp,
    'adafac_diag': adafac_diag,
    'adafac_diag_pp': adafac_diag_pp,
    'hfac_diag': hfac_diag,
    'smmf': smmf,
    'adam_sn': adam_sn,
    'adam_snsm': adam_snsm,
    'rmsprop_sn': rmsprop_sn,
    'adagrad_sn': adagrad_sn,
}

__all__ = (
    'NAMED_OPTIMIZERS',
    'StackedState',
    'stack_leaves',
    'BiasCorrectionState',
    'FactoredMomentumState',
    'FactoredRmsState',
    'HfacState',
    'LeafInfo',
    'MatrixView',
    'MultiSteps',
    'SMMFState',
    'SubsetNormState',
    'SubspaceMomentumState',
    'SvdRotationState',
    'adadiag',
    'adadiag_pp',
    'adafac_diag',
    'adafac_diag_pp',
    'adafactor_momentum',
    'adagrad_sn',
    'adam_fallback',
    'exclude_by_name',
    'adam_sn',
    'adam_snsm',
    'add_decayed_updated_weights',
    'hfac',
    'hfac_diag',
    'lion_factor',
    'named_optimizer',
    'register_state_rule',
    'rmsprop_sn',
    'scale_by_bias_correction',
    'scale_by_factored_momentum',
    'scale_by_factored_rms',
    'scale_by_hfac',
    'scale_by_lion_factor',
    'scale_by_sign_fsgd',
    'scale_by_smmf',
    'scale_by_subset_norm',
    'scale_by_subspace_momentum',
    'scale_in_float32',
    'sign_fsgd',
    'smmf',
    'state_elements',
    'state_partition_report',
    'state_partition_specs',
    'state_report',
    'state_shapes',
    'state_shardings',
    'state_size',
    'svd_rotation',
)
