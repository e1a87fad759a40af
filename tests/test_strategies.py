"""Decoding strategies' shared front door (engine, CLI, server) and the two that came first: momentum decoding and
contrastive search. Each strategy's own file has tests of its rule."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import httpx
import openai
import pytest
import torch
from test_server import client_for, serving

from decodekit import Engine, InvalidParameter, SamplingParams
from decodekit.bench import answers, distinct_n, repetition
from decodekit.cli import main
from decodekit.engine import describe_strategies, strategy_policy
from decodekit.server.app import create_app
from decodekit.strategies import STRATEGIES, make_strategy
from decodekit.strategies.contrastive_search import contrastive_scores
from decodekit.strategies.momentum import closes_circle, momentum_scores

PROMPT = "the quick brown fox"
LOOPING = "the fox"  # the tiny model's greedy answer to it repeats itself: the case the rules are for


def repeated_bigrams(tokens: list[int]) -> int:
    """Bigram occurrences beyond each bigram's first."""
    return sum(count - 1 for count in Counter(itertools.pairwise(tokens)).values())


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(tiny_model, "ar")


@pytest.fixture(scope="module")
def greedy(engine) -> list[int]:
    return engine.generate(LOOPING, max_new_tokens=40).token_ids


def test_closing_a_circle_and_the_growing_resistance():
    text = [1, 2, 3, 1, 2]
    assert closes_circle([3, 4, 2], text, n=2).tolist() == [True, False, False]  # (2, 3) is known, (2, 4) is not
    assert closes_circle([1, 9], text, n=1).tolist() == [True, False]
    probs = torch.tensor([0.5, 0.3, 0.2])
    closes = torch.tensor([True, False, False])
    assert torch.allclose(momentum_scores(probs, closes, alpha=0.1, depth=0), torch.tensor([0.4, 0.3, 0.2]))
    # deeper in a loop, the same re-entry costs more: the second candidate now wins
    assert int(momentum_scores(probs, closes, alpha=0.1, depth=2).argmax()) == 1


def test_contrastive_score_by_hand():
    probs = torch.tensor([0.6, 0.4])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    context = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # candidate 0 repeats the first context state exactly
    scores = contrastive_scores(probs, candidates, context, alpha=0.5)
    assert torch.allclose(scores, torch.tensor([0.5 * 0.6 - 0.5 * 1.0, 0.5 * 0.4 - 0.5 * 2**-0.5]))
    assert int(scores.argmax()) == 1


@pytest.mark.parametrize("spec", ["momentum:alpha=0", "contrastive_search:alpha=0"])
def test_rules_that_reduce_to_greedy_give_greedy_output(engine, greedy, spec):
    generation = engine.generate(LOOPING, max_new_tokens=40, strategy=spec)
    assert generation.token_ids == greedy
    assert generation.stats.strategy == spec and generation.stats.to_dict()["lossless"] is False


@pytest.mark.parametrize("spec", ["momentum:alpha=1", "contrastive_search:alpha=0.6"])
def test_strategies_repeat_less_than_greedy(engine, greedy, spec):
    assert repeated_bigrams(greedy) >= 3
    out = engine.generate(LOOPING, max_new_tokens=40, strategy=spec).token_ids
    assert len(out) == 40 and repeated_bigrams(out) < repeated_bigrams(greedy)


def test_momentum_with_full_resistance_never_reenters_while_it_has_a_way_out(engine):
    out = engine.generate(LOOPING, max_new_tokens=40, strategy="momentum:alpha=10,k=64").token_ids
    assert repeated_bigrams(out) == 0


def test_stop_strings_cut_a_strategy_output(engine):
    whole = engine.generate(PROMPT, max_new_tokens=30, strategy="momentum")
    stop = whole.text[len(whole.text) // 2 :][:3]
    cut = engine.generate(PROMPT, max_new_tokens=30, stop=stop, strategy="momentum")
    assert cut.text == whole.text[: whole.text.index(stop)] and cut.stats.finish_reason == "stop"
    assert cut.token_ids == whole.token_ids[: len(cut.token_ids)]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"strategy": "beam9"}, "unknown strategy 'beam9'"),
        ({"strategy": "momentum:k=0"}, "must be in [1, 64]"),
        ({"strategy": "momentum:alpha=x"}, "expects a number"),
        ({"strategy": "momentum", "method": "recycling"}, "no method beside it"),
        ({"strategy": "momentum", "sampling": SamplingParams(temperature=0.7)}, "takes no sampling"),
    ],
)
def test_bad_strategy_requests_are_refused(engine, kwargs, says):
    with pytest.raises(InvalidParameter, match=says.replace("[", r"\[")) as err:
        engine.request(PROMPT, **kwargs)
    assert err.value.param == "strategy"


