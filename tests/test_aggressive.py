"""Aggressive decoding: unique-suffix anchoring, advancing and re-anchoring, adaptive length, memory, lossless."""

import inspect

import pytest
import torch

from decodekit import Engine
from decodekit.drafters.aggressive import MAX_SUFFIX, AggressiveDecoding
from decodekit.errors import InvalidParameter
from decodekit.protocol import StepOutcome, TargetInfo

VOCAB = 50
#        0  1  2  3  4  5  6  7  8  9 10
SOURCE = [1, 2, 3, 4, 5, 2, 3, 6, 7, 8, 9]


def drafter(source=SOURCE, **options) -> AggressiveDecoding:
    d = AggressiveDecoding(TargetInfo(VOCAB), **options)
    d.begin(torch.tensor(source), None)
    return d


def step(d: AggressiveDecoding, sequence: list[int], target: list[int]) -> list[int]:
    """One fake verification step: the target's greedy continuation is ``target``. Returns the committed tokens
    and appends them to ``sequence``."""
    draft = d.propose(torch.tensor(sequence))
    proposed = draft.tokens[1:].tolist()
    k = 0
    while k < len(proposed) and k < len(target) and proposed[k] == target[k]:
        k += 1
    committed = target[: k + 1]
    d.observe(StepOutcome(draft, torch.zeros(draft.tree.size, 1), torch.arange(k + 1), committed))
    sequence.extend(committed)
    return proposed


def test_shortest_unique_suffix_anchors():
    d = drafter()
    assert d.find([40, 4]) == 4  # one token suffices when it occurs once
    assert d.find([40, 1, 2, 3]) == 3  # "3" and "2 3" occur twice, "1 2 3" once
    assert d.find([40, 5, 2, 3]) == 7
    assert d.find([40, 41, 7]) == 9


def test_ambiguous_or_missing_suffix_finds_nothing():
    d = drafter()
    assert d.find([40, 2, 3]) is None  # "2 3" twice; "40 2 3" nowhere
    assert d.find([3]) is None  # ambiguous and nothing left to extend with
    assert d.find([40, 41]) is None
    assert d.find([40, 9]) is None  # only at the source's end: nothing to draft after it
    assert d.find([]) is None


def test_min_match_is_the_shortest_suffix_tried():
    d = drafter(min_match=2)
    assert d.find([40, 4]) is None  # "40 4" is not in the source, and "4" alone is too short
    assert d.find([3, 4]) == 4
    assert d.find([4]) is None


def test_ambiguity_search_stops_at_max_suffix():
    d = drafter([7] * 100)
    assert d.find([7] * (2 * MAX_SUFFIX)) is None


def test_source_tokens_keeps_the_prompts_end():
    d = drafter(source_tokens=4)
    assert d.source == SOURCE[-4:]
    assert d.find([40, 7]) == 2  # position in the kept source
    assert d.find([40, 4]) is None


def test_first_step_drafts_nothing_after_a_unique_prompt_end():
    d = drafter()
    assert step(d, list(SOURCE), [20]) == []


def test_first_step_anchors_on_an_earlier_copy_of_the_prompt_end():
    # a multi-turn prompt: "1 2" (an assistant header, say) already opened an earlier reply "3 4 5"
    prompt = [1, 2, 3, 4, 5, 0, 1, 2]
    d = drafter(prompt)
    assert step(d, list(prompt), [3, 4, 5, 6]) == [3, 4, 5, 0, 1, 2]


def test_anchor_advances_while_the_output_copies_the_source():
    source = list(range(1, 31))
    d = drafter(source, max_nodes=4)
    sequence = [*source, 99, 1]  # the output has started copying the source
    assert step(d, sequence, [2, 3, 4, 5, 6]) == [2, 3, 4, 5]  # all accepted, the bonus 6 continues the source
    assert d.anchor == 6
    assert step(d, sequence, list(range(7, 12))) == [7, 8, 9, 10]


