"""The draft trie and the copy-style drafters (prompt lookup, CopySpec) and the hybrid, on hand-made sequences."""

import pytest
import torch

from decodekit.drafters import TargetInfo, make_drafter
from decodekit.drafters.copyspec import CopySpec
from decodekit.drafters.hybrid import PRIOR_HITS, PRIOR_TRIALS, Hybrid
from decodekit.drafters.lookup import NgramIndex, PromptLookup
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, StepOutcome

TARGET = TargetInfo(vocab_size=100)


def paths(draft: Draft) -> set[tuple[int, ...]]:
    """Every root-to-node token path of a draft, root excluded."""
    parents, tokens = draft.tree.parents.tolist(), draft.tokens.tolist()
    out, prefix = set(), {0: ()}
    for i in range(1, len(tokens)):
        prefix[i] = prefix[parents[i]] + (tokens[i],)
        out.add(prefix[i])
    return out


def outcome(draft: Draft, accepted_depth: int, bonus: int = 99) -> StepOutcome:
    """Accept the first chain of ``accepted_depth`` nodes of ``draft`` (nodes 0..depth of a chain)."""
    path = torch.arange(accepted_depth + 1)
    committed = [*draft.tokens[1 : accepted_depth + 1].tolist(), bonus]
    return StepOutcome(draft, torch.zeros(draft.tree.size, TARGET.vocab_size), path, committed)


def test_trie_merges_shared_prefixes_and_keeps_the_best_nodes():
    trie = DraftTrie()
    trie.add([1, 2, 3], 0.9)
    trie.add([1, 2, 4], [0.9, 0.8, 0.5])
    trie.add([5], 0.1)
    assert len(trie) == 5
    draft = trie.build(root=7, max_nodes=3)
    assert draft.tokens.tolist() == [7, 1, 2, 3]
    assert draft.tree.parents.tolist() == [-1, 0, 1, 2]
    assert paths(trie.build(7, max_nodes=10, min_prob=0.3)) == {(1,), (1, 2), (1, 2, 3), (1, 2, 4)}


def test_trie_scores_never_grow_along_a_path():
    trie = DraftTrie()
    trie.add([1, 2], [0.1, 0.9])  # the child cannot be likelier than its parent
    trie.add([3], 0.5)
    draft = trie.build(root=0, max_nodes=2)
    assert paths(draft) == {(1,), (3,)}  # (1, 2) scores 0.1, tied with (1,), and deeper: cut


def test_ngram_index_finds_the_longest_recent_match():
    index = NgramIndex(1, 3, keep=2)
    index.extend([1, 2, 3, 9, 1, 2, 3, 8, 2, 3])
    n, follows = index.matches([2, 3])
    assert n == 2 and follows == [7, 3]  # most recent first; "2 3" was followed by 8, then by 9
    assert index.matches([1, 2, 3])[0] == 3
    assert index.matches([42]) == (0, [])


def test_ngram_index_memory_is_bounded_by_keep():
    index = NgramIndex(1, 2, keep=3)
    index.extend([1, 2] * 500)
    assert max(len(v) for v in index._follows.values()) == 3
    assert len(index._follows) == 4  # (1,), (2,), (1, 2), (2, 1)


def test_lookup_drafts_the_continuation_of_the_match():
    drafter = PromptLookup(TARGET, min_ngram=1, max_ngram=3, num_tokens=3, branches=2)
    prompt = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3])
    drafter.begin(prompt, None)
    draft = drafter.propose(torch.tensor([*prompt.tolist(), 5, 6, 7]))
    assert draft.tokens[0] == 7
    assert paths(draft) == {(1,), (1, 2), (1, 2, 3), (8,), (8, 9), (8, 9, 5)}


def test_lookup_without_a_match_proposes_only_the_root():
    drafter = PromptLookup(TARGET, min_ngram=2)
    drafter.begin(torch.tensor([1, 2, 3]), None)
    assert drafter.propose(torch.tensor([1, 2, 3, 4])).tree.size == 1


