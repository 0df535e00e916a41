# `make train` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m train

test: $(STAMP)
	JAXBN_DATA=$${JAXBN_DATA:-$(abspath ../shared/data)} $(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .pytest_cache runs
