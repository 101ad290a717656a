"""Shared command-line handling of scripts/train.py and scripts/demo.py."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from optax_fac.experiments import config_lib
from optax_fac.experiments import models
from optax_fac.experiments import optimizers


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
  """Parses ``argv``: the parser's own flags + ``--config.<field>=`` overrides.

  Returns ``(args, config)``; exits with status 2 and a one-paragraph message
  on a bad config file, field, value or optimizer name.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    overrides, rest = config_lib.split_argv(argv)
    args = parser.parse_args(rest)
    config = config_lib.config_from_argv(args.config, overrides)
    check(config)
  except config_lib.ConfigError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  return args, config


def check(config) -> None:
  """Fails early (before loading data) on names that do not exist."""
  for key in ('optimizer', 'batch_size', 'learning_rate', 'model', 'data'):
    if key not in config:
      raise config_lib.ConfigError(f'The config has no {key!r} field.')
  try:
    optimizers.lookup(config.optimizer)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.optimizer: {e}') from None
  section = config.model.to_dict()
  if section.get('name') == 'llama':
    section.setdefault('vocab_size', 256)
  try:
    models.build_model(section)
  except (ValueError, TypeError) as e:
    raise config_lib.ConfigError(f'config.model: {e}') from None
