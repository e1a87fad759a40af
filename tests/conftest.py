"""Shared fixtures: tiny random checkpoints and the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_tiny_llama

from decodekit.runtime.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 (converted once into $DECODEKIT_CACHE or the user cache)."""
    try:
        return load_model(None, dtype="float32", cache_dir=os.environ.get("DECODEKIT_CACHE"))
    except Exception as err:  # the default model is an install step; say so instead of erroring every test
        pytest.fail(f"default model unavailable: {err}")


@pytest.fixture(scope="session")
def default_model_gguf(default_model: LoadedModel) -> LoadedModel:
    """The default model on its own GGUF weights (Q4_1 layers, a Q8_0 embedding), through the CPU kernels."""
    return load_model(default_model.source, dtype="gguf", cache_dir=os.environ.get("DECODEKIT_CACHE"))


@pytest.fixture(scope="session")
def default_model_bf16(default_model: LoadedModel) -> LoadedModel:
    """The default model's checkpoint in bfloat16."""
    return load_model(default_model.path, dtype="bfloat16")
