# make serve: set up .venv and start the server (MODEL=tiny by default)
# make test:  set up .venv, install redis-server/chromium when missing and allowed, run the suite on the CPU
#             in TEST_WORKERS pytest-xdist workers, a whole module each (TEST_WORKERS=0: one process)
# make bench: the speed-mode benchmark (BENCH_ARGS="--weights tiny" on a CPU; see benchmarks/README.md)
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_WORKERS ?= 2
# A CUDA machine takes the registry's torch; elsewhere the CPU build (seconds, not GBs).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: serve test bench lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,ray]"
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/octoflux serve --model "$(MODEL)" --host $(HOST) --port $(PORT)

test: $(VENV)/.installed
	sh scripts/system-deps.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
