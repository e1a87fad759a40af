"""Sampling: parameters, the target distribution, and statistical exactness of rejection sampling over trees.

Every statistical test uses fixed seeds, so it is deterministic; its power is shown by a negative control (a rule
that accepts any draft token with p > 0) that the same test rejects.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
import torch
from helpers import runnable, write_small_vocab_llama
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import decodekit.sampling
from decodekit import Engine, InvalidParameter, SamplingParams
from decodekit.decoding import draft_seed
from decodekit.drafters import METHODS
from decodekit.protocol import Draft, Drafter, Tree
from decodekit.runtime.loader import load_model
from decodekit.sampling import Sampler, penalize, warp
from decodekit.verify import verify_sampled

# ----------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": 1e-308},
        {"temperature": 9e-6},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": 1e-308},
        {"repetition_penalty": 1e300},
        {"seed": -1},
        {"seed": True},
        {"temperature": "hot"},
    ],
)
def test_bad_parameters_get_clear_errors(bad):
    with pytest.raises(InvalidParameter, match=next(iter(bad))):
        SamplingParams(**bad)


def test_temperature_zero_is_greedy_and_takes_the_greedy_path(tiny_model):
    engine = Engine(tiny_model, "recycling")
    greedy = engine.generate("the quick brown fox", max_new_tokens=24)
    zero = engine.generate("the quick brown fox", max_new_tokens=24, sampling=SamplingParams(0.0, top_p=0.5, seed=3))
    assert zero.token_ids == greedy.token_ids
    assert zero.stats.seed is None


def test_warp_matches_transformers_processors():
    """The target distribution is the one transformers' sampling would use with the same parameters."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    context = torch.randint(0, 50, (3, 6))
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, context, True)
    ours = warp(penalize(logits, seen, params.repetition_penalty), params)
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.8),
            MinPLogitsWarper(0.05),
        ]
    )
    theirs = processors(context, logits.clone()).softmax(dim=-1)
    torch.testing.assert_close(ours.float(), theirs, atol=1e-6, rtol=1e-5)


def test_node_distributions_use_each_nodes_own_context():
    """With a repetition penalty, a node's p counts the tokens on its own path, not its siblings'."""
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=2.0), vocab_size=4, prompt_ids=[0])
    tree = Tree.from_parents([-1, 0, 0])
    tokens = torch.tensor([0, 1, 2])
    logits = torch.ones(3, 4)
    p1, p2 = sampler.node_probs(logits, tokens, tree, 1), sampler.node_probs(logits, tokens, tree, 2)
    assert p1[1] < p1[2] and p2[2] < p2[1]  # each node penalizes its own token, not its sibling's
    assert p1[0] == p1[1]  # the prompt's token is penalized too
    sampler.advance([3])
    assert sampler.node_probs(logits, tokens, tree, 0)[3] < sampler.node_probs(logits, tokens, tree, 0)[2]


# ------------------------------------------------------------------------------------------- the statistics


