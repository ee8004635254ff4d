# Set-up on a fresh machine: `make demo` (install, then probe an example on the CPU under a
# memory limit) and `make test` (install, then run the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that these machines install from disk; pyproject.toml itself only asks
# for torch>=2.3, so a GPU machine keeps its own CUDA build (override with TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test gpu-check

$(BIN)/bsplan: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,hf,plot,lightning]"
	touch $@

install: $(BIN)/bsplan

demo: install
	$(BIN)/bsplan probe examples/cnn.py --device cpu --memory-limit 300MiB

test: install
	$(BIN)/python -m pytest -q

# Where a CUDA device is present (install with TORCH_SPEC=torch for a CUDA build): the CUDA tests, and
# each example probed on the GPU beside its trace, as a table for docs/validation.md.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py
