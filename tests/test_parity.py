"""Our runtime's logits equal transformers' own forward on tiny random checkpoints of each supported family (Gemma 3
at three head sizes: 16 takes torch's attention, 64 and 256 the kernel's; its sliding window of 8 is crossed by the
prefixes and trees below)."""

from pathlib import Path

import pytest
import torch
from helpers import write_tiny_gemma, write_tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from decodekit.protocol import Tree
from decodekit.runtime.loader import load_model

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
)
FAMILIES = {
    "llama-gqa-tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-rope-bias-untied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=False,
            attention_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-linear-rope": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "mistral-sliding-window": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=6)),
    "qwen2-bias-untied": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-yarn": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            num_key_value_heads=2,
            rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
        ),
    ),
}


GEMMA_HEAD_DIMS = {f"gemma3-head{d}": d for d in (16, 64, 256)}


@pytest.fixture(scope="module", params=[*FAMILIES, *GEMMA_HEAD_DIMS])
def pair(request, tmp_path_factory):
    directory: Path = tmp_path_factory.mktemp(request.param)
    if request.param in GEMMA_HEAD_DIMS:
        write_tiny_gemma(directory, head_dim=GEMMA_HEAD_DIMS[request.param])
    else:
        config_cls, model_cls, extra = FAMILIES[request.param]
        write_tokenizer(directory)
        torch.manual_seed(1)
        model_cls(config_cls(**COMMON, **extra)).save_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return load_model(directory), hf


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_prefix_logits_match(pair):
    ours, hf = pair
    torch.manual_seed(2)
    ids = torch.randint(0, 320, (20,)).tolist()
    cache = ours.transformer.new_cache(64)
    logits = ours.transformer(torch.tensor([ids]), cache)[0]
    torch.testing.assert_close(logits, hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_tree_logits_match_each_nodes_own_path(pair):
    """Node i of a tree after a 12-token prefix must score like the sequence prefix + path(root..i)."""
    ours, hf = pair
    torch.manual_seed(3)
    prefix = torch.randint(0, 320, (12,)).tolist()
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 3, 6])
    tokens = torch.randint(0, 320, (tree.size,))
    cache = ours.transformer.new_cache(64)
    ours.transformer(torch.tensor([prefix]), cache)
    cache.commit(0, len(prefix))
    logits = ours.transformer(tokens[None], cache, tree)[0]
    for node in range(tree.size):
        path = tokens[tree.ancestors[node]].tolist()
        torch.testing.assert_close(logits[node], hf_logits(hf, prefix + path)[-1], rtol=1e-4, atol=1e-4)


def test_kept_path_continues_like_a_fresh_sequence(pair):
    """After committing a tree path, the next step's logits equal a forward over prefix + path + next token."""
    ours, hf = pair
    torch.manual_seed(4)
    prefix = torch.randint(0, 320, (9,)).tolist()
    tree = Tree.from_parents([-1, 0, 0, 2, 2, 4])
    tokens = torch.randint(0, 320, (tree.size,))
    cache = ours.transformer.new_cache(64)
    ours.transformer(torch.tensor([prefix]), cache)
    cache.commit(0, len(prefix))
    ours.transformer(tokens[None], cache, tree)
    path = torch.tensor([0, 2, 4, 5])
    cache.commit(0, path)
    nxt = [7]
    logits = ours.transformer(torch.tensor([nxt]), cache)[0, -1]
    torch.testing.assert_close(logits, hf_logits(hf, prefix + tokens[path].tolist() + nxt)[-1], rtol=1e-4, atol=1e-4)
