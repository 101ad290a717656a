"""Config files and command-line overrides (flax-examples style).

A config file is a Python file with ``get_config()`` returning an
``ml_collections.ConfigDict`` (``configs/*.py``). On the command line::

    scripts/train.py --config=configs/demo_shakespeare.py --workdir=DIR \\
        --config.optimizer=hfac --config.learning_rate=3e-3 \\
        --config.model.num_layers=4 --config.optimizer_kwargs.b1=0.95

Every ``--config.a.b=value`` must name an existing field (a typo fails with
the closest names); the value is parsed to the field's type (int, float,
bool, str, tuple, None). Sections listed in ``OPEN_SECTIONS`` (the optimizer's
keyword arguments, the model's fields) accept new keys; their values are
parsed as Python literals, else kept as strings, and checked by the code that
uses them (the optimizer's signature, the model's config dataclass).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

OPEN_SECTIONS = ('optimizer_kwargs', 'model')


class ConfigError(ValueError):
  """A bad config file, override or value."""


def load_config(path: str):
  """Runs ``get_config()`` of a config file (``path`` or ``path:arg``)."""
  arg = None
  if ':' in os.path.basename(path):
    path, arg = path.rsplit(':', 1)
  if not os.path.exists(path):
    raise ConfigError(f'Config file not found: {path}')
  spec = importlib.util.spec_from_file_location(
      'config_' + os.path.basename(path).replace('.', '_'), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config().')
  config = module.get_config() if arg is None else module.get_config(arg)
  return config


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(key: str, text: str, current: Any) -> Any:
  """Parses ``text`` to the type of the field's current value."""
  def fail(kind):
    raise ConfigError(f'--config.{key}={text!r}: expected {kind} (the '
                      f'current value is {current!r}).')
  if text in ('None', 'none', 'null'):
    return None
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    fail('a bool')
  if isinstance(current, int):
    try:
      value = float(text)
    except ValueError:
      fail('an int')
    if value != int(value):
      fail('an int')
    return int(value)
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      fail('a float')
  if isinstance(current, (tuple, list)):
    value = _literal(text)
    if isinstance(value, (tuple, list)):
      return tuple(value)
    if isinstance(value, str):
      items = [t.strip() for t in value.split(',') if t.strip()]
      return tuple(_literal(t) for t in items)
    return (value,)
  if isinstance(current, str):
    return text
  return _literal(text)


def _field_names(config, prefix=''):
  out = []
  for k in config.keys():
    v = config[k]
    out.append(prefix + k)
    if hasattr(v, 'keys') and not isinstance(v, str):
      out += _field_names(v, prefix + k + '.')
  return out


def apply_override(config, key: str, text: str) -> None:
  """Sets ``config.<key>`` from the command-line string ``text``."""
  parts = key.split('.')
  node = config
  for i, part in enumerate(parts):
    is_last = i == len(parts) - 1
    open_section = any(p in OPEN_SECTIONS for p in parts[:i])
    if part not in node:
      if open_section and is_last:
        _set(node, part, _literal(text))
        return
      names = _field_names(config)
      close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
      hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close \
          else ''
      raise ConfigError(
          f'Unknown config field {"config." + key!r}.{hint} Known fields: '
          f'{", ".join(sorted(names))}.')
    if is_last:
      current = node[part]
      if hasattr(current, 'keys') and not isinstance(current, str):
        value = _literal(text)
        if not isinstance(value, dict):
          raise ConfigError(f'--config.{key} is a section; set its fields '
                            f'(--config.{key}.<field>=...) or pass a dict.')
        for k, v in value.items():
          apply_override(config, f'{key}.{k}', repr(v) if not isinstance(
              v, str) else v)
        return
      _set(node, part, parse_value(key, text, current))
      return
    node = node[part]


def _set(node, key, value):
  unlocked = getattr(node, 'unlocked', None)
  if unlocked is not None:
    with node.unlocked():
      node[key] = value
  else:
    node[key] = value


def split_argv(argv: Sequence[str]):
  """Splits ``--config.x=v`` overrides from the other ``--flag=v`` options."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith('--config.'):
      if '=' not in arg:
        raise ConfigError(f'{arg}: write --config.<field>=<value>.')
      key, value = arg[len('--config.'):].split('=', 1)
      overrides.append((key, value))
    else:
      rest.append(arg)
  return overrides, rest


def config_from_argv(path: str, overrides) -> Any:
  config = load_config(path)
  for key, value in overrides:
    apply_override(config, key, value)
  return config
