"""A decoder block as one kernel call (cpu.fused_block, kernels/block.cpp): bitwise the block's op-by-op kernel
path, in logits and in what it writes to the KV cache, for every kind of block and weight it takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_tiny_gemma, write_tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from decodekit.protocol import Tree
from decodekit.runtime import cpu
from decodekit.runtime.loader import load_model
from decodekit.runtime.model import Transformer

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the fused block is made of the CPU kernels")

TREES = [Tree.from_parents([-1, 0, 0, 1, 1, 2, 3]), Tree.from_parents([-1, 0, 1, 2, 2, 0, 5])]


def scored_twice(transformer: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logits and cache contents of a batch of two rows (prefixes of 21 and 12 tokens, a tree each, and a chain of
    one token after a whole prefix): once through the fused blocks, once op by op."""
    vocab = transformer.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(0, vocab, (1, length), generator=g) for length in (21, 12)]
    nodes = torch.randint(0, vocab, (2, TREES[0].size), generator=g)
    fused = [block.fused_block for block in transformer.blocks]
    assert all(f is not None for f in fused), "every block of this model should be fused"
    results = []
    for use in (fused, [None] * len(fused)):
        for block, fused_block in zip(transformer.blocks, use, strict=True):
            block.fused_block = fused_block
        cache = transformer.new_cache(64, batch=2)
        for row, prefix in enumerate(prefixes):
            transformer(prefix, cache.rows(row, row + 1))
            cache.commit(row, prefix.shape[1])
        trees = transformer(nodes, cache, TREES)
        one = transformer(nodes[:1, :1], cache.rows(0, 1))
        results.append((torch.cat([trees.flatten(), one.flatten()]), cache.kv.clone()))
    for block, fused_block in zip(transformer.blocks, fused, strict=True):
        block.fused_block = fused_block
    return results


def assert_fused_is_op_by_op(transformer: Transformer) -> None:
    (fused_logits, fused_kv), (logits, kv) = scored_twice(transformer)
    assert torch.equal(fused_logits, logits)
    assert torch.equal(fused_kv, kv)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama64"), head_dim=64)  # the attention kernel's head size


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_llama_block_on_packed_weights(llama_dir, dtype):
    assert_fused_is_op_by_op(load_model(llama_dir, dtype=dtype).transformer)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gemma_block(tmp_path, dtype):
    """Gemma's post norms, q/k norms, GeGLU and sliding-window masks."""
    model = load_model(write_tiny_gemma(tmp_path, head_dim=64), dtype=dtype)
    assert_fused_is_op_by_op(model.transformer)


def test_quantized_weights_in_row_blocks_with_a_bias(tmp_path, monkeypatch):
    """GGUF weights, q|k|v as two row blocks (each its own call, then the bias), as a file of mixed types gives."""
    monkeypatch.setenv("DECODEKIT_LINEAR", "torch")  # float weights kept, to be quantized here
    write_tiny_llama(tmp_path, Qwen2Config, Qwen2ForCausalLM, head_dim=64, num_key_value_heads=2)
    transformer = load_model(tmp_path).transformer
    assert transformer.cfg.qkv_bias
    for block in transformer.blocks:
        for linear in (block.wqkv, block.wo, block.w_gate_up, block.w_down):
            weight = linear.weight.detach()
            parts = [weight[:128], weight[128:]] if linear is block.wqkv else [weight]
            quantized = [cpu.quantize_q8_0(part) for part in parts]
            linear.quantized(quantized if len(quantized) > 1 else quantized[0])
        block.fuse()
    assert_fused_is_op_by_op(transformer)


def test_the_default_models_gguf_weights(default_model_gguf):
    assert_fused_is_op_by_op(default_model_gguf.transformer)


def test_a_block_off_the_kernel_path_is_not_fused(tmp_path):
    """Torch's attention (head size 16) leaves every block op by op."""
    model = load_model(write_tiny_llama(tmp_path))
    assert not any(block.cpu_attention or block.fused_block is not None for block in model.transformer.blocks)
