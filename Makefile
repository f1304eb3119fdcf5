# Quickstart: `make demo` (the main job on the committed fixture) and `make test` (the whole suite).
# Each creates .venv on first use; stamp files skip reinstalling when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_MODEL := fixtures/checkpoints/llama3
DEMO_OUT := demo-out
# The embedding part of the demo: the real all-MiniLM-L6-v2 (Apache-2.0), fetched from PyPI once and cached.
DEMO_TEXTS := --text "A man is eating food." --text "A man is eating pasta." --text "The new movie is awesome."
DEMO_ENCODER_TARGETS := onnx:fp32 gguf:f16 openvino:fp16
# A chat model with real weights: SmolLM2-135M-Instruct (Apache-2.0), dequantized from its PyPI GGUF once and cached.
DEMO_LLM_TARGETS := onnx:fp16 gguf:f16 openvino:fp16
DEMO_PROMPT := --prompt "The capital of France is" --max-new-tokens 3
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

# The main job: a signed three-target bundle from the committed fixture, verified, inspected and run; then the same
# for an embedding model with real weights (cosine similarities of three texts, identical on every runtime) and a
# chat model with real weights (" Paris." from the reference and from every runtime of the signed bundle).
demo: $(VENV)/.demo-installed
	$(BIN)/sovpack inspect $(DEMO_MODEL)
	$(BIN)/sovpack run $(DEMO_MODEL) --prompt "The capital of France is" --max-new-tokens 12
	test -f $(DEMO_OUT)/keys/private.pem || $(BIN)/sovpack keygen -o $(DEMO_OUT)/keys
	$(BIN)/sovpack build $(DEMO_MODEL) -o $(DEMO_OUT)/bundle --force --key $(DEMO_OUT)/keys/private.pem \
		-t onnx:fp16 -t gguf:q8_0 -t openvino:fp16 --license Apache-2.0
	$(BIN)/sovpack verify $(DEMO_OUT)/bundle --key $(DEMO_OUT)/keys/public.pem \
		--require-target onnx:fp16 --require-target gguf:q8_0 --require-target openvino:fp16
	$(BIN)/sovpack inspect $(DEMO_OUT)/bundle --key $(DEMO_OUT)/keys/public.pem
	$(BIN)/sovpack run $(DEMO_OUT)/bundle -t gguf:q8_0 --key $(DEMO_OUT)/keys/public.pem \
		--prompt "The capital of France is" --max-new-tokens 12
	@echo "--- embeddings: all-MiniLM-L6-v2 (real weights), reference, then signed bundle on three runtimes"
	$(BIN)/python -m fixtures.real_weights minilm > $(DEMO_OUT)/minilm.path
	$(BIN)/sovpack run "$$(cat $(DEMO_OUT)/minilm.path)" $(DEMO_TEXTS)
	$(BIN)/sovpack build "$$(cat $(DEMO_OUT)/minilm.path)" -o $(DEMO_OUT)/minilm --force \
		--key $(DEMO_OUT)/keys/private.pem $(addprefix -t ,$(DEMO_ENCODER_TARGETS)) --license Apache-2.0
	$(BIN)/sovpack verify $(DEMO_OUT)/minilm --key $(DEMO_OUT)/keys/public.pem \
		$(addprefix --require-target ,$(DEMO_ENCODER_TARGETS))
	$(BIN)/sovpack inspect $(DEMO_OUT)/minilm --key $(DEMO_OUT)/keys/public.pem
	for target in $(DEMO_ENCODER_TARGETS); do \
		$(BIN)/sovpack run $(DEMO_OUT)/minilm -t $$target --key $(DEMO_OUT)/keys/public.pem $(DEMO_TEXTS) || exit 1; \
	done
	@echo "--- a real answer: SmolLM2-135M-Instruct (real weights), reference, then signed bundle on three runtimes"
	$(BIN)/python -m fixtures.real_weights smollm2 > $(DEMO_OUT)/smollm2.path
	$(BIN)/sovpack run "$$(cat $(DEMO_OUT)/smollm2.path)" $(DEMO_PROMPT)
	$(BIN)/sovpack build "$$(cat $(DEMO_OUT)/smollm2.path)" -o $(DEMO_OUT)/smollm2 --force \
		--key $(DEMO_OUT)/keys/private.pem $(addprefix -t ,$(DEMO_LLM_TARGETS)) --license Apache-2.0
	$(BIN)/sovpack verify $(DEMO_OUT)/smollm2 --key $(DEMO_OUT)/keys/public.pem \
		$(addprefix --require-target ,$(DEMO_LLM_TARGETS))
	for target in $(DEMO_LLM_TARGETS); do \
		$(BIN)/sovpack run $(DEMO_OUT)/smollm2 -t $$target --key $(DEMO_OUT)/keys/public.pem $(DEMO_PROMPT) || exit 1; \
	done

# llama.cpp's own tokenizer test vectors (models/ggml-vocab-*.gguf + .inp/.out) ship in llama-cpp-python's
# source distribution on PyPI: the real-vocabulary tokenizer tests read them from here.
LLAMA_VOCAB := $(VENV)/llama-vocab
$(LLAMA_VOCAB)/.done: $(VENV)/.test-installed
	rm -rf $(LLAMA_VOCAB) && mkdir -p $(LLAMA_VOCAB)/sdist
	$(BIN)/pip download --quiet --no-binary :all: --no-deps -d $(LLAMA_VOCAB)/sdist \
		"llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
	tar -xzf $(LLAMA_VOCAB)/sdist/*.tar.gz -C $(LLAMA_VOCAB) --strip-components=4 --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
	rm -rf $(LLAMA_VOCAB)/sdist
	touch $@

test: $(VENV)/.test-installed $(LLAMA_VOCAB)/.done lint
	SOVPACK_LLAMA_CPP_MODELS=$(CURDIR)/$(LLAMA_VOCAB) $(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed
	$(BIN)/ruff check sovpack converters targets fixtures tests benchmarks
	$(BIN)/mypy sovpack converters targets fixtures

# Regenerate the committed demo checkpoint (deterministic: the bytes do not change).
fixtures: | $(BIN)/python
	rm -rf $(DEMO_MODEL)
	$(BIN)/python -m fixtures.generate $(dir $(DEMO_MODEL)) --variant llama3

clean:
	rm -rf $(VENV) $(DEMO_OUT)
