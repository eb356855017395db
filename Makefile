# The two commands: `make run` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SPEC   ?= specs/quickstart.yaml
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-cluster test-hardening test-all lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tda run $(SPEC)

# the report's browser tests drive Debian's Chromium; installed here when missing and we are root with apt-get
CHROMIUM := $(VENV)/.chromium
$(CHROMIUM): | $(STAMP)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then touch $@; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  && touch $@ || echo "chromium: apt-get install failed; the report's browser tests will be skipped"; \
	else echo "chromium: not installed (apt-get install chromium chromium-driver as root); browser tests skipped"; fi

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest

# a real 2-node Ray cluster + MLflow server on 127.0.0.1 (deploy/local-cluster.sh), `tda submit --wait`
test-cluster: $(STAMP)
	$(PY) -m pytest -m cluster tests/cluster

# faults at every stage (SIGKILLed workers and drivers, a full disk) and the 1,000-subset soak
test-hardening: $(STAMP)
	$(PY) -m pytest -m hardening tests/hardening

test-all: $(STAMP)
	$(PY) -m pytest -m ''

# ruff (lint, format), the import-linter contracts over whole packages, mypy --strict on pipelines/
lint: $(STAMP)
	$(VENV)/bin/ruff check pipelines tda tests benchmarks examples
	$(VENV)/bin/ruff format --check pipelines tda tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/engine_overhead.py

docs: $(STAMP)
	$(VENV)/bin/tda docs docs/steps --installed
	$(VENV)/bin/tda schema --installed --out spec.schema.json

clean:
	rm -rf $(VENV) tda-store .pytest_cache
