# `make train` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-oldest install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Each run gets its own output folder, so earlier runs are kept. Compiled
# programs are kept in .cache/xla: a second run skips most of its
# compilation (the CNN's first step: about 0.5 s instead of 2.5).
train: $(STAMP)
	$(PY) -m train --compile-cache .cache/xla --out runs/make-train-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	JAXBN_DATA=$${JAXBN_DATA:-$(abspath ../shared/data)} $(PY) -m pytest -n 2 -q

# The whole suite on the oldest versions pyproject.toml allows, in a venv of
# their own. Flax's ported tests are left out: they follow the Flax release
# they were ported from.
OLDEST := .venv-oldest
test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet -e '.[dev]' -c tests/oldest-versions.txt
	JAXBN_DATA=$${JAXBN_DATA:-$(abspath ../shared/data)} $(OLDEST)/bin/python -m pytest -n 2 -q \
	  --ignore=tests/flax_ported

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache runs .cache
