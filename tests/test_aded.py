import inspect
import random

import pytest
import torch

from decodekit import Engine
from decodekit.drafters.aded import CORPUS_MASS, AdaptiveNgram
from decodekit.errors import InvalidParameter
from decodekit.protocol import StepOutcome, TargetInfo

VOCAB = 50


def drafter(**options) -> AdaptiveNgram:
    return AdaptiveNgram(TargetInfo(VOCAB), **options)


def outcome_for(draft, predicted: list[int], committed: list[int]) -> StepOutcome:
    """A verification step whose target predicts ``predicted[i]`` after draft node i."""
    logits = torch.zeros(draft.tokens.numel(), VOCAB)
    logits[torch.arange(len(predicted)), torch.tensor(predicted)] = 1.0
    return StepOutcome(draft, logits, torch.tensor([0]), committed)


def nodes_of(draft) -> dict[tuple[int, ...], int]:
    """Every node's token path below the root -> node index."""
    paths: list[tuple[int, ...]] = [()]
    for i, parent in enumerate(draft.tree.parents.tolist()[1:], start=1):
        paths.append((*paths[parent], int(draft.tokens[i])))
    return {path: i for i, path in enumerate(paths)}


def test_prompt_trigrams_and_bigrams_are_counted():
    d = drafter(decay=1.0, prior=1.0)
    d.begin(torch.tensor([1, 2, 3, 1, 2, 4]), None)
    assert d.trigrams[1 * VOCAB + 2] == {3: 1.0, 4: 1.0}
    assert d.trigrams[2 * VOCAB + 3] == {1: 1.0}
    assert d.bigrams[2] == {3: 1.0, 4: 1.0}
    assert 4 not in d.bigrams  # the last token has no follower yet
    assert d._estimates(1, 2) == [(3, pytest.approx(1 / 3)), (4, pytest.approx(1 / 3))]


def test_counts_decay_so_recent_text_weighs_more():
    d = drafter(decay=0.5, prior=1.0)
    d.begin(torch.tensor([1, 2, 3, 1, 2, 4]), None)
    # 4 followed (1, 2) three tokens after 3 did: it counts 2**3 times as much
    # counts 4 (seen when the unit was 2**2) and 32 (2**5); prior 1 = one fresh observation = 32
    assert dict(d._estimates(1, 2)) == {4: pytest.approx(32 / 68), 3: pytest.approx(4 / 68)}
    d._tick(1)  # one token later without seeing the context: its estimates lose confidence
    assert dict(d._estimates(1, 2)) == {4: pytest.approx(32 / 100), 3: pytest.approx(4 / 100)}


def test_lazy_decay_rescales_without_changing_estimates():
    d = drafter(decay=0.5, prior=1.0)
    d.begin(torch.tensor([1, 2, 3, 1, 2, 4]), None)
    before = dict(d._estimates(1, 2))
    d._tick(120)  # the unit 2**125 passes RESCALE_AT: every count is scaled back
    assert d._unit == 1.0
    after = dict(d._estimates(1, 2))
    assert after[4] / after[3] == pytest.approx(before[4] / before[3])
    assert after[4] == pytest.approx(2.0**-120 / (1 + 2.0**-120 + 2.0**-123))


def test_bigram_fallback_only_when_the_trigram_context_is_unseen():
    d = drafter(decay=1.0)
    d.begin(torch.tensor([1, 2, 3, 7, 2, 4]), None)
    assert [t for t, _ in d._estimates(9, 2)] == [3, 4]  # (9, 2) unseen: every follower of 2
    assert [t for t, _ in d._estimates(1, 2)] == [3]  # (1, 2) seen: its own follower only
    assert [t for t, _ in d._estimates(None, 2)] == [3, 4]  # no token before the root
    assert d._estimates(1, 9) == []  # 9 never seen: nothing to draft


def test_observe_learns_the_verdict_after_every_node_rejected_ones_included():
    d = drafter(decay=1.0)
    d.begin(torch.tensor([5, 6, 7, 8]), None)  # (6, 7) -> 8 and (7, 8) -> nothing yet
    d._count(d.trigrams, 7 * VOCAB + 8, 9)
    d._count(d.trigrams, 8 * VOCAB + 9, 10)
    draft = d.propose(torch.tensor([5, 6, 7, 8]))
    assert draft.tokens.tolist() == [8, 9, 10]
    # the target agrees with 9 after the root, then says 11 (not 10) after 9, and 12 after the rejected 10
    d.observe(outcome_for(draft, [9, 11, 12], [9, 11]))
    assert d.trigrams[7 * VOCAB + 8] == {9: 2.0}  # root context: the token before the root, the root
    assert d.trigrams[8 * VOCAB + 9] == {10: 1.0, 11: 1.0}
    assert d.trigrams[9 * VOCAB + 10] == {12: 1.0}  # learned from the rejected node


