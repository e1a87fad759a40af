"""The decode attention kernel (decodekit.runtime.cpu.attention): agrees with torch's attention, and a query's
output is bitwise a function of the keys and values it sees, in order, whatever else is in the call; so the model
gives a token scored in a tree bitwise the logits it gets alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decodekit.protocol import Tree
from decodekit.runtime import cpu
from decodekit.runtime.tree import attention_mask

pytestmark = pytest.mark.skipif(not cpu.available(), reason="AVX2/FMA kernels unavailable here")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("d", cpu.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize(("n", "width"), [(1, 1), (1, 37), (3, 8), (10, 300), (17, 600)])
def test_matches_torch_attention(d: int, n: int, width: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + width + d)
    batch, heads, kv_heads = 2, 6, 2
    cache = torch.randn(2, batch, kv_heads, width + 5, d, generator=g)  # a cache longer than the view
    k, v = cache[0, :, :, :width], cache[1, :, :, :width]
    q = torch.randn(batch, n, heads, d, generator=g).transpose(1, 2)  # the model's strided layout
    mask = torch.rand(batch, 1, n, width, generator=g) < 0.6
    mask[..., 0] = True
    for m in (mask, None):
        out = cpu.attention(q, k, v, m)
        assert out.shape == (batch, heads, n, d) and out.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(out.double(), reference(q, k, v, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", cpu.ATTENTION_HEAD_DIMS)
def test_a_query_depends_only_on_what_it_sees_in_order(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    prefix, n = 523, 9
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 3, 3, 5])  # node 7's ancestors: 0, 1, 3
    mask = attention_mask([prefix], tree)
    k = torch.randn(1, 1, prefix + n, d, generator=g)
    v = torch.randn(1, 1, prefix + n, d, generator=g)
    q = torch.randn(1, 1, n, d, generator=g)
    together = cpu.attention(q, k, v, mask)
    # node 7 alone, its keys laid out as plain decoding would have them: prefix, ancestors, itself, contiguous
    seen = [*range(prefix), *(prefix + i for i in (0, 1, 3, 7))]
    alone = cpu.attention(q[:, :, 7:8], k[:, :, seen], v[:, :, seen], None)
    assert torch.equal(together[0, 0, 7], alone[0, 0, 0])
    # and among other neighbours, in a batch row of its own, with unseen garbage in the masked slots
    k2, v2 = k.clone(), v.clone()
    k2[:, :, prefix + 2] = 1e3
    v2[:, :, prefix + 4] = -1e3
    q2 = torch.randn(2, 1, n, d, generator=g)
    q2[1, 0, 4] = q[0, 0, 7]
    mask2 = torch.zeros(2, 1, n, prefix + n, dtype=torch.bool)
    mask2[1, 0, 4] = mask[0, 0, 7]
    mask2[0, 0, :, 0] = True
    out2 = cpu.attention(q2, torch.cat([k2, k2]), torch.cat([v2, v2]), mask2)
    assert torch.equal(out2[1, 0, 4], alone[0, 0, 0])


@pytest.mark.parametrize("d", cpu.ATTENTION_HEAD_DIMS)
def test_bfloat16_computes_as_its_float32_widening(d: int) -> None:
    """bf16 -> float32 is exact: bf16 q, k, v give bitwise the float32 kernel's output on their float32 copies,
    rounded to bf16 once."""
    g = torch.Generator().manual_seed(d)
    n, width = 5, 300
    q = torch.randn(2, n, 6, d, generator=g).bfloat16().transpose(1, 2)
    k, v = torch.randn(2, 2, 2, width, d, generator=g).bfloat16()
    mask = torch.rand(2, 1, n, width, generator=g) < 0.6
    mask[..., 0] = True
    for m in (mask, None):
        out = cpu.attention(q, k, v, m)
        assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
        assert torch.equal(out, cpu.attention(q.float(), k.float(), v.float(), m).bfloat16())


def test_rejects_bad_input() -> None:
    q, k = torch.randn(1, 2, 1, 64), torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError):
        cpu.attention(q.double(), k, k, None)
    with pytest.raises(ValueError):  # one dtype for all three
        cpu.attention(q.bfloat16(), k, k, None)
    with pytest.raises(ValueError):
        cpu.attention(torch.randn(1, 2, 1, 48), torch.randn(1, 1, 4, 48), torch.randn(1, 1, 4, 48), None)
    with pytest.raises(ValueError):
        cpu.attention(q, k, k, torch.ones(1, 1, 1, 4))
    with pytest.raises(RuntimeError):  # heads not a multiple of kv_heads
        cpu.attention(torch.randn(1, 3, 1, 64), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64), None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tree_logits_are_bitwise_those_of_plain_decoding(request: pytest.FixtureRequest, dtype: str) -> None:
    """A chain of 10 tokens scored in one forward over a cache past torch's 512-slot attention blocks gets
    bitwise the logits of decoding them one by one (torch's attention differs here by ~5e-5), in float32 and in
    bfloat16 (where torch's matmuls and attention flip near-ties between tree and plain decoding)."""
    model = request.getfixturevalue("default_model" if dtype == "float32" else "default_model_bf16")
    transformer = model.transformer
    assert transformer.blocks[0].cpu_attention
    g = torch.Generator().manual_seed(1)
    prefix = 700
    prompt, chain = torch.randint(0, 20000, (1, prefix), generator=g), torch.randint(0, 20000, (1, 10), generator=g)
    cache = transformer.new_cache(prefix + 16)
    transformer(prompt, cache)
    cache.commit(0, prefix)
    together = transformer(chain, cache, Tree.chain(10))[0]
    cache.reset()
    transformer(prompt, cache)
    cache.commit(0, prefix)
    for i in range(10):
        alone = transformer(chain[:, i : i + 1], cache)[0, 0]
        cache.commit(0, 1)
        assert torch.equal(together[i], alone), i
