"""Strategies that return several completions: diverse beam search and superposed decoding."""

from __future__ import annotations

import pytest
import torch

from decodekit.engine import Engine
from decodekit.errors import InvalidParameter
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.rows import Rows
from decodekit.strategies import make_strategy
from decodekit.strategies.diverse_beam import Beam, DiverseBeamSearch, beam_step, hamming_penalized, normalized_score
from decodekit.strategies.superposed import PromptNgrams, SuperposedDecoding, interpolated, superposed_embedding

PROMPT = "The quick brown fox jumps over the lazy dog. The quick"
N = 12


@pytest.fixture(scope="module")
def engine(tiny_model: LoadedModel) -> Engine:
    return Engine(tiny_model, "ar")


@pytest.fixture(scope="module")
def greedy(engine: Engine) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy output) of PROMPT."""
    out = engine.generate(PROMPT, max_new_tokens=N)
    return out.prompt_ids, out.token_ids


def outputs(engine: Engine, spec: str, prompt: str = PROMPT) -> list[list[int]]:
    out = engine.generate(prompt, max_new_tokens=N, strategy=spec)
    completions = [c.token_ids for c in out.completions] or [out.token_ids]
    assert out.token_ids == completions[0] and out.stats.strategy == spec
    return completions


# diverse beam search: the rule on hand-made cases


def test_hamming_penalty_lowers_tokens_by_earlier_groups_choices() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0], [-0.5, -1.5, -2.5, -3.5, -4.5]])
    earlier = torch.tensor([1, 3, 1])  # token 1 taken twice, token 3 once
    expected = logprobs - torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0])
    assert torch.equal(hamming_penalized(logprobs, earlier, 0.5), expected)
    assert torch.equal(hamming_penalized(logprobs, torch.tensor([], dtype=torch.int64), 0.5), logprobs)


def test_penalty_moves_a_group_off_the_earlier_groups_token() -> None:
    totals = torch.tensor([[-0.1, -0.3, -2.0, -3.0, -4.0]])  # one beam; token 0 best
    assert beam_step(totals, 1, set())[0] == [(0, 0)]
    penalized = totals[0] + hamming_penalized(torch.zeros(1, 5), torch.tensor([0]), 0.5)  # -0.6 < -0.3
    assert beam_step(penalized, 1, set())[0] == [(0, 1)]


def test_beam_step_keeps_width_live_beams_and_finishes_top_ranked_eos() -> None:
    totals = torch.tensor([[-1.0, -0.5, -3.0, -2.0, -4.0], [-0.7, -5.0, -0.6, -6.0, -7.0]])
    # ranked: (0,1) -0.5, (1,2) -0.6, (1,0) -0.7, (0,0) -1.0
    assert beam_step(totals, 2, {1}) == ([(1, 2), (1, 0)], [(0, 1)])
    assert beam_step(totals, 2, {0}) == ([(0, 1), (1, 2)], [])  # the EOS ranks third: past the width


def test_final_score_divides_by_length_to_the_penalty() -> None:
    beam = Beam([5, 6, 7, 8], -2.0)
    assert normalized_score(beam, 0.0) == -2.0
    assert normalized_score(beam, 1.0) == -0.5
    assert normalized_score(beam, 2.0) == -0.125
    assert normalized_score(Beam([], 0.0), 1.0) == 0.0


# diverse beam search end to end


def test_one_group_of_one_beam_is_greedy(engine: Engine, greedy: tuple[list[int], list[int]]) -> None:
    assert outputs(engine, "diverse_beam:groups=1,beams=1") == [greedy[1]]


@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_one_beam_stops_at_eos_as_greedy_does(
    tiny_model: LoadedModel, greedy: tuple[list[int], list[int]], length_penalty: float
) -> None:
    prompt_ids, tokens = greedy
    strategy = DiverseBeamSearch(tiny_model, groups=1, beams=1, length_penalty=length_penalty)
    assert tokens[3] not in tokens[:3]
    strategy.eos = {tokens[3]}  # pretend the greedy path's fourth token ends the text
    assert strategy.decode(prompt_ids, N) == [tokens[:4]]


def test_without_penalty_every_group_is_the_same_beam_search(engine: Engine) -> None:
    plain = outputs(engine, "diverse_beam:groups=1,beams=3")
    assert outputs(engine, "diverse_beam:groups=3,beams=3,penalty=0") == plain * 3


def reference_diverse_beams(
    model: LoadedModel, prompt_ids: list[int], groups: int, width: int, penalty: float, steps: int
) -> list[list[int]]:
    """Each group's best beam, every hypothesis scored by a forward of its whole text on a fresh cache (no EOS)."""

    def next_logprobs(tokens: list[int]) -> torch.Tensor:
        rows = Rows(model.transformer, len(prompt_ids) + steps)
        return rows.extend(torch.tensor([prompt_ids + tokens]))[0].log_softmax(-1)

    beams: list[list[tuple[list[int], float]]] = [[([], 0.0)] for _ in range(groups)]
    for _ in range(steps):
        taken: list[int] = []
        for group in range(groups):
            candidates = []
            for tokens, score in beams[group]:
                logprobs = next_logprobs(tokens)
                for token in range(logprobs.shape[0]):
                    ranked = score + float(logprobs[token]) - penalty * taken.count(token)
                    candidates.append((ranked, [*tokens, token], score + float(logprobs[token])))
            chosen = sorted(candidates, key=lambda c: c[0], reverse=True)[:width]
            beams[group] = [(tokens, score) for _, tokens, score in chosen]
            taken += [tokens[-1] for _, tokens, _ in chosen]
    return [max(group, key=lambda beam: beam[1])[0] for group in beams]


