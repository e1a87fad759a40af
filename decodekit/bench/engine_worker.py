"""A decodekit method as another checkout of decodekit has it, for ``decodekit bench --checkout``: a version
measured side by side with this one, on the same prompt ids, in a process of its own.

Started as a script with that checkout first on the import path, so ``import decodekit`` is its package; it uses
only what every version offers (``load_model``, ``Engine(model, method).generate``). Protocol, one JSON object per
line: ``{"ready": true}`` once the model is loaded; then for each ``{"prompt_ids": [...], "max_new_tokens": N,
"sampling": {...}}`` on stdin it prints the generation's token ids and statistics, or ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir")
    args = parser.parse_args()

    from decodekit import Engine, SamplingParams, load_model

    engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir), args.method)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            sampling = SamplingParams(**request["sampling"])
            generation = engine.generate(request["prompt_ids"], request["max_new_tokens"], sampling=sampling)
            reply = {"token_ids": generation.token_ids, **generation.stats.to_dict()}
        except Exception as err:  # report, keep serving: one bad request must not end the worker
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
