"""The decode loop on a tiny random Llama: cut points inside accepted paths, streaming, limits, errors."""

import re
from dataclasses import replace

import pytest
import torch
from helpers import runnable

from decodekit import DecodekitError, Engine, InvalidParameter, PromptTooLong, SamplingParams, load_model
from decodekit.decoding import Decoding
from decodekit.drafters import METHODS
from decodekit.protocol import Draft, Drafter, StepOutcome, Tree
from decodekit.sampling import MIN_TEMPERATURE

PROMPT = "the quick brown fox"


class Oracle(Drafter):
    """Proposes the next ``depth`` tokens of a known greedy output as a chain, plus one wrong sibling branch, so
    every step accepts ``depth`` drafts and commits ``depth + 1`` tokens."""

    def __init__(self, reference: list[int], prompt_len: int, depth: int = 4) -> None:
        self.reference, self.prompt_len, self.depth = reference, prompt_len, depth
        self.outcomes: list[StepOutcome] = []

    def begin(self, prompt, prompt_logits):
        pass

    def propose(self, sequence):
        done = len(sequence) - self.prompt_len
        chain = self.reference[done : done + self.depth]
        wrong = (int(sequence[-1]) + 1) % 300
        tokens = [int(sequence[-1]), *chain, wrong]
        parents = [-1, *range(len(chain)), 0]
        return Draft(torch.tensor(tokens), Tree.from_parents(parents))

    def observe(self, outcome):
        self.outcomes.append(outcome)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Plain greedy output: 40 tokens, no EOS allowed to end it early."""
    model = replace(tiny_model, eos_token_ids=frozenset())
    engine = Engine(model, "ar")
    return engine.request(PROMPT).prompt_ids, engine.generate(PROMPT, max_new_tokens=40)


def oracle_engine(model, reference, depth=4):
    prompt_ids, gen = reference
    oracle = Oracle(gen.token_ids, len(prompt_ids), depth)
    return Engine(model, oracle), oracle


def test_oracle_commits_whole_paths_and_matches_plain(tiny_model, reference):
    model = replace(tiny_model, eos_token_ids=frozenset())
    engine, oracle = oracle_engine(model, reference)
    out = engine.generate(PROMPT, max_new_tokens=40)
    assert out.token_ids == reference[1].token_ids
    assert out.stats.accepted_lengths == [5] * 8
    assert out.stats.mean_accepted == 5.0
    assert all(o.logits.shape == (6, len(model.tokenizer)) for o in oracle.outcomes)


def test_eos_inside_an_accepted_path(tiny_model, reference):
    tokens = reference[1].token_ids
    # the first token that first appears at output index >= 6 and index % 5 not in {4} (not a bonus token)
    index = next(i for i in range(6, 40) if i % 5 != 4 and tokens[i] not in tokens[:i])
    model = replace(tiny_model, eos_token_ids=frozenset({tokens[index]}))
    engine, oracle = oracle_engine(model, reference)
    out = engine.generate(PROMPT, max_new_tokens=40)
    assert out.token_ids == tokens[: index + 1]  # EOS kept, nothing after it
    assert out.stats.finish_reason == "stop"
    assert out.stats.accepted_lengths[-1] < len(oracle.outcomes[-1].accepted)  # the accepted path was cut


def test_max_new_tokens_reached_mid_path(tiny_model, reference):
    model = replace(tiny_model, eos_token_ids=frozenset())
    engine, _ = oracle_engine(model, reference)
    out = engine.generate(PROMPT, max_new_tokens=7)  # steps commit 5 tokens: the second is cut to 2
    assert out.token_ids == reference[1].token_ids[:7]
    assert out.stats.accepted_lengths == [5, 2] and out.stats.finish_reason == "length"


def test_stop_string_inside_an_accepted_path(tiny_model, reference):
    model = replace(tiny_model, eos_token_ids=frozenset())
    tok = model.tokenizer
    tokens = reference[1].token_ids
    full = tok.decode(tokens)
    # a stop string made of the text of tokens 6..7 (inside the second step), first occurring there
    start_text = tok.decode(tokens[:6])
    stop = tok.decode(tokens[:8])[len(start_text) :]
    assert stop and full.find(stop) == len(start_text), "fixture text changed; pick another span"
    engine, _ = oracle_engine(model, reference)
    chunks = []
    out = engine.generate(PROMPT, max_new_tokens=40, stop=[stop], on_chunk=chunks.append)
    assert out.text == full[: len(start_text)]
    assert out.token_ids == tokens[:8]  # through the token that completed the stop string
    assert out.stats.finish_reason == "stop"
    assert "".join(c.text for c in chunks) == out.text


@pytest.mark.parametrize("method", ["ar", "recycling", "recycling:tree=published", "recycling:tree=5,k=6"])
def test_streamed_text_equals_returned_text(tiny_model, method):
    engine = Engine(tiny_model, method)
    stream = engine.stream(PROMPT, max_new_tokens=30)
    pieces = [chunk.text for chunk in stream]
    assert stream.result is not None
    assert (
        "".join(pieces)
        == stream.result.text
        == tiny_model.tokenizer.decode(stream.result.token_ids, skip_special_tokens=True)
    )
    assert sum(len(c) for c in [stream.result.token_ids]) == stream.result.stats.new_tokens


EXTRA_SPECS = [
    "recycling:tree=published",
    "recycling:tree=1",
    "recycling:seed_prompt=0",
    "lookup:branches=3,num_tokens=4",
    "copyspec:gamma=1",
    "hybrid:parts=recycling+copyspec+lookup,budget=24",
]


@pytest.mark.parametrize("method", sorted(METHODS) + EXTRA_SPECS)
def test_every_method_equals_plain_on_tiny_model(tiny_model, method):
    plain = Engine(tiny_model, "ar")
    spec = Engine(tiny_model, runnable(method, tiny_model))
    for prompt in [PROMPT, "it is sunny today", "foxes and dogs"]:
        for _ in range(2):  # the second request starts from the state the first one left
            a, b = plain.generate(prompt, max_new_tokens=48), spec.generate(prompt, max_new_tokens=48)
            assert a.token_ids == b.token_ids


def test_a_drafter_that_fails_to_end_a_request_loses_nothing(tiny_model, caplog):
    """``end`` raising (a drafter's bug) is logged; the request's output is whole and the engine decodes on."""

    class FailsToEnd(Drafter):
        def propose(self, sequence):
            return Draft(sequence[-1:], Tree.chain(1))

        def end(self):
            raise RuntimeError("broken end")

    plain = Engine(tiny_model, "ar").generate(PROMPT, 12)
    engine = Engine(tiny_model, FailsToEnd())
    for _ in range(2):
        assert engine.generate(PROMPT, 12).token_ids == plain.token_ids
    assert "failed to end a request" in caplog.text and "broken end" in caplog.text


def test_run_all_decodes_many_requests_in_order(tiny_model, monkeypatch):
    """More requests than rows: each Generation is the one the request gets alone, in the requests' order; a
    failing request raises and leaves nothing decoding."""
    engine = Engine(tiny_model, "hybrid", max_batch=2)
    cases = [(PROMPT, 20, None), ("it is sunny today", 5, "ar"), ("foxes and dogs", 31, None), (PROMPT, 9, "aded")]
    requests = [engine.request(prompt, n, method=method) for prompt, n, method in cases]
    finished = []
    generations = engine.run_all(requests, on_done=lambda index, generation: finished.append(index))
    alone = Engine(tiny_model, "ar")
    assert [g.token_ids for g in generations] == [alone.generate(p, n).token_ids for p, n, _ in cases]
    assert sorted(finished) == [0, 1, 2, 3] and not engine.busy

    propose = Decoding.propose

    def fails_for_one(self):
        if self.request.max_new_tokens == 9:
            raise RuntimeError("broken drafter")
        return propose(self)

    monkeypatch.setattr(Decoding, "propose", fails_for_one)
    with pytest.raises(RuntimeError, match="broken drafter"):
        engine.run_all(requests)
    assert not engine.busy
    with pytest.raises(InvalidParameter, match="strategy"):
        engine.run_all([engine.request(PROMPT, 8, strategy="momentum")])


def test_a_conversation_continues_with_its_history(tiny_model):
    engine = Engine(tiny_model, "copyspec")
    first = engine.generate(PROMPT, max_new_tokens=12)
    history = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and then?"},
    ]
    ids = engine.request(history).prompt_ids
    assert ids[: len(first.prompt_ids)] == first.prompt_ids  # the first turn's prompt opens the conversation
    assert (
        engine.generate(history, max_new_tokens=16).token_ids
        == Engine(tiny_model, "ar").generate(ids, max_new_tokens=16).token_ids
    )


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user"}], [{"role": "robot", "content": "hi"}], [{"role": "assistant", "content": "hi"}]],
)
def test_bad_conversations_raise(tiny_model, messages):
    with pytest.raises(InvalidParameter):
        Engine(tiny_model, "ar").generate(messages, max_new_tokens=4)


def test_prompt_that_fills_the_context_window(tiny_model):
    window = tiny_model.cfg.context_window
    engine = Engine(tiny_model, "recycling")
    prompt = [5] * (window - 3)
    out = engine.generate(prompt, max_new_tokens=10)
    assert len(out.token_ids) <= 3
    assert out.stats.finish_reason in ("length", "stop")
    assert len(out.token_ids) == 3 or out.token_ids[-1] in tiny_model.eos_token_ids
    with pytest.raises(PromptTooLong):
        engine.generate([5] * window, max_new_tokens=1)


@pytest.mark.parametrize(
    ("prompt", "max_new", "error"),
    [
        ("", 5, InvalidParameter),
        ("   ", 5, InvalidParameter),
        ("hi", 0, InvalidParameter),
        ("hi", -3, InvalidParameter),
        ("hi", 10**9, InvalidParameter),
        ([], 5, InvalidParameter),
        ([10**6], 5, InvalidParameter),
    ],
)
def test_bad_requests_raise_typed_errors(tiny_model, prompt, max_new, error):
    with pytest.raises(error):
        Engine(tiny_model, "ar").generate(prompt, max_new_tokens=max_new)


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda model: load_model(123), "model must be a path"),
        (lambda model: Engine(model, 123), "method must be a method spec"),
        (lambda model: Engine(model, "recycling:k=1000000000000"), "must be in [1, 64]"),
        (lambda model: Engine(model, "hybrid:parts=lookup:num_tokens=300+aded"), "option num_tokens of method lookup"),
        (lambda model: Engine(model, "ar").generate("hi \ud800 there", 4), "the prompt is not valid text"),
        (lambda model: Engine(model, "ar").generate([{"role": "user", "content": "\udcff"}], 4), "message 0 is not"),
        (lambda model: Engine(model, "ar").generate("hi", 4, stop=[5]), "stop strings must be text"),
        (lambda model: Engine(model, "ar").generate("hi", 4, stop=["\ud800"]), "a stop string is not valid text"),
        (lambda model: Engine(model, "ar").generate("hi", 4, sampling=SamplingParams(temperature=1e-308)), "at least"),
    ],
)
def test_library_misuse_raises_decodekit_errors(tiny_model, call, says):
    with pytest.raises(DecodekitError, match=re.escape(says)):
        call(tiny_model)


def test_a_plain_string_stop_is_one_stop_string(tiny_model):
    engine = Engine(tiny_model, "ar")
    text = engine.generate(PROMPT, max_new_tokens=48).text
    # three characters, one of which occurs earlier on its own: a set of characters would cut there
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if set(text[:i]) & set(text[i : i + 3]))
    cut = engine.generate(PROMPT, max_new_tokens=48, stop=stop).text
    assert cut == text[: text.index(stop)]


def test_the_least_temperature_samples_without_nan(tiny_model):
    engine = Engine(tiny_model, "recycling")
    coldest = SamplingParams(temperature=MIN_TEMPERATURE, seed=3)
    assert engine.generate(PROMPT, 24, sampling=coldest).token_ids == engine.generate(PROMPT, 24).token_ids


def test_statistics_are_consistent(tiny_model):
    out = Engine(tiny_model, "recycling").generate(PROMPT, max_new_tokens=32)
    s = out.stats
    assert s.new_tokens == len(out.token_ids) == sum(s.accepted_lengths)
    assert s.steps == len(s.accepted_lengths) and s.mean_accepted == s.new_tokens / s.steps
    assert 0 < s.prefill_s <= s.wall_s and s.tokens_per_s == pytest.approx(s.new_tokens / s.wall_s)
    assert s.prompt_tokens == len(out.prompt_ids)
