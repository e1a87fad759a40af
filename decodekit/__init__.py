"""decodekit: speculative decoding that generates exactly what the model would, faster."""

from decodekit.engine import Chunk, Engine, Generation, GenerationStats
from decodekit.errors import (
    DecodekitError,
    DeviceUnavailable,
    InvalidParameter,
    ModelFileError,
    PromptTooLong,
    UnsupportedArchitecture,
)
from decodekit.runtime.loader import LoadedModel, load_model
from decodekit.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "DecodekitError",
    "DeviceUnavailable",
    "Engine",
    "Generation",
    "GenerationStats",
    "InvalidParameter",
    "LoadedModel",
    "ModelFileError",
    "PromptTooLong",
    "SamplingParams",
    "UnsupportedArchitecture",
    "load_model",
]
