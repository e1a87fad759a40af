"""GPU check: correctness of the runtime on CUDA and step cost against tree size, on random weights.

The default model's weights cannot travel to the GPU machine (the tree that travels is capped at 64 MiB), so this
uses random weights in the shapes of SmolLM2-135M and Llama-2-7B. Acceptance on random weights means nothing; the
step costs combine with MAT measured on CPU (same outputs) into a projected speedup.

    PYTHONPATH=. python scripts/gpu_check.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_tokenizer

from decodekit import Engine, load_model
from decodekit.protocol import Tree
from decodekit.runtime import model as runtime_model
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.model import Transformer

SMOL = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
LLAMA7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_costs(cfg: ModelConfig, dtype: torch.dtype, sizes: list[int], device: str, prefix: int = 512) -> dict:
    """Median ms of one forward of k tree nodes over a ``prefix``-token cache."""
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.eval()
    cache = model.new_cache(prefix + 300)
    model(torch.randint(0, 1000, (1, prefix), device=device), cache)
    cache.commit(0, prefix)
    out = {}
    for k in sizes:
        tokens, tree = torch.randint(0, 1000, (1, k), device=device), Tree.chain(k)
        times = []
        for _ in range(12):
            sync()
            t = time.perf_counter()
            model(tokens, cache, tree)
            sync()
            times.append(time.perf_counter() - t)
        out[k] = sorted(times)[len(times) // 2] * 1000
    del model, cache
    return out


def step_profile(cfg: ModelConfig, dtype: torch.dtype, k: int, device: str, steps: int = 20) -> dict:
    """Where one forward of ``k`` tree nodes spends its time: host-side calls that wait on the GPU (syncs, copies
    to host) and the ops with the most host time, from torch's profiler over ``steps`` forwards."""
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    model.eval()
    cache = model.new_cache(600)
    model(torch.randint(0, 1000, (1, 256), device=device), cache)
    cache.commit(0, 256)
    tokens, tree = torch.randint(0, 1000, (1, k), device=device), Tree.chain(k)
    model(tokens, cache, tree)
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model(tokens, cache, tree)
        sync()
    events = prof.key_averages()
    waits = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    del model, cache
    return {
        "k": k,
        "per_step": {e.key: e.count / steps for e in events if e.key in waits or e.key.startswith("cudaMemcpy")},
        "launches_per_step": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel")) / steps,
        "top_self_cpu_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 3) for e in top},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a dry run on CPU")
    args = parser.parse_args()
    device = args.device
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    result: dict = {"gpu": gpu, "torch": torch.__version__}
    if args.quick:
        SMOL.update(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        LLAMA7B.update(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
        )
    print(result, flush=True)

    # 1. correctness on CUDA: recycling == ar, our ar vs transformers' greedy (random SmolLM2-shaped weights)
    directory = Path(tempfile.mkdtemp())
    tokenizer = write_tokenizer(directory)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOL, initializer_range=0.1, eos_token_id=tokenizer.eos_token_id)).save_pretrained(
        directory
    )
    prompts = [
        torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (20, 60, 200)
    ]
    for dtype in ("float32", "bfloat16"):
        model = load_model(directory, dtype=dtype, device=device)
        ar, rec, pub = Engine(model, "ar"), Engine(model, "recycling"), Engine(model, "recycling:tree=published")
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype).to(device).eval()
        rows = []
        for p in prompts:
            a = ar.generate(p, max_new_tokens=64)
            r, q = rec.generate(p, max_new_tokens=64), pub.generate(p, max_new_tokens=64)
            with torch.no_grad():
                ids = torch.tensor([p], device=device)
                h = hf.generate(ids, do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0)
            h = h[0, len(p) :].tolist()
            rows.append(
                {
                    "prompt_len": len(p),
                    "recycling_equal": r.token_ids == a.token_ids,
                    "published_equal": q.token_ids == a.token_ids,
                    "hf_equal": h == a.token_ids,
                    "ar_tokens_per_s": a.stats.tokens_per_s,
                }
            )
        # timing of plain decoding: ours vs transformers generate, 128 tokens
        p = prompts[1]
        ar.generate(p, max_new_tokens=8)
        ours = ar.generate(p, max_new_tokens=128).stats
        allowed = runtime_model.CUDA_ATTENTION_BACKENDS
        runtime_model.CUDA_ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *allowed]  # as torch would pick
        with_cudnn = ar.generate(p, max_new_tokens=128).stats
        runtime_model.CUDA_ATTENTION_BACKENDS = allowed
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                torch.tensor([p], device=device),
                do_sample=False,
                max_new_tokens=128,
                min_new_tokens=128,
                pad_token_id=0,
            )
        sync()
        hf_tps = 128 / (time.perf_counter() - t)
        result[f"smol_{dtype}"] = {
            "rows": rows,
            "ours_ar_tokens_per_s": ours.tokens_per_s,
            "ours_ar_tokens_per_s_cudnn_attention": with_cudnn.tokens_per_s,
            "hf_tokens_per_s": hf_tps,
        }
        print(dtype, result[f"smol_{dtype}"], flush=True)
        del model, hf, ar, rec, pub

    # 2. step cost against tree size
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 81, 128]
    for name, shape in (("smol", SMOL), ("llama7b", LLAMA7B)):
        cfg = ModelConfig.from_hf(LlamaConfig(**shape))
        result[f"step_ms_{name}_bf16"] = step_costs(cfg, torch.bfloat16, sizes, device)
        print(name, result[f"step_ms_{name}_bf16"], flush=True)
    # 3. why a step costs what it does: host waits and launches per forward (SmolLM2 shape, bf16)
    cfg = ModelConfig.from_hf(LlamaConfig(**SMOL))
    result["profile_smol_bf16"] = [step_profile(cfg, torch.bfloat16, k, device) for k in (1, 16)]
    print(json.dumps(result["profile_smol_bf16"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
