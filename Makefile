# Quickstart: `make demo` (the main job on the committed fixture) and `make test` (the whole suite).
# Each creates .venv on first use; stamp files skip reinstalling when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_MODEL := fixtures/tiny-llama3
DEMO_OUT := demo-out
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: demo test lint fixtures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[onnx,llama,openvino]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[onnx,llama,openvino,oracle,dev]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/sovpack inspect $(DEMO_MODEL)
	$(BIN)/sovpack run $(DEMO_MODEL) --prompt "The capital of France is" --max-new-tokens 12

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed
	$(BIN)/ruff check sovpack converters targets fixtures tests benchmarks

fixtures: | $(BIN)/python
	rm -rf $(DEMO_MODEL)
	$(BIN)/python -m fixtures.generate --variant llama3 --out $(DEMO_MODEL)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
