"""Strategies guided by a second checkpoint: CleanGen (a reference model vetoes the target's suspicious tokens)
and Transfer Q* (an aligned model's continuations reweight the target's candidates)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_small_vocab_llama, write_tiny_llama

from decodekit.engine import Engine
from decodekit.errors import InvalidParameter
from decodekit.runtime.loader import LoadedModel, load_model
from decodekit.runtime.rows import Rows
from decodekit.strategies.cleangen import CleanGen, clean_window
from decodekit.strategies.transfer_qstar import TransferQStar, qstar_scores, until_eos

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model over the tiny model's tokenizer (a third layer): it ranks tokens otherwise."""
    return write_tiny_llama(tmp_path_factory.mktemp("other-llama"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def other_model(other_dir: Path) -> LoadedModel:
    return load_model(other_dir)


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_vocab_llama(tmp_path_factory.mktemp("small-vocab"))


def greedy(model: LoadedModel, max_new_tokens: int) -> list[int]:
    return Engine(model, "ar").generate(PROMPT, max_new_tokens=max_new_tokens).token_ids


def with_strategy(model: LoadedModel, spec: str, max_new_tokens: int) -> list[int]:
    generation = Engine(model, "ar").generate(PROMPT, max_new_tokens=max_new_tokens, strategy=spec)
    assert generation.stats.strategy == spec
    return generation.token_ids


def next_logits(model: LoadedModel, sequence: list[int]) -> torch.Tensor:
    """float ``[V]``: ``model``'s logits after ``sequence``, from one fresh forward over all of it."""
    return Rows(model.transformer, len(sequence) + 1).extend(torch.tensor([sequence]))[0]


def logits_from(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


# CleanGen


def test_clean_window_keeps_the_draft_up_to_its_first_suspicious_token() -> None:
    draft = torch.tensor([1, 2, 3])
    target = logits_from([[0.1, 0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.6, 0.1]])
    reference = logits_from([[0.45, 0.4, 0.05, 0.05, 0.05], [0.1, 0.1, 0.05, 0.05, 0.7], [0.2, 0.2, 0.2, 0.3, 0.1]])
    # ratios target / reference of the drafted tokens: 1.5, 10, 2
    assert clean_window(draft, target, reference, 20.0) == [1, 2, 3]
    assert clean_window(draft, target, reference, 5.0) == [1, 4]  # token 2 replaced by the reference's choice
    assert clean_window(draft, target, reference, 1.8) == [1, 4]  # the first suspicious one ends the window
    assert clean_window(draft, target, reference, 1.2) == [0]
    assert clean_window(draft[2:], target[2:], reference[2:], 1.8) == [3]  # that of the last token, by its reference


def test_cleangen_with_the_target_as_reference_is_greedy(tiny_model: LoadedModel) -> None:
    expected = greedy(tiny_model, 24)
    for window in (1, 4):
        assert with_strategy(tiny_model, f"cleangen:reference={tiny_model.path},window={window}", 24) == expected


def test_cleangen_replaces_the_tokens_the_reference_finds_less_likely(
    tiny_model: LoadedModel, other_dir: Path, other_model: LoadedModel
) -> None:
    prompt = tiny_model.tokenizer.encode(PROMPT)
    for ratio in (1.0, 3.0):
        expected: list[int] = []  # the rule token by token, each step a fresh forward of both models
        for _ in range(13):
            target = next_logits(tiny_model, prompt + expected).softmax(-1)
            reference = next_logits(other_model, prompt + expected).softmax(-1)
            token = int(target.argmax())
            expected.append(int(reference.argmax()) if target[token] > ratio * reference[token] else token)
        for window in (1, 4, 8):
            strategy = CleanGen(tiny_model, reference=str(other_dir), ratio=ratio, window=window)
            assert strategy.decode(prompt, 13) == [expected], (ratio, window)
    assert with_strategy(tiny_model, f"cleangen:reference={other_dir},ratio=1", 24) != greedy(tiny_model, 24)


def test_cleangen_refuses_a_missing_or_foreign_reference(tiny_model: LoadedModel, small_vocab_dir: Path) -> None:
    with pytest.raises(InvalidParameter, match="reference=PATH"):
        CleanGen(tiny_model)
    with pytest.raises(InvalidParameter, match="vocabulary differs"):
        CleanGen(tiny_model, reference=str(small_vocab_dir))
    with pytest.raises(InvalidParameter, match="option reference"):
        CleanGen(tiny_model, reference=str(small_vocab_dir / "nowhere"))
    with pytest.raises(InvalidParameter, match="ratio"):
        CleanGen(tiny_model, reference=str(tiny_model.path), ratio=0.5)


# Transfer Q*


def test_qstar_scores_add_the_weighted_implicit_reward_of_each_path() -> None:
    target = torch.tensor([-0.5, -1.0, -2.0])
    aligned = torch.tensor([[-1.0, -1.0], [-0.5, -0.2], [-0.1, -0.1]])
    reference = torch.tensor([[-1.0, -2.0], [-1.0, -1.0], [-3.0, -5.0]])
    counted = torch.tensor([[True, True], [True, True], [True, False]])
    # rewards beta * sum of counted log-ratios: 2 * (0 + 1), 2 * (0.5 + 0.8), 2 * 2.9
    scores = qstar_scores(target, aligned, reference, counted, alpha=0.5, beta=2.0)
    assert torch.allclose(scores, torch.tensor([0.5, 0.3, 0.9]))
    assert torch.equal(qstar_scores(target, aligned, reference, counted, alpha=0.0, beta=2.0), target)


def test_until_eos_counts_each_path_through_its_first_eos() -> None:
    paths = torch.tensor([[5, 0, 7], [0, 5, 0], [5, 5, 5]])
    expected = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    assert torch.equal(until_eos(paths, frozenset({0, 9})), expected)
    assert bool(until_eos(paths, frozenset()).all())


def test_transfer_qstar_without_a_reward_is_greedy(tiny_model: LoadedModel, other_dir: Path) -> None:
    expected = greedy(tiny_model, 24)
    assert with_strategy(tiny_model, f"transfer_qstar:aligned={other_dir},weight=0", 24) == expected
    # an aligned model that is its own reference earns no reward, whatever its weight
    spec = f"transfer_qstar:aligned={other_dir},reference={other_dir},weight=10,beta=10"
    assert with_strategy(tiny_model, spec, 24) == expected
    assert with_strategy(tiny_model, f"transfer_qstar:aligned={tiny_model.path},weight=10", 24) == expected


def test_transfer_qstar_follows_the_aligned_models_continuations(
    tiny_model: LoadedModel, other_dir: Path, other_model: LoadedModel
) -> None:
    prompt = tiny_model.tokenizer.encode(PROMPT)
    k, horizon, weight, beta = 3, 2, 0.7, 1.5
    expected: list[int] = []  # the rule step by step, every probability from a fresh forward over the whole text
    for _ in range(6):
        logprobs, candidates = next_logits(tiny_model, prompt + expected).log_softmax(-1).topk(k)
        scores = []
        for logprob, candidate in zip(logprobs.tolist(), candidates.tolist(), strict=True):
            path = [candidate]
            while len(path) <= horizon:
                path.append(int(next_logits(other_model, prompt + expected + path).argmax()))
            reward = 0.0
            for i, token in enumerate(path):
                context = prompt + expected + path[:i]
                aligned = next_logits(other_model, context).log_softmax(-1)[token]
                reference = next_logits(tiny_model, context).log_softmax(-1)[token]
                reward += beta * float(aligned - reference)
            scores.append(logprob + weight * reward)
        expected.append(candidates.tolist()[max(range(k), key=scores.__getitem__)])
    strategy = TransferQStar(tiny_model, aligned=str(other_dir), k=k, horizon=horizon, weight=weight, beta=beta)
    assert strategy.decode(prompt, 6) == [expected]
    assert expected != greedy(tiny_model, 6)
    assert with_strategy(tiny_model, f"transfer_qstar:aligned={other_dir}", 24) != greedy(tiny_model, 24)


def test_transfer_qstar_refuses_missing_or_foreign_checkpoints(
    tiny_model: LoadedModel, other_dir: Path, small_vocab_dir: Path
) -> None:
    with pytest.raises(InvalidParameter, match="aligned=PATH"):
        TransferQStar(tiny_model)
    with pytest.raises(InvalidParameter, match="aligned model's vocabulary differs"):
        TransferQStar(tiny_model, aligned=str(small_vocab_dir))
    with pytest.raises(InvalidParameter, match="reference model's vocabulary differs"):
        TransferQStar(tiny_model, aligned=str(other_dir), reference=str(small_vocab_dir))
    with pytest.raises(InvalidParameter, match="option aligned"):
        TransferQStar(tiny_model, aligned=str(other_dir / "config.json"))
    with pytest.raises(InvalidParameter, match="strategy transfer_qstar"):
        Engine(tiny_model, "ar").generate(PROMPT, max_new_tokens=4, strategy="transfer_qstar:aligned=/no/such/model")
