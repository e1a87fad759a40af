"""Drafters that run a model (a draft checkpoint, or a slice of the target's layers) on tiny random Llamas: the
draft model's cache follows the committed text through accepted, partly accepted and rejected steps, outputs equal
plain decoding, hidden states reach drafters that ask, and bad input is refused clearly."""

import random

import pytest
import torch
from helpers import write_small_vocab_llama, write_tiny_llama

from decodekit import Engine
from decodekit.decoding import target_info
from decodekit.drafters import CLIENT, METHODS, make_drafter, parse_method
from decodekit.drafters.ar import Autoregressive
from decodekit.drafters.s2d import EXPLORE_EVERY, SortedDrafts
from decodekit.drafters.swift import LayerSkip, spread
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, StepOutcome, Tree
from decodekit.runtime.runner import ModelRunner

PROMPTS = ["the quick brown fox", "tell me about the weather tomorrow in the hills", "a b c a b c a b c"]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A 4-layer random Llama with the tiny tokenizer: a target with layers to skip."""
    from decodekit.runtime.loader import load_model

    return load_model(write_tiny_llama(tmp_path_factory.mktemp("four"), num_hidden_layers=4))


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """A 1-layer random Llama with the tiny tokenizer: a draft model that disagrees with the target often."""
    return write_tiny_llama(tmp_path_factory.mktemp("one-layer"), num_hidden_layers=1, initializer_range=0.3)


def reference_logits(transformer, layers, sequence):
    """The logits after ``sequence`` from a fresh cache, in one forward."""
    cache = transformer.new_cache(len(sequence), layers=len(layers))
    hidden = transformer.hidden_states(torch.tensor([sequence]), cache, layers=layers)
    return transformer.logits(hidden[0, -1])


@pytest.mark.parametrize("layers", [None, [0, 2, 3], [1]])
def test_the_draft_cache_follows_accepted_partial_and_rejected_steps(four_layers, layers):
    transformer = four_layers.transformer
    runner = ModelRunner(transformer, layers)
    run = list(range(4)) if layers is None else layers
    rng = random.Random(0)
    sequence = [rng.randrange(300) for _ in range(5)]
    for _ in range(40):
        drafted = [rng.randrange(300) for _ in range(rng.randrange(1, 5))]
        for i in range(len(drafted)):  # drafting: one token at a time along one path
            runner.logits(torch.tensor(sequence + drafted[:i]))
        kept = rng.choice([0, len(drafted) // 2, len(drafted)])  # rejected, partly, wholly accepted
        sequence += [*drafted[:kept], rng.randrange(300)]  # and the bonus token
        if rng.random() < 0.1:
            sequence = sequence[: rng.randrange(1, len(sequence))]  # a new request sharing a prefix
        got = runner.logits(torch.tensor(sequence))
        assert runner.cached == len(sequence)
        torch.testing.assert_close(got, reference_logits(transformer, run, sequence), rtol=1e-5, atol=1e-5)
    assert runner.logits(torch.tensor(sequence)) is got  # asked again: nothing is recomputed


def test_the_draft_cache_grows_past_its_first_size(four_layers):
    runner = ModelRunner(four_layers.transformer, [0, 3])
    sequence = [i % 300 for i in range(700)]
    got = runner.logits(torch.tensor(sequence))
    assert runner.cache.capacity >= 700
    torch.testing.assert_close(got, reference_logits(four_layers.transformer, [0, 3], sequence), rtol=1e-5, atol=1e-5)


def test_greedy_choices_of_a_slice_are_teacher_forced(four_layers):
    transformer = four_layers.transformer
    runner = ModelRunner(transformer, [0, 1])
    tokens = [5, 9, 33, 2, 17, 60]
    expected = [int(reference_logits(transformer, [0, 1], tokens[: i + 1]).argmax()) for i in range(len(tokens))]
    assert runner.greedy(torch.tensor(tokens)).tolist() == expected
    assert runner.cached == 0


@pytest.mark.parametrize(
    "spec",
    ["draft:model={own}", "draft:model={own},branch=3,min_prob=0", "draft:model={other},branch=2", "swift",
     "swift:skipped=1/2,branch=2,min_prob=0.05", "swift:skip=0.25,trials=50,window=8",
     "hybrid:parts=swift+copyspec", "s2d", "s2d:exits=1/3,branch=2,min_prob=0", "hybrid:parts=s2d:exits=2+copyspec",
     "pearl:model={own}", "pearl:model={other},max_nodes=2", "pearl:model={other},min_prob=0.2",
     "hybrid:parts=pearl:model={other}+copyspec"],
)  # fmt: skip
def test_model_drafters_equal_plain_greedy(four_layers, other_draft, spec):
    spec = spec.format(own=four_layers.path, other=other_draft)
    plain = Engine(four_layers, "ar")
    engine = Engine(four_layers, spec)
    for prompt in PROMPTS:
        for n in (1, 7, 60):
            assert engine.generate(prompt, n).token_ids == plain.generate(prompt, n).token_ids, (spec, prompt, n)


def test_a_draft_model_equal_to_the_target_is_accepted_whole(four_layers):
    result = Engine(four_layers, f"draft:model={four_layers.path},min_prob=0,max_nodes=6").generate(PROMPTS[1], 60)
    assert result.stats.acceptance_rate > 0.95
    assert result.stats.mean_accepted > 5


def test_draft_models_load_once_per_engine(four_layers):
    engine = Engine(four_layers, "ar", max_batch=2)
    spec = f"draft:model={four_layers.path}"
    first, second = (make_drafter(spec, engine._target) for _ in range(2))
    assert first.runner.transformer is second.runner.transformer
    assert first.runner.cache is not second.runner.cache


def test_model_drafters_in_a_batch_with_stops_and_the_context_end(four_layers, other_draft):
    """Rows join and leave while others draft; a stop string or EOS inside a draft; the context window's end."""
    specs = ["ar", f"draft:model={other_draft}", "swift:min_prob=0", f"draft:model={four_layers.path},min_prob=0",
             "s2d:exits=1-3,min_prob=0", f"pearl:model={other_draft}",
             f"pearl:model={four_layers.path},max_nodes=8"]  # fmt: skip
    plain = Engine(four_layers, "ar")
    cases = [(spec, PROMPTS[i % 3], n) for i, spec in enumerate(specs) for n in (9, 31)]
    long_prompt = (list(range(1, 60)) * 5)[: four_layers.cfg.context_window - 20]  # decodes into the window's end
    cases += [(spec, long_prompt, None) for spec in specs[1:]]
    engine = Engine(four_layers, "ar", max_batch=3)
    results = engine.run_all([engine.request(prompt, n, stop=["fox"], method=spec) for spec, prompt, n in cases])
    for index, (spec, prompt, n) in enumerate(cases):
        expected = plain.generate(prompt, n, stop=["fox"])
        assert results[index].token_ids == expected.token_ids, spec
        assert results[index].text == expected.text


