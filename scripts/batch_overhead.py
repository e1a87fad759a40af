"""What load-aware speculation costs when the batch is full and speculation does not pay: plain decoding against a
load-aware method in the library's continuous batch, without the server.

    python scripts/batch_overhead.py --method recycling --rows 16 --requests 48 --max-tokens 64 --rounds 5

Each setup (``ar``, not adaptive; ``--method``, adaptive) owns one :class:`decodekit.engine.Engine` of ``--rows``
rows (its KV cache allocated whole, as the server's), warmed by one untimed round so the step-cost calibration and
the method's warm-up drafts are behind it. Then the setups take turns ``--rounds`` times: a round keeps the engine
full with ``--requests`` greedy requests (the built-in prompts in turn, ``--max-tokens`` each; a request that ends
is replaced at once). Reported per round: tokens/s (prefill included), ms per step, steps that verified a draft;
and the median ratio of the method's tokens/s to ``ar``'s in the same round. A full batch of 16 is what the
server runs at 64 concurrent clients (``--max-batch 16``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decodekit import Engine, load_model
from decodekit.prompts import builtin_questions


def run_round(engine: Engine, prompts: list[list[int]], requests: int, max_tokens: int) -> dict:
    """Keep ``engine`` full until ``requests`` requests have finished (its drafters reused, as the server's)."""
    waiting = list(range(requests))
    tokens = steps = drafted = 0
    step_s = 0.0
    start = time.perf_counter()
    while waiting or engine.busy:
        while waiting and not engine.full:
            engine.submit(engine.request(prompts[waiting.pop(0) % len(prompts)], max_tokens))
        step_start = time.perf_counter()
        results = engine.step()
        step_s += time.perf_counter() - step_start
        steps, drafted = steps + 1, drafted + (engine.batch.last_width > 1)
        for _, chunk in results:
            if isinstance(chunk, Exception):
                raise chunk
            tokens += len(chunk.token_ids)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "ms_per_step": 1000 * step_s / steps, "steps": steps, "drafted": drafted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="recycling")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    model = load_model(args.model, dtype=args.dtype)
    prompts = [Engine(model, "ar").request(question.turns[0]).prompt_ids for question in builtin_questions()]
    rows = {"max_batch": args.rows, "preallocate": True, "max_prompt_tokens": max(map(len, prompts))}
    rows["max_new_tokens_cap"] = args.max_tokens
    setups = {"ar": Engine(model, "ar", **rows), args.method: Engine(model, args.method, adaptive=True, **rows)}
    for engine in setups.values():  # warm-up
        run_round(engine, prompts, args.requests, args.max_tokens)
    ratios = []
    for round_ in range(args.rounds):
        measured = {name: run_round(engine, prompts, args.requests, args.max_tokens) for name, engine in setups.items()}
        for name, row in measured.items():
            print(
                f"round {round_ + 1} {name:>12}: {row['tokens_per_s']:6.1f} tokens/s, {row['ms_per_step']:6.2f} ms a"
                f" step, {row['drafted']} of {row['steps']} steps drafted"
            )
        ratios.append(measured[args.method]["tokens_per_s"] / measured["ar"]["tokens_per_s"])
    print(
        f"{args.method} (load-aware) over ar at {args.rows} rows, {torch.get_num_threads()} threads, {args.dtype}:"
        f" median {statistics.median(ratios):.3f}x (rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
