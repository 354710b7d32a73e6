# Both targets set themselves up on a fresh machine: a .venv with torch (CPU 2.13.0 unless a torch is
# already importable there) and this package in editable mode with its dev, dali and eval extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.repa-fast-installed

.PHONY: install test lint demo bench bench-gpu aot-triton36 clean

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

# The sm_90 ahead-of-time checks of every kernel (no GPU needed) under Triton 3.6, the version of CUDA torch 2.11
# wheels and of the lent H200, installed beside the venv's own Triton (pip here picks the newest).
TRITON36 := $(VENV)/triton-3.6.0
$(TRITON36)/triton/__init__.py: | $(STAMP)
	$(PY) -m pip install --no-deps --target $(TRITON36) triton==3.6.0

aot-triton36: $(TRITON36)/triton/__init__.py
	PYTHONPATH=$(TRITON36) $(PY) -c "import triton; assert triton.__version__ == '3.6.0', triton.__file__"
	PYTHONPATH=$(TRITON36) $(PY) -m pytest -q tests/test_aot.py tests/test_kernel_align_head.py \
		tests/test_kernel_align_branch.py tests/test_kernel_align_loss.py tests/test_kernel_token_gram.py -k "aot or h200"

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_report.py --out benchmarks/results/gpu_$(shell date +%F)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache demo_out
