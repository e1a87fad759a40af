"""Lookahead: the draft layout (candidates, then the Jacobi window as side tokens), the pool and the window."""

import torch

from decodekit.drafters.lookahead import Lookahead
from decodekit.protocol import StepOutcome, TargetInfo

VOCAB = 60


def outcome_with_predictions(draft, predicted: list[int], committed: list[int]) -> StepOutcome:
    """Logits whose argmax after node i is ``predicted[i]``."""
    logits = torch.zeros(draft.tree.size, VOCAB)
    logits[torch.arange(draft.tree.size), torch.tensor(predicted)] = 1.0
    return StepOutcome(draft, logits, torch.tensor([0]), committed)


def test_window_rides_as_a_side_chain_after_the_candidates():
    drafter = Lookahead(TargetInfo(VOCAB), window=3, ngram=3, candidates=2)
    drafter.begin(torch.tensor([1, 2, 3, 4]), None)
    drafter.pool[4] = [(5, 6), (7, 8)]
    draft = drafter.propose(torch.tensor([1, 2, 3, 4]))
    # root, trie of (7 8) then (5 6), best (the newest n-gram) first, then the window (the prompt's last three
    # tokens) as a chain
    assert draft.tokens.tolist() == [4, 7, 8, 5, 6, 2, 3, 4]
    assert draft.tree.parents.tolist() == [-1, 0, 1, 0, 3, 0, 5, 6]
    assert draft.candidates.tolist() == [True] * 5 + [False] * 3
    assert draft.num_candidates == 4


def test_one_jacobi_iteration_fills_the_pool_and_shifts_the_window():
    drafter = Lookahead(TargetInfo(VOCAB), window=4, ngram=3, candidates=2)
    drafter.begin(torch.tensor([9, 10, 11, 12, 13]), None)
    draft = drafter.propose(torch.tensor([9, 10, 11, 12, 13]))
    assert draft.tokens.tolist() == [13, 10, 11, 12, 13]  # empty pool: root and window only
    # predictions after root, 10, 11, 12, 13
    drafter.observe(outcome_with_predictions(draft, [20, 21, 22, 23, 24], committed=[20]))
    # n-grams (slot i-1, slot i, prediction after slot i) keyed by their first token
    assert drafter.pool[13] == [(10, 21)]
    assert list(drafter.pool[10]) == [(11, 22)] and list(drafter.pool[11]) == [(12, 23)]
    assert list(drafter.pool[12]) == [(13, 24)]
    # one token committed: the window now guesses the four positions after it
    assert drafter.window == [21, 22, 23, 24]


def test_pool_is_bounded():
    drafter = Lookahead(TargetInfo(VOCAB), window=4, ngram=2, candidates=2, pool_keys=10)
    for step in range(200):
        drafter._remember((step % 50, step % 7))
        drafter._remember((step % 50, step % 5))
        drafter._remember((step % 50, step % 3))
    assert len(drafter.pool) == 10
    assert all(len(grams) <= 2 for grams in drafter.pool.values())
