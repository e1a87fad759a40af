"""Decoding strategies by name: rules that change what is generated, by design (diverse, less repetitive, more
factual or better aligned text), apart from the lossless methods. Specs are ``name:key=value,...`` as a
method's are, with options declared and bounded the same way (decodekit.drafters.options)."""

from __future__ import annotations

from decodekit.drafters.options import OPERATOR, MethodPolicy, Option, options_of, parse_spec
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.base import Strategy
from decodekit.strategies.cleangen import CleanGen
from decodekit.strategies.contrastive_search import ContrastiveSearch
from decodekit.strategies.diverse_beam import DiverseBeamSearch
from decodekit.strategies.layer_contrast import LayerContrast
from decodekit.strategies.momentum import MomentumDecoding
from decodekit.strategies.superposed import SuperposedDecoding
from decodekit.strategies.transfer_qstar import TransferQStar
from decodekit.strategies.uscd import UncertaintySelectiveContrast

STRATEGIES: dict[str, type[Strategy]] = {
    "momentum": MomentumDecoding,
    "contrastive_search": ContrastiveSearch,
    "diverse_beam": DiverseBeamSearch,
    "superposed": SuperposedDecoding,
    "layer_contrast": LayerContrast,
    "uscd": UncertaintySelectiveContrast,
    "cleangen": CleanGen,
    "transfer_qstar": TransferQStar,
}

__all__ = ["STRATEGIES", "Strategy", "make_strategy", "parse_strategy", "strategy_options"]


def parse_strategy(spec: str, policy: MethodPolicy = OPERATOR) -> tuple[type[Strategy], dict[str, object]]:
    """``"momentum:alpha=0.5"`` -> (MomentumDecoding, {"alpha": 0.5}): a strategy ``policy`` allows (its
    ``methods`` name the strategies), every option checked under it."""
    allowed = {name: cls for name, cls in STRATEGIES.items() if policy.methods is None or name in policy.methods}
    return parse_spec(spec, allowed, "strategy", policy, example="momentum:alpha=0.5")


def strategy_options(name: str) -> dict[str, Option]:
    """The options of a registered strategy, by name."""
    return options_of(STRATEGIES[name])


def make_strategy(spec: str, model: LoadedModel, policy: MethodPolicy = OPERATOR) -> Strategy:
    """Build the strategy a spec names for ``model``, its options checked under ``policy``."""
    cls, kwargs = parse_strategy(spec, policy)
    return cls(model, **kwargs)
