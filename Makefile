# Entry points: `make demo` (a first run in minutes), `make repro` (set up + run the pipeline),
# `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STARTED := $(shell date +%s)

# The demo: every stage through DVC, MNIST only, presets/demo.yaml's small model and sweep.
# DVC reads the datasets matrix and the params of preprocess and evaluator from params.yaml
# itself, so those are set here rather than in the preset. Add your own `dvc exp run` options with
# DEMO_ARGS, e.g. make demo DEMO_ARGS="-S 'data.mirrors.mnist=[/data/mnist]'".
DEMO_SET := -S preset=demo -S 'data.datasets=[mnist]' -S data.train_images=10000 -S evaluator.epochs=2
DEMO_ARGS ?=
PARAMS_BACKUP := .ganpipe/params.before-demo.yaml

.PHONY: demo repro test setup clean-venv

$(BIN)/ganpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so the project's range installs nothing more.
	# Keep a torch you installed into .venv yourself (e.g. a CUDA build).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/ganpipe

# A DVC experiment (`dvc exp show` lists it); params.yaml is put back afterwards, so
# `make repro` stays the full pipeline. The outputs, plots and MLflow runs stay.
demo: setup
	@mkdir -p $(dir $(PARAMS_BACKUP)) && cp params.yaml $(PARAMS_BACKUP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run $(DEMO_SET) $(DEMO_ARGS); status=$$?; \
	cp $(PARAMS_BACKUP) params.yaml; \
	echo "make demo: $$(( $$(date +%s) - $(STARTED) )) s from the start of make, setup included (exit $$status)"; \
	if [ $$status -eq 0 ]; then echo "Look at plots/samples/mnist.png and sweep/results.csv; then" \
	  "'$(BIN)/dvc plots show' (loss and FID curves) and '$(BIN)/ganpipe ui' (the MLflow runs)."; fi; \
	exit $$status

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Two pytest-xdist workers, a module's tests on one of them (docs/testing.md); PYTEST_ARGS= runs one worker.
PYTEST_ARGS ?= -n 2 --dist loadgroup
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
