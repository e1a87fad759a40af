import random

import pytest
import torch

from decodekit import Engine
from decodekit.drafters import TargetInfo
from decodekit.drafters.suffix import CONTEXT_PRIOR, SuffixDrafter, SuffixTrie, expand
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter
from decodekit.protocol import StepOutcome

VOCAB = 50


def table(trie: SuffixTrie) -> dict[tuple[int, ...], tuple[int, int]]:
    """{string: (count, cont)} for every node below the root, walked through ``children``."""
    out, stack = {}, [((), 0)]
    while stack:
        path, node = stack.pop()
        for token, child in trie.children(node):
            out[(*path, token)] = (trie.count[child], trie.cont[child])
            stack.append(((*path, token), child))
    return out


def paths(draft) -> set[tuple[int, ...]]:
    """Every root-to-node token path of a draft (root token excluded)."""
    tokens, parents = draft.tokens.tolist(), draft.tree.parents.tolist()
    found = [()]
    for i in range(1, len(tokens)):
        found.append((*found[parents[i]], tokens[i]))
    return set(found[1:])


def feed(drafter: SuffixDrafter, prompt: list[int], output: list[int], step: int = 3) -> list:
    """Run one request through begin / propose / observe, committing ``step`` tokens of ``output`` a step."""
    drafter.begin(torch.tensor(prompt), None)
    drafts, done = [], 0
    while done < len(output):
        draft = drafter.propose(torch.tensor(prompt + output[:done]))
        committed = output[done : done + step]
        drafter.observe(StepOutcome(draft, torch.zeros(draft.tree.size, VOCAB), torch.tensor([0]), committed))
        drafts.append(draft)
        done += len(committed)
    return drafts


def test_counts_of_every_substring_up_to_the_depth():
    trie = SuffixTrie(3, VOCAB)
    trie.extend([1, 2])
    trie.extend([1, 2, 3])  # appending in pieces is the same as at once
    assert table(trie) == {
        (1,): (2, 2),
        (2,): (2, 2),
        (3,): (1, 0),
        (1, 2): (2, 2),
        (2, 1): (1, 1),
        (2, 3): (1, 0),
        (1, 2, 1): (1, 0),
        (1, 2, 3): (1, 0),
        (2, 1, 2): (1, 0),
    }
    assert len(trie) == 9 <= 3 * 5


def test_streams_do_not_join():
    trie = SuffixTrie(3, VOCAB)
    trie.extend([1, 2])
    trie.start()
    trie.extend([3])
    assert (2, 3) not in table(trie) and table(trie)[(2,)] == (1, 0)


def test_match_is_the_longest_suffix_seen_with_a_continuation():
    trie = SuffixTrie(4, VOCAB)
    trie.extend([1, 2, 1, 2])
    # [2, 1, 2] and [1, 2, 1, 2] only occur at the end (nothing follows); [1, 2] was followed by 1
    assert trie.match([1, 2, 1, 2], max_len=8) == (2, trie.find([1, 2]))
    assert trie.match([1, 2, 1, 2], max_len=1) == (1, trie.find([2]))
    assert trie.match([7, 1], max_len=8) == (1, trie.find([1]))
    assert trie.match([1, 7], max_len=8) == (0, 0)
    assert trie.find([2, 2]) == -1


def test_expansion_is_best_first_under_budget_and_min_prob():
    assert CONTEXT_PRIOR == 2.0  # the scores below assume it
    trie = SuffixTrie(4, VOCAB)
    for stream in ([9, 5, 6], [9, 5, 6], [9, 5, 7], [9, 8]):
        trie.start()
        trie.extend(stream)
    node = trie.find([9])
    # count ratios P(5) = 3/4, P(8) = 1/4, P(6 | 5) = 2/3, P(7 | 5) = 1/3; a match of 2 tokens trusts the first
    # level by 2 / (2 + 2) and the second by 3 / (3 + 2): scores 5: .375, 5 6: .15, 8: .125, 5 7: .075
    for budget, min_prob, expected in [
        (1, 0.0, {(5,)}),
        (2, 0.0, {(5,), (5, 6)}),
        (3, 0.0, {(5,), (5, 6), (8,)}),
        (4, 0.0, {(5,), (5, 6), (8,), (5, 7)}),
        (4, 0.1, {(5,), (5, 6), (8,)}),
        (4, 0.14, {(5,), (5, 6)}),
        (4, 0.16, {(5,)}),
        (4, 0.4, set()),
    ]:
        draft = DraftTrie()
        expand(trie, node, 2, draft, budget, min_prob)
        built = draft.build(9, budget)
        assert paths(built) == expected, (budget, min_prob)
        assert built.tokens[0] == 9


