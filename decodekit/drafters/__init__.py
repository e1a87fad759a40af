"""Drafters by method name, and the ``name:key=value,...`` spec syntax used by the CLI, bench and server."""

from __future__ import annotations

from decodekit.drafters.aded import AdaptiveNgram
from decodekit.drafters.aggressive import AggressiveDecoding
from decodekit.drafters.ar import Autoregressive
from decodekit.drafters.copyspec import CopySpec
from decodekit.drafters.draft import DraftModelDrafter
from decodekit.drafters.eagle import Eagle
from decodekit.drafters.hybrid import Hybrid
from decodekit.drafters.hydra import Hydra
from decodekit.drafters.kangaroo import Kangaroo
from decodekit.drafters.lookahead import Lookahead
from decodekit.drafters.lookup import PromptLookup
from decodekit.drafters.medusa import Medusa
from decodekit.drafters.options import CLIENT, OPERATOR, MethodPolicy, Option, options_of, parse_spec
from decodekit.drafters.pearl import Pearl
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
    "pearl": Pearl,
    "medusa": Medusa,
    "hydra": Hydra,
    "kangaroo": Kangaroo,
    "eagle": Eagle,
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
    allowed = {m: cls for m, cls in METHODS.items() if policy.methods is None or m in policy.methods}
    return parse_spec(spec, allowed, "method", policy, example="recycling:k=8")


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
