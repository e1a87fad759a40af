"""Lossless on the real default model (float32; bfloat16 and its own GGUF weights through the CPU kernels): every
method == plain greedy (== transformers' greedy in float32).

These run SmolLM2-135M for 128 tokens on 24 prompts per method and take a few minutes each on a 2-core CPU.
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
NEW_TOKENS = 128


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


@pytest.fixture(scope="module")
def plain(default_model):
    engine = Engine(default_model, "ar")
    return {p: engine.generate(p, max_new_tokens=NEW_TOKENS) for p in PROMPTS + EDIT_PROMPTS}


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


MODEL_DRAFTERS = {"draft", "pearl", "swift", "s2d", "medusa", "hydra", "kangaroo", "eagle"}
# where a method's defaults would draft little on this model (so that "drafts were accepted" could not hold)
SPECS = {
    "swift": "swift:skip=0.1",
    "s2d": "s2d:exits=20/27",
    "kangaroo": "kangaroo:min_prob=0,max_nodes=3",
    "medusa": "medusa:max_nodes=4",
    "hydra": "hydra:max_nodes=4",
}


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"ar"}))
def test_every_method_equals_plain_greedy(default_model, plain, method):
    """Token Recycling on all 24 prompts; the costliest drafters (aggressive's 16-node drafts, lookahead's and
    sjd's Jacobi windows, the model drafters and trained parts) on one per task; the other methods on two per task.
    Some run with SPECS: SWIFT skips 3 layers (with its default half skipped, no draft of this 30-layer model is
    accepted and its walker stops drafting, so the check that drafts were accepted would fail by design); S2D's
    default exits (15, 20 and 25 layers) draft little for the same reason; the trained heads draft 4 nodes (their
    24-node trees cost a minute each here; their trees are tested on tiny models); Kangaroo drafts whatever its
    chance (on these prompts its walker would soon stop)."""
    engine = Engine(default_model, SPECS.get(method) or runnable(method, default_model))  # state carries over
    one_per_task = {"aggressive", "lookahead", "sjd", *MODEL_DRAFTERS}
    every = 1 if method == "recycling" else 4 if method in one_per_task else 2
    prompts = PROMPTS[::every] + EDIT_PROMPTS
    steps = new_tokens = 0
    for prompt in prompts:
        out = engine.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert out.token_ids == plain[prompt].token_ids, prompt
        steps, new_tokens = steps + out.stats.steps, new_tokens + out.stats.new_tokens
    assert new_tokens >= len(prompts) * 100  # most answers are long, not early EOS
    # drafts were accepted, not only tried; sjd's Jacobi guesses rarely hold on this small model (MAT ~1.05)
    assert steps < (0.98 if method == "sjd" else 0.95) * new_tokens


SECOND_TURNS = sorted(set(METHODS) - {"ar"} - MODEL_DRAFTERS)


@pytest.mark.parametrize("method", SECOND_TURNS)
def test_second_turns_equal_plain_greedy(default_model, method):
    """A multi-turn conversation: the second turn carries the model's own first answer in its prompt. Not for the
    model drafters and trained parts, to keep CI short: their state across requests is tested on tiny models
    (test_model_drafters, test_heads, test_kangaroo, test_eagle)."""
    conversations = [q.turns for q in builtin_questions() if len(q.turns) > 1][:1]
    engines = {name: Engine(default_model, runnable(name, default_model)) for name in ("ar", method)}
    for turns in conversations:
        outputs = {}
        for name, engine in engines.items():
            first = engine.generate(turns[0], max_new_tokens=64)
            history = [
                {"role": "user", "content": turns[0]},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": turns[1]},
            ]
            outputs[name] = (first.token_ids, engine.generate(history, max_new_tokens=NEW_TOKENS).token_ids)
        assert outputs[method] == outputs["ar"]


@pytest.mark.skipif(not cpu.available(), reason="bfloat16 is bitwise tree-safe only through our CPU kernels")
def test_bfloat16_methods_equal_plain_greedy(default_model_bf16):
    """In bfloat16 too (weights and activations), through the CPU kernels: every row is computed as if alone, so
    a tree flips no near-tie; one prompt per task, and an edit-like one."""
    bf16 = default_model_bf16
    prompts = PROMPTS[::4] + EDIT_PROMPTS[:1]
    plain_bf16 = Engine(bf16, "ar")
    expected = [plain_bf16.generate(p, max_new_tokens=64).token_ids for p in prompts]
    for method in ("recycling", "suffix", "hybrid", "lookahead", "aggressive"):
        engine = Engine(bf16, method)
        assert [engine.generate(p, max_new_tokens=64).token_ids for p in prompts] == expected, method


@pytest.fixture(scope="module")
def plain_gguf(default_model_gguf):
    engine = Engine(default_model_gguf, "ar")
    return {p: engine.generate(p, max_new_tokens=GGUF_TOKENS).token_ids for p in GGUF_PROMPTS}


GGUF_PROMPTS, GGUF_TOKENS = PROMPTS[::4] + EDIT_PROMPTS[:1], 64


@pytest.mark.skipif(not cpu.available(), reason="the GGUF weights run on the CPU kernels")
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"ar"}))
def test_every_method_equals_plain_greedy_on_the_gguf_weights(default_model_gguf, plain_gguf, method):
    """On the file's own Q4_1/Q8_0 weights (the default for a GGUF model): each row of a quantized linear is
    computed as if alone (activations quantized per row), so trees change nothing here either; one prompt per
    task and an edit-like one."""
    engine = Engine(default_model_gguf, SPECS.get(method) or runnable(method, default_model_gguf))
    steps = new_tokens = 0
    for prompt, expected in plain_gguf.items():
        out = engine.generate(prompt, max_new_tokens=GGUF_TOKENS)
        assert out.token_ids == expected, prompt
        steps, new_tokens = steps + out.stats.steps, new_tokens + out.stats.new_tokens
    assert steps < (0.98 if method == "sjd" else 0.95) * new_tokens


@pytest.mark.parametrize("method", ["recycling:tree=published", "recycling:seed_prompt=0,tree=8,k=4"])
def test_other_recycling_configurations_equal_plain_greedy(default_model, plain, method):
    engine = Engine(default_model, method)
    for prompt in PROMPTS[::4]:
        assert engine.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids == plain[prompt].token_ids, prompt


def test_plain_equals_transformers_greedy_up_to_near_ties(default_model, plain):
    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    differing, prompts = [], PROMPTS[::2] + EDIT_PROMPTS
    for ours in [plain[prompt] for prompt in prompts]:
        ids = torch.tensor([ours.prompt_ids])
        with torch.no_grad():
            ref = hf.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)[
                0, ids.shape[1] :
            ].tolist()
        if ref == ours.token_ids:
            continue
        j = next(i for i, (a, b) in enumerate(zip(ref, ours.token_ids, strict=False)) if a != b)
        cache = default_model.transformer.new_cache(len(ours.prompt_ids) + j + 1)
        logits = default_model.transformer(torch.tensor([ours.prompt_ids + ours.token_ids[:j]]), cache, logits_at=[-1])
        top2 = logits[0, -1].topk(2).values
        differing.append((j, float(top2[0] - top2[1])))
    print(f"transformers greedy differs from ours on {len(differing)} of {len(prompts)} prompts: {differing}")
    assert all(gap < 1e-4 for _, gap in differing), differing


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[4]])
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
