"""Time from command to first token, and peak resident memory, of `decodekit generate` against llama.cpp.

    python scripts/startup.py [--repeats 3] [--out benchmarks/startup-cpu]

Each command runs as a fresh process (caches warm: the converted checkpoint and the kernel build exist, the file is
in the page cache after the first run), streaming a 64-token answer to one chat prompt; the time is from starting
the process to its first byte of answer on stdout, the memory its peak resident set (ru_maxrss). llama.cpp is
llama-cpp-python's `create_chat_completion(stream=True)` on the same GGUF file with the same threads. Prints a
Markdown table and writes it (result.md, for BENCHMARKS.md) and the raw numbers (result.json) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Why is the sky blue?"
TOKENS = 64
LLAMA = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False)
for part in llm.create_chat_completion([{"role": "user", "content": sys.argv[3]}], max_tokens=int(sys.argv[4]),
                                       temperature=0.0, top_k=1, stream=True):
    text = part["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
"""


def measure(command: list[str]) -> dict:
    """Seconds to the first byte on stdout and to the end, and the peak resident set (MiB) of ``command``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = process.stdout.read(1)
    first_s = time.perf_counter() - start
    process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or not first:
        raise SystemExit(f"startup: {command[0]} failed (exit status {process.returncode})")
    return {"first_token_s": first_s, "total_s": time.perf_counter() - start, "peak_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/startup-cpu")
    args = parser.parse_args()
    from decodekit.runtime.loader import default_model_file

    gguf = str(default_model_file())
    bindir = Path(sys.executable).parent
    ours = [str(bindir / "decodekit"), "generate", PROMPT, "--max-new-tokens", str(TOKENS), "--stream", "--method"]
    commands = {
        "llama.cpp (Q4_1)": [sys.executable, "-c", LLAMA, gguf, str(args.threads), PROMPT, str(TOKENS)],
        "decodekit ar (gguf)": [*ours, "ar"],
        "decodekit hybrid (gguf)": [*ours, "hybrid"],
        "decodekit ar (float32)": [*ours, "ar", "--dtype", "float32"],
    }
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results = {name: [measure(command) for _ in range(args.repeats)] for name, command in commands.items()}
    rows = ["| command | first token (s) | whole answer (s) | peak resident (MB) |", "|---|---|---|---|"]
    for name, runs in results.items():
        first = statistics.median(run["first_token_s"] for run in runs)
        total = statistics.median(run["total_s"] for run in runs)
        peak = max(run["peak_mib"] for run in runs)
        rows.append(f"| {name} | {first:.2f} | {total:.2f} | {peak * 1.048576:.0f} |")
    print("\n".join(rows))
    from decodekit.bench import machine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"prompt": PROMPT, "tokens": TOKENS, "results": results, "machine": machine(), "date": time.ctime()}
    (out / "result.json").write_text(json.dumps(payload, indent=1))
    (out / "result.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
