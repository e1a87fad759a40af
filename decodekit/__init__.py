"""decodekit: speculative decoding that generates exactly what the model would, faster."""

from decodekit.engine import Chunk, Decoding, Engine, EngineFull, Generation, GenerationStats, Request
from decodekit.errors import (
    DecodekitError,
    DeviceUnavailable,
    InvalidParameter,
    ModelFileError,
    PromptTooLong,
    UnsupportedArchitecture,
)
from decodekit.runtime.loader import NAMED_MODELS, WEIGHT_CHOICES, LoadedModel, load_model
from decodekit.sampling import GREEDY, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "GREEDY",
    "NAMED_MODELS",
    "WEIGHT_CHOICES",
    "Chunk",
    "DecodekitError",
    "Decoding",
    "DeviceUnavailable",
    "Engine",
    "EngineFull",
    "Generation",
    "GenerationStats",
    "InvalidParameter",
    "LoadedModel",
    "ModelFileError",
    "PromptTooLong",
    "Request",
    "SamplingParams",
    "UnsupportedArchitecture",
    "load_model",
]
