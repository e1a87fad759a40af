"""How close a quantized decode step comes to the memory-bandwidth limit, and what a tree's extra rows cost.

    python scripts/quant_limits.py [--out benchmarks/quant-limits-cpu]

Builds a random-weight Llama of about 1.1B parameters in code (TinyLlama's shape: hidden 2048, 22 layers, 32 heads
/ 4 KV heads, MLP 5632, vocabulary 32,000) with every matrix in GGUF Q4_0 blocks (nothing is read or written but
the results), measures this machine's memory read bandwidth (torch summing 1 GiB), and times one forward of
1, 2, 4, ..., 64 tree nodes after a 256-token context (the best of several). The limit of a step is the weights'
bytes over that bandwidth: every byte must come from memory once per step. Writes result.json, a Markdown table
(result.md, for BENCHMARKS.md) and a chart of step time against tree size (steps.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decodekit.bench import machine
from decodekit.protocol import Tree
from decodekit.runtime import cpu
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.model import Embedding, Linear, Transformer

SHAPE = dict(hidden_size=2048, layers=22, heads=32, kv_heads=4, head_dim=64, intermediate_size=5632, vocab_size=32000)
NODES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 256


def random_q4_0(n: int, k: int, generator: torch.Generator) -> cpu.QuantWeight:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(n, k // cpu.QUANT_BLOCK, generator=generator) * 0.02).half()
    return cpu.quant_pack("q4_0", q, scales)


def build() -> Transformer:
    cfg = ModelConfig(
        architecture="llama",
        norm_eps=1e-5,
        qkv_bias=False,
        tie_embeddings=False,
        context_window=2048,
        layer_windows=(None,) * SHAPE["layers"],
        rope_inv_freq=1.0 / (10000.0 ** (torch.arange(0, SHAPE["head_dim"], 2).float() / SHAPE["head_dim"])),
        rope_scale=1.0,
        **SHAPE,
    )
    model = Transformer(cfg)  # norms at ones; every matrix replaced below
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantized(random_q4_0(module.out_features, module.in_features, generator))
        elif isinstance(module, Embedding):
            module.quantized(random_q4_0(module.num_embeddings, module.embedding_dim, generator))
    return model.eval().prepare()


def read_bandwidth() -> float:
    """Bytes per second of a 2-thread torch sum over 1 GiB (the best of 5)."""
    data = torch.ones(256 * 1024 * 1024)
    data.sum()
    best = min(_seconds(data.sum) for _ in range(5))
    return data.numel() * 4 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/quant-limits-cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("quant_limits: the CPU kernels are not available here")
    model = build()
    weight_bytes = sum(m.packed.nbytes() for m in model.modules() if getattr(m, "backend", "") == "quant")
    weight_bytes += model.embed.quant.nbytes()
    bandwidth = read_bandwidth()
    cache = model.new_cache(CONTEXT + max(NODES))
    model(torch.randint(0, SHAPE["vocab_size"], (1, CONTEXT)), cache)
    cache.commit(0, CONTEXT)
    rows = []
    for nodes in NODES:
        tokens = torch.randint(0, SHAPE["vocab_size"], (1, nodes))
        tree = Tree.chain(nodes)
        model(tokens, cache, tree)  # warm-up
        best = min(_seconds(lambda t=tokens, s=tree: model(t, cache, s)) for _ in range(args.repeats))
        rows.append({"nodes": nodes, "step_s": best})
        print(f"{nodes:3d} nodes: {best * 1e3:7.2f} ms", flush=True)
    limit = weight_bytes / bandwidth
    result = {
        "shape": SHAPE,
        "weights": "q4_0",
        "weight_bytes": weight_bytes,
        "read_bandwidth_bytes_per_s": bandwidth,
        "limit_s": limit,
        "context": CONTEXT,
        "steps": rows,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    one = rows[0]["step_s"]
    lines = [
        f"Weights {weight_bytes / 1e6:.0f} MB (Q4_0), read bandwidth {bandwidth / 1e9:.1f} GB/s: limit "
        f"{limit * 1e3:.2f} ms a step; one token took {one * 1e3:.2f} ms, {one / limit:.2f}x the limit.",
        "",
        "| tree nodes | " + " | ".join(str(r["nodes"]) for r in rows) + " |",
        "|---" * (len(rows) + 1) + "|",
        "| step ms | " + " | ".join(f"{r['step_s'] * 1e3:.1f}" for r in rows) + " |",
        "| x one token | " + " | ".join(f"{r['step_s'] / one:.2f}" for r in rows) + " |",
    ]
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["nodes"] for r in rows], [r["step_s"] * 1e3 for r in rows], marker="o", label="forward")
    ax.axhline(limit * 1e3, color="grey", linestyle="--", label="bandwidth limit (1 token)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes")
    ax.set_ylabel("ms per step")
    ax.set_title("1.1B Llama, Q4_0, random weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "steps.png", dpi=120)


if __name__ == "__main__":
    main()
