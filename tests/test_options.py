"""Method options: every option declares its bounds, one check refuses what is out of them, a server client sets only
what its operator allows, files are read safely, and drafters report their memory."""

from __future__ import annotations

import os
import random
import tracemalloc
from typing import Annotated

import pytest
import torch

from decodekit.drafters import (
    CLIENT,
    METHODS,
    MethodPolicy,
    StepOutcome,
    TargetInfo,
    make_drafter,
    method_options,
    parse_method,
)
from decodekit.drafters.options import Choice, Range, checked_options, options_of
from decodekit.errors import InvalidParameter
from decodekit.protocol import MAX_DRAFT_NODES

TARGET = TargetInfo(vocab_size=49152)
NUMERIC = [(m, o) for m in METHODS for o in method_options(m).values() if isinstance(o.kind, Range)]


def test_every_option_of_every_method_declares_its_kind():
    for name, cls in METHODS.items():
        for option in options_of(cls).values():  # raises TypeError for an option without a kind
            assert option.base in (bool, int, float, str), (name, option.name)
            assert option.kind is not None or option.base is bool, (name, option.name)
            if option.default not in ("", None):
                option.check(option.default)  # the defaults are inside their own bounds


def test_an_option_without_bounds_is_caught():
    class Unbounded:
        def __init__(self, target: TargetInfo, size: int = 3) -> None:
            pass

    class Bounded:
        def __init__(self, target: TargetInfo, size: Annotated[int, Range(1, 4)] = 3, flag: bool = False) -> None:
            pass

    with pytest.raises(TypeError, match="size"):
        options_of(Unbounded)
    assert list(options_of(Bounded)) == ["size", "flag"]


@pytest.mark.parametrize(("method", "option"), NUMERIC, ids=[f"{m}:{o.name}" for m, o in NUMERIC])
def test_numeric_bounds_are_inclusive_and_enforced(method, option):
    low, high = option.kind.low, option.kind.high
    step = 1 if option.base is int else 1e-6 * max(1.0, abs(high))
    for inside in (low, high):
        assert parse_method(f"{method}:{option.name}={inside}")[1][option.name] == inside
    for outside in (low - step, high + step):
        with pytest.raises(InvalidParameter, match=rf"option {option.name} of method {method}: .* must be in \["):
            parse_method(f"{method}:{option.name}={outside}")
    for nonsense in ("nan", "inf", "1e400", "10**12", "", "x"):
        with pytest.raises(InvalidParameter, match=option.name):
            parse_method(f"{method}:{option.name}={nonsense}")


@pytest.mark.parametrize(("method", "option"), NUMERIC, ids=[f"{m}:{o.name}" for m, o in NUMERIC])
def test_a_drafter_at_any_bound_drafts_within_the_node_limit(method, option):
    """Built with one option at its largest value, a drafter either refuses (a cross-option rule, as
    InvalidParameter) or drafts trees the engine accepts, on a sequence full of repeats to copy."""
    try:
        drafter = make_drafter(f"{method}:{option.name}={option.kind.high}", TARGET)
    except InvalidParameter:
        return
    sequence = torch.tensor([7, 8, 9, 10, 11, 12] * 60)
    drafter.begin(sequence, None)
    for _ in range(3):
        draft = drafter.propose(sequence)
        assert draft.tree.size <= MAX_DRAFT_NODES
        logits = torch.zeros(draft.tree.size, TARGET.vocab_size)
        drafter.observe(StepOutcome(draft, logits, torch.tensor([0]), [int(sequence[0])]))
        sequence = torch.cat([sequence, sequence[:1]])


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("recycling:k=8000", "option k of method recycling: '8000' must be in [1, 64]"),
        ("recycling:k=1000000000000", "must be in [1, 64]"),
        ("lookahead:window=100000000", "option window of method lookahead"),
        ("lookahead:window=300", "option window"),
        ("lookup:num_tokens=1000", "option num_tokens"),
        ("copyspec:num_tokens=300,max_tokens=300", "option num_tokens"),
        ("hybrid:parts=aded+copyspec,max_nodes=100000", "option max_nodes"),
        ("hybrid:parts=" + "+".join(["aded"] * 20000), "must join 2 to 8 methods"),
        ("suffix:max_depth=100000,max_match=99999", "option max_depth"),
        ("lookup:num_tokens=128,branches=2", "num_tokens * branches < 256"),
        ("hybrid:parts=lookup:num_tokens=999+aded", "option num_tokens of method lookup"),
        ("recycling:tree=999", "option tree of method recycling"),
        ("recycling:tree=huge", "'auto' or 'published' or an integer in [1, 80]"),
        ("aded:decay=0", "option decay"),
        ("x" * 100_000, "unknown method 'xxxx"),
    ],
)
def test_out_of_bounds_specs_get_one_clipped_line(spec, says):
    with pytest.raises(InvalidParameter) as caught:
        make_drafter(spec, TARGET)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message and len(message) < 300


def test_directly_built_drafters_are_checked_too():
    for name, cls in METHODS.items():
        for option in method_options(name).values():
            if isinstance(option.kind, Range):
                with pytest.raises(InvalidParameter, match=option.name):
                    cls(TARGET, **{option.name: option.kind.high + 1})
            elif option.kind is None:
                with pytest.raises(InvalidParameter, match=option.name):
                    cls(TARGET, **{option.name: "yes"})