class HiddenRecorder(Autoregressive):
    """Chains of the last committed token repeated, recording the hidden states each step brings."""

    wants_hidden = (0, 2, 4)

    def __init__(self, target):
        super().__init__(target)
        self.seen: list[StepOutcome] = []

    def propose(self, sequence):
        root = int(sequence[-1])
        return Draft(torch.tensor([root, root, root]), Tree.chain(3))

    def observe(self, outcome):
        self.seen.append(outcome)


def test_drafters_get_the_hidden_states_they_ask_for(four_layers):
    recorder = HiddenRecorder(target_info(four_layers))
    result = Engine(four_layers, recorder).generate(PROMPTS[0], 12)
    sequence = result.prompt_ids + result.token_ids
    transformer = four_layers.transformer
    capture = dict.fromkeys((0, 2, 4))
    transformer.hidden_states(torch.tensor([sequence]), transformer.new_cache(len(sequence)), capture=capture)
    position = len(result.prompt_ids) - 1  # the first root
    for outcome in recorder.seen:
        assert set(outcome.hidden) == {0, 2, 4}
        for layer, states in outcome.hidden.items():
            assert states.shape == (3, four_layers.cfg.hidden_size)
            path = outcome.accepted  # the accepted nodes sit at the next positions of the sequence
            expected = capture[layer][0, position : position + len(path)]
            torch.testing.assert_close(states[path], expected, rtol=1e-4, atol=1e-4)
        position += len(outcome.committed)


