"""Checks the built documentation site (``make docs-check`` runs it).

Two kinds of checks on the HTML that ``make docs`` wrote (docs/_build/html):

* static, over the files (plain Python): every internal ``href``/``src`` of
  every page points to a file that exists and, with a ``#fragment``, to an
  ``id`` on that page; no page loads anything from another host (scripts,
  styles, images, fonts: the site must work offline); every name of
  ``optax_fac.__all__`` has its API page with the object's anchor;
* in a browser: the site is served on 127.0.0.1 and a few pages are opened in
  headless Chromium (Debian's ``chromium`` on the PATH, driven by the
  ``playwright`` package of the ``docs`` extra; no browser is downloaded).
  Requests to any other host are blocked and reported. On each page: MathJax
  has typeset every formula (no ``\\(``, ``\\[`` or ``$`` left in the text, no
  MathJax error), the expected tables and images are there, no script error;
  a full-page screenshot goes to ``--out``.

    python scripts/check_docs_site.py --site=docs/_build/html \\
        --out=docs/_build/site_check

Chromium: ``apt-get install -y chromium chromium-driver`` (Debian). Exit
status 1 when a check fails; ``--out/report.json`` lists every result.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Debian's package installs it on the PATH as ``chromium``.
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu',
                  '--disable-quic', '--no-first-run',
                  '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']
# (page, what it must show): the landing page, an API page, the guide and
# the math-heavy algorithm reference.
PAGES = (
    ('index.html', dict(min_math=5, min_tables=1)),
    ('_autosummary/optax_fac.hfac.html', dict(anchor='optax_fac.hfac')),
    ('guide.html', dict(min_tables=6, min_images=1)),
    ('algorithms.html', dict(min_math=100, min_tables=1)),
)
# Attributes that load or link a resource.
LINK_ATTRS = {'a': 'href', 'link': 'href', 'script': 'src', 'img': 'src',
              'source': 'src', 'iframe': 'src'}


# --------------------------------------------------------------------------
# Static checks over the HTML files.


class _PageParser(html.parser.HTMLParser):
  """Collects the ids and the outgoing links of one page."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.ids = set()
    self.links = []  # (tag, attribute, url)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    for key in ('id', 'name'):
      if attrs.get(key) and (key == 'id' or tag == 'a'):
        self.ids.add(attrs[key])
    attr = LINK_ATTRS.get(tag)
    if attr and attrs.get(attr):
      self.links.append((tag, attr, attrs[attr]))


def html_files(site):
  """The pages of the site (the theme's template fragments in _static are
  not pages)."""
  for folder, dirs, files in os.walk(site):
    if folder == site:
      dirs[:] = [d for d in dirs if d != '_static']
    for name in files:
      if name.endswith('.html'):
        yield os.path.relpath(os.path.join(folder, name), site)


@functools.lru_cache(maxsize=None)
def _parse(path):
  parser = _PageParser()
  with open(path, encoding='utf-8') as f:
    parser.feed(f.read())
  return parser


def _is_external(url):
  parts = urllib.parse.urlsplit(url)
  return bool(parts.scheme or parts.netloc)


def check_links(site):
  """Broken internal links and external resources of the built site.

  Returns:
    ``(problems, stats)``: a list of readable problems (empty when all is
    well) and counts of pages, internal and external links checked.
  """
  site = os.path.abspath(site)
  problems, internal, external = [], 0, 0
  pages = sorted(html_files(site))
  for page in pages:
    parser = _parse(os.path.join(site, page))
    for tag, attr, url in parser.links:
      if url.startswith(('mailto:', 'javascript:', 'data:')):
        continue
      if _is_external(url):
        external += 1
        if tag != 'a':  # fetched when the page is shown
          problems.append(f'{page}: <{tag} {attr}="{url}"> loads from '
                          'another host (the site must work offline)')
        continue
      internal += 1
      problem = _check_internal(site, page, url)
      if problem:
        problems.append(f'{page}: {url}: {problem}')
  stats = {'pages': len(pages), 'internal_links': internal,
           'external_links': external}
  return problems, stats


