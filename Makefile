# The two commands in README.md: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# No Hub access is needed or attempted: everything runs on tiny models built locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (pip's default Linux wheel is a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[dev,llamaindex]"
	touch $@

demo: install
	$(VENV)/bin/mmrag demo

# The slow tests (the 20k-record recall test, the SIGKILL trials) stay out of the local run;
# CI runs them too (.ci/run sets MMRAG_SLOW=1).
MARKERS := $(if $(MMRAG_SLOW),not gpu,not gpu and not slow)

test: install
	$(PY) -m pytest -q -m "$(MARKERS)"

bench: install
	$(PY) benchmarks/ingest.py

clean:
	rm -rf demo-out .pytest_cache
