"""Continuous batching on a tiny random Llama: outputs independent of the batch, rows joining and leaving, the
goodput width rule and the step-cost table."""

import random

import pytest
import torch
from helpers import runnable
from test_engine import Oracle

from decodekit import Engine
from decodekit.batch import Batch, StepCost, best_width, interpolate
from decodekit.decoding import Decoding, Request, target_info
from decodekit.drafters import METHODS, make_drafter
from decodekit.drafters.ar import Autoregressive
from decodekit.protocol import MAX_DRAFT_NODES, Drafter
from decodekit.sampling import GREEDY, SamplingParams

PROMPTS = [
    "the quick brown fox",
    "a b c a b c a b c a b c",
    "tell me about the weather tomorrow in the hills",
    "one two three four five six seven eight nine ten eleven twelve",
]


def decoding(model, method: str, prompt: str, max_new_tokens: int, sampling: SamplingParams = GREEDY) -> Decoding:
    ids = Engine(model, "ar").request(prompt).prompt_ids
    request = Request(ids, max_new_tokens, sampling=sampling)
    return Decoding(model, make_drafter(method, target_info(model)), method, request)


def run(batch: Batch, joining: list[tuple[int, Decoding]]) -> dict[Decoding, list]:
    """Step ``batch`` until every request is done; ``joining``: (step, decoding), joined before that step."""
    results, steps = {}, 0
    pending = sorted(joining, key=lambda item: item[0])
    while pending or batch.size:
        while pending and pending[0][0] <= steps and not batch.full:
            batch.join(pending.pop(0)[1])
        for request, result in batch.step():
            if isinstance(result, Exception):
                raise result
            results.setdefault(request, []).append(result)
            if request.done:
                batch.leave(request)
        steps += 1
    return results


@pytest.mark.parametrize("widths", ["whole trees", "random widths"])
def test_every_method_in_one_batch_gives_its_single_request_output(tiny_model, widths):
    cases = [(runnable(m, tiny_model), PROMPTS[i % len(PROMPTS)], 12 + 5 * i) for i, m in enumerate(METHODS)]
    batch = Batch(tiny_model, max_rows=4, capacity=512, adaptive=False)
    if widths == "random widths":  # every drafter must take a cut draft, or a skipped step, in its stride
        choice = random.Random(0).choice
        batch._width = lambda: choice([1, 1, 2, 3, 5, 8, MAX_DRAFT_NODES])
    requests = [decoding(tiny_model, method, prompt, n) for method, prompt, n in cases]
    chunks = run(batch, [(3 * i, request) for i, request in enumerate(requests)])  # joins while others run
    for (method, prompt, n), request in zip(cases, requests, strict=True):
        expected = Engine(tiny_model, method).generate(prompt, n)
        assert request.result().token_ids == expected.token_ids, method
        assert [t for chunk in chunks[request] for t in chunk.token_ids] == expected.token_ids
    assert batch.rows == []


def test_a_batch_mixing_a_high_acceptance_drafter_keeps_outputs(tiny_model):
    """An oracle row accepts whole chains while others accept nothing: rows commit different counts per step."""
    reference = Engine(tiny_model, "ar").generate(PROMPTS[0], 40)
    ids = reference.prompt_ids
    oracle = Decoding(tiny_model, Oracle(reference.token_ids, len(ids)), "oracle", Request(ids, 40))
    cases = list(zip(["ar", "lookup"], PROMPTS[1:3], strict=True))
    others = [decoding(tiny_model, method, prompt, 30) for method, prompt in cases]
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=False)
    run(batch, [(0, oracle), (1, others[0]), (2, others[1])])
    assert oracle.result().token_ids == reference.token_ids
    assert oracle.stats.steps < 40 / 3  # the oracle's chains were accepted inside the batch
    for (method, prompt), request in zip(cases, others, strict=True):
        assert request.result().token_ids == Engine(tiny_model, method).generate(prompt, 30).token_ids