def test_a_hybrid_hands_its_parts_the_hidden_states_they_want(four_layers):
    from decodekit.drafters.hybrid import Hybrid

    hybrid = Hybrid(target_info(four_layers), "aded+copyspec")
    hybrid.parts[1] = HiddenRecorder(target_info(four_layers))
    hybrid.wants_hidden = (0, 2, 4)
    Engine(four_layers, hybrid).generate(PROMPTS[2], 20)
    seen = hybrid.parts[1].seen
    assert any(outcome.hidden and outcome.hidden[4].shape[0] == outcome.draft.tree.size for outcome in seen)


def test_swift_searches_skip_sets_of_a_fixed_size(four_layers):
    drafter = LayerSkip(target_info(four_layers), skip=0.5, trials=10, window=16)
    assert drafter.skipped == [1, 2]
    Engine(four_layers, drafter).generate(PROMPTS[1], 80)
    assert drafter.trials_left < 10
    assert len(drafter.skipped) == 2 and len(set(drafter.skipped)) == 2
    assert drafter.runner.layers == tuple(layer for layer in range(4) if layer not in drafter.skipped)


def test_s2d_drafts_with_the_exit_that_pays_and_gives_the_others_turns(four_layers):
    drafter = SortedDrafts(target_info(four_layers), exits="1/3", min_prob=0)
    assert drafter.depths == [1, 3] and [runner.layers for runner in drafter.runners] == [(0,), (0, 1, 2)]
    Engine(four_layers, drafter).generate(PROMPTS[1], 80)
    assert all(step > 0 for step in drafter.last_used)  # both exits drafted at some step
    assert drafter.chosen == max(range(2), key=drafter.worth) or drafter.steps % EXPLORE_EVERY == 0
    drafter.committed, drafter.drafted = [3.0, 1.0], [2.0, 2.0]  # the shallow exit commits more for less
    assert drafter.worth(0) > drafter.worth(1)
    drafter.committed = [1.5, 4.0]  # the deep one commits far more: worth its cost
    assert drafter.worth(1) > drafter.worth(0)
    drafter.steps = 0  # the next step is no exploring turn
    assert drafter.propose(torch.tensor([1, 2, 3])) is not None and drafter.chosen == 1


def test_spread_keeps_the_outer_layers_first():
    assert spread(1, 30) == [15]
    assert spread(15, 30)[0] >= 1 and spread(15, 30)[-1] <= 28 and len(spread(15, 30)) == 15
    assert len(spread(29, 30)) == 29 and max(spread(29, 30)) <= 29


def test_bad_model_drafter_input_is_refused_clearly(four_layers, tmp_path):
    target = target_info(four_layers)
    small = write_small_vocab_llama(tmp_path / "small")
    cases = {
        f"draft:model={small}": "vocabulary of 8 tokens, the target 3",
        "draft": "needs a draft model",
        f"draft:model={tmp_path / 'missing'}": "neither a checkpoint directory nor a .gguf file",
        f"draft:model={tmp_path}": "without config.json",
        "swift:skipped=0-3": "skips every layer",
        "swift:skipped=2/9": "has layers 0 to 3",
        "swift:skipped=3-1": "ranges",
        "swift:skipped=a": "layer indices",
        "s2d:exits=4": "exits are layer counts in \\[1, 3\\]",
        "s2d:exits=0/2": "exits are layer counts",
        "s2d:exits=1-7": "names at most 6 layers",
    }
    for spec, message in cases.items():
        with pytest.raises(InvalidParameter, match=message):
            make_drafter(spec, target)
    with pytest.raises(InvalidParameter, match="through an Engine"):
        make_drafter("swift", target_info(four_layers).__class__(four_layers.cfg.vocab_size))
    with pytest.raises(InvalidParameter, match="operator only"):
        parse_method(f"draft:model={four_layers.path}", CLIENT.__class__(options=True, operator=False))
    assert "draft" in METHODS and "swift" in METHODS and "s2d" in METHODS