def test_copyspec_finds_text_from_an_earlier_request():
    drafter = CopySpec(TARGET, gamma=3, num_tokens=4, max_tokens=16)
    first = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    drafter.begin(first, None)
    drafter.propose(first)
    second = torch.tensor([1, 2, 11, 12, 13])  # a new request quoting the first
    drafter.begin(second, None)
    draft = drafter.propose(second)
    assert draft.tokens.tolist() == [13, 14, 15, 16, 17]


def test_copyspec_span_doubles_on_full_acceptance_and_resets_on_rejection():
    drafter = CopySpec(TARGET, gamma=2, num_tokens=2, max_tokens=8)
    text = list(range(1, 40))
    sequence = torch.tensor([*text, 1, 2])
    drafter.begin(sequence, None)
    spans = []
    for accepted in [2, 4, 8, 8, 3]:
        draft = drafter.propose(sequence)
        spans.append(draft.tree.size - 1)
        drafter.observe(outcome(draft, accepted))
        sequence = torch.cat([sequence, draft.tokens[1 : accepted + 1], torch.tensor([sequence[-1] + accepted + 1])])
    assert spans == [2, 4, 8, 8, 8]
    assert drafter.span == 2


def test_copyspec_history_is_bounded():
    drafter = CopySpec(TARGET, history=100)
    for start in range(0, 3000, 50):
        prompt = torch.arange(start, start + 50) % 97
        drafter.begin(prompt, None)
        drafter.propose(prompt)
    assert len(drafter.index.tokens) <= 200


class Fixed(Drafter):
    """A drafter that always proposes the same tree and records what it observes."""

    def __init__(self, tokens: list[int], parents: list[int], estimates: list[float] | None = None) -> None:
        from decodekit.protocol import Tree

        chances = None if estimates is None else torch.tensor(estimates, dtype=torch.float64)
        self.draft = Draft(torch.tensor(tokens), Tree.from_parents(parents), estimates=chances)
        self.seen: list[StepOutcome] = []

    def begin(self, prompt, prompt_logits):
        pass

    def propose(self, sequence):
        return self.draft

    def observe(self, outcome):
        self.seen.append(outcome)


def test_hybrid_merges_parts_and_hands_each_its_own_outcome():
    hybrid = Hybrid(TARGET, parts="lookup+recycling", max_nodes=5, min_prob=0.0)
    a = Fixed([0, 1, 2, 3], [-1, 0, 1, 2])  # chain 1 2 3
    b = Fixed([0, 1, 4, 5], [-1, 0, 1, 0])  # 1 -> 4, and 5
    hybrid.parts = [a, b]
    merged = hybrid.propose(torch.tensor([0]))
    assert merged.tokens.tolist() == [0, 1, 5, 2, 4, 3]  # breadth-first; the shared node 1 is verified once
    assert merged.tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    logits = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, TARGET.vocab_size)  # row i holds i
    hybrid.observe(StepOutcome(merged, logits, torch.tensor([0, 1, 4]), [1, 4, 9]))  # target took 1 then 4
    seen_a, seen_b = a.seen[-1], b.seen[-1]
    assert seen_a.draft.tokens.tolist() == [0, 1, 2, 3] and seen_a.accepted.tolist() == [0, 1]
    assert seen_a.logits[:, 0].tolist() == [0, 1, 3, 5]
    assert seen_b.draft.tokens.tolist() == [0, 1, 4, 5] and seen_b.accepted.tolist() == [0, 1, 2]
    assert seen_b.logits[:, 0].tolist() == [0, 1, 4, 2]
    # a part that never reads logits gets none copied, but its rows of the greedy choices all the same
    a.wants_step_logits = False
    choices = torch.tensor([10, 11, 12, 13, 14, 15])
    hybrid.observe(StepOutcome(merged, logits, torch.tensor([0, 1, 4]), [1, 4, 9], greedy_choices=choices))
    seen_a, seen_b = a.seen[-1], b.seen[-1]
    assert seen_a.logits.shape == (4, 0) and seen_a.greedy_choices.tolist() == [10, 11, 13, 15]
    assert seen_b.logits[:, 0].tolist() == [0, 1, 4, 2] and seen_b.greedy_choices.tolist() == [10, 11, 14, 12]


