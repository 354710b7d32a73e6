# Both targets set themselves up on a fresh machine: a .venv with torch (CPU 2.13.0 unless a torch is
# already importable there) and this package in editable mode with its dev, dali and eval extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.repa-fast-installed

.PHONY: install test lint demo bench bench-gpu clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,dali,eval]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
	$(PY) -m pytest benchmarks --benchmark-disable -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m repa_fast.demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_report.py --out benchmarks/results/gpu_$(shell date +%F)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache demo_out