@pytest.mark.parametrize(("groups", "width", "penalty", "steps"), [(1, 4, 0.0, 5), (3, 2, 1.5, 4), (2, 3, 0.5, 5)])
def test_beams_match_a_search_that_recomputes_every_hypothesis(
    tiny_model: LoadedModel, greedy: tuple[list[int], list[int]], groups: int, width: int, penalty: float, steps: int
) -> None:
    prompt_ids = greedy[0]
    strategy = DiverseBeamSearch(tiny_model, groups=groups, beams=width, penalty=penalty)
    found = strategy.decode(prompt_ids, steps)
    assert found == reference_diverse_beams(tiny_model, prompt_ids, groups, width, penalty, steps)


def test_large_penalty_makes_groups_start_apart(engine: Engine) -> None:
    groups = outputs(engine, "diverse_beam:groups=4,beams=2,penalty=10")
    assert len(groups) == 4 and engine.completions("diverse_beam:groups=4,beams=2,penalty=10") == 4
    assert len({completion[0] for completion in groups}) == 4
    assert groups[:1] == outputs(engine, "diverse_beam:groups=1,beams=2")  # the first group is plain beam search
    assert all(len(completion) == N for completion in groups)


# superposed decoding: the rule on hand-made cases


def test_superposed_input_is_the_weighted_sum_of_embeddings() -> None:
    embeddings = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    weights = torch.tensor([0.5, 0.25, 0.25])
    assert torch.equal(superposed_embedding(embeddings, weights), torch.tensor([2.5, 3.5]))
    assert torch.equal(superposed_embedding(embeddings[1:2], torch.ones(1)), embeddings[1])


def test_prompt_ngrams_average_the_orders_that_saw_the_context() -> None:
    ngrams = PromptNgrams([1, 2, 3, 1, 2, 4, 5, 2, 3], max_n=3)  # after 2: 3 twice, 4 once
    assert torch.allclose(ngrams.probs([9, 1, 2], [3, 4, 5]), torch.tensor([7 / 12, 5 / 12, 0.0]))
    assert torch.allclose(ngrams.probs([7, 5, 2], [3, 4, 5]), torch.tensor([5 / 6, 1 / 6, 0.0]))
    assert torch.allclose(ngrams.probs([8, 2], [3, 4]), torch.tensor([2 / 3, 1 / 3]))  # (8, 2) unseen
    assert ngrams.probs([9, 7], [3]) is None


def test_interpolation_mixes_lm_and_ngram_probabilities() -> None:
    lm = torch.tensor([0.6, 0.3, 0.1])
    assert torch.allclose(interpolated(lm, torch.tensor([0.0, 1.0, 0.0]), 0.5), torch.tensor([0.3, 0.65, 0.05]))
    assert torch.equal(interpolated(lm, None, 0.5), lm)


# superposed decoding end to end


def test_one_draft_without_ngrams_is_greedy(engine: Engine, greedy: tuple[list[int], list[int]]) -> None:
    assert outputs(engine, "superposed:k=1,ngram_weight=0") == [greedy[1]]


