"""The documentation site: generated tables current, the build clean.

* docs/_generated/tables.md (the numbers of docs/guide.md) equals what
  scripts/docs_tables.py computes now, so the guide cannot go stale;
* with the ``docs`` extra installed, the site builds with warnings as errors
  (which includes the API-page coverage of ``optax_fac.__all__``, the
  extension docs/_ext/api_coverage.py) and every internal link and anchor of
  the built HTML resolves (scripts/check_docs_site.py, without its browser
  part: that one is ``make docs-check``).
"""

import collections
import importlib.util
import os
import subprocess
import sys

import pytest

import optax_fac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(relpath):
  name = os.path.splitext(os.path.basename(relpath))[0]
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


check_site = load(os.path.join('scripts', 'check_docs_site.py'))


@pytest.mark.slow
def test_generated_tables_are_current():
  pytest.importorskip('flax')
  pytest.importorskip('ml_collections')
  tables = load(os.path.join('scripts', 'docs_tables.py'))
  with open(tables.OUT, encoding='utf-8') as f:
    committed = f.read()
  # optax's own states (adamw, adafactor, muon) and flax's model trees are
  # in the tables: compare only with the library versions they were made with.
  versions = tables.library_versions()
  if versions not in committed.splitlines()[0]:
    pytest.skip(f'the tables were made with other library versions than '
                f'{versions}: {committed.splitlines()[0]}')
  assert committed == tables.render(), (
      'docs/_generated/tables.md is stale: run python scripts/docs_tables.py')


def test_guide_includes_every_generated_table():
  with open(os.path.join(ROOT, 'docs', '_generated', 'tables.md'),
            encoding='utf-8') as f:
    blocks = set(_markers(f.read(), 'begin'))
  with open(os.path.join(ROOT, 'docs', 'guide.md'), encoding='utf-8') as f:
    included = set(_markers(f.read(), 'begin'))
  assert blocks == included


def _markers(text, kind):
  prefix = f'<!-- {kind} '
  for line in text.splitlines():
    at = line.find(prefix)
    if at >= 0:
      yield line[at + len(prefix):].split(' -->')[0]


def test_link_checker_finds_broken_links_and_anchors(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'index.html').write_text(
      '<a href="sub/page.html#here">ok</a> <a href="sub/page.html#gone">x</a>'
      '<a href="missing.html">x</a> <a href="https://example.org/">out</a>'
      '<script src="https://example.org/x.js"></script>')
  (tmp_path / 'sub' / 'page.html').write_text(
      '<h1 id="here">h</h1><a href="../index.html">up</a><a href="#here">'
      'self</a>')
  problems, stats = check_site.check_links(str(tmp_path))
  assert stats == {'pages': 2, 'internal_links': 5, 'external_links': 2}
  assert len(problems) == 3, problems
  assert any('#gone' in p for p in problems)
  assert any('missing.html' in p for p in problems)
  assert any('x.js' in p and 'another host' in p for p in problems)


def test_api_coverage_names_the_missing_pages():
  api_coverage = load(os.path.join('docs', '_ext', 'api_coverage.py'))
  entry = collections.namedtuple('Entry', 'docname')
  objects = {f'optax_fac.{name}': entry(f'_autosummary/optax_fac.{name}')
             for name in optax_fac.__all__}
  del objects['optax_fac.hfac']
  objects['optax_fac.smmf'] = entry('api')  # documented, but not on a page

  class Env:

    def get_domain(self, name):
      assert name == 'py'
      return collections.namedtuple('Domain', 'objects')(objects)

  assert api_coverage.missing_pages(Env()) == ['hfac', 'smmf']


@pytest.mark.slow
def test_site_builds_without_warnings_and_links_resolve(tmp_path):
  pytest.importorskip(
      'sphinx', reason='the docs extra is not installed (make docs installs '
      "it: pip install -e '.[docs]')")
  for module in ('myst_parser', 'sphinx_book_theme'):
    pytest.importorskip(module, reason='the docs extra is not installed')
  out = tmp_path / 'html'
  build = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-b', 'html', '-W', '--keep-going',
       '-n', '-q', '-d', str(tmp_path / 'doctrees'),
       os.path.join(ROOT, 'docs'), str(out)],
      capture_output=True, text=True, timeout=300, check=False)
  assert build.returncode == 0, build.stdout + build.stderr
  assert not build.stderr.strip(), build.stderr  # no warning at all
  problems, stats = check_site.check_links(str(out))
  assert not problems, problems[:20]
  assert stats['internal_links'] > 1000, stats
  assert check_site.check_api_pages(str(out)) == []
  # The pages in headless Chromium (math typeset, tables, no script error,
  # nothing fetched from another host), where the machine has it (.ci/run
  # installs Debian's chromium when it can).
  chromium = check_site.CHROMIUM
  if not chromium or not os.path.exists(chromium):
    pytest.skip('built and checked; no chromium for the browser part '
                '(apt-get install -y chromium)')
  pytest.importorskip('playwright', reason='the docs extra is not installed')
  (tmp_path / 'shots').mkdir()
  results = check_site.browse(str(out), str(tmp_path / 'shots'),
                              chromium=chromium)
  failing = {page: r['problems'] for page, r in results.items()
             if r['problems']}
  assert not failing, failing
  assert len(results) == len(check_site.PAGES), results
