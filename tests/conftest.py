"""Test configuration: 8 CPU devices for the sharding/parallel tests.

Must run before JAX initialises its backends, so it lives at import time here.
"""

import jax

jax.config.update('jax_num_cpu_devices', 8)
