"""vLLM peer for ``decodekit bench``, run as its own process by the Python of a vLLM environment (``make vllm-env``:
vLLM pins other versions than ours).

Started as a script with the model's checkpoint directory (the files vLLM reads are linked into a temporary one:
our cache keeps other safetensors beside them). Protocol, one JSON object per line, as ``llamacpp_worker.py``'s:
``{"ready": true, "build": {...}}`` once the engine is up (the vLLM version and the speculative config), then for
each request ``{"prompt_ids": [...], "max_new_tokens": N, "eos": [...], "sampling": {...}}`` it prints
``{"token_ids": [...], "wall_s": s}`` (EOS kept, as decodekit does; with a speculative config also ``steps``, its
verification steps: the tokens less those its drafts had accepted, by vLLM's own counters) or ``{"error": "..."}``.
vLLM runs eagerly (no graph capture on a CPU), one sequence at a time, float32 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "special_tokens_map.json")  # fmt: skip


def linked_checkpoint(model: str) -> Path:
    """A temporary directory holding links to the files of checkpoint directory ``model`` that vLLM reads."""
    linked = Path(tempfile.mkdtemp(prefix="decodekit-vllm-"))
    for name in FILES:
        if (Path(model) / name).is_file():
            (linked / name).symlink_to(Path(model).resolve() / name)
    return linked


def accepted_drafts(llm: object) -> int:
    """The draft tokens ``llm`` (a ``vllm.LLM`` with its stats on) has accepted so far."""
    return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a checkpoint directory")
    parser.add_argument("--speculative-config", default=None, help="vLLM's speculative config, as JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=8192)
    args = parser.parse_args()
    protocol = os.fdopen(os.dup(1), "w")  # the replies; whatever else writes to stdout (vLLM's logs) goes to stderr
    os.dup2(2, 1)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    linked = linked_checkpoint(args.model)
    speculative = json.loads(args.speculative_config) if args.speculative_config else None
    llm = LLM(
        model=str(linked),
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_seqs=1,
        seed=0,
        speculative_config=speculative,
        disable_log_stats=speculative is None,  # the counters of accepted drafts
    )
    build = {"vllm": vllm.__version__, "speculative_config": speculative, "dtype": args.dtype}
    print(json.dumps({"ready": True, "build": build}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sampling = request["sampling"]
        options = {"temperature": sampling["temperature"], "repetition_penalty": sampling["repetition_penalty"]}
        if sampling["temperature"] > 0:
            options |= {"top_p": sampling["top_p"], "top_k": sampling["top_k"] or -1, "min_p": sampling["min_p"]}
            options["seed"] = sampling["seed"]
        params = SamplingParams(max_tokens=request["max_new_tokens"], stop_token_ids=request["eos"], **options)
        try:
            accepted = accepted_drafts(llm) if speculative is not None else 0
            start = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=request["prompt_ids"])], params, use_tqdm=False)
            wall = time.perf_counter() - start
            reply = {"token_ids": list(out[0].outputs[0].token_ids), "wall_s": wall}
            if speculative is not None:
                reply["steps"] = len(reply["token_ids"]) - (accepted_drafts(llm) - accepted)
        except Exception as err:  # report, keep serving: one bad request must not end the peer
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply), file=protocol, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
