"""decodekit's drafters as vLLM proposers, driven the way vLLM drives a ``custom_class`` proposer (a batch of rows of
token ids after every step), without vLLM: state follows each request through moving rows and is freed when it
leaves, identical prompts keep separate drafters, chains are the drafter's best path, methods that need more than
token ids are refused; and, where a vLLM environment exists, vLLM itself with our proposer (skipped elsewhere: CI
makes none, it takes ~10 minutes to install). Speed inside vLLM: the bench's vllm peers (BENCHMARKS.md)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from decodekit import InvalidParameter
from decodekit.bench.runners import VllmRunner, vllm_python
from decodekit.integrations import vllm as integration
from decodekit.protocol import Draft, Tree

VOCAB = 100
WIDTH = 4


def config(width: int = WIDTH) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=width),
        model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB, max_model_len=4096),
    )


def text(seed: int, length: int = 120) -> list[int]:
    """A repetitive 'answer': a random 9-token phrase again and again, a different phrase per seed."""
    phrase = torch.randint(1, VOCAB, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (phrase * (length // 9 + 1))[:length]


class FakeVllm:
    """vLLM's side: rows of token ids, each step committing the accepted part of the row's chain and one more token
    of the row's reference text (greedy verification against it)."""

    def __init__(self, proposer: integration.Proposer, rows: int, capacity: int = 512) -> None:
        self.proposer, self.tokens = proposer, np.zeros((rows, capacity), dtype=np.int32)
        self.lengths = [0] * rows
        self.references: list[list[int] | None] = [None] * rows
        self.chains: list[list[int]] = [[] for _ in range(rows)]
        self.steps = self.committed = 0

    def add(self, row: int, reference: list[int], prompt: int = 12) -> None:
        self.references[row] = reference
        self.tokens[row, :prompt] = reference[:prompt]
        self.lengths[row], self.chains[row] = prompt, []

    def step(self) -> None:
        sampled = []
        for row, reference in enumerate(self.references):
            if reference is None or self.lengths[row] >= len(reference):
                sampled.append([])
                continue
            n, chain = self.lengths[row], self.chains[row][: len(reference) - self.lengths[row]]
            accepted = 0
            while accepted < len(chain) and chain[accepted] == reference[n + accepted]:
                accepted += 1
            new = reference[n : min(len(reference), n + accepted + 1)]
            self.tokens[row, n : n + len(new)] = new
            self.lengths[row] += len(new)
            sampled.append(new)
            self.steps, self.committed = self.steps + 1, self.committed + len(new)
        self.chains = self.proposer.propose(sampled, list(self.lengths), self.tokens)
        for chain in self.chains:
            assert len(chain) <= WIDTH and all(0 <= token < VOCAB for token in chain)


def test_the_chain_is_the_drafts_best_path():
    # root 0; children 1 (best) and 2; 1's children 3 and 4; 3's child 5
    draft = Draft(torch.tensor([7, 10, 20, 11, 12, 13]), Tree.from_parents([-1, 0, 0, 1, 1, 3]))
    assert integration.best_path(draft, 8) == [1, 3, 5]
    assert integration.best_path(draft, 2) == [1, 3]
    assert integration.best_path(Draft(torch.tensor([7]), Tree.chain(1)), 8) == []


@pytest.mark.parametrize("cls", [integration.Lookup, integration.Suffix, integration.Hybrid])
def test_each_request_keeps_its_own_drafter_and_copies_its_own_text(cls):
    fake = FakeVllm(cls(config()), rows=2)
    fake.add(0, text(1))
    fake.add(1, text(2))
    for _ in range(5):
        fake.step()
    assert len(fake.proposer.requests) == 2
    assert fake.proposer.requests[0] is not fake.proposer.requests[1]
    for _ in range(60):
        fake.step()
    assert fake.committed / fake.steps > 2.5  # repetitive text: most chains are accepted (plain decoding: 1)
    assert fake.proposer.requests == {}  # both texts ended


def test_state_follows_a_request_to_another_row_and_is_freed_when_it_leaves():
    proposer = integration.Proposer(config())
    fake = FakeVllm(proposer, rows=3)
    fake.add(0, text(1))
    fake.add(2, text(2))
    for _ in range(5):
        fake.step()
    leaving, moving = proposer.requests[0], proposer.requests[2]
    ended = []
    for request in (leaving, moving):
        request.drafter.end = lambda request=request: ended.append(request)
    # request 0 ends and vLLM condenses its batch: request 2's tokens move to row 0
    fake.tokens[0], fake.references[0], fake.lengths[0], fake.chains[0] = (
        fake.tokens[2].copy(), fake.references[2], fake.lengths[2], fake.chains[2])  # fmt: skip
    fake.references[2], fake.lengths[2] = None, 0
    fake.step()
    assert list(proposer.requests) == [0] and proposer.requests[0] is moving and ended == [leaving]
    fake.references[0] = None  # it ends too
    fake.step()
    assert proposer.requests == {} and ended == [leaving, moving]


def test_identical_prompts_take_separate_drafters():
    proposer = integration.Lookup(config())
    fake = FakeVllm(proposer, rows=2)
    fake.add(0, text(3))
    fake.add(1, text(3))
    fake.step()
    assert proposer.requests[0] is not proposer.requests[1]
    fake.step()
    assert proposer.requests[0] is not proposer.requests[1]


@pytest.mark.parametrize("spec", ["recycling", "aded", "hybrid", "lookahead", "hybrid:parts=aded+copyspec"])
def test_methods_that_need_more_than_token_ids_are_refused(spec, monkeypatch):
    monkeypatch.setenv(integration.METHOD_ENV, spec)
    with pytest.raises(InvalidParameter, match="learns from committed tokens only"):
        integration.Proposer(config())


def test_a_spec_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv(integration.METHOD_ENV, "lookup:num_tokens=0")
    with pytest.raises(InvalidParameter, match="num_tokens"):
        integration.Proposer(config())
    monkeypatch.setenv(integration.METHOD_ENV, "hybrid:parts=lookup+copyspec")
    assert integration.Proposer(config()).spec == "hybrid:parts=lookup+copyspec"


@pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment (make vllm-env, or DECODEKIT_VLLM_PYTHON)")
def test_inside_vllm_the_output_is_vllms_without_speculation(default_model):
    """vLLM itself with our proposer: greedy outputs equal vLLM's plain ones (and so ours) on the built-in prompts."""
    from decodekit import Engine
    from decodekit.prompts import builtin_questions

    engine = Engine(default_model, "ar")
    prompts = [engine.request(q.turns[0]).prompt_ids for q in builtin_questions()[:3]]
    runners = [VllmRunner(default_model, peer, vllm_python()) for peer in ("vllm", "vllm-decodekit")]
    try:
        outputs = [[runner.run(ids, 48).token_ids for ids in prompts] for runner in runners]
    finally:
        for runner in runners:
            runner.close()
    assert outputs[0] == outputs[1]