def test_mismatch_reanchors_on_the_output():
    d = drafter(max_nodes=4)
    sequence = [40, 1]
    assert step(d, sequence, [2, 3, 4, 20]) == [2, 3, 4, 5]  # "1" is unique: anchor after it; 5 is rejected
    assert d.anchor is None
    assert step(d, sequence, [5]) == []  # "20" is nowhere in the source: the root alone
    assert step(d, sequence, [2, 3, 6, 7, 8]) == [2, 3, 6, 7]  # "5" is unique: re-anchored after it


def test_bonus_token_that_leaves_the_source_drops_the_anchor():
    d = drafter(max_nodes=2)
    sequence = [40, 4]
    assert step(d, sequence, [5, 2, 30]) == [5, 2]  # both accepted, but the bonus 30 is not source[7]
    assert d.anchor is None
    assert step(d, sequence, [31]) == []  # "30" is nowhere in the source


def test_draft_is_cut_at_the_source_end():
    d = drafter(max_nodes=8)
    assert step(d, [40, 7], [8, 9, 0]) == [8, 9]


def test_length_grows_on_whole_acceptances_and_shrinks_on_early_rejections():
    source = list(range(1, 49))
    d = drafter(source, max_nodes=16)
    start = d.length
    assert 1 <= start < 16
    sequence = [*source, 99, 1]
    lengths = []
    while sequence[-1] < 40:
        step(d, sequence, list(range(sequence[-1] + 1, 49)))
        lengths.append(d.length)
    assert lengths == sorted(lengths) and lengths[-1] == 16
    for _ in range(30):  # the target never agrees with the draft
        step(d, [*source, 99, 1], [98])
    assert d.length == 1
    assert step(d, [*source, 99, 1], [98]) == [2]  # still drafts one token: never below 1


def test_memory_is_bounded_by_the_source():
    source = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9] * 20
    d = drafter(source)
    sequence = list(source)
    rng = torch.Generator().manual_seed(0)
    for i in range(3000):  # a long output that copies the source in stretches and wanders off in between
        if i % 3:
            j = int(torch.randint(len(source) - 8, (1,), generator=rng))
            target = source[j : j + 8]
        else:
            target = torch.randint(VOCAB, (5,), generator=rng).tolist()
        step(d, sequence, target)
    assert len(sequence) > 10 * len(source)
    assert d.source == source
    assert sum(len(v) for v in d.follows.values()) <= len(source)
    sizes = [len(v) for v in vars(d).values() if isinstance(v, (list, dict))]
    assert max(sizes) <= len(source)


def test_options_are_spec_compatible_and_validated():
    params = list(inspect.signature(AggressiveDecoding.__init__).parameters.values())[2:]
    assert {p.name: p.default for p in params} == {"max_nodes": 16, "min_match": 1, "source_tokens": 0}
    for bad in ({"max_nodes": 0}, {"min_match": 0}, {"min_match": MAX_SUFFIX + 1}, {"source_tokens": -1}):
        with pytest.raises(InvalidParameter):
            AggressiveDecoding(TargetInfo(VOCAB), **bad)


class Primed(AggressiveDecoding):
    """Drafts from the prompt followed by a known greedy output, so that drafts get accepted on a random model."""

    def __init__(self, target: TargetInfo, output: list[int]) -> None:
        super().__init__(target, max_nodes=8)
        self.output = output

    def begin(self, prompt, prompt_logits):
        super().begin(torch.cat([prompt, torch.tensor(self.output)]), prompt_logits)


@pytest.mark.parametrize("prompt", ["the quick brown fox", "it is sunny today", "foxes and dogs"])
def test_equals_plain_on_tiny_model(tiny_model, prompt):
    plain = Engine(tiny_model, "ar").generate(prompt, max_new_tokens=48)
    engine = Engine(tiny_model, AggressiveDecoding(TargetInfo(tiny_model.cfg.vocab_size)))
    for _ in range(2):  # the second request reuses the drafter
        assert engine.generate(prompt, max_new_tokens=48).token_ids == plain.token_ids
    target = TargetInfo(tiny_model.cfg.vocab_size)
    for budget in (48, 13):  # drafts the target accepts, cut by the token budget in the last step
        primed = Engine(tiny_model, Primed(target, plain.token_ids)).generate(prompt, max_new_tokens=budget)
        assert primed.token_ids == plain.token_ids[:budget]
        assert sum(primed.stats.accepted_drafts) > 0
