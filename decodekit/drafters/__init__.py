"""Drafters by method name, and the ``name:key=value,...`` spec syntax used by the CLI, bench and server."""

from __future__ import annotations

from decodekit.drafters.aded import AdaptiveNgram
from decodekit.drafters.aggressive import AggressiveDecoding
from decodekit.drafters.ar import Autoregressive
from decodekit.drafters.copyspec import CopySpec
from decodekit.drafters.draft import DraftModelDrafter
from decodekit.drafters.hybrid import Hybrid
from decodekit.drafters.hydra import Hydra
from decodekit.drafters.kangaroo import Kangaroo
from decodekit.drafters.lookahead import Lookahead
from decodekit.drafters.lookup import PromptLookup
from decodekit.drafters.medusa import Medusa
from decodekit.drafters.options import CLIENT, OPERATOR, MethodPolicy, Option, current_name, options_of
from decodekit.drafters.recycling import TokenRecycling
from decodekit.drafters.s2d import SortedDrafts
from decodekit.drafters.sjd import SpeculativeJacobi
from decodekit.drafters.suffix import SuffixDrafter
from decodekit.drafters.swift import LayerSkip
from decodekit.errors import InvalidParameter, clip
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo

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
    "draft": DraftModelDrafter,
    "swift": LayerSkip,
    "s2d": SortedDrafts,
    "medusa": Medusa,
    "hydra": Hydra,
    "kangaroo": Kangaroo,
}

__all__ = [
    "CLIENT",
    "METHODS",
    "OPERATOR",
    "Draft",
    "Drafter",
    "MethodPolicy",
    "StepOutcome",
    "TargetInfo",
    "client_policy",
    "make_drafter",
    "method_options",
    "parse_method",
    "resolved_options",
]


def parse_method(spec: str, policy: MethodPolicy = OPERATOR) -> tuple[type, dict[str, object]]:
    """``"recycling:k=8,tree=16"`` -> (TokenRecycling, {"k": 8, "tree": "16"}): the method allowed by ``policy``,
    every option it sets known, settable under ``policy``, of its type and within its declared bounds."""
    if not isinstance(spec, str):
        raise InvalidParameter(f"a method spec is a string such as 'recycling:k=8', got {type(spec).__name__}")
    name, _, options = spec.strip().partition(":")
    allowed = [m for m in METHODS if policy.methods is None or m in policy.methods]
    if name not in allowed:
        raise InvalidParameter(f"unknown method {clip(name)}; available: {', '.join(allowed)}")
    known = options_of(METHODS[name])
    kwargs: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        if not policy.options:
            raise InvalidParameter(f"this server lets requests name a method, not set its options ({clip(item)})")
        key, eq, raw = (part.strip() for part in item.partition("="))
        key = current_name(METHODS[name], key, f"method {name}")
        option = known.get(key)
        if not eq or option is None:
            raise InvalidParameter(f"bad option {clip(item)} for method {name} (options: {', '.join(known) or 'none'})")
        if not (policy.operator or option.client_settable):
            raise InvalidParameter(f"option {key} of method {name} can be set by the server's operator only")
        try:
            kwargs[key] = option.parse(raw)
        except ValueError as err:
            raise InvalidParameter(f"option {key} of method {name}: {clip(raw)} {err}") from None
    return METHODS[name], kwargs


def client_policy(methods: list[str] | None = None, options: bool = False) -> MethodPolicy:
    """What a server's clients may choose: a method among ``methods`` (None: every method), with its numeric,
    boolean and choice options only when ``options`` (never those that name files or other methods)."""
    if methods is not None:
        unknown = [name for name in methods if name not in METHODS]
        if unknown or not methods:
            given = clip(unknown or methods)
            raise InvalidParameter(f"the allowed methods must be some of {', '.join(METHODS)}; got {given}")
    return MethodPolicy(None if methods is None else frozenset(methods), options=options, operator=False)


def method_options(name: str) -> dict[str, Option]:
    """The options of a registered method, by name (their kinds, bounds and defaults)."""
    return options_of(METHODS[name])


def resolved_options(spec: str) -> dict[str, object]:
    """Every option of a method spec, defaults filled in: what a benchmark records to be rerun exactly."""
    cls, kwargs = parse_method(spec)
    return {name: option.default for name, option in options_of(cls).items()} | kwargs


def make_drafter(spec: str, target: TargetInfo, policy: MethodPolicy = OPERATOR) -> Drafter:
    """Build the drafter a method spec names, its options checked under ``policy``."""
    cls, kwargs = parse_method(spec, policy)
    return cls(target, **kwargs)