def _check_internal(site, page, url):
  parts = urllib.parse.urlsplit(url)
  path = urllib.parse.unquote(parts.path)
  if path:
    target = posixpath.normpath(
        posixpath.join(posixpath.dirname(page), path))
  else:
    target = page
  full = os.path.join(site, target)
  if os.path.isdir(full):
    target, full = posixpath.join(target, 'index.html'), os.path.join(
        full, 'index.html')
  if target.startswith('..') or not os.path.isfile(full):
    return f'no file {target}'
  fragment = urllib.parse.unquote(parts.fragment)
  if fragment and target.endswith('.html'):
    if fragment not in _parse(full).ids:
      return f'no anchor #{fragment} in {target}'
  return None


def check_api_pages(site, names=None):
  """Names of ``optax_fac.__all__`` without a page and anchor in the site."""
  if names is None:
    sys.path.insert(0, ROOT)
    import optax_fac  # pylint: disable=import-outside-toplevel
    names = optax_fac.__all__
  missing = []
  for name in names:
    page = os.path.join(site, '_autosummary', f'optax_fac.{name}.html')
    if (not os.path.isfile(page)
        or f'optax_fac.{name}' not in _parse(page).ids):
      missing.append(name)
  return missing


# --------------------------------------------------------------------------
# Browser checks.


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


def serve(site):
  """Serves ``site`` on 127.0.0.1 (a free port); returns (server, base url)."""
  handler = functools.partial(_QuietHandler, directory=site)
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f'http://127.0.0.1:{server.server_address[1]}/'


# Runs in the page: what MathJax made of the formulas, the tables and images,
# and the visible text outside code, where no TeX delimiter may be left.
_PAGE_FACTS = """() => {
  const math = [...document.querySelectorAll('.math')];
  const clone = document.querySelector('main') || document.body;
  const text = [...clone.querySelectorAll('p, li, td, th, h1, h2, h3, dd, dt')]
      .filter(e => !e.closest('pre, code, mjx-container'))
      .map(e => {
        const c = e.cloneNode(true);
        c.querySelectorAll('mjx-container, code, pre').forEach(x => x.remove());
        return c.textContent;
      }).join('\\n');
  return {
    math: math.length,
    typeset: math.filter(e => e.querySelector('mjx-container')).length,
    mjx: document.querySelectorAll('mjx-container').length,
    merror: document.querySelectorAll('mjx-merror').length,
    tables: document.querySelectorAll('main table, article table').length,
    images: [...document.querySelectorAll('main img, article img')]
        .map(i => ({src: i.getAttribute('src'),
                    ok: i.complete && i.naturalWidth > 0})),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    text: text,
  };
}"""
_RAW_TEX = re.compile(r'\\\(|\\\[|\$\$|\$[^$\s][^$]*\$')


def _wait_for_mathjax(page):
  has_mathjax = page.evaluate('() => !!window.MathJax')
  if has_mathjax:
    page.wait_for_function(
        '() => window.MathJax && MathJax.startup && MathJax.startup.promise',
        timeout=30000)
    page.evaluate('() => MathJax.startup.promise')
  return has_mathjax


def check_page(page, url, expect):
  """Opens ``url``; returns (problems, facts)."""
  problems, errors = [], []
  page.on('pageerror', lambda e: errors.append(f'script error: {e}'))
  page.on('console', lambda m: errors.append(f'console {m.type}: {m.text}')
          if m.type == 'error' else None)
  response = page.goto(url, wait_until='load')
  if response is None or response.status != 200:
    problems.append(f'HTTP {response.status if response else "no response"}')
  has_mathjax = _wait_for_mathjax(page)
  facts = page.evaluate(_PAGE_FACTS)
  raw = _RAW_TEX.findall(facts.pop('text'))
  ids = set(facts.pop('ids'))
  facts['mathjax_loaded'] = has_mathjax
  if facts['math'] and not has_mathjax:
    problems.append('formulas on the page but MathJax did not load')
  if facts['typeset'] < facts['math']:
    problems.append(f'{facts["math"] - facts["typeset"]} of {facts["math"]} '
                    'formulas not typeset by MathJax')
  if facts['merror']:
    problems.append(f'{facts["merror"]} MathJax errors')
  if raw:
    problems.append(f'raw TeX left in the text: {raw[:5]}')
  if facts['math'] < expect.get('min_math', 0):
    problems.append(f'{facts["math"]} formulas, expected at least '
                    f'{expect["min_math"]}')
  if facts['tables'] < expect.get('min_tables', 0):
    problems.append(f'{facts["tables"]} tables, expected at least '
                    f'{expect["min_tables"]}')
  images = facts['images']
  broken = [i['src'] for i in images if not i['ok']]
  if broken:
    problems.append(f'images not shown: {broken}')
  if len(images) < expect.get('min_images', 0):
    problems.append(f'{len(images)} images, expected at least '
                    f'{expect["min_images"]}')
  if expect.get('anchor') and expect['anchor'] not in ids:
    problems.append(f'no element #{expect["anchor"]}')
  problems.extend(errors)
  return problems, facts


