"""Loss-curve plots of one or several runs' ``metrics.jsonl`` (matplotlib)."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

from optax_fac.experiments.train import read_metrics


def smooth(values, window: int):
  """Trailing moving average (window 1 = unchanged)."""
  values = np.asarray(values, np.float64)
  if window <= 1 or len(values) < 2:
    return values
  c = np.cumsum(np.insert(values, 0, 0.0))
  out = np.empty_like(values)
  for i in range(len(values)):
    lo = max(0, i + 1 - window)
    out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
  return out


def plot_runs(runs: Mapping[str, str], out: str, *, title: Optional[str] = None,
              window: int = 10, log_y: bool = False) -> str:
  """Plots training loss (smoothed) and eval loss of each run to ``out``.

  Args:
    runs: label -> a run directory (with metrics.jsonl) or a metrics file.
    out: the image path (.png / .pdf / .svg).
    title: figure title.
    window: moving-average window of the training loss.
    log_y: logarithmic loss axis.

  Returns:
    ``out``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  for i, (label, path) in enumerate(runs.items()):
    if os.path.isdir(path):
      path = os.path.join(path, 'metrics.jsonl')
    records = read_metrics(path)
    color = f'C{i % 10}'
    steps = [r['step'] for r in records if 'loss' in r]
    losses = [r['loss'] for r in records if 'loss' in r]
    ax_train.plot(steps, smooth(losses, window), color=color, label=label)
    ev = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
    if ev:
      ax_eval.plot(*zip(*ev), 'o-', color=color, label=label)
  ax_train.set_title(f'training loss (moving average of {window})'
                     if window > 1 else 'training loss')
  ax_eval.set_title('validation loss')
  for ax in (ax_train, ax_eval):
    ax.set_xlabel('step')
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
    if log_y:
      ax.set_yscale('log')
    if ax.lines:
      ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