def test_a_strategy_request_does_not_join_the_batch(engine):
    with pytest.raises(InvalidParameter, match=r"Engine\.run"):
        engine.submit(engine.request(PROMPT, strategy="momentum"))


def test_every_strategy_is_listed_with_its_paper():
    described = describe_strategies()
    assert set(described) == set(STRATEGIES)
    assert all(paper for paper, _ in described.values())


def test_a_strategy_is_built_once_per_engine(tiny_model):
    engine = Engine(tiny_model, "ar")
    first = engine.generate(PROMPT, max_new_tokens=5, strategy="momentum")
    built = engine._strategies["momentum"]
    assert engine.generate(PROMPT, max_new_tokens=5, strategy="momentum").token_ids == first.token_ids
    assert engine._strategies["momentum"] is built
    assert make_strategy("momentum:k=3", tiny_model).k == 3


def test_cli_generate_with_a_strategy(capsys, tiny_dir):
    args = ["generate", PROMPT, "--model", str(tiny_dir), "--max-new-tokens", "8", "--json", "--compare"]
    assert main([*args, "--strategy", "contrastive_search"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "contrastive_search" and out["stats"]["lossless"] is False
    assert "identical" not in out and len(out["token_ids"]) == 8
    assert main([*args[:-2], "--strategy", "momentum", "--method", "ar"]) == 1
    assert "no --method beside it" in capsys.readouterr().err
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "differs from plain decoding by design" in listing and "momentum  [Lan et al." in listing


def test_server_takes_strategies_only_where_allowed(tiny_model):
    with pytest.raises(InvalidParameter, match="allowed strategies"):
        strategy_policy(["beam9"])
    closed = create_app(tiny_model, "ar", max_tokens_cap=16)
    with serving(closed) as url:
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "strategy": "momentum"}
        response = httpx.post(f"{url}/v1/completions", json=body)
        assert response.status_code == 400 and "takes no strategies" in response.json()["error"]["message"]
    app = create_app(tiny_model, "ar", max_tokens_cap=16, allow_strategies=["momentum"])
    with serving(app) as url:
        client = client_for(url)
        reply = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"strategy": "momentum"}
        )
        expected = Engine(tiny_model, "ar").generate(PROMPT, max_new_tokens=8, chat=False, strategy="momentum")
        assert reply.choices[0].text == expected.text
        assert reply.model_extra["decodekit"] == {"strategy": "momentum", "lossless": False}
        for extra, says in [
            ({"strategy": "contrastive_search"}, "unknown strategy"),
            ({"strategy": "momentum:k=3"}, "not set its options"),
            ({"strategy": "momentum", "stream": True}, "cannot stream"),
            ({"strategy": "momentum", "n": 2}, "returns 1"),
        ]:
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
            response = httpx.post(f"{url}/v1/completions", json=body)
            assert response.status_code == 400 and says in response.json()["error"]["message"], extra
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["decodekit"]["strategies"] == ["momentum"]
        with pytest.raises(openai.BadRequestError, match="no sampling"):
            client.completions.create(model="t", prompt=PROMPT, max_tokens=4, extra_body={"strategy": "momentum"})


def test_output_measures_by_hand():
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)  # 5 4-grams, 4 distinct
    assert repetition([1, 2, 3]) == 0.0
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert answers("The answer is  Paris.", ("paris",)) and not answers("Lyon", ("Paris", "paris, France"))


def test_bench_measures_strategies_beside_methods(tiny_dir, tmp_path, capsys):
    args = ["bench", "--model", str(tiny_dir), "--output", str(tmp_path), "--peers", "--methods", "ar"]
    args += ["--strategies", "momentum:alpha=1", "--dataset", "short-answers", "--limit", "3", "--max-new-tokens", "8"]
    assert main(args) == 0
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["meta"]["strategies"] == ["momentum:alpha=1"]
    records = [r for r in data["records"] if r["runner"] == "momentum:alpha=1"]
    assert len(records) == 3 and all("correct" in r and "repetition" in r for r in records)
    overall = data["summary"]["momentum:alpha=1"]["overall"]
    assert 0 <= overall["correct"] <= 1 and overall["repetition"] >= 0
    assert (tmp_path / "outputs.png").read_bytes().startswith(b"\x89PNG")
    assert main([*args[:-2], "--strategies", "momentum", "--temperature", "0.5"]) == 1
    assert "takes no sampling" in capsys.readouterr().err