def test_hybrid_learns_which_parts_nodes_get_accepted():
    hybrid = Hybrid(TARGET, parts="lookup+recycling", max_nodes=1, min_prob=0.0)
    good, bad = Fixed([0, 1], [-1, 0]), Fixed([0, 2], [-1, 0])
    hybrid.parts = [bad, good]
    for _ in range(5):
        merged = hybrid.propose(torch.tensor([0]))
        path = torch.tensor([0, 1]) if merged.tokens[1] == 1 else torch.tensor([0])
        hybrid.observe(StepOutcome(merged, torch.zeros(2, TARGET.vocab_size), path, [1]))
    assert hybrid.propose(torch.tensor([0])).tokens.tolist() == [0, 1]


@pytest.mark.parametrize(
    "spec",
    ["lookup:num_tokens=0", "copyspec:num_tokens=9,max_tokens=4", "hybrid:parts=lookup", "hybrid:parts=hybrid+ar"],
)
def test_bad_options_raise(spec):
    with pytest.raises(InvalidParameter):
        make_drafter(spec, TARGET)


def test_hybrid_scores_nodes_it_cut_from_the_committed_text():
    hybrid = Hybrid(TARGET, parts="lookup+recycling", max_nodes=1, min_prob=0.0)
    first, second = Fixed([0, 1], [-1, 0]), Fixed([0, 2, 3], [-1, 0, 1])
    hybrid.parts = [first, second]
    merged = hybrid.propose(torch.tensor([0]))
    assert merged.tokens.tolist() == [0, 1]  # budget 1: the second part's chain 2 -> 3 is cut
    hybrid.observe(StepOutcome(merged, torch.zeros(2, TARGET.vocab_size), torch.tensor([0]), [2]))
    # the target said 2: the cut node 2 would have been accepted, node 1 was not; node 3 was not tested
    assert hybrid._hits[1][1] - PRIOR_HITS == 1 and hybrid._trials[1][1] - PRIOR_TRIALS == 1
    assert hybrid._trials[1][2] == PRIOR_TRIALS
    assert hybrid._hits[0][1] == PRIOR_HITS and hybrid._trials[0][1] - PRIOR_TRIALS == 1
    assert hybrid.propose(torch.tensor([0])).tokens.tolist() == [0, 2]


def test_hybrid_ranks_a_part_by_its_own_estimates_calibrated_by_what_matched():
    hybrid = Hybrid(TARGET, parts="lookup+recycling", max_nodes=2, min_prob=0.0)
    # the estimating part thinks 1 -> 2 is likely (0.9, 0.85) and 3 is not (0.15)
    estimating, chain = Fixed([0, 1, 2, 3], [-1, 0, 1, 0], [1.0, 0.9, 0.85, 0.15]), Fixed([0, 4], [-1, 0])
    hybrid.parts = [estimating, chain]
    merged = hybrid.propose(torch.tensor([0]))
    assert merged.tokens.tolist() == [0, 1, 2]  # its estimates (0.9, 0.85) beat an unseen chain node (0.5)
    for _ in range(6):  # the target keeps saying 3: node 1's tenth (0.9) and 2's (0.8) never match, 3's tenth does
        hybrid.observe(StepOutcome(merged, torch.zeros(3, TARGET.vocab_size), torch.tensor([0]), [3]))
        merged = hybrid.propose(torch.tensor([0]))
    assert hybrid._bin_trials[0][8] - 4 == 6 and hybrid._bin_hits[0][8] == 4 * 0.85  # node 2: known to miss
    assert hybrid._bin_hits[0][1] - 4 * 0.15 == 6  # node 3, cut from the merged drafts, matched every time
    assert merged.tokens.tolist() == [0, 3, 1]  # 3 now ranks first (0.66), then 1 (0.38) over the chain (0.12)


def test_trie_hands_its_scores_on_as_estimates_when_asked():
    trie = DraftTrie()
    trie.add([1, 2], [0.8, 0.5])
    assert trie.build(0, max_nodes=4).estimates is None
    assert trie.build(0, max_nodes=4, estimates=True).estimates.tolist() == [1.0, 0.8, 0.5]