def test_adaptive_width_follows_cost_and_acceptance(tiny_model):
    reference = Engine(tiny_model, "ar").generate(PROMPTS[0], 60)
    ids = reference.prompt_ids

    def widths(cost: StepCost) -> list[int]:
        batch = Batch(tiny_model, max_rows=2, capacity=512, adaptive=True)
        batch.cost = cost
        cost.observe = lambda rows, width, seconds: None  # the given table, not the tiny model's timings
        request = Decoding(tiny_model, Oracle(reference.token_ids, len(ids)), "oracle", Request(ids, 60))
        batch.join(request)
        seen, row = [], batch.joining[0]  # live after the first step's prefill
        while batch.size:
            batch.step()
            seen.append(batch.last_width)
            if request.done:
                batch.leave(request)
        assert request.result().token_ids == reference.token_ids
        # drafts were scored against the text, verified or not: the chain always matched, the sibling never
        assert row.node_rates[1:5].min() > 0.9 and row.node_rates[5] < 0.1
        return seen

    flat = StepCost([1, 256], [0.01, 0.0100001], [1, 2], [0.01, 0.01])  # extra nodes cost nothing
    mild = StepCost([1, 256], [0.01, 0.265], [1, 2], [0.01, 0.02])  # a node costs a tenth of a step
    steep = StepCost([1, 256], [0.01, 5.12], [1, 2], [0.01, 0.02])  # a node costs two steps
    assert set(widths(flat)) == {6}  # the oracle's whole draft: root, a 4-token chain and a wrong sibling
    mild_widths = widths(mild)
    assert mild_widths[:8] == [6] * 8  # the method's warm-up drafts whole trees
    assert mild_widths[8:11] == [5] * 3  # then the sibling, never accepted, is left out
    steep_widths = widths(steep)
    assert steep_widths[:8] == [6] * 8
    assert set(steep_widths[8:]) == {1}  # then drafting never pays


def test_best_width():
    rates = torch.tensor([[1.0, 0.9, 0.8, 0.1], [1.0, 0.5, 0.0, 0.0]])
    flat = torch.ones(4)
    assert best_width(rates, flat, 0.0) == 4  # any expected token is free
    assert best_width(rates, torch.tensor([1.0, 1.0, 1.0, 5.0]), 0.0) == 3
    assert best_width(rates, torch.tensor([1.0, 1.0, 1.0, 1.05]), 0.0) == 3
    assert best_width(rates, torch.tensor([1.0, 1.0, 1.0, 1.05]), 0.0, tolerance=0.03) == 4  # near enough: wider
    assert best_width(rates, torch.tensor([1.0, 1.2, 1.4, 2.0]), 0.0) == 3
    assert best_width(rates, torch.tensor([1.0, 1.2, 1.4, 2.0]), 5.0) == 1  # drafting costs more than it brings
    assert best_width(rates, torch.tensor([1.0, 3.0, 4.0, 5.0]), 0.0) == 1


def test_interpolate_and_step_cost():
    xs, ys = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([10.0, 12.0, 20.0])
    assert interpolate(torch.tensor([1.0, 1.5, 3.0, 8.0, 0.0]), xs, ys).tolist() == [10.0, 11.0, 16.0, 36.0, 8.0]
    cost = StepCost([1, 2, 4, 8], [1.0, 1.0, 2.0, 4.0], [1, 2, 4], [1.0, 1.5, 3.0])
    # t1(B w) + tB(B) - t1(B): 4 rows of 2 nodes = a one-row forward of 8 tokens and the extra of 4 rows
    assert cost.predict(4, torch.tensor([1, 2])).tolist() == [3.0, 5.0]
    cost.observe(4, 2, 10.0)  # twice the table: the first measurement of a batch size and width is taken as is
    # width 1 is unmeasured with nothing narrower: the table; width 3 borrows width 2's ratio (table: 6 + 3 - 2)
    assert cost.predict(4, torch.tensor([1, 2, 3])).tolist() == [3.0, 10.0, 14.0]
    assert cost.predict(2, torch.tensor([2])).item() == 2.5  # another batch size keeps its table
    cost.observe(4, 2, 5.0)  # then a running ratio: 2 + 0.1 (1 - 2)
    assert cost.predict(4, torch.tensor([2])).item() == pytest.approx(9.5)
    cost.observe(4, 1, 6.0)  # a measured narrower width no longer lends to a wider measured one
    assert cost.predict(4, torch.tensor([1, 2, 4])).tolist() == pytest.approx([6.0, 9.5, 1.9 * 9.0])


def test_step_cost_calibrates_on_empty_rows(tiny_model):
    batch = Batch(tiny_model, max_rows=3, capacity=64, adaptive=True)
    assert batch.cost.token_counts.tolist() == [1, 2, 4, 8, 16, 32, 64]
    assert batch.cost.rows.tolist() == [1, 2, 3] and bool((batch.cost.token_seconds > 0).all())
    assert batch.cache.lengths == [0, 0, 0]  # calibration committed nothing


def test_seeded_sample_in_a_batch_equals_the_library(tiny_model):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    sampled = decoding(tiny_model, "recycling", PROMPTS[2], 30, params)
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=True)
    batch.join(decoding(tiny_model, "lookup", PROMPTS[1], 40))
    batch.join(sampled, pinned=True)
    batch.join(decoding(tiny_model, "recycling", PROMPTS[0], 40))
    run(batch, [])
    expected = Engine(tiny_model, "recycling").generate(PROMPTS[2], 30, sampling=params)
    assert sampled.result().token_ids == expected.token_ids


