"""Fails the docs build when a public name of optax_fac has no API page.

Every name in ``optax_fac.__all__`` must be documented as the Python object
``optax_fac.<name>`` on its own page (autosummary writes them under
``_autosummary/``). A missing one is a Sphinx warning of type
``api-coverage``, hence an error under ``sphinx-build -W``.
"""

import importlib

from sphinx.util import logging

logger = logging.getLogger(__name__)

PACKAGE = 'optax_fac'
PAGE_DIR = '_autosummary/'


def missing_pages(env, package=PACKAGE):
  """Names of ``package.__all__`` without an object on an API page."""
  objects = env.get_domain('py').objects
  names = importlib.import_module(package).__all__
  missing = []
  for name in names:
    entry = objects.get(f'{package}.{name}')
    if entry is None or not entry.docname.startswith(PAGE_DIR):
      missing.append(name)
  return missing


def check(app, env):
  missing = missing_pages(env)
  if missing:
    logger.warning('no API page for %s.%s (add them to docs/api.rst)',
                   PACKAGE, f', {PACKAGE}.'.join(missing),
                   type='api-coverage')


def setup(app):
  app.connect('env-check-consistency', check)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
