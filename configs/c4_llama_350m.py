"""LLaMA-350M on C4 (60K steps); the recipe of configs/c4_llama_60m.py.

Published validation perplexity (docs/algorithms.md §6): Adam 18.79,
AdaDiag 16.91.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'c4_llama_60m', os.path.join(os.path.dirname(__file__), 'c4_llama_60m.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  config = _base.get_config(size='350m', steps=60_000)
  return config
