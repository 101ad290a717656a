"""Sphinx configuration of the optax_fac documentation site (``make docs``).

The site builds offline: MathJax comes from the ``sphinx-mathjax-offline``
package (copied into ``_static/mathjax``), the theme ships its own assets and
no inventory is fetched (no intersphinx), so references to jax and optax
types stay plain text (``nitpick_ignore_regex`` below). The local
extension ``_ext/api_coverage.py`` fails the build when a name of
``optax_fac.__all__`` has no API page.
"""

import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(DOCS, '..'))
sys.path.insert(0, os.path.join(DOCS, '_ext'))

import optax  # noqa: E402
from sphinx.util.typing import stringify_annotation  # noqa: E402

import optax_fac  # noqa: E402

project = 'optax_fac'
author = 'the optax_fac authors'
copyright = 'the optax_fac authors, Apache-2.0'  # noqa: A001
release = version = optax_fac.__version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx-mathjax-offline',
    'api_coverage',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
templates_path = ['_templates']
exclude_patterns = ['_build', '_generated', 'Thumbs.db', '.DS_Store']

# -- Markdown (MyST) ----------------------------------------------------------
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3
# docs/algorithms.md writes display math $$...$$ inside paragraphs too.
myst_dmath_double_inline = True

# -- API pages ----------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {'member-order': 'bysource'}
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [('References', 'notes_style')]

# Warnings are errors (-W) and every reference must resolve (-n), except the
# types of the libraries we build on: without network there is no inventory
# of jax, optax or numpy (``jax.typing.DTypeLike`` expands to numpy types)
# to link them to.
nitpicky = True
nitpick_ignore_regex = [(r'py:.*', r'(jax|optax|numpy)\..*')]
# Internal helpers that public docstrings and signatures mention: they are
# not in optax_fac.__all__, so they have no page to link to.
nitpick_ignore = [
    ('py:func', 'resolve_view'),
    ('py:func', 'merge_batch'),
    ('py:func', 'checked'),
    ('py:func', 'optax_fac.matrix.resolve_views'),
    ('py:func', 'optax_fac.matrix.square_shape'),
    ('py:func', 'optax_fac.smmf_kernel.smmf_group_step'),
    ('py:func', 'optax_fac.factored.row_col_statistics'),
    ('py:func', 'optax_fac._common.tree_f32'),
    ('py:mod', 'optax_fac.matrix'),
    ('py:class', 'optax_fac.stacking.Groups'),
    ('py:class', 'optax_fac.sharding.Walker'),
]

# -- HTML ---------------------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = f'optax_fac {version}'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_theme_options = {
    'show_toc_level': 2,
    'home_page_in_toc': True,
    'use_download_button': False,
    'use_fullscreen_button': False,
    'navigation_with_keys': False,
}
# pydata-sphinx-theme's light/dark switch logs an error without a default.
html_context = {'default_mode': 'light'}
html_last_updated_fmt = None
html_show_sourcelink = False


# -- Docstring hooks ----------------------------------------------------------
# The docstrings are also read as plain text (help()), where |M| is an
# absolute value and (*batch, m, n) a shape; reStructuredText would read them
# as a substitution and an emphasis. Those two forms are escaped here, outside
# inline literals and doctest lines; nothing else is changed.
_LITERAL = re.compile(r'(``.*?``|`[^`]*`)')
_ABS = re.compile(r'(?<![\\\w|])\|([^\s|`]+)\|(?![\w|])')
_STAR_ARGS = re.compile(r'(?<=\()\*(?=\w)')


def _escape_plain_text(line):
  if line.lstrip().startswith(('>>>', '...')):
    return line
  parts = _LITERAL.split(line)
  for i in range(0, len(parts), 2):
    parts[i] = _STAR_ARGS.sub(r'\*', _ABS.sub(r'\|\1\|', parts[i]))
  return ''.join(parts)


def _named_optimizers_doc():
  names = ', '.join(f':func:`{name}`' for name in optax_fac.NAMED_OPTIMIZERS)
  return ['The named optimizers by name (name -> factory), in the order of '
          'the algorithm reference (:doc:`/algorithms`): ' + names + '.', '',
          '``optax_fac.NAMED_OPTIMIZERS[name](learning_rate=...)`` builds one;'
          ' the benchmark and training scripts look optimizers up here.']


# Annotations the signatures show by their optax names instead of expanded
# (optax_fac's modules evaluate them: no ``from __future__ import
# annotations``, so ``autodoc_type_aliases`` cannot apply).
_TYPE_ALIASES = {'optax.ScalarOrSchedule': 'ScalarOrSchedule'}


def _alias_forms():
  forms = []
  for alias, attr in _TYPE_ALIASES.items():
    value = getattr(optax, attr)
    for mode in ('smart', 'fully-qualified-except-typing', 'fully-qualified'):
      forms.append((stringify_annotation(value, mode), alias))
  return forms


def process_signature(app, what, name, obj, options, signature,
                      return_annotation):
  for expanded, alias in _alias_forms():
    if signature:
      signature = signature.replace(expanded, alias)
  return signature, return_annotation


def process_docstring(app, what, name, obj, options, lines):
  if obj is optax_fac.NAMED_OPTIMIZERS:
    lines[:] = _named_optimizers_doc()
    return
  lines[:] = [_escape_plain_text(line) for line in lines]


def setup(app):
  app.connect('autodoc-process-docstring', process_docstring)
  app.connect('autodoc-process-signature', process_signature)
