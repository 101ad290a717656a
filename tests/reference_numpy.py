"""Independent float64 NumPy transcriptions of docs/algorithms.md §1-§2 (and Adam).

Written from the equations, on explicit (m, n) matrices, without any code of
the library. Each ``*_step`` takes a float64 matrix G and a dict of state and
returns (D, new_state).
"""

import numpy as np


def tc(beta, t):
  """Time-corrected decay β̂_t = β(1 − β^{t−1}) / (1 − β^t)."""
  return 0.0 if beta == 0 else beta * (1 - beta ** (t - 1)) / (1 - beta ** t)


def adam_step(g, st, t, b1=0.9, b2=0.999, eps=1e-8):
  m = b1 * st.get('m', 0 * g) + (1 - b1) * g
  v = b2 * st.get('v', 0 * g) + (1 - b2) * g * g
  d = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  return d, {'m': m, 'v': v}


def factored_rms_step(g, st, t, b1=None, b2=0.999, eps=1e-30, d=None):
  m_, n_ = g.shape
  b2h = tc(b2, t)
  z = g * g + eps
  r = b2h * st.get('r', np.zeros(m_)) + (1 - b2h) * z.sum(1)
  s = b2h * st.get('s', np.zeros(n_)) + (1 - b2h) * z.sum(0)
  vhat = np.outer(r, s) / r.sum()
  new = {'r': r, 's': s}
  if b1 is None:
    num = g
  else:
    b1h = tc(b1, t)
    num = b1h * st.get('M', 0 * g) + (1 - b1h) * g
    new['M'] = num
  out = num / np.sqrt(vhat)
  if d is not None:
    out = out / max(1.0, np.sqrt(np.mean(out ** 2)) / d)
  return out, new


def hfac_step(g, st, t, b1=0.9, b2=0.999, eps=1e-30, d=1.0):
  m_, n_ = g.shape
  b1h, b2h = tc(b1, t), tc(b2, t)
  a, b = g.mean(1), g.mean(0)
  u = b1h * st.get('u', np.zeros(m_)) + (1 - b1h) * a
  v = b1h * st.get('v', np.zeros(n_)) + (1 - b1h) * b
  z = g * g + eps
  r = b2h * st.get('r', np.zeros(m_)) + (1 - b2h) * z.sum(1)
  s = b2h * st.get('s', np.zeros(n_)) + (1 - b2h) * z.sum(0)
  vhat = np.outer(r, s) / r.sum()
  u_mat = g / np.sqrt(vhat)
  if d is not None:
    u_mat = u_mat / max(1.0, np.sqrt(np.mean(u_mat ** 2)) / d)
  phi = np.outer(b1h * (u - a) / np.sqrt(r / n_), np.ones(n_))
  psi = np.outer(np.ones(m_), b1h * (v - b) / np.sqrt(s / m_))
  return 0.5 * (phi + psi) + u_mat, {'u': u, 'v': v, 'r': r, 's': s}


def sign_fsgd_step(g, st, t, b1=0.9):
  del t
  m_, n_ = g.shape
  a, b = g.mean(1), g.mean(0)
  u = b1 * st.get('u', np.zeros(m_)) + (1 - b1) * a
  v = b1 * st.get('v', np.zeros(n_)) + (1 - b1) * b
  d = 0.5 * (np.sign(g + b1 * (u - a)[:, None]) +
             np.sign(g + b1 * (v - b)[None, :]))
  return d, {'u': u, 'v': v}


def lion_factor_step(g, st, t, b1=0.9, b2=0.99):
  del t
  m_, n_ = g.shape
  a, b = g.mean(1), g.mean(0)
  u, v = st.get('u', np.zeros(m_)), st.get('v', np.zeros(n_))
  d = 0.5 * (np.sign(g + b1 * (u - a)[:, None]) +
             np.sign(g + b1 * (v - b)[None, :]))
  return d, {'u': b2 * u + (1 - b2) * a, 'v': b2 * v + (1 - b2) * b}


def factored_momentum_step(g, st, t, b1=0.9):
  m_, n_ = g.shape
  b1h = tc(b1, t)
  a, b = g.mean(1), g.mean(0)
  u = b1h * st.get('u', np.zeros(m_)) + (1 - b1h) * a
  v = b1h * st.get('v', np.zeros(n_)) + (1 - b1h) * b
  d = g + 0.5 * b1h * ((u - a)[:, None] + (v - b)[None, :])
  return d, {'u': u, 'v': v}
