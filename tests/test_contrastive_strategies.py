"""Contrastive strategies: layer_contrast (final layer against the fused lower layers, LOL/DoLa-style) and uscd
(the full prompt against a lame one, only where the full prompt is uncertain)."""

from __future__ import annotations

import math

import pytest
import torch

from decodekit import Engine, InvalidParameter
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.layer_contrast import LayerContrast, contrast_scores, default_exits
from decodekit.strategies.uscd import UncertaintySelectiveContrast, entropy, selective_choice

PROMPT = "The quick brown fox"
STEPS = 12
INF = float("inf")


def logs(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


@pytest.fixture(scope="module")
def engine(tiny_model: LoadedModel) -> Engine:
    return Engine(tiny_model, "ar")


@pytest.fixture(scope="module")
def greedy(engine: Engine) -> list[int]:
    return engine.generate(PROMPT, max_new_tokens=STEPS).token_ids


def run(engine: Engine, spec: str) -> list[int]:
    return engine.generate(PROMPT, max_new_tokens=STEPS, strategy=spec).token_ids


# layer_contrast


def test_contrast_scores_fuse_the_lower_layers_and_keep_only_plausible_tokens():
    final = logs(0.5, 0.3, 0.1, 0.06, 0.04)
    lower = torch.stack([logs(0.8, 0.05, 0.05, 0.05, 0.05), logs(0.2, 0.2, 0.2, 0.2, 0.2)])
    # fused log p_lower: mean of the two rows' logs = log sqrt(p1 * p2): [log 0.4, log 0.1, log 0.1, log 0.1, log 0.1]
    # alpha 0.1: plausible where p_final >= 0.05 (token 4, at 0.04, is not)
    scores = contrast_scores(final, lower, alpha=0.1, beta=1.0)
    expected = torch.tensor([math.log(0.5 / 0.4), math.log(3.0), 0.0, math.log(0.6), -INF])
    torch.testing.assert_close(scores, expected)
    assert int(scores.argmax()) == 1  # plain greedy would take token 0
    # alpha 0: every token plausible; beta 0.5: log p_final - 0.5 * fused
    half = contrast_scores(final, lower, alpha=0.0, beta=0.5)
    torch.testing.assert_close(half[4], torch.tensor(math.log(0.04) - 0.5 * math.log(0.1)))
    assert int(contrast_scores(final, lower, alpha=0.1, beta=0.0).argmax()) == 0  # beta 0: plain greedy


def test_default_exits_are_at_a_half_and_three_quarters_of_the_depth():
    assert default_exits(32) == [16, 24]
    assert default_exits(2) == [1]  # three quarters of 2 rounds to 2, the final layer: the last lower one instead
    assert default_exits(1) == [0]


@pytest.mark.parametrize("exits", ["", "0/1"])
def test_layer_contrast_with_beta_zero_is_greedy(engine, greedy, exits):
    assert run(engine, f"layer_contrast:beta=0,exits={exits}") == greedy


def test_layer_contrast_with_a_large_beta_changes_the_output(engine, greedy):
    assert run(engine, "layer_contrast:beta=2") != greedy


@pytest.mark.parametrize("exits", ["2", "0-2", "1/5"])
def test_layer_contrast_refuses_exits_past_the_model(engine, tiny_model, exits):
    with pytest.raises(InvalidParameter, match="layers 0 to 1"):
        LayerContrast(tiny_model, exits=exits)
    with pytest.raises(InvalidParameter, match="layers 0 to 1"):
        run(engine, f"layer_contrast:exits={exits}")


@pytest.mark.parametrize("spec", ["layer_contrast:exits=a", "layer_contrast:exits=0-9", "layer_contrast:beta=3"])
def test_layer_contrast_refuses_bad_options(engine, spec):
    with pytest.raises(InvalidParameter):
        run(engine, spec)  # 0-9 names more exits than a step may read


# uscd

FULL = logs(0.4, 0.3, 0.2, 0.06, 0.04)  # entropy 1.3472 nats
LAME = logs(0.6, 0.1, 0.1, 0.001, 0.199)


def test_entropy_in_nats():
    assert entropy(FULL).item() == pytest.approx(1.3471554, abs=1e-5)
    assert entropy(torch.tensor([0.0, -INF, -INF])).item() == 0.0  # one sure token; impossible ones add nothing


def test_selective_rule_passes_confident_steps_and_contrasts_uncertain_ones():
    # confident (entropy 1.347 < 1.5): the full prompt's greedy token, whatever the lame prompt says
    assert selective_choice(FULL, LAME, alpha=0.2, beta=1.0, threshold=1.5) == 0
    # uncertain (1.347 >= 1.0): plausible tokens 0, 1, 2 (p >= 0.2 * 0.4); scores log(0.4/0.6), log 3, log 2, so 1;
    # token 3 (log 60) would win were it plausible
    assert selective_choice(FULL, LAME, alpha=0.2, beta=1.0, threshold=1.0) == 1
    assert selective_choice(FULL, LAME, alpha=0.0, beta=1.0, threshold=1.0) == 3


def test_uscd_with_a_huge_threshold_is_greedy(engine, greedy):
    assert run(engine, "uscd:threshold=10,beta=2") == greedy


def test_uscd_contrasting_every_step_changes_the_output(engine, greedy):
    assert run(engine, "uscd:threshold=0,beta=0.5") != greedy


def test_uscd_with_the_whole_prompt_as_lame_prompt_is_greedy(engine, greedy):
    # tail past the prompt's length: the lame prompt is the prompt, so the score is (1 - beta) * log p_full
    assert 1 < len(engine.request(PROMPT, STEPS).prompt_ids) <= 64
    assert run(engine, "uscd:threshold=0,beta=0.5,tail=64") == greedy


@pytest.mark.parametrize(
    "options", [{"threshold": 11.0}, {"threshold": -1.0}, {"beta": 2.5}, {"alpha": 1.5}, {"tail": 65}, {"tail": 1.5}]
)
def test_uscd_refuses_bad_options(engine, tiny_model, options):
    with pytest.raises(InvalidParameter):
        UncertaintySelectiveContrast(tiny_model, **options)
    spec = ",".join(f"{key}={value}" for key, value in options.items())
    with pytest.raises(InvalidParameter):
        run(engine, f"uscd:{spec}")
