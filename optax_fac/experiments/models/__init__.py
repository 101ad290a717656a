"""Models for the reproductions: LLaMA, ResNet, ViT (Flax linen).

:func:`build_model` turns the ``config.model`` section of an experiment config
(``name``, ``size`` and any field of the model's config dataclass) into a
module and its config; the config's ``num_params()`` is what the tests check
the module's real parameter count against.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import jax.numpy as jnp

from optax_fac.experiments.models import llama
from optax_fac.experiments.models import resnet
from optax_fac.experiments.models import vit

_REGISTRY = {
    'llama': (llama.LlamaConfig, llama.Llama),
    'resnet': (resnet.ResNetConfig, resnet.ResNet),
    'vit': (vit.ViTConfig, vit.ViT),
}


def build_model(model_config: Mapping[str, Any]):
  """Returns ``(module, cfg)`` for a ``config.model`` section.

  Args:
    model_config: a mapping with ``name`` (llama | resnet | vit), optional
      ``size`` (a key of the model's ``SIZES`` table) and overrides of any
      field of the model's config dataclass; ``dtype`` may be a string.
  """
  model_config = dict(model_config)
  name = model_config.pop('name')
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; known: {sorted(_REGISTRY)}.')
  cfg_cls, module_cls = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cfg_cls)} | {'size'}
  unknown = sorted(set(model_config) - fields)
  if unknown:
    close = sorted({c for u in unknown
                    for c in difflib.get_close_matches(u, fields, n=2)})
    hint = f' Did you mean {close}?' if close else ''
    raise ValueError(f'Unknown field(s) {unknown} for model {name!r}.{hint} '
                     f'Known: {sorted(fields)}.')
  if isinstance(model_config.get('dtype'), str):
    model_config['dtype'] = jnp.dtype(model_config['dtype'])
  for key, value in model_config.items():
    if isinstance(value, list):
      model_config[key] = tuple(value)
  size = model_config.pop('size', None)
  cfg = (cfg_cls.from_size(size, **model_config) if size is not None
         else cfg_cls(**model_config))
  return module_cls(cfg), cfg


__all__ = ['build_model', 'llama', 'resnet', 'vit']
