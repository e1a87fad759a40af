"""Where a decode step's time goes: forward cost against tree size, and an operator profile of whole requests.

    python scripts/profile_step.py [--dtype float32] [--methods ar recycling] [--out benchmarks/profile.md]

Prints (and writes as markdown) the median wall time of one forward of k tree nodes over a 300-token cache, and
for each method the share of a request's time spent in linear layers, attention, other tensor operations, and
outside operators (drafting, verification and Python bookkeeping).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from decodekit import Engine, load_model
from decodekit.bench import machine, machine_name
from decodekit.protocol import Tree

PROMPT = "Explain how vaccines train the immune system, with an example, in about 200 words."
GROUPS = {
    "linear layers": ("linear", "mm", "addmm", "matmul"),
    "attention": ("scaled_dot_product", "flash_attention", "decodekit_cpu::attention"),
    "top-k / argmax": ("topk", "argmax"),
}


def forward_costs(model, sizes: list[int], prefix: int = 300) -> dict[int, float]:
    transformer = model.transformer
    cache = transformer.new_cache(prefix + max(sizes) + 1)
    transformer(torch.randint(0, 1000, (1, prefix)), cache)
    cache.commit(0, prefix)
    costs = {}
    for k in sizes:
        tokens, tree = torch.randint(0, 1000, (1, k)), Tree.chain(k)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            transformer(tokens, cache, tree)
            times.append(time.perf_counter() - start)
        costs[k] = sorted(times)[3] * 1000
    return costs


def operator_shares(engine: Engine, tokens: int) -> tuple[dict[str, float], float]:
    engine.generate(PROMPT, max_new_tokens=16)
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        result = engine.generate(PROMPT, max_new_tokens=tokens)
        wall = time.perf_counter() - start
    shares = dict.fromkeys([*GROUPS, "other tensor ops", "outside operators"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        group = next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other tensor ops")
        shares[group] += event.self_cpu_time_total / 1e6
    # the profiler's own overhead inflates operator time a little; clamp so shares never exceed the wall time
    ops = sum(shares.values())
    if ops > wall:
        shares = {g: v * wall / ops for g, v in shares.items()}
    shares["outside operators"] = max(0.0, wall - sum(shares.values()))
    return {g: v / wall for g, v in shares.items()}, wall / result.stats.steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", nargs="+", default=["ar", "recycling"])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = load_model(dtype=args.dtype)
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 81]
    costs = forward_costs(model, sizes)
    info = machine()
    lines = [
        f"Forward of k tree nodes over a 300-token cache, {args.dtype}, {machine_name(info)},"
        f" {info['threads']} threads, decodekit {info['decodekit_commit']}:",
        "",
    ]
    lines += ["| k | " + " | ".join(map(str, sizes)) + " |", "|---" * (len(sizes) + 1) + "|"]
    lines += ["| ms | " + " | ".join(f"{costs[k]:.1f}" for k in sizes) + " |"]
    lines += ["| x k=1 | " + " | ".join(f"{costs[k] / costs[1]:.2f}" for k in sizes) + " |", ""]
    lines += ["Share of a request's wall time (profiled, 96 new tokens):", ""]
    header = None
    for method in args.methods:
        shares, step_ms = operator_shares(Engine(model, method), args.tokens)
        if header is None:
            header = list(shares)
            lines += ["| method | ms/step | " + " | ".join(header) + " |", "|---" * (len(header) + 2) + "|"]
        lines.append(f"| `{method}` | {step_ms:.1f} | " + " | ".join(f"{shares[g]:.0%}" for g in header) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
