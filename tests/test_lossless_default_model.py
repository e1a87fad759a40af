"""Lossless on the real default model (float32; bfloat16 and its own GGUF weights through the CPU kernels): every
method == plain greedy (== transformers' greedy in float32).

`make test` checks every method on one prompt per task and an edit-like one (float32, 64 tokens) and on three
prompts of its GGUF weights; the tests marked ``wide`` (``pytest -m wide``, deselected by default: about an hour on
a 2-core CPU) check every method on all 26 prompts for 128 tokens, float32 and GGUF alike.
"""

from collections import defaultdict

import pytest
import torch
from helpers import runnable
from transformers import AutoModelForCausalLM

from decodekit import Engine
from decodekit.drafters import METHODS
from decodekit.prompts import builtin_questions
from decodekit.protocol import Tree
from decodekit.runtime import cpu

pytestmark = pytest.mark.slow


def first_turns(per_category: int) -> list[str]:
    chosen: dict[str, list[str]] = defaultdict(list)
    for q in builtin_questions():
        if len(chosen[q.category]) < per_category:
            chosen[q.category].append(q.turns[0])
    return [p for prompts in chosen.values() for p in prompts]


PROMPTS = first_turns(4)
EDIT_PROMPTS = [  # edit-like requests, where copy drafters (aggressive decoding above all) should shine
    "Correct the grammar and spelling of this text and return only the corrected text: Yesterday me and my "
    "freind goes to the market for buy some apple and orange. The seller were very kind and he give us a "
    "discount becuase we was buying alot. After that we walks to the park and eated our fruits under a big tree.",
    "Rewrite the following paragraph in the past tense, changing nothing else: The committee meets every Monday "
    "at nine. Each member brings a short report, and the chair reads the minutes of the last meeting aloud. "
    "Then the group votes on new proposals and plans the work for the coming week.",
]
TASK_PROMPTS = PROMPTS[::4] + EDIT_PROMPTS[:1]  # one per task and an edit-like one
ALL_PROMPTS = PROMPTS + EDIT_PROMPTS
QUICK_TOKENS, NEW_TOKENS = 64, 128
METHODS_BUT_AR = sorted(set(METHODS) - {"ar"})
MODEL_DRAFTERS = {"draft", "pearl", "swift", "s2d", "medusa", "hydra", "kangaroo", "eagle"}
# where a method's defaults would draft little on this model (so that "drafts were accepted" could not hold)
SPECS = {
    "swift": "swift:skip=0.1",
    "s2d": "s2d:exits=20/27",
    "kangaroo": "kangaroo:min_prob=0,max_nodes=3",
    "medusa": "medusa:max_nodes=4",
    "hydra": "hydra:max_nodes=4",
}


class Answers:
    """Plain greedy answers of one model, generated on first use and kept."""

    def __init__(self, model) -> None:
        self.engine, self.answers = Engine(model, "ar"), {}

    def __call__(self, prompt, tokens):
        if (prompt, tokens) not in self.answers:
            self.answers[prompt, tokens] = self.engine.generate(prompt, max_new_tokens=tokens)
        return self.answers[prompt, tokens]


@pytest.fixture(scope="module")
def plain(default_model):
    return Answers(default_model)


@pytest.fixture(scope="module")
def plain_gguf(default_model_gguf):
    return Answers(default_model_gguf)


def check_method(model, plain, method, prompts, tokens):
    """``method`` (with SPECS' options, state carried over from prompt to prompt) answers every prompt as plain
    greedy decoding does; most answers are long, not early EOS; and drafts were accepted, not only tried (sjd's
    Jacobi guesses rarely hold on this small model: MAT ~1.05). SWIFT skips 3 layers (with its default half skipped
    no draft of this 30-layer model is accepted and its walker stops drafting), S2D's default exits draft little for
    the same reason, the trained heads draft 4 nodes (their 24-node trees are tested on tiny models), Kangaroo
    drafts whatever its chance."""
    engine = Engine(model, SPECS.get(method) or runnable(method, model))
    steps = new_tokens = 0
    for prompt in prompts:
        out = engine.generate(prompt, max_new_tokens=tokens)
        assert out.token_ids == plain(prompt, tokens).token_ids, prompt
        steps, new_tokens = steps + out.stats.steps, new_tokens + out.stats.new_tokens
    assert new_tokens >= len(prompts) * tokens * 0.75
    assert steps < (0.98 if method == "sjd" else 0.95) * new_tokens


