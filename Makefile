# Entry points, each installs what it needs first:
#   make demo      build a tiny checkpoint, embed, search and rerank a small corpus
#   make test      run the test suite
#   make mutation  run the mutation check (tests/mutation/check.py)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test mutation install clean

demo: $(STAMP)
	$(VENV)/bin/rematch-fast demo

test: $(STAMP)
	$(PY) -m pytest -q

# plants realistic one-line bugs in a copy of the package, one at a time: every one must fail a test
mutation: $(STAMP)
	$(PY) tests/mutation/check.py

install: $(STAMP)

# CPU-only machine: torch==2.13.0 (the CPU build), installed before anything can pull a CUDA build.
# CUDA machine: the venv sees the system's packages, so the user's torch is kept.
# the C++ extension is built by this install: a change to its sources installs again
$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
		else $(PY) -m pip install -q torch==2.13.0; fi; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info rematch_fast/_C*.so
