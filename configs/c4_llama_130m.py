"""LLaMA-130M on C4 (20K steps); the recipe of configs/c4_llama_60m.py.

Published validation perplexity (docs/algorithms.md §6): Adam 24.55,
AdaDiag 22.40.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'c4_llama_60m', os.path.join(os.path.dirname(__file__), 'c4_llama_60m.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  return _base.get_config(size='130m', steps=20_000)
