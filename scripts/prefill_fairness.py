"""Short streams beside a long prompt: inter-token latency and time to first token while `decodekit serve`
prefills a long prompt, by --prefill-chunk.

    python scripts/prefill_fairness.py --prefill-chunk 100000 256 512 --rounds 3 \
        --out benchmarks/server-prefill-fairness-cpu.json

For each ``--prefill-chunk`` setting it starts `decodekit serve --prefill-chunk N` (default model, method and
speculation; ``--clients`` + 1 rows) on a free loopback port; a setting at least as large as the long prompt
prefills it in one step, as the server did before chunked prefill, and 0 passes no flag (the server's default:
for a server from before the flag, run with ``--checkout`` naming a worktree of its commit). A round:
``--clients`` clients stream short greedy chat requests (the built-in prompts under ``--short-chars`` characters,
``--max-tokens`` new tokens each) back to back; after ``--settle`` seconds a long completion prompt arrives
(built-in prompt text, about ``--long-tokens`` tokens, 16 new tokens), and once it has finished the short clients
stop after their current request. Measured while the long request is in the server (sent to last token), pooled
over rounds: the gaps between successive chunks of the short streams (inter-token latency; a chunk holds one
step's tokens), and the time to first token of the short requests that waited for theirs then; the long
request's time to first token (median over rounds); and for reference the gaps in the seconds before it came.
The settings take turns each round (order alternating). Writes the numbers (``--out``) and a markdown table
beside them (same name, .md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from load_test import free_port, start_server
from openai import AsyncOpenAI

from decodekit.bench import machine, machine_name
from decodekit.prompts import builtin_questions

LONG_NEW_TOKENS = 16
CHARS_PER_TOKEN = 4.3  # SmolLM2's tokenizer on the built-in prompts' English text, roughly
STAGGER_S = 0.5  # the short clients start this far apart, so that their requests do not end together


async def stream(client: AsyncOpenAI, prompt: str, max_tokens: int, chat: bool) -> tuple[float, list[float], int]:
    """Stream one greedy request: (time sent, arrival time of each chunk with text, prompt tokens)."""
    sent, times, prompt_tokens = time.perf_counter(), [], 0
    options = dict(model="default", max_tokens=max_tokens, temperature=0, stream=True)
    options["stream_options"] = {"include_usage": True}
    if chat:
        chunks = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **options)
    else:
        chunks = await client.completions.create(prompt=prompt, **options)
    async for chunk in chunks:
        if chunk.choices and (chunk.choices[0].delta.content if chat else chunk.choices[0].text):
            times.append(time.perf_counter())
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    return sent, times, prompt_tokens


async def one_round(port: int, prompts: list[str], long_prompt: str, args: argparse.Namespace) -> dict:
    done = asyncio.Event()
    records: list[tuple[float, list[float]]] = []
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0) as client:

        async def short_client(i: int) -> None:
            await asyncio.sleep(i * STAGGER_S)
            while not done.is_set():
                sent, times, _ = await stream(client, prompts[i % len(prompts)], args.max_tokens, chat=True)
                records.append((sent, times))
                i += args.clients

        clients = [asyncio.create_task(short_client(i)) for i in range(args.clients)]
        await asyncio.sleep(args.settle)
        sent, long_times, long_tokens = await stream(client, long_prompt, LONG_NEW_TOKENS, chat=False)
        end = time.perf_counter()
        done.set()
        await asyncio.gather(*clients)
    gaps = [(a, b - a) for _, times in records for a, b in itertools.pairwise(times)]
    return {
        "long_prompt_tokens": long_tokens,
        "long_ttft_s": long_times[0] - sent,
        "long_s": end - sent,
        "gaps_s": [gap for a, gap in gaps if a + gap >= sent and a <= end],
        "ttfts_s": [times[0] - start for start, times in records if times and start <= end and times[0] >= sent],
        "quiet_gaps_s": [gap for a, gap in gaps if sent - args.settle / 2 <= a and a + gap < sent],
    }


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summarize(chunk: int, rounds: list[dict]) -> dict:
    gaps = [g for r in rounds for g in r["gaps_s"]]
    ttfts = [t for r in rounds for t in r["ttfts_s"]]
    quiet = [g for r in rounds for g in r["quiet_gaps_s"]]
    return {
        "prefill_chunk": chunk,
        "rounds": len(rounds),
        "long_prompt_tokens": rounds[0]["long_prompt_tokens"],
        "long_ttft_s": statistics.median(r["long_ttft_s"] for r in rounds),
        "itl_p50_s": pct(gaps, 0.5),
        "itl_p99_s": pct(gaps, 0.99),
        "itl_max_s": max(gaps, default=float("nan")),
        "gaps": len(gaps),
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p99_s": pct(ttfts, 0.99),
        "short_requests": len(ttfts),
        "quiet_itl_p50_s": pct(quiet, 0.5),
        "quiet_itl_p99_s": pct(quiet, 0.99),
    }


def table(summary: list[dict]) -> str:
    lines = [
        "| --prefill-chunk | ITL p50 s | ITL p99 s | ITL max s | short TTFT p50 s | p99 s | long TTFT s | "
        "ITL before it came, p50 / p99 s | gaps / short requests |",
        "|---" * 9 + "|",
    ]
    for s in summary:
        lines.append(
            f"| {s['prefill_chunk']} | {s['itl_p50_s']:.2f} | {s['itl_p99_s']:.2f} | {s['itl_max_s']:.2f} | "
            f"{s['ttft_p50_s']:.2f} | {s['ttft_p99_s']:.2f} | {s['long_ttft_s']:.1f} | "
            f"{s['quiet_itl_p50_s']:.2f} / {s['quiet_itl_p99_s']:.2f} | {s['gaps']} / {s['short_requests']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-chunk", nargs="+", type=int, default=[100000, 256])
    parser.add_argument("--clients", type=int, default=8, help="short streams")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens of each short request")
    parser.add_argument("--short-chars", type=int, default=1000, help="short prompts are built-in ones under this")
    parser.add_argument("--long-tokens", type=int, default=4000, help="about this many prompt tokens")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of short streams before the long one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-args", default="", help="extra arguments for decodekit serve, one string")
    parser.add_argument("--checkout", default=".", help="run the server of this checkout (e.g. another commit's)")
    parser.add_argument("--out", type=Path, default=Path("server-prefill-fairness.json"))
    args = parser.parse_args()
    everything = [q.turns[0] for q in builtin_questions()]
    prompts = [prompt for prompt in everything if len(prompt) < args.short_chars]
    text = "\n\n".join(everything * 10)
    long_prompt = text[: int(args.long_tokens * CHARS_PER_TOKEN)]
    rows = f"--max-batch {args.clients + 1} --max-prompt-tokens {args.long_tokens + 512} --max-tokens-cap 256"
    servers, rounds = {}, {chunk: [] for chunk in args.prefill_chunk}
    try:
        for chunk in args.prefill_chunk:  # every server up first: the settings then take turns
            port = free_port()
            flag = ["--prefill-chunk", str(chunk)] if chunk else []
            extra = [*rows.split(), *flag, *args.serve_args.split()]
            servers[chunk] = port, start_server("recycling", "adaptive", port, extra, args.checkout)
        for r in range(args.rounds):
            for chunk in args.prefill_chunk if r % 2 == 0 else args.prefill_chunk[::-1]:
                result = asyncio.run(one_round(servers[chunk][0], prompts, long_prompt, args))
                rounds[chunk].append(result)
                gaps = result["gaps_s"]
                print(
                    f"round {r} --prefill-chunk {chunk}: long TTFT {result['long_ttft_s']:.1f} s, "
                    f"ITL p50 {pct(gaps, 0.5):.2f} s max {max(gaps, default=0):.2f} s",
                    file=sys.stderr,
                )
    finally:
        for _, server in servers.values():
            server.terminate()
            server.wait(timeout=30)
    summary = [summarize(chunk, rounds[chunk]) for chunk in args.prefill_chunk]
    info = machine()
    result = {"command": " ".join(sys.argv), "machine": info, "summary": summary, "rounds": rounds}
    args.out.write_text(json.dumps(result, indent=1))
    markdown = f"Command: `{result['command']}`  \nMachine: {machine_name(info)}, {info['threads']} threads\n\n"
    args.out.with_suffix(".md").write_text(markdown + table(summary))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
