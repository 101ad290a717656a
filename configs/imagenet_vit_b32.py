"""ViT-B/32 on ImageNet-1k; the recipe of configs/imagenet_vit_s16.py.

Published top-1 (docs/algorithms.md §6): AdamW 72.20, AdaDiag 73.39,
Hfac 71.87.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'imagenet_vit_s16',
    os.path.join(os.path.dirname(__file__), 'imagenet_vit_s16.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  return _base.get_config(size='b32')