class Broken(Drafter):
    def begin(self, prompt, prompt_logits):
        pass

    def propose(self, sequence):
        raise RuntimeError("drafter bug")

    def observe(self, outcome):
        pass


class Seeded(Broken):
    """Records whether its request was handed the prompt's logits."""

    wants_prompt_logits = True

    def begin(self, prompt, prompt_logits):
        self.seeded = prompt_logits is not None


@pytest.mark.parametrize("adaptive", [True, False])
def test_only_a_request_decoding_alone_gets_prompt_logits_under_load_aware_speculation(tiny_model, adaptive):
    ids = Engine(tiny_model, "ar").request(PROMPTS[0]).prompt_ids
    first, second = Seeded(), Seeded()
    batch = Batch(tiny_model, max_rows=2, capacity=512, adaptive=adaptive)
    batch.join(Decoding(tiny_model, first, "seeded", Request(ids, 4, sampling=GREEDY)))
    batch.join(Decoding(tiny_model, second, "seeded", Request(ids, 4, sampling=GREEDY)))
    batch.step()  # both prompts are in after one step: the first alone, the second beside it
    assert first.seeded and second.seeded == (not adaptive)  # whole trees always draft: seeding always pays


def test_a_failing_drafter_fails_only_its_row(tiny_model):
    ids = Engine(tiny_model, "ar").request(PROMPTS[0]).prompt_ids
    broken = Decoding(tiny_model, Broken(), "broken", Request(ids, 10, sampling=GREEDY))
    healthy = decoding(tiny_model, "recycling", PROMPTS[1], 10)
    batch = Batch(tiny_model, max_rows=2, capacity=512, adaptive=False)
    batch.join(broken)
    batch.join(healthy)
    results = dict(batch.step())
    assert isinstance(results[broken], RuntimeError) and not isinstance(results[healthy], Exception)
    batch.leave(broken)
    run(batch, [])
    assert healthy.result().token_ids == Engine(tiny_model, "recycling").generate(PROMPTS[1], 10).token_ids


def test_rates_are_kept_for_a_bounded_number_of_methods(tiny_model, monkeypatch):
    monkeypatch.setattr("decodekit.batch.MAX_METHODS", 2)
    batch = Batch(tiny_model, max_rows=1, capacity=512, adaptive=True)
    for spec in ["lookup", "lookup:num_tokens=4", "recycling"]:
        run(batch, [(0, decoding(tiny_model, spec, PROMPTS[1], 12))])
    assert list(batch.method_rates) == ["lookup:num_tokens=4", "recycling"] == list(batch.method_drafts)


class Recorder(Autoregressive):
    """Plain decoding that records each step's ``drafted`` flag."""

    def __init__(self):
        self.drafted = []

    def observe(self, outcome):
        self.drafted.append(outcome.drafted)


def test_a_step_without_propose_tells_the_drafter_it_did_not_draft(tiny_model):
    ids = Engine(tiny_model, "ar").request(PROMPTS[0]).prompt_ids
    recorder = Recorder()
    request = Decoding(tiny_model, recorder, "recorder", Request(ids, 10, sampling=GREEDY))
    cache = tiny_model.transformer.new_cache(request.capacity)
    request.prefill(cache)
    for next_draft in (request.propose, request.root_draft, request.propose):
        draft = next_draft()
        logits = tiny_model.transformer(draft.tokens[None], cache, draft.tree)[0]
        request.accept(draft, logits, cache, 0, 0.0)
    assert recorder.drafted == [True, False, True]


def test_without_drafts_the_rows_take_turns_to_propose(tiny_model):
    """At width 1 a row still proposes (only to be scored) every max(SHADOW_EVERY, B) steps, one row a step."""
    ids = Engine(tiny_model, "ar").request(PROMPTS[0]).prompt_ids
    batch = Batch(tiny_model, max_rows=10, capacity=512, adaptive=True, prefill_chunk=1024)  # all in one step
    recorders = [Recorder() for _ in range(10)]
    for recorder in recorders:
        batch.join(Decoding(tiny_model, recorder, "recorder", Request(ids, 40, sampling=GREEDY)))
    chosen = []  # each step's width, as the batch chose it before drafting (the first prefills every prompt)
    while batch.size:
        chosen.append(batch._width())
        for request, _ in batch.step():
            if request.done:
                batch.leave(request)
    plain = chosen.index(1)  # root-only drafts never pay: width 1 once the method's rates are warm
    assert plain <= 2 and set(chosen[plain:]) == {1}
    drafted = torch.tensor([recorder.drafted for recorder in recorders])
    assert drafted[:, :plain].all()  # the warm-up drafted whole trees
    drafted = drafted[:, plain:]
    assert (drafted.sum(dim=0) == 1).all()  # ten rows, every tenth step each: exactly one a step
    for row in drafted:
        assert set(row.nonzero().flatten().diff().tolist()) == {10}
