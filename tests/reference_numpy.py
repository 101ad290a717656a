"""Independent float64 NumPy transcriptions of docs/algorithms.md §1-§2 (and Adam).

Written from the equations, on explicit (m, n) matrices, without any code of
the library. Each ``*_step`` takes a float64 matrix G and a dict of state and
returns (D, new_state). :func:`ema_gram_rotation` runs §3's rotation with
``basis_source="ema_gram"`` over a whole gradient sequence.
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


# --------------------------------------------------------------------------
# docs/algorithms.md §3 with basis_source="ema_gram": the bases are the
# eigenvectors of EMAs of the Gram matrices (SOAP-style).

EPS32 = 2.0 ** -23


def sign_fix(vecs):
  """Each column flipped so that its largest-magnitude entry is positive."""
  idx = np.argmax(np.abs(vecs), axis=0)
  pivot = vecs[idx, np.arange(vecs.shape[1])]
  return vecs * np.where(pivot < 0, -1.0, 1.0)


def canonical_completion(kept, k):
  """The kept (k, r) orthonormal columns, then, while columns are missing,
  (I − B Bᵀ) e_j normalized for the first j whose residual 1 − ‖B[j, :]‖² is
  at least e⁻¹ × the largest (B: the columns so far)."""
  cols = list(kept.T)
  while len(cols) < k:
    b = np.array(cols).T if cols else np.zeros((k, 0))
    res = 1.0 - np.sum(b ** 2, axis=1)
    j = int(np.flatnonzero(res >= np.exp(-1.0) * res.max())[0])
    v = np.eye(k)[j] - b @ b[j]
    v -= b @ (b.T @ v)
    cols.append(v / np.linalg.norm(v))
  return np.array(cols).T


def gram_eigenbasis(gram, m, n):
  """(basis, rank) of a symmetric PSD k×k matrix of an (m, n) leaf: the
  eigenvectors of λ > max(m, n)·eps32·λ_max (descending, sign-fixed), then
  the canonical completion."""
  lam, vecs = np.linalg.eigh(gram)
  lam, vecs = lam[::-1], vecs[:, ::-1]
  rank = int(np.sum(lam > max(m, n) * EPS32 * lam[0])) if lam[0] > 0 else 0
  return canonical_completion(sign_fix(vecs[:, :rank]), gram.shape[0]), rank


def rotated_sides(m, n, sides, max_dim=8192):
  """(left, right): the smaller side (tie: rows) or both; none > max_dim."""
  if sides == 'one':
    return (m <= n and m <= max_dim), (n < m and n <= max_dim)
  return m <= max_dim, n <= max_dim


def ema_gram_rotation(grads, *, sides, every, decay=0.95, max_dim=8192,
                      carry='keep', inner=adam_step, inner_kwargs=None,
                      moment_key='m'):
  """§3 with EMA-Gram bases, on a list (steps) of lists (matrices) of float64
  (m, n) arrays; returns the directions D per step and matrix.

  Every step: L ← β L + (1 − β) G Gᵀ (rotated left side), R ← β R +
  (1 − β) Gᵀ G (rotated right side), from L = R = 0. At t = 1 and whenever
  (t − 1) mod every = 0: P, Q ← canonical eigenbases of L, R (identity on an
  unrotated side), optionally rotating the first moment into them; G̃ =
  Pᵀ G Q; where the previous L and R were zero (or β = 0) the refresh keeps
  only the diagonal of a two-sided G̃ and zeroes its rows (columns) beyond
  the rank of L (R); D = P inner(G̃) Qᵀ.
  """
  inner_kwargs = inner_kwargs or {}
  mats = []
  for g in grads[0]:
    m, n = g.shape
    mats.append({'L': np.zeros((m, m)), 'R': np.zeros((n, n)),
                 'P': np.eye(m), 'Q': np.eye(n), 'inner': {}})
  out = []
  for t, step_grads in enumerate(grads, start=1):
    step_out = []
    for g, st in zip(step_grads, mats):
      m, n = g.shape
      left, right = rotated_sides(m, n, sides, max_dim)
      single = decay == 0 or (
          (not left or not st['L'].any()) and (not right or not st['R'].any()))
      if left:
        st['L'] = decay * st['L'] + (1 - decay) * g @ g.T
      if right:
        st['R'] = decay * st['R'] + (1 - decay) * g.T @ g
      refresh = (t - 1) % every == 0
      rank_p, rank_q = m, n
      if refresh:
        new_p, new_q = np.eye(m), np.eye(n)
        if left:
          new_p, rank_p = gram_eigenbasis(st['L'], m, n)
        if right:
          new_q, rank_q = gram_eigenbasis(st['R'], m, n)
        if carry == 'rotate' and moment_key in st['inner']:
          mom = st['P'] @ st['inner'][moment_key] @ st['Q'].T
          st['inner'][moment_key] = new_p.T @ mom @ new_q
        st['P'], st['Q'] = new_p, new_q
      p, q = st['P'], st['Q']
      gt = p.T @ g @ q
      if refresh and single:
        if left and right:
          k = min(m, n)
          diag = np.zeros_like(gt)
          diag[np.arange(k), np.arange(k)] = gt[np.arange(k), np.arange(k)]
          gt = diag
        gt[rank_p:, :] = 0.0
        gt[:, rank_q:] = 0.0
      dt, st['inner'] = inner(gt, st['inner'], t, **inner_kwargs)
      step_out.append(p @ dt @ q.T)
    out.append(step_out)
  return out