def test_the_checked_decorator_keeps_positional_arguments():
    @checked_options
    class Toy:
        def __init__(
            self, target: TargetInfo, size: Annotated[int, Range(1, 4)] = 3, tree: Annotated[str, Choice(("a",))] = "a"
        ):
            self.size, self.tree = size, tree

    assert Toy(TARGET, 2, "a").size == 2
    with pytest.raises(InvalidParameter, match="Toy option tree: 'b' must be 'a'"):
        Toy(TARGET, 2, "b")


def test_a_client_policy_refuses_options_and_methods_it_does_not_allow():
    assert parse_method("recycling", CLIENT)[1] == {}
    with pytest.raises(InvalidParameter, match="not set its options"):
        parse_method("recycling:k=4", CLIENT)
    numeric = MethodPolicy(options=True, operator=False)
    assert parse_method("recycling:k=4,seed_prompt=false,tree=published", numeric)[1]["k"] == 4
    for operator_only in ("aded:corpus=/etc/hostname", "hybrid:parts=lookup+aded", "medusa:learn=0.001"):
        with pytest.raises(InvalidParameter, match="operator only"):
            parse_method(operator_only, numeric)
    few = MethodPolicy(methods=frozenset({"ar", "aded"}), options=False, operator=False)
    with pytest.raises(InvalidParameter, match="unknown method 'recycling'; available: ar, aded"):
        parse_method("recycling", few)
    with pytest.raises(InvalidParameter, match="a method spec is a string"):
        parse_method(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/stdin", "/proc/self/environ", "/etc", "/nonexistent/x"])
def test_a_corpus_must_be_a_regular_file(path):
    with pytest.raises(InvalidParameter, match=r"corpus .*(not a regular file|not readable)") as caught:
        make_drafter(f"aded:corpus={path}", TARGET)
    assert "PATH=" not in str(caught.value)


def test_a_fifo_corpus_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidParameter, match="is not a regular file"):
        make_drafter(f"aded:corpus={fifo}", TARGET)
    from decodekit.drafters.aded import AdaptiveNgram

    with pytest.raises(InvalidParameter, match="is not a regular file"):  # the open file is checked too
        AdaptiveNgram._load_corpus(AdaptiveNgram(TARGET), str(fifo))


def test_a_corpus_error_never_quotes_the_file(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("root:SECRET-PASSWORD:0:0\n")
    with pytest.raises(InvalidParameter) as caught:
        make_drafter(f"aded:corpus={secret}", TARGET)
    assert "SECRET" not in str(caught.value) and "whitespace-separated token ids" in str(caught.value)
    import decodekit.drafters.aded as aded

    monkeypatch.setattr(aded, "CORPUS_BYTES", 8)
    big = tmp_path / "big"
    big.write_text("1 2 3 4 5 6 7 8 9")
    with pytest.raises(InvalidParameter, match="more than the 8 allowed"):
        aded.AdaptiveNgram(TARGET, corpus=str(big))


def _natural_tokens(count: int, seed: int) -> list[int]:
    """Tokens with Zipf-like repeats, as text has."""
    rng = random.Random(seed)
    return [
        min(int(rng.paretovariate(1.0)), 5000) if rng.random() < 0.7 else rng.randrange(49152) for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("spec", "steps"),
    [(m, 200) for m in ("lookup", "copyspec", "aggressive", "suffix", "aded", "hybrid:parts=aded+copyspec")]
    + [("lookahead", 1000)],  # its pool grows a few n-grams a step
)
def test_memory_bytes_tracks_what_python_holds(spec, steps):
    """The estimate is within a factor 1.5 of what tracemalloc sees the drafter allocate over three requests."""
    # CPython hands out small tuples, lists, dicts and floats from free lists that tracemalloc does not see:
    # empty them first (and keep them empty while measuring), or earlier tests decide what is counted
    held_aside = [(*range(size), i) for size in range(20) for i in range(3000)]
    held_aside += [[i] for i in range(300)] + [{i: i} for i in range(300)] + [i + 0.5 for i in range(300)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        drafter = make_drafter(spec, TARGET)
        for request in range(3):
            sequence = torch.tensor(_natural_tokens(4000, request))
            drafter.begin(sequence, None)
            for _ in range(steps):
                draft = drafter.propose(sequence)
                logits = torch.zeros(draft.tree.size, 0)
                guesses = torch.tensor(_natural_tokens(draft.tree.size, len(sequence)))
                committed = [int(guesses[0]), 7]
                drafter.observe(StepOutcome(draft, logits, torch.tensor([0]), committed, greedy_choices=guesses))
                sequence = torch.cat([sequence, torch.tensor(committed)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held > 50_000  # enough state for the comparison to mean something
    assert held / 1.5 < drafter.memory_bytes() < held * 1.5, (drafter.memory_bytes(), held)


def test_tensor_state_is_counted_exactly():
    assert make_drafter("recycling:k=16", TARGET).memory_bytes() == TARGET.vocab_size * 16 * 4
    assert make_drafter("ar", TARGET).memory_bytes() == 0


@pytest.mark.parametrize(
    ("spec", "old", "new", "value"),
    [
        ("hybrid:budget=10", "budget", "max_nodes", 10),
        ("hybrid:min_score=0.2", "min_score", "min_prob", 0.2),
        ("aggressive:max_draft=5", "max_draft", "max_nodes", 5),
    ],
)
def test_renamed_options_still_work_with_a_warning(spec, old, new, value):
    with pytest.warns(FutureWarning, match=f"option {old} of method .* is now called {new}"):
        assert parse_method(spec)[1] == {new: value}
    with pytest.warns(FutureWarning, match=f"option {old} of .* is now called {new}"):
        assert getattr(make_drafter(spec.partition(":")[0], TARGET).__class__(TARGET, **{old: value}), new) == value
