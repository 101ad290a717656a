"""The contract every named optimizer meets (README.md).

Each issue adds its optimizers as ``Case`` entries in a ``tests/cases_*.py``
file (a list named ``CASES``); ``tests/test_contract.py`` runs every check on
every case. Modelled on optax/contrib/_common_test.py and
optax/_src/sharding_test.py.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
  """One named optimizer under the contract.

  Attributes:
    name: test id.
    make: the factory (e.g. ``optax_fac.hfac``).
    kwargs: keyword arguments that make it converge on the targets below in
      ``steps`` steps with a constant learning rate.
    static_args: structural arguments for ``optax.inject_hyperparams``.
    steps: optimisation steps for the convergence checks.
  """
  name: str
  make: Callable[..., Any]
  kwargs: dict
  static_args: tuple = ()
  steps: int = 3000

  def __str__(self):
    return self.name


def all_cases() -> list[Case]:
  here = os.path.dirname(__file__)
  cases = []
  for path in sorted(glob.glob(os.path.join(here, 'cases_*.py'))):
    module = importlib.import_module(os.path.basename(path)[:-3])
    cases.extend(module.CASES)
  names = [c.name for c in cases]
  assert len(names) == len(set(names)), f'duplicate case names: {names}'
  return cases


# --------------------------------------------------------------------------
# Optimisation targets: (initial params, optimum, objective).


def parabola(dtype):
  x0 = jnp.array([-1.0, 10.0, 1.0], dtype)
  xs = jnp.array([1.0, -1.0, 1.0], dtype)
  return x0, xs, lambda x: jnp.sum((x - xs) ** 2)


def rosenbrock(dtype):
  x0 = jnp.array([0.0, 0.0], dtype)
  xs = jnp.array([1.0, 1.0], dtype)
  return x0, xs, lambda x: (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


def matrix_parabola(dtype):
  x0 = jnp.zeros((2, 2), dtype)
  xs = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return x0, xs, lambda x: jnp.sum((x - xs) ** 2)


def mixed_target(dtype):
  x0 = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
  xs = (jnp.array([1.0, -1.0, 2.0], dtype),
        jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
  def f(x):
    return jnp.sum((x[0] - xs[0]) ** 2) + jnp.sum((x[1] - xs[1]) ** 2)
  return x0, xs, f


def matrix_least_squares(dtype):
  """min ||A W − B||² for a well-conditioned A (8x6) and W* of shape (6, 4)."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(8, 6)))
  a = jnp.asarray(q * np.linspace(1.0, 2.0, 6), dtype)
  ws = jnp.asarray(rng.uniform(-1.5, 1.5, size=(6, 4)), dtype)
  b = a @ ws
  return (jnp.zeros((6, 4), dtype), ws,
          lambda w: 0.5 * jnp.sum((a @ w - b) ** 2))


TARGETS = (parabola, rosenbrock, matrix_parabola, mixed_target,
           matrix_least_squares)
