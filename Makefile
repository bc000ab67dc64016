# The two entry points of the README. Both set up the environment first (tools/setup_env.sh:
# .venv unless a virtual environment is active, torch, Detectron2, up2; idempotent).
SHELL := /bin/bash
# The recipes run the set-up first and use the interpreter it prints.
SETUP = bash tools/setup_env.sh
DATASETS_ROOT ?= datasets
SHAPES_DIR = $(DATASETS_ROOT)/shapes
DEMO_CONFIG ?= configs/shapes/up2_multitask_EffLite0_MiniLM.yaml
DEMO_OUTPUT ?= output/demo
DEMO_OPTS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast shapes

setup:
	@bash tools/setup_env.sh >/dev/null

# The main job: generate `shapes` and train + evaluate on it; prints where the results are.
# DEMO_OPTS adds config overrides, e.g. make demo DEMO_OPTS="SOLVER.MAX_ITER 20".
demo:
	@py="$$($(SETUP))" || exit $$?; set -e; \
	bash tools/demo.sh "$$py" "$(SHAPES_DIR)" "$(DEMO_CONFIG)" "$(DEMO_OUTPUT)" $(DEMO_OPTS)

# The whole test suite (about 4 minutes on 2 cores after set-up); `make test-fast` skips slow tests.
test:
	@py="$$($(SETUP))" || exit $$?; "$$py" -m pytest $(PYTEST_ARGS) -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite must never be empty" >&2; fi; \
	exit $$rc

test-fast:
	@$(MAKE) test PYTEST_ARGS='-m "not slow"'

shapes:
	@py="$$($(SETUP))" && "$$py" -m up2.data.shapes --out "$(SHAPES_DIR)" --seed 0
