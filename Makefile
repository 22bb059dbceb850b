# densediff: `make demo` trains and evaluates the embedded default; `make test` runs the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= outputs/quickstart/demo-$(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_ARGS ?=   # extra train.py overrides, e.g. make demo DEMO_ARGS="trainer.max_steps=100"
PRIOR_DIR ?= outputs/prior/$(shell date +%Y-%m-%d_%H-%M-%S)
PRIOR_RECIPES ?= prior/e2e_depth,prior/marigold_depth,prior/dmp_normal,prior/geowizard,prior/diff2in1,prior/diffusionmtl,prior/lotus_depth,prior/lotus_depth_d
PRIOR_METRICS ?= abs_rel,delta1,angular_mean,angular_11_25,segmentation/miou,depth/abs_rel,normals/angular_mean,edges/ods_f
PRIOR_ARGS ?=  # extra train.py overrides for every job, e.g. PRIOR_ARGS="trainer.max_steps=100"

.PHONY: help install demo prior lint test test-all bench bench-gpu gpu-wheels gpu-check app clean-outputs check-recipes

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build lies on the project's machines; a plain `torch` may pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with densediff and its test tools

demo: $(STAMP)  ## E2E fine-tune the tiny backbone for depth on procedural scenes, then evaluate it
	$(PY) evaluate.py backbone=tiny dataset=procedural hydra.run.dir=$(RUN)/untrained
	$(PY) train.py experiment=quickstart hydra.run.dir=$(RUN) $(DEMO_ARGS)
	$(PY) evaluate.py ckpt=$(RUN)/checkpoints/last.ckpt dataset=procedural hydra.run.dir=$(RUN)/trained
	$(PY) -m densediff.compare $(RUN)/untrained $(RUN)/trained

prior: $(STAMP)  ## does the prior help? each recipe on backbone=tiny and tiny_random: one table, one plot
	$(PY) train.py -m experiment=$(PRIOR_RECIPES) backbone=tiny,tiny_random hydra.sweep.dir=$(PRIOR_DIR) $(PRIOR_ARGS)
	$(PY) -m densediff.compare --sweep $(PRIOR_DIR) --pivot backbone \
		--metrics $(PRIOR_METRICS) --table $(PRIOR_DIR)/comparison.md --plot $(PRIOR_DIR)/curves.png

lint: $(STAMP)  ## ruff, configured in pyproject.toml (diffusers' line length 119; pyflakes, pycodestyle errors, isort)
	$(PY) -m ruff check .

test: lint  ## lint, then the test suite (what CI runs): one worker per core, a test file per worker at a time
	$(PY) -m pytest -m "not slow" -q -n auto --dist loadfile

test-all: $(STAMP)  ## every test, including the slow demo-length training
	$(PY) -m pytest -q -n auto --dist loadfile

MUTANTS ?= 40  # generated mutants drawn per `make mutate` (MUTATE_SEED picks which)
MUTATE_SEED ?= 0
.PHONY: mutate
mutate: $(STAMP)  ## mutation testing (not in `test`): the named one-line bugs, then a sample of generated mutants
	$(PY) tools/mutate.py --named
	$(PY) tools/mutate.py --sample $(MUTANTS) --seed $(MUTATE_SEED)

bench: $(STAMP)  ## benchmarks, JSON in benchmarks/results/
	@mkdir -p benchmarks/results
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

check-recipes: $(STAMP)  ## every recipe 2 steps at SD size, random weights (CHECK_ARGS="--recipes ... | --tiny"): benchmarks/README.md
	nice -n 10 $(PY) benchmarks/check_recipes.py $(CHECK_ARGS)

bench-gpu: $(STAMP)  ## CUDA only: SD-sized latency fp16/bf16 (+compile, xformers) vs diffusers, E2E-FT train step
	@mkdir -p benchmarks/results
	$(PY) benchmarks/gpu_suite.py --out benchmarks/results/gpu.json

gpu-wheels: $(STAMP)  ## the wheels the lent GPU machine lacks, into .whl/ (benchmarks/README.md, "The GPU check")
	benchmarks/gpu_wheels.sh

gpu-check:  ## on the GPU machine (no .venv there): every CUDA path in one run (GPU_CHECK_ARGS="--out DIR ...")
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

app: $(STAMP)  ## the Gradio demo, densediff-app (APP_ARGS="ckpt=<run>/checkpoints/last.ckpt"; default backbone=tiny)
	$(VENV)/bin/densediff-app $(or $(APP_ARGS),backbone=tiny)

clean-outputs:  ## remove outputs/ (runs, checkpoints)
	rm -rf outputs multirun