def test_one_draft_stops_at_eos_as_greedy_does(tiny_model: LoadedModel, greedy: tuple[list[int], list[int]]) -> None:
    prompt_ids, tokens = greedy
    strategy = SuperposedDecoding(tiny_model, k=1, ngram_weight=0.0)
    strategy.eos = {tokens[3]}
    assert strategy.decode(prompt_ids, N) == [tokens[:4]]


def test_k_drafts_are_distinct_and_ngrams_change_them(engine: Engine) -> None:
    drafts = outputs(engine, "superposed:k=3")
    assert len(drafts) == 3 and engine.completions("superposed:k=3") == 3
    assert len({tuple(draft) for draft in drafts}) == 3
    assert outputs(engine, "superposed:k=3,ngram_weight=0") != outputs(engine, "superposed:k=3,ngram_weight=1")


def test_finished_drafts_end_at_eos(tiny_model: LoadedModel, greedy: tuple[list[int], list[int]]) -> None:
    prompt_ids, tokens = greedy
    strategy = SuperposedDecoding(tiny_model, k=3)
    strategy.eos = {tokens[1]}
    drafts = strategy.decode(prompt_ids, N)
    assert len({tuple(draft) for draft in drafts}) == 3
    assert all((draft[-1] == tokens[1] and tokens[1] not in draft[:-1]) or len(draft) == N for draft in drafts)
    assert any(draft[-1] == tokens[1] for draft in drafts)


def test_superposed_costs_one_forward_of_one_row_a_step(
    tiny_model: LoadedModel, greedy: tuple[list[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt_ids = greedy[0]
    shapes: list[tuple[int, ...]] = []
    extend = Rows.extend

    def counted(rows: Rows, tokens: torch.Tensor, embeddings: torch.Tensor | None = None, exits=()) -> torch.Tensor:
        shapes.append(tuple(tokens.shape))
        return extend(rows, tokens, embeddings, exits)

    monkeypatch.setattr(Rows, "extend", counted)
    for k in (1, 3, 8):
        shapes.clear()
        drafts = SuperposedDecoding(tiny_model, k=k).decode(prompt_ids, N)
        assert len(drafts) == k and all(len(draft) == N for draft in drafts)  # no EOS: N steps
        assert shapes == [(1, len(prompt_ids) - 1)] + [(1, 1)] * N  # the prompt, then one forward a step


def test_second_step_feeds_the_first_tokens_weighted_by_their_probabilities(
    tiny_model: LoadedModel, greedy: tuple[list[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt_ids = greedy[0]
    fed: list[torch.Tensor] = []
    extend = Rows.extend

    def recorded(rows: Rows, tokens: torch.Tensor, embeddings: torch.Tensor | None = None, exits=()) -> torch.Tensor:
        if embeddings is not None:
            fed.append(embeddings)
        return extend(rows, tokens, embeddings, exits)

    monkeypatch.setattr(Rows, "extend", recorded)
    SuperposedDecoding(tiny_model, k=3, ngram_weight=0.0).decode(prompt_ids, 2)
    rows = Rows(tiny_model.transformer, len(prompt_ids))
    probs, first = extend(rows, torch.tensor([prompt_ids]))[0].softmax(-1).topk(3)
    expected = (probs[:, None] / probs.sum() * rows.embedded(first)).sum(0)
    assert len(fed) == 1 and fed[0].shape == (1, 1, expected.shape[0])
    assert torch.allclose(fed[0][0, 0], expected, atol=1e-5)
    assert not torch.allclose(fed[0][0, 0], rows.embedded(first[:1])[0], atol=1e-3)  # a mix, not the top token


# bad input


@pytest.mark.parametrize(
    "spec",
    [
        "diverse_beam:groups=0",
        "diverse_beam:groups=9",
        "diverse_beam:beams=9",
        "diverse_beam:penalty=-1",
        "diverse_beam:length_penalty=3",
        "diverse_beam:width=2",
        "superposed:k=0",
        "superposed:k=9",
        "superposed:ngram_weight=1.5",
        "superposed:n=1",
        "superposed:n=7",
    ],
)
def test_bad_options_are_refused(tiny_model: LoadedModel, spec: str) -> None:
    with pytest.raises(InvalidParameter):
        make_strategy(spec, tiny_model)


def test_bad_options_are_refused_when_built_directly(tiny_model: LoadedModel) -> None:
    with pytest.raises(InvalidParameter, match="beams"):
        DiverseBeamSearch(tiny_model, beams=0)
    with pytest.raises(InvalidParameter, match="ngram_weight"):
        SuperposedDecoding(tiny_model, ngram_weight=-0.1)
