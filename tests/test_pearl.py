"""PEARL: the chain a worker thread drafts ahead follows the committed text (kept when a step agrees with it,
started over when not, tokens drafted from an older text dropped), drafts are a function of the text alone, and
the engine runs the target on one thread fewer while a PEARL request is live."""

import threading

import pytest
import torch
from helpers import write_tiny_llama

from decodekit import Engine
from decodekit.decoding import target_info
from decodekit.drafters import make_drafter
from decodekit.drafters.pearl import Chain
from decodekit.errors import InvalidParameter
from decodekit.protocol import DraftModel, StepOutcome
from decodekit.sampling import SamplingParams


def drafted(chain, n):
    """Let ``chain`` draft ``n`` tokens as the worker would."""
    for _ in range(n):
        context = torch.cat([chain.text, torch.tensor(chain.tokens, dtype=torch.int64)])
        chain.extend(chain.epoch, (int(context[-1]) + 1) % 100, 0.6)


def test_a_chain_moves_on_with_the_text_and_starts_over_when_it_disagrees():
    chain = Chain(DraftModel(), ahead=9)
    chain.restart(torch.tensor([1, 2, 3]))
    drafted(chain, 5)
    assert chain.tokens == [4, 5, 6, 7, 8]
    assert chain.agrees([4, 5]) and chain.agrees([4]) and chain.agrees([4, 5, 6, 7, 8, 9]) is None
    chain.follow([4, 5], kept=True)  # the step accepted 4 and its bonus token was 5
    assert chain.text.tolist() == [1, 2, 3, 4, 5] and chain.tokens == [6, 7, 8] and len(chain.probs) == 3
    epoch = chain.epoch
    assert chain.agrees([6, 9]) is False  # 9 where the chain had 7
    chain.follow([6, 9], kept=False)
    assert chain.text.tolist() == [1, 2, 3, 4, 5, 6, 9] and chain.tokens == [] and chain.epoch == epoch + 1
    chain.extend(epoch, 8, 0.6)  # drafted from the older text while the step ran: dropped
    assert chain.tokens == []
    drafted(chain, 9)
    assert not chain.wants and chain.tokens[0] == 10
    assert chain.agrees(list(range(10, 22)))  # a hybrid committed past the chain's reach, agreeing with all of it
    chain.follow(list(range(10, 22)), kept=True)
    assert chain.tokens == [] and chain.text[-1] == 21 and chain.wants


def test_a_draft_takes_the_chain_while_its_chance_lasts():
    chain = Chain(DraftModel(), ahead=9)
    chain.restart(torch.tensor([1]))
    assert chain.ready(4, 0.0) is None  # nothing drafted yet: wait
    drafted(chain, 3)
    assert chain.ready(4, 0.0) is None and chain.ready(3, 0.0) == 3
    assert chain.ready(4, 0.3) == 2  # 0.6, 0.36, then 0.216 < 0.3
    assert chain.ready(4, 0.7) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from decodekit.runtime.loader import load_model

    return load_model(write_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=2))


def test_drafts_depend_on_the_text_only(tiny):
    """The same request drafts the same trees however fast the worker is (a seeded sample is reproducible)."""
    engine = Engine(tiny, f"pearl:model={tiny.path},max_nodes=3")
    sampling = SamplingParams(temperature=0.9, seed=7)
    first = engine.generate("tell me about the weather", 40, sampling=sampling)
    second = engine.generate("tell me about the weather", 40, sampling=sampling)
    assert first.token_ids == second.token_ids
    assert first.stats.steps == second.stats.steps


def test_a_step_may_commit_past_the_chain(tiny):
    """A hybrid's step can commit more tokens than the chain holds (other parts' drafts): the chain is checked as
    far as it reaches, without waiting for tokens it may never draft."""
    plain = Engine(tiny, "ar").generate("the quick brown fox", 20)
    drafter = make_drafter(f"pearl:model={tiny.path},max_nodes=2", target_info(tiny))
    prompt = torch.tensor(plain.prompt_ids)
    drafter.begin(prompt, None)
    draft = drafter.propose(prompt)  # the first step verifies no draft
    committed = plain.token_ids[:12]  # 12 > the chain's 5
    outcome = StepOutcome(draft, torch.zeros(1, 0), torch.tensor([0]), committed, greedy_choices=torch.zeros(1))
    step = threading.Thread(target=drafter.observe, args=(outcome,))
    step.start()
    step.join(timeout=30)
    assert not step.is_alive()
    assert drafter.chain.text.tolist() == plain.prompt_ids + committed and not drafter.pre_verify
    following = drafter.propose(drafter.chain.text)
    assert following.tokens.tolist() == [committed[-1], *plain.token_ids[12:14]]


def test_the_target_decodes_on_one_thread_fewer_while_pearl_drafts(tiny, monkeypatch):
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("needs two torch threads")
    seen = []
    forward = type(tiny.transformer).__call__

    def spy(self, *args, **kwargs):
        seen.append(("decode" if len(args) > 2 else "prefill", torch.get_num_threads()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny.transformer), "__call__", spy)
    Engine(tiny, f"pearl:model={tiny.path}").generate("the quick brown fox", 12)
    assert set(seen) == {("prefill", threads), ("decode", threads - 1)}
    seen.clear()
    Engine(tiny, "ar").generate("the quick brown fox", 12)
    assert set(seen) == {("prefill", threads), ("decode", threads)} and torch.get_num_threads() == threads


@pytest.mark.parametrize("spec", ["pearl:model={}", "hybrid:parts=aded+pearl:model={}"])
def test_an_ended_request_leaves_the_worker_nothing_to_draft(tiny, spec):
    """The engine ends each request's drafter (a hybrid its parts): the chain is dropped, so the worker does not
    draft on past a finished answer; the drafter then serves the next request as before."""
    plain = Engine(tiny, "ar").generate("the quick brown fox", 16)
    drafter = make_drafter(spec.format(tiny.path), target_info(tiny))
    chain = drafter.chain if hasattr(drafter, "chain") else drafter.parts[1].chain
    engine = Engine(tiny, drafter)
    for _ in range(2):
        assert engine.generate("the quick brown fox", 16).token_ids == plain.token_ids
        assert chain.text.numel() == 0 and not chain.wants


def test_pearl_refuses_bad_input_clearly(tiny):
    with pytest.raises(InvalidParameter, match="needs a draft model"):
        make_drafter("pearl", target_info(tiny))
    with pytest.raises(InvalidParameter, match="through an Engine"):
        make_drafter(f"pearl:model={tiny.path}", target_info(tiny).__class__(tiny.cfg.vocab_size))
