"""Drafters by method name, and the ``name:key=value,...`` spec syntax used by the CLI, bench and server."""

from __future__ import annotations

import inspect

from decodekit.drafters.aded import AdaptiveNgram
from decodekit.drafters.aggressive import AggressiveDecoding
from decodekit.drafters.base import Autoregressive, Draft, Drafter, StepOutcome, TargetInfo
from decodekit.drafters.copyspec import CopySpec
from decodekit.drafters.hybrid import Hybrid
from decodekit.drafters.lookahead import Lookahead
from decodekit.drafters.lookup import PromptLookup
from decodekit.drafters.recycling import TokenRecycling
from decodekit.drafters.sjd import SpeculativeJacobi
from decodekit.drafters.suffix import SuffixDrafter
from decodekit.errors import InvalidParameter

METHODS: dict[str, type] = {
    "ar": Autoregressive,
    "recycling": TokenRecycling,
    "lookup": PromptLookup,
    "copyspec": CopySpec,
    "aggressive": AggressiveDecoding,
    "suffix": SuffixDrafter,
    "aded": AdaptiveNgram,
    "lookahead": Lookahead,
    "hybrid": Hybrid,
    "sjd": SpeculativeJacobi,
}

__all__ = [
    "METHODS",
    "Draft",
    "Drafter",
    "StepOutcome",
    "TargetInfo",
    "make_drafter",
    "parse_method",
    "resolved_options",
]


def _convert(method: str, key: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
    elif isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            pass
    elif isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            pass
    else:
        return raw
    raise InvalidParameter(f"option {key} of method {method} expects a {type(default).__name__}, got {raw!r}")


def parse_method(spec: str) -> tuple[type, dict[str, object]]:
    """``"recycling:k=8,tree=16"`` -> (TokenRecycling, {"k": 8, "tree": "16"}), validating names and types."""
    name, _, options = spec.strip().partition(":")
    if name not in METHODS:
        raise InvalidParameter(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    cls = METHODS[name]
    params = {p.name: p.default for p in list(inspect.signature(cls.__init__).parameters.values())[2:]}
    kwargs: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in params:
            allowed = ", ".join(params) or "none"
            raise InvalidParameter(f"bad option {item!r} for method {name} (options: {allowed})")
        kwargs[key] = _convert(name, key, raw.strip(), params[key])
    return cls, kwargs


def resolved_options(spec: str) -> dict[str, object]:
    """Every option of a method spec, defaults filled in: what a benchmark records to be rerun exactly."""
    cls, kwargs = parse_method(spec)
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return {p.name: p.default for p in params} | kwargs


def make_drafter(spec: str, target: TargetInfo) -> Drafter:
    """Build the drafter a method spec names."""
    cls, kwargs = parse_method(spec)
    return cls(target, **kwargs)
