"""Pieces shared by the model configs."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def config_from_size(cls, model: str, sizes: Mapping[str, Sequence[Any]],
                     size_fields: Sequence[str], size: str,
                     overrides: Mapping[str, Any]):
  """``cls`` with the fields of row ``size`` of a size table and ``overrides``.

  Args:
    cls: the config dataclass.
    model: the model's name, for the error message.
    sizes: ``{size name: row}``; a row gives the values of ``size_fields``.
    size_fields: the config fields a row gives, in the row's order.
    size: a key of ``sizes``.
    overrides: config fields that replace the row's (or set others).
  """
  if size not in sizes:
    raise ValueError(f'Unknown {model} size {size!r}; known: {sorted(sizes)}.')
  return cls(**{**dict(zip(size_fields, sizes[size])), **overrides})
