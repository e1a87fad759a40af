"""llama.cpp peer for ``decodekit bench``, run as its own process (llama_cpp next to torch has crashed).

Started as a script (not ``-m``, which would import the decodekit package and torch). Protocol, one JSON object
per line: it prints ``{"ready": true, "build": {...}}`` once the model is loaded (the llama-cpp-python version and
llama.cpp's system info: the CPU features it was built for); then for each request
``{"prompt_ids": [...], "max_new_tokens": N, "eos": [...], "sampling": {...}}`` on stdin (sampling: decodekit's
SamplingParams as a dict) it prints ``{"token_ids": [...], "wall_s": s}`` (EOS kept, as decodekit does) or
``{"error": "..."}``. llama.cpp applies its repetition penalty to the last 64 tokens only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--lookup", type=int, default=0, help="prompt-lookup draft tokens (0 = plain greedy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=8192)
    args = parser.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    draft = None
    if args.lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=args.lookup)
    llm = Llama(args.model, n_ctx=args.n_ctx, n_threads=args.threads, draft_model=draft, verbose=False)
    build = {"llama_cpp_python": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}
    print(json.dumps({"ready": True, "build": build}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        eos = set(request["eos"])
        out: list[int] = []
        sampling = request["sampling"]
        if sampling["temperature"] == 0:
            options = {"top_k": 1, "temp": 0.0}
        else:
            options = {
                "temp": sampling["temperature"],
                "top_k": sampling["top_k"],
                "top_p": sampling["top_p"],
                "min_p": sampling["min_p"],
            }
            if sampling["seed"] is not None:
                llm.set_seed(sampling["seed"])
        options["repeat_penalty"] = sampling["repetition_penalty"]
        try:
            start = time.perf_counter()
            for token in llm.generate(request["prompt_ids"], reset=True, **options):
                out.append(int(token))
                if token in eos or len(out) >= request["max_new_tokens"]:
                    break
            reply = {"token_ids": out, "wall_s": time.perf_counter() - start}
        except Exception as err:  # report, keep serving: one bad request must not end the peer
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