def browse(site, out, pages=PAGES, chromium=CHROMIUM):
  """Opens ``pages`` in headless Chromium; returns {page: result}."""
  # Imported here: the static checks (and tests/test_docs_site.py) run
  # without the browser's package.
  from playwright.sync_api import sync_playwright
  server, base = serve(site)
  results = {}
  blocked = []

  def route(r):
    host = urllib.parse.urlsplit(r.request.url).hostname
    if host == '127.0.0.1':
      r.continue_()
    else:
      blocked.append(r.request.url)
      r.abort()

  try:
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
      context = p.chromium.launch_persistent_context(
          profile, executable_path=chromium, headless=True,
          args=CHROMIUM_FLAGS, viewport={'width': 1280, 'height': 900})
      context.route('**/*', route)
      for name, expect in pages:
        page = context.new_page()
        problems, facts = check_page(page, base + name, expect)
        shot = os.path.join(out, name.replace('/', '_')[:-len('.html')]
                            + '.png')
        page.screenshot(path=shot, full_page=True)
        results[name] = {'problems': problems, 'facts': facts,
                         'screenshot': os.path.relpath(shot, out)}
        page.close()
      context.close()
  finally:
    server.shutdown()
  if blocked:
    results['(network)'] = {'problems': [
        f'requests to other hosts (blocked): {sorted(set(blocked))[:10]}']}
  return results


# --------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--site', default=os.path.join('docs', '_build', 'html'))
  parser.add_argument('--out', default=os.path.join('docs', '_build',
                                                    'site_check'))
  parser.add_argument('--chromium', default=CHROMIUM,
                      help='the Chromium binary (default: on the PATH)')
  parser.add_argument('--no_browser', action='store_true',
                      help='only the static link and API-page checks')
  args = parser.parse_args(argv)
  site = os.path.abspath(args.site)
  if not os.path.isfile(os.path.join(site, 'index.html')):
    print(f'no site in {args.site}: run make docs first', file=sys.stderr)
    return 1
  os.makedirs(args.out, exist_ok=True)
  report = {}
  problems, stats = check_links(site)
  report['links'] = {'problems': problems, 'stats': stats}
  missing = check_api_pages(site)
  report['api_pages'] = {'problems': [f'no API page for optax_fac.{n}'
                                      for n in missing]}
  if not args.no_browser:
    if not args.chromium or not os.path.exists(args.chromium):
      print('no chromium found: apt-get install -y chromium chromium-driver '
            '(or pass --chromium=PATH)', file=sys.stderr)
      return 1
    report.update(browse(site, args.out, chromium=args.chromium))
  with open(os.path.join(args.out, 'report.json'), 'w') as f:
    json.dump(report, f, indent=1)
  failed = 0
  for name, result in report.items():
    status = 'FAIL' if result['problems'] else 'ok'
    failed += bool(result['problems'])
    extra = result.get('stats') or result.get('facts') or ''
    print(f'{status:4} {name} {extra if extra else ""}')
    for problem in result['problems']:
      print(f'     - {problem}')
  print(f'site check: {len(report) - failed} ok, {failed} failing '
        f'(screenshots and report.json in {args.out})')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