def chi_square_pvalue(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Goodness of fit of ``samples`` to ``exact`` (outcome -> probability); cells expecting fewer than 5
    samples are pooled. An outcome the exact law rules out gives 0."""
    n, counts = len(samples), Counter(samples)
    if any(exact.get(outcome, 0.0) <= 0 for outcome in counts):
        return 0.0
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for outcome, prob in exact.items():
        if n * prob >= 5:
            cells.append((counts[outcome], n * prob))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts[outcome], pooled_exp + n * prob
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((obs - exp) ** 2 / exp for obs, exp in cells)
    dof = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


# ------------------------------------------------------------------- rejection sampling as a pure function

V = 5


def toy_probs(context: tuple[int, ...]) -> torch.Tensor:
    """A fixed, context-dependent next-token distribution over V tokens."""
    g = torch.Generator().manual_seed(hash(context) % 2**31)
    return (torch.randn(V, generator=g, dtype=torch.float64) * 1.5).softmax(dim=0)


def exact_pairs() -> dict[tuple, float]:
    return {(a, b): float(toy_probs((a,))[b] * toy_probs(())[a]) for a in range(V) for b in range(V)}


# root -> 1, 2, 3 (3 repeats 1's token when deterministic); 1 -> 4, 5; 2 -> 6; 4 -> 7
TOY_TREE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2, 4])


def first_two(path: torch.Tensor, bonus: int, tokens: torch.Tensor, generator: torch.Generator) -> tuple:
    out = [*tokens[path[1:]].tolist(), bonus][:2]
    if len(out) == 1:
        out.append(int(torch.multinomial(toy_probs(tuple(out)), 1, generator=generator)))
    return tuple(out)


def context_of(tokens: torch.Tensor, node: int) -> tuple[int, ...]:
    return tuple(tokens[TOY_TREE.ancestors[node].nonzero().flatten()[1:]].tolist())


def accept_if_possible(tokens, tree, target_probs, generator, candidates=None, draft_probs=None):
    """The negative control: a wrong rule that takes the first child whose token has p > 0."""
    path, node = [0], 0
    while True:
        p = target_probs(node)
        child = next((c for c in range(node + 1, tree.size) if tree.parents[c] == node and p[tokens[c]] > 0), None)
        if child is None:
            return torch.tensor(path), int(torch.multinomial(p, 1, generator=generator))
        path.append(child)
        node = child


def run_toy(verify, draws: str, trials: int = 12000) -> list[tuple]:
    """Sample the first two output tokens ``trials`` times, drafting on TOY_TREE.

    ``draws``: "fixed" (deterministic tokens), "iid" (children drawn from a known q with replacement) or
    "distinct" (children drawn from q without replacement, each with q renormalized over what is left)."""
    generator, drafter = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    fixed = torch.tensor([0, 1, 3, 1, 4, 0, 2, 1])
    parents = TOY_TREE.parents.tolist()
    samples = []
    for _ in range(trials):
        tokens, draft_probs = fixed, None
        if draws != "fixed":
            tokens, draft_probs = fixed.clone(), torch.zeros(TOY_TREE.size, V, dtype=torch.float64)
            taken: dict[int, list[int]] = {}
            for node in range(1, TOY_TREE.size):
                q = toy_probs((7, *context_of(tokens, parents[node]))).clone()  # a q that differs from p
                if draws == "distinct":
                    q[taken.setdefault(parents[node], [])] = 0
                    q /= q.sum()
                draft_probs[node] = q
                tokens[node] = int(torch.multinomial(q, 1, generator=drafter))
                taken.setdefault(parents[node], []).append(int(tokens[node]))
        path, bonus = verify(
            tokens,
            TOY_TREE,
            lambda node, tokens=tokens: toy_probs(context_of(tokens, node)),
            generator,
            None,
            draft_probs,
        )
        samples.append(first_two(path, bonus, tokens, generator))
    return samples


@pytest.mark.parametrize("draws", ["fixed", "iid", "distinct"])
def test_rejection_sampling_over_a_tree_is_exact(draws):
    assert chi_square_pvalue(run_toy(verify_sampled, draws), exact_pairs()) > 1e-3


def test_negative_control_accepting_any_possible_token_is_detected():
    assert chi_square_pvalue(run_toy(accept_if_possible, "fixed"), exact_pairs()) < 1e-6


def test_candidates_mask_keeps_side_tokens_out_of_the_output():
    tokens = torch.tensor([0, 1, 2])
    candidates = torch.tensor([True, False, False])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        path, _ = verify_sampled(tokens, Tree.chain(3), lambda node: torch.full((V,), 0.2), generator, candidates)
        assert path.tolist() == [0]


# --------------------------------------------------- every drafter in the engine, on an enumerable tiny model

PROMPT = [0, 1, 2, 3, 0, 1, 2]  # repeats, so that copying drafters propose something
ENGINE_PARAMS = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2)
LENGTH = 3


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return load_model(write_small_vocab_llama(tmp_path_factory.mktemp("small-vocab")))


@pytest.fixture(scope="module")
def exact_triples(small_model) -> dict[tuple, float]:
    """The exact law of the first LENGTH sampled tokens: every continuation scored by the runtime."""
    model, vocab = small_model.transformer, small_model.cfg.vocab_size
    exact = {}
    for seq in itertools.product(range(vocab), repeat=LENGTH):
        ids = torch.tensor([PROMPT + list(seq[:-1])])
        logits = model(ids, model.new_cache(ids.shape[1]))[0, len(PROMPT) - 1 :]
        prob = 1.0
        for i, token in enumerate(seq):
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[PROMPT + list(seq[:i])] = True
            prob *= float(warp(penalize(logits[i], seen, ENGINE_PARAMS.repetition_penalty), ENGINE_PARAMS)[token])
        exact[seq] = prob
    return exact


class WideTree(Drafter):
    """A deterministic tree with several children per node (one a repeated token) and depth 3."""

    tree = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2, 4])

    def begin(self, prompt, prompt_logits):
        pass

    def propose(self, sequence):
        root = int(sequence[-1])
        shifts = [0, 1, 3, 1, 2, 5, 6, 1]
        return Draft(torch.tensor([(root + s) % 8 for s in shifts]), self.tree)

    def observe(self, outcome):
        pass


class SampledTree(WideTree):
    """Children drawn from a known q (its own random stream), siblings without replacement."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(5)
        self.q = torch.tensor([0.3, 0.05, 0.1, 0.05, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)

    def propose(self, sequence):
        tokens, probs = [int(sequence[-1])], torch.zeros(self.tree.size, 8, dtype=torch.float64)
        taken: dict[int, list[int]] = {}
        for node, parent in enumerate(self.tree.parents.tolist()[1:], start=1):
            q = self.q.clone()
            q[taken.setdefault(parent, [])] = 0
            probs[node] = q / q.sum()
            tokens.append(int(torch.multinomial(probs[node], 1, generator=self.generator)))
            taken[parent].append(tokens[-1])
        return Draft(torch.tensor(tokens), self.tree, draft_probs=probs)


def sample_outputs(model, method, trials: int = 1500, rows: int = 16) -> list[tuple]:
    """The first LENGTH tokens of the samples seeded 0..trials-1, decoded ``rows`` requests at a time in one batch
    (a Drafter instance decodes alone), so the law is checked under batching too."""
    engine = Engine(model, method, max_batch=1 if isinstance(method, Drafter) else rows)
    requests = [engine.request(PROMPT, LENGTH, sampling=replace(ENGINE_PARAMS, seed=seed)) for seed in range(trials)]
    return [tuple(generation.token_ids) for generation in engine.run_all(requests)]


@pytest.mark.parametrize("method", [*METHODS, "wide-tree", "sampled-tree"])
def test_every_drafter_samples_the_target_distribution(small_model, exact_triples, method):
    drafter = {"wide-tree": WideTree, "sampled-tree": SampledTree}.get(method)
    samples = sample_outputs(small_model, drafter() if drafter else runnable(method, small_model))
    assert chi_square_pvalue(samples, exact_triples) > 1e-3


def test_engine_negative_control_is_detected(small_model, exact_triples, monkeypatch):
    monkeypatch.setattr(decodekit.sampling, "verify_sampled", accept_if_possible)
    assert chi_square_pvalue(sample_outputs(small_model, WideTree()), exact_triples) < 1e-6


def test_same_seed_same_output_for_every_method(tiny_model):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=11)
    for method in (runnable(name, tiny_model) for name in METHODS):
        first = Engine(tiny_model, method).generate("the quick brown fox", 24, sampling=params)
        again = Engine(tiny_model, method).generate("the quick brown fox", 24, sampling=params)
        assert first.token_ids == again.token_ids, method
        assert first.stats.seed == 11


def test_a_sampling_drafter_draws_from_a_stream_of_its_own():
    for seed in [0, 1, 7, 2**32 + 5, 2**63 - 1, *range(100, 200)]:
        drafted = draft_seed(seed)
        assert drafted == draft_seed(seed) and drafted & 0xFFFFFFFF != seed & 0xFFFFFFFF