def test_longer_matches_are_trusted_more():
    trie = SuffixTrie(8, VOCAB)
    trie.extend([1, 2, 3, 4, 5, 6])
    short, long = DraftTrie(), DraftTrie()
    expand(trie, trie.find([2]), 1, short, 8, 0.09)
    expand(trie, trie.find([1, 2]), 2, long, 8, 0.09)
    # from 1 token: 1/3, 1/3 * 2/4, then .1 and .067 (cut); from 2: 2/4, 2/4 * 3/5, .3 * 4/6, .2 * 5/7 = .14
    assert paths(short.build(2, 8)) == {(3,), (3, 4), (3, 4, 5)}
    assert paths(long.build(2, 8)) == {(3,), (3, 4), (3, 4, 5), (3, 4, 5, 6)}


def test_draft_continues_the_request_and_earlier_outputs():
    drafter = SuffixDrafter(TargetInfo(VOCAB), max_nodes=8, min_prob=0.0)
    feed(drafter, [1, 2], [10, 11, 12, 13, 14])
    drafter.begin(torch.tensor([10, 11, 30, 31]), None)
    assert drafter.propose(torch.tensor([10, 11, 30, 31])).tree.size == 1  # no match: the root alone
    draft = drafter.propose(torch.tensor([10, 11, 30, 31, 10, 11]))
    # "10 11" was followed by "30 31" in this request and by "12 13 14" in the last output
    assert paths(draft) == {(30,), (30, 31), (30, 31, 10), (30, 31, 10, 11), (12,), (12, 13), (12, 13, 14)}
    assert draft.tokens[0] == 11


def test_history_evicts_oldest_outputs_and_their_counts():
    drafter = SuffixDrafter(TargetInfo(VOCAB), max_depth=4, max_match=2, history=12)
    rng = random.Random(0)
    outputs = [[rng.randrange(5) for _ in range(rng.randrange(3, 8))] for _ in range(12)]
    for output in outputs:
        feed(drafter, [1], output)
    drafter.begin(torch.tensor([1]), None)  # archives the last output
    kept = list(drafter.outputs)
    assert sum(map(len, kept)) <= 12 and kept == outputs[-len(kept) :]
    fresh = SuffixTrie(4, VOCAB)
    for output in kept:
        fresh.start()
        fresh.extend(output)
    assert table(drafter.glob) == table(fresh)  # removal left exactly the counts of what is kept


def test_an_output_longer_than_history_keeps_its_end():
    drafter = SuffixDrafter(TargetInfo(VOCAB), history=4)
    feed(drafter, [1], list(range(10, 20)))
    drafter.begin(torch.tensor([1]), None)
    assert list(drafter.outputs) == [list(range(16, 20))]
    drafter = SuffixDrafter(TargetInfo(VOCAB), history=0)
    feed(drafter, [1], list(range(10, 20)))
    drafter.begin(torch.tensor([1]), None)
    assert not drafter.outputs and len(drafter.glob) == 0


def test_memory_stays_bounded_on_a_long_stream():
    depth, history = 8, 300
    drafter = SuffixDrafter(TargetInfo(VOCAB), max_depth=depth, max_match=4, history=history)
    rng = random.Random(1)
    phrases = [[rng.randrange(VOCAB) for _ in range(6)] for _ in range(10)]
    for _ in range(20):  # 20 requests of ~400 tokens: repeated phrases and noise
        stream = [t for _ in range(50) for t in (rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(VOCAB)])]
        prompt, output = stream[:100], stream[100:400]
        for draft in feed(drafter, prompt, output, step=rng.randrange(1, 5)):
            assert draft.tree.size <= 1 + drafter.max_nodes
        assert len(drafter.local) <= depth * len(drafter.tokens)
        assert len(drafter.glob) <= depth * history
        assert len(drafter.glob._token) <= 1 + depth * (history + len(output))  # freed nodes are reused
    assert sum(map(len, drafter.outputs)) <= history


@pytest.mark.parametrize(
    "options",
    [
        dict(max_match=0),
        dict(max_match=16),
        dict(max_depth=1, max_match=1),
        dict(max_nodes=0),
        dict(max_nodes=256),
        dict(min_prob=-0.1),
        dict(min_prob=1.5),
        dict(history=-1),
    ],
)
def test_bad_options_raise_invalid_parameter(options):
    with pytest.raises(InvalidParameter):
        SuffixDrafter(TargetInfo(VOCAB), **options)


@pytest.mark.parametrize("options", [{}, dict(max_nodes=1), dict(max_depth=3, max_match=2, min_prob=0.0, history=8)])
def test_suffix_equals_plain_on_tiny_model(tiny_model, options):
    plain = Engine(tiny_model, "ar")
    spec = Engine(tiny_model, SuffixDrafter(TargetInfo(tiny_model.cfg.vocab_size), **options))
    accepted = 0
    for prompt in ["the quick brown fox", "it is sunny today", "foxes and dogs"]:
        for _ in range(2):  # the second request also drafts from the first one's output
            a, b = plain.generate(prompt, max_new_tokens=48), spec.generate(prompt, max_new_tokens=48)
            assert a.token_ids == b.token_ids
            accepted += sum(b.stats.accepted_drafts)
    assert accepted > 0  # drafts were accepted: the equality is not vacuous
