"""decodekit's drafters inside transformers' ``generate`` (decodekit.integrations.transformers): greedy output
identical to transformers' own on tiny random Llama, Qwen2 (a sliding-window layer) and Gemma 3 and on the default
model, sampling through decodekit's sampler, the Hub folder layout, and what the loop refuses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_gemma, write_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

import decodekit.integrations
from decodekit.errors import InvalidParameter
from decodekit.integrations.transformers import generate, hub_generate
from decodekit.prompts import builtin_questions

# longer than the tiny models' sliding windows (8), and a prompt where ignoring them changes Gemma's and Qwen2's output
PROMPT = "It is sunny today, and tomorrow it will rain over the hills and the river."
METHODS = ["recycling", "lookup", "suffix", "hybrid"]
NEW_TOKENS = 40


def write_tiny_qwen2(directory: Path) -> Path:
    """The tiny Llama's shape as a Qwen2 whose second layer attends through a sliding window of 8 tokens."""
    overrides = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    return write_tiny_llama(directory, Qwen2Config, Qwen2ForCausalLM, **overrides)


WRITERS = {"llama": write_tiny_llama, "qwen2": write_tiny_qwen2, "gemma": write_tiny_gemma}


@dataclass
class Tiny:
    """A tiny model, the prompt's inputs for it and transformers' own greedy output (``[1, p + new]``)."""

    model: PreTrainedModel
    inputs: dict[str, torch.Tensor]
    greedy: torch.Tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    models = {}
    for arch, write in WRITERS.items():
        directory = write(tmp_path_factory.mktemp(arch))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        inputs = AutoTokenizer.from_pretrained(directory)(PROMPT, return_tensors="pt")
        models[arch] = Tiny(model, inputs, model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS))
    return models


def speculate(tiny: Tiny, method: str = "recycling", **options: object) -> torch.Tensor:
    return tiny.model.generate(
        **tiny.inputs, max_new_tokens=NEW_TOKENS, custom_generate=generate, method=method, **options
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", WRITERS)
def test_greedy_output_is_transformers_greedy(tiny, arch, method):
    assert torch.equal(speculate(tiny[arch], method, do_sample=False), tiny[arch].greedy)


def test_drafts_are_accepted(tiny):
    """The tiny Gemma repeats itself: recycling then commits several tokens a step, along tree paths that skip
    nodes (the cache keeps them by moving their entries), and the output stays transformers' own."""
    forwards = []
    hook = tiny["gemma"].model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        out = speculate(tiny["gemma"], do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(out, tiny["gemma"].greedy)
    assert len(forwards) < NEW_TOKENS / 2


def test_repetition_penalty_and_dict_output_follow_transformers(tiny):
    llama = tiny["llama"]
    expected = llama.model.generate(**llama.inputs, do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5)
    out = speculate(llama, do_sample=False, repetition_penalty=1.5, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("method", ["recycling", "sjd"])
def test_sampling_goes_through_decodekits_sampler(tiny, method):
    """top_k=1 leaves one token possible: sampled output is the greedy one; otherwise torch's seed repeats it."""
    llama = tiny["llama"]
    assert torch.equal(speculate(llama, method, do_sample=True, top_k=1), llama.greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(speculate(llama, method, do_sample=True, temperature=0.8, top_p=0.9))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, : llama.inputs["input_ids"].shape[1]], llama.inputs["input_ids"])


def test_the_hub_folder_layout_runs_offline(tiny):
    """``custom_generate`` names a local folder holding ``custom_generate/generate.py``; and the same function
    called directly."""
    qwen2 = tiny["qwen2"]
    folder = str(Path(decodekit.integrations.__file__).parent)
    out = qwen2.model.generate(
        **qwen2.inputs, do_sample=False, max_new_tokens=NEW_TOKENS, custom_generate=folder, trust_remote_code=True
    )
    assert torch.equal(out, qwen2.greedy)
    direct = hub_generate(qwen2.model, **qwen2.inputs, do_sample=False, max_new_tokens=NEW_TOKENS, method="lookup")
    assert torch.equal(direct, qwen2.greedy)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("nope", "unknown method 'nope'"),
        ("recycling:k=0", "option k of method recycling"),
        ("lookup:depth=2", "bad option 'depth=2'"),
        ("swift", r"method swift runs \(part of\) a model"),
        ("hybrid:parts=aded+medusa", r"method medusa runs \(part of\) a model"),
    ],
)
def test_bad_methods_are_refused(tiny, method, message):
    with pytest.raises(InvalidParameter, match=message):
        speculate(tiny["llama"], method)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"no_repeat_ngram_size": 2}, r"not \['NoRepeatNGramLogitsProcessor'\]"),
        ({"output_scores": True, "return_dict_in_generate": True}, r"not \['output_scores'\]"),
    ],
)
def test_what_the_loop_would_not_honour_is_refused(tiny, options, message):
    with pytest.raises(ValueError, match=message):
        speculate(tiny["llama"], **options)


def test_a_batch_or_padding_is_refused(tiny):
    llama = tiny["llama"]
    ids = llama.inputs["input_ids"]
    with pytest.raises(ValueError, match=r"one non-empty sequence .* got input_ids of shape \[2, "):
        llama.model.generate(ids.repeat(2, 1), max_new_tokens=4, custom_generate=generate, method="lookup")
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="no padding"):
        llama.model.generate(ids, attention_mask=padded, max_new_tokens=4, custom_generate=generate)


@pytest.mark.slow
def test_default_model_greedy_output_is_transformers_greedy(default_model):
    """A question, 64 tokens: identical to transformers' greedy (a tree's rows are scored in one matmul, whose low
    bits may differ from a one-row forward's: a near tie could flip, and would show here)."""
    model = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    questions = builtin_questions()
    for category in ("math_reasoning",):  # where drafts are accepted most: trees of many nodes
        question = next(q.turns[0] for q in questions if q.category == category)
        messages = [{"role": "user", "content": question}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=64)
        for method in ("recycling", "hybrid"):
            out = model.generate(**inputs, do_sample=False, max_new_tokens=64, custom_generate=generate, method=method)
            assert torch.equal(out, expected), (category, method)
