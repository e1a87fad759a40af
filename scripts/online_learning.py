"""Online speculative decoding in the server: acceptance over a stream of requests from one task.

    python scripts/online_learning.py --dataset ../shared/data/spec_bench/question.jsonl --category translation \
        --requests 60 --max-tokens 128 --methods medusa medusa:learn=0.0005 --out benchmarks/online-learning-cpu

Each method runs in a `decodekit serve --method METHOD` of its own on a free loopback port, one after the other,
alone on the machine: the same stream of requests (the first turns of one ``--category`` of the question file, in
file order, greedy chat completions, one at a time) goes to each. A request records the server's
``usage.mean_accepted_tokens`` (MAT), its tokens and its latency. Writes ``OUT/result.json`` (the machine, the
command, every request) and ``OUT/mat.png`` (MAT by request, each method's running mean over ``--window``), and
prints each method's MAT over the first and last ``--window`` requests and its tokens/s over the stream. Exits 1
unless every method's answers are identical (learning must never change them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from load_test import free_port, start_server
from openai import OpenAI
from tqdm import tqdm

from decodekit.bench import machine
from decodekit.prompts import load_questions


def stream(port: int, prompts: list[str], max_tokens: int, desc: str) -> list[dict]:
    """The replies of one server to ``prompts``, in order: text, tokens, MAT, latency."""
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=900, max_retries=0)
    rows = []
    for prompt in tqdm(prompts, desc=desc, unit="request"):
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        usage = reply.usage.model_dump()
        rows.append(
            {
                "latency_s": time.perf_counter() - start,
                "tokens": usage["completion_tokens"],
                "mat": usage["mean_accepted_tokens"],
                "text": reply.choices[0].message.content,
            }
        )
    return rows


def plot(results: dict[str, list[dict]], window: int, path: Path, title: str) -> None:
    """MAT by request (dots) and its running mean over ``window`` requests (line), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for method, rows in results.items():
        mats = [row["mat"] for row in rows]
        means = [statistics.mean(mats[max(0, i + 1 - window) : i + 1]) for i in range(len(mats))]
        (line,) = ax.plot(range(1, len(mats) + 1), means, label=f"{method} (mean of last {window})")
        ax.scatter(range(1, len(mats) + 1), mats, s=8, alpha=0.35, color=line.get_color())
    ax.set_xlabel("request")
    ax.set_ylabel("mean accepted tokens per step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None, help="a question file (Spec-Bench's format); default: built-in")
    parser.add_argument("--category", default="translation", help="the task whose questions make the stream")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["medusa", "medusa:learn=0.0005"])
    parser.add_argument("--window", type=int, default=10, help="requests in a running mean")
    parser.add_argument("--serve-args", default="", help="extra arguments for decodekit serve, one string")
    parser.add_argument("--out", type=Path, default=Path("online-learning"))
    args = parser.parse_args()
    questions = [q for q in load_questions(args.dataset) if q.category == args.category]
    if not questions:
        raise SystemExit(f"no questions of category {args.category!r} in {args.dataset or 'the built-in set'}")
    prompts = [q.turns[0] for q in questions[: args.requests]]
    results: dict[str, list[dict]] = {}
    for method in args.methods:
        port = free_port()
        server = start_server(method, "full", port, args.serve_args.split())
        try:
            stream(port, prompts[:1], 8, "warm-up")
            results[method] = stream(port, prompts, args.max_tokens, method)
        finally:
            server.terminate()
            server.wait(timeout=30)
    identical = all(
        [row["text"] for row in rows] == [row["text"] for row in results[args.methods[0]]] for rows in results.values()
    )
    summary = {}
    for method, rows in results.items():
        mats = [row["mat"] for row in rows]
        summary[method] = {
            "mat_first": statistics.mean(mats[: args.window]),
            "mat_last": statistics.mean(mats[-args.window :]),
            "mat": statistics.mean(mats),
            "tokens_per_s": sum(row["tokens"] for row in rows) / sum(row["latency_s"] for row in rows),
        }
        print(
            f"{method:28s} MAT first {args.window}: {summary[method]['mat_first']:.2f}  last {args.window}: "
            f"{summary[method]['mat_last']:.2f}  all: {summary[method]['mat']:.2f}  "
            f"tokens/s {summary[method]['tokens_per_s']:.1f}"
        )
    print(f"answers identical across methods: {identical}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "machine": machine(), "category": args.category, "window": args.window}
    record["identical"] = identical
    record |= {"summary": summary, "requests": results}
    (args.out / "result.json").write_text(json.dumps(record, indent=1))
    title = f"decodekit serve, {len(prompts)} {args.category} requests in a row, greedy"
    plot(results, args.window, args.out / "mat.png", title)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