def test_prompt_set_covers_six_tasks():
    assert len(PROMPTS) == 24
    assert {q.category for q in builtin_questions()} == {
        "conversation",
        "translation",
        "summarization",
        "qa",
        "math_reasoning",
        "rag",
    }


@pytest.mark.parametrize("method", METHODS_BUT_AR)
def test_every_method_equals_plain_greedy(default_model, plain, method):
    check_method(default_model, plain, method, TASK_PROMPTS, QUICK_TOKENS)


@pytest.mark.wide
@pytest.mark.parametrize("method", METHODS_BUT_AR)
def test_every_method_equals_plain_greedy_on_every_prompt(default_model, plain, method):
    check_method(default_model, plain, method, ALL_PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def plain_turns(default_model):
    """Plain greedy answers to a two-turn conversation: the second turn carries the first answer in its prompt."""
    return second_turns(Engine(default_model, "ar"))


def second_turns(engine):
    turns = next(q.turns for q in builtin_questions() if len(q.turns) > 1)
    first = engine.generate(turns[0], max_new_tokens=QUICK_TOKENS)
    history = [
        {"role": "user", "content": turns[0]},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": turns[1]},
    ]
    return first.token_ids, engine.generate(history, max_new_tokens=NEW_TOKENS).token_ids


@pytest.mark.parametrize("method", sorted(set(METHODS_BUT_AR) - MODEL_DRAFTERS))
def test_second_turns_equal_plain_greedy(default_model, plain_turns, method):
    """A multi-turn conversation, each method carrying its own first answer into the second turn. Not for the
    model drafters and trained parts, to keep CI short: their state across requests is tested on tiny models
    (test_model_drafters, test_heads, test_kangaroo, test_eagle)."""
    assert second_turns(Engine(default_model, runnable(method, default_model))) == plain_turns


@pytest.mark.skipif(not cpu.available(), reason="bfloat16 is bitwise tree-safe only through our CPU kernels")
def test_bfloat16_methods_equal_plain_greedy(default_model_bf16):
    """In bfloat16 too (weights and activations), through the CPU kernels: every row is computed as if alone, so
    a tree flips no near-tie; three prompts and an edit-like one."""
    bf16 = default_model_bf16
    prompts = PROMPTS[::8] + EDIT_PROMPTS[:1]
    plain_bf16 = Engine(bf16, "ar")
    expected = [plain_bf16.generate(p, max_new_tokens=QUICK_TOKENS).token_ids for p in prompts]
    for method in ("recycling", "suffix", "hybrid", "lookahead", "aggressive"):
        engine = Engine(bf16, method)
        assert [engine.generate(p, max_new_tokens=QUICK_TOKENS).token_ids for p in prompts] == expected, method


@pytest.mark.skipif(not cpu.available(), reason="the GGUF weights run on the CPU kernels")
@pytest.mark.parametrize("method", METHODS_BUT_AR)
def test_every_method_equals_plain_greedy_on_the_gguf_weights(default_model_gguf, plain_gguf, method):
    """On the file's own Q4_1/Q8_0 weights (the default for a GGUF model): each row of a quantized linear is
    computed as if alone (activations quantized per row), so trees change nothing here either."""
    check_method(default_model_gguf, plain_gguf, method, PROMPTS[::8], QUICK_TOKENS)


@pytest.mark.wide
@pytest.mark.skipif(not cpu.available(), reason="the GGUF weights run on the CPU kernels")
@pytest.mark.parametrize("method", METHODS_BUT_AR)
def test_every_method_equals_plain_greedy_on_the_gguf_weights_on_every_prompt(default_model_gguf, plain_gguf, method):
    check_method(default_model_gguf, plain_gguf, method, ALL_PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("method", ["recycling:tree=published", "recycling:seed_prompt=0,tree=8,k=4"])
def test_other_recycling_configurations_equal_plain_greedy(default_model, plain, method):
    engine = Engine(default_model, method)
    for prompt in TASK_PROMPTS[::2]:
        out = engine.generate(prompt, max_new_tokens=QUICK_TOKENS)
        assert out.token_ids == plain(prompt, QUICK_TOKENS).token_ids, prompt


@pytest.mark.parametrize(
    ("prompts", "tokens"),
    [(TASK_PROMPTS, QUICK_TOKENS), pytest.param(PROMPTS[::2] + EDIT_PROMPTS, NEW_TOKENS, marks=pytest.mark.wide)],
    ids=["tasks", "wide"],
)
def test_plain_equals_transformers_greedy_up_to_near_ties(default_model, plain, prompts, tokens):
    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    differing = []
    for ours in [plain(prompt, tokens) for prompt in prompts]:
        ids = torch.tensor([ours.prompt_ids])
        with torch.no_grad():
            ref = hf.generate(ids, do_sample=False, max_new_tokens=tokens, pad_token_id=0)[0, ids.shape[1] :].tolist()
        if ref == ours.token_ids:
            continue
        j = next(i for i, (a, b) in enumerate(zip(ref, ours.token_ids, strict=False)) if a != b)
        cache = default_model.transformer.new_cache(len(ours.prompt_ids) + j + 1)
        logits = default_model.transformer(torch.tensor([ours.prompt_ids + ours.token_ids[:j]]), cache, logits_at=[-1])
        top2 = logits[0, -1].topk(2).values
        differing.append((j, float(top2[0] - top2[1])))
    print(f"transformers greedy differs from ours on {len(differing)} of {len(prompts)} prompts: {differing}")
    assert all(gap < 1e-4 for _, gap in differing), differing


@pytest.mark.parametrize("prompt", [PROMPTS[0], pytest.param(PROMPTS[4], marks=pytest.mark.wide)])
def test_recycling_samples_the_first_two_tokens_as_the_model_does(default_model, prompt):
    """Sampled (T=0.7, top-p 0.95): the law of the first two tokens under recycling is the model's own, computed
    exactly from its logits; and recycling's drafts were accepted on some of the runs."""
    from test_sampling import chi_square_pvalue

    from decodekit import SamplingParams
    from decodekit.sampling import warp

    params = SamplingParams(temperature=0.7, top_p=0.95)
    engine = Engine(default_model, "recycling")
    ids = engine.request(prompt).prompt_ids
    model = default_model.transformer
    first = warp(model(torch.tensor([ids]), model.new_cache(len(ids)))[0, -1], params)
    support = first.nonzero().flatten().tolist()
    cache = model.new_cache(len(ids) + len(support))  # every first token as a child of the prompt's last, at once
    model(torch.tensor([ids[:-1]]), cache, logits_at=slice(0, 0))
    cache.commit(0, len(ids) - 1)
    after = model(torch.tensor([[ids[-1], *support]]), cache, Tree.from_parents([-1] + [0] * len(support)))[0]
    exact = {}
    for x1, logits in zip(support, after[1:], strict=True):
        second = warp(logits, params)
        exact |= {(x1, x2): float(first[x1] * second[x2]) for x2 in second.nonzero().flatten().tolist()}
    # unseeded: each run draws a seed of its own and gets the drafter its predecessors warmed (a seeded request
    # would get a fresh one, whose first draft is empty)
    runs = [engine.generate(ids, 2, sampling=params) for _ in range(240)]
    assert chi_square_pvalue([tuple(run.token_ids) for run in runs], exact) > 1e-3
    assert sum(sum(run.stats.accepted_drafts) for run in runs) > 20
