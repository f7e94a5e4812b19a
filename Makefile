# Targets a newcomer can guess: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# On a machine without an NVIDIA driver, install the CPU build of torch first and pinned, so that
# resolving `torch` for the other dependencies does not pull a multi-GB CUDA build. Elsewhere pip
# resolves the normal torch from pyproject.toml. Override with `make install TORCH_SPEC=...`.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),gpu)
TORCH_SPEC ?=
else
TORCH_SPEC ?= torch==2.13.0
endif

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-slow lint bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -m "not slow" -q

test-slow: install
	$(BIN)/pytest -m slow -q

bench: install
	$(BIN)/python benchmarks/bench_encoder.py
	$(BIN)/python benchmarks/bench_indexing.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_training.py --size tiny
	$(BIN)/python benchmarks/bench_training.py --size base --epochs 1 --pairs 40 --batch-size 8

demo: install
	@echo "make demo: the demo corpus, demo checkpoint and index are not built yet."
	@echo "It will train a small checkpoint on the shipped clip-art corpus in data/, build"
	@echo "indexes/demo and run 'search text \"a person walking\"'. Until then, see README.md."
	$(BIN)/retrieval version

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