def test_best_first_tree_keeps_the_most_probable_nodes_under_budget():
    d = drafter(decay=1.0, prior=1.0, min_prob=0.0, max_nodes=4)
    # after (0, 1): 2 (p 3/5) or 3 (p 1/5); after (1, 2): 4 (p 3/4); after (2, 4): 5 (p 1/2); after (1, 3): 6
    for key, nxt, count in [(1, 2, 3), (1, 3, 1), (1 * VOCAB + 2, 4, 3), (2 * VOCAB + 4, 5, 1), (1 * VOCAB + 3, 6, 9)]:
        for _ in range(count):
            d._count(d.trigrams, key, nxt)
    draft = d.propose(torch.tensor([0, 1]))
    nodes = nodes_of(draft)
    # scores: 2: .6, 2-4: .45, 2-4-5: .225, 3: .2, 3-6: .18
    assert set(nodes) == {(), (2,), (2, 4), (2, 4, 5), (3,)}
    assert draft.tokens[0] == 1 and draft.tree.size == 5
    d.max_nodes, d.min_prob = 16, 0.21
    assert set(nodes_of(d.propose(torch.tensor([0, 1])))) == {(), (2,), (2, 4), (2, 4, 5)}
    d.max_nodes = 0
    assert d.propose(torch.tensor([0, 1])).tree.size == 1


def test_no_guess_means_a_root_only_step():
    d = drafter()
    draft = d.propose(torch.tensor([3]))
    assert draft.tokens.tolist() == [3] and draft.tree.size == 1


def test_memory_stays_bounded_on_a_long_stream():
    max_contexts, max_next = 200, 3
    d = drafter(max_contexts=max_contexts, max_next=max_next, min_prob=0.0, max_nodes=8)
    rng = random.Random(0)
    d.begin(torch.tensor([rng.randrange(VOCAB) for _ in range(500)]), None)
    sequence = [1, 2]
    for _ in range(2000):
        draft = d.propose(torch.tensor(sequence))
        predicted = [rng.randrange(VOCAB) for _ in range(draft.tokens.numel())]
        d.observe(outcome_for(draft, predicted, predicted[:1]))
        sequence.append(predicted[0])
        assert len(d.trigrams) <= max_contexts and len(d.bigrams) <= max_contexts
    assert max(map(len, d.trigrams.values())) <= max_next
    assert d.num_counts <= 2 * max_contexts * max_next
    assert len(d.trigrams) == max_contexts  # the stream has far more contexts: the cap was reached


def test_least_recently_used_context_is_evicted():
    d = drafter(max_contexts=2)
    d._count(d.trigrams, 1, 5)
    d._count(d.trigrams, 2, 5)
    d._estimates(0, 1)  # reading context 1 (key 0 * VOCAB + 1) makes it recent
    d._count(d.trigrams, 3, 5)
    assert list(d.trigrams) == [1, 3]


def test_full_row_replaces_its_smallest_count():
    d = drafter(max_next=2)
    for nxt in [5, 5, 5, 6, 7]:
        d._count(d.bigrams, 1, nxt)
    assert d.bigrams[1] == {5: 3.0, 7: 1.0}


def test_prompt_logits_teach_the_models_predictions():
    d = drafter(decay=1.0, seed_logits=True)
    assert d.wants_prompt_logits
    logits = torch.zeros(2, VOCAB)
    logits[0, 9] = logits[1, 8] = 1.0
    d.begin(torch.tensor([1, 2, 3]), logits)
    assert d.bigrams[1] == {2: 1.0, 9: 1.0}
    assert d.trigrams[1 * VOCAB + 2] == {3: 1.0, 8: 1.0}


def test_corpus_of_token_ids(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("1 2 3\n" * 10 + "1 2 4\n")
    d = drafter(corpus=str(corpus))
    assert sum(d.trigrams[1 * VOCAB + 2].values()) == pytest.approx(CORPUS_MASS)
    assert [t for t, _ in d._estimates(1, 2)] == [3, 4]
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 x")
    for path in [bad, tmp_path / "missing.txt"]:
        with pytest.raises(InvalidParameter):
            drafter(corpus=str(path))
    bad.write_text(f"1 2 {VOCAB}")
    with pytest.raises(InvalidParameter):
        drafter(corpus=str(bad))


def test_options_are_spec_compatible():
    params = list(inspect.signature(AdaptiveNgram.__init__).parameters.values())[2:]
    assert all(type(p.default) in (int, float, bool, str) for p in params)


@pytest.mark.parametrize(
    "options",
    [{"max_nodes": -1}, {"max_nodes": 256}, {"decay": 0.0}, {"decay": 1.5}, {"prior": 0.0}, {"max_next": 0}],
)
def test_bad_options_raise_invalid_parameter(options):
    with pytest.raises(InvalidParameter):
        drafter(**options)


@pytest.mark.parametrize(
    "options", [{}, {"seed_logits": True}, {"max_nodes": 40, "min_prob": 0.0}, {"max_contexts": 8, "max_next": 1}]
)
def test_aded_equals_plain_on_tiny_model(tiny_model, options):
    plain = Engine(tiny_model, "ar")
    spec = Engine(tiny_model, AdaptiveNgram(TargetInfo(tiny_model.cfg.vocab_size), **options))
    for prompt in ["the quick brown fox", "it is sunny today", "foxes and dogs"]:
        for _ in range(2):  # the second request starts from the table the first one left
            a, b = plain.generate(prompt, max_new_tokens=48), spec.generate(prompt, max_new_tokens=48)
            assert a.token_ids == b.token_ids
    assert sum(b.stats.draft_sizes) > 0  # the drafter did draft
