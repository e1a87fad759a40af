"""Double Sparsity against full attention on the default model (SmolLM2-135M, float32) at long contexts: the time
of a decode step, and the quality of what it decodes.

    python scripts/sparse_attention_bench.py --out bench-out/sparse-attention --threads 1 \
        [--lengths 1024 2048 4096 8000] [--attention double_sparsity:channels=16,tokens=256,recent=16]

Text: the package holds no long natural text, so the context is the built-in prompts' turns (all questions but
the last four) joined by blank lines, repeated as needed and cut to each length; the held-out continuation is the
first ``--tokens`` tokens of the last four questions' turns, which the context never holds. Per length, full
attention and sparse, each on a cache of its own: the context but its last token prefilled in chunks of 256 (the
engine's), then ``--tokens`` greedy decode steps from its last token, the two attentions' steps taking turns, each
forward timed (median: the decode-step time); then the held-out continuation scored after the context in one
teacher-forced forward (its perplexity; under sparse attention each of its tokens scores as it would alone).
Greedy agreement: the share of the greedy tokens equal, position by position, to full attention's. Also timed at
each length, on layer 0: a query's label scores from the label cache against labels gathered from the cached
keys. Writes ``result.json`` and ``sparse_attention.png`` into ``--out``, a line per length as it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decodekit.bench import machine, machine_name
from decodekit.prompts import builtin_questions
from decodekit.runtime.loader import LoadedModel, load_model
from decodekit.runtime.sparse_attention import (
    DoubleSparsity,
    attention_spec,
    calibrated_channels,
    key_labels,
    label_scores,
    parse_attention,
)

CHUNK = 256  # prompt tokens a prefill forward scores (decodekit.decoding.PREFILL_CHUNK)
HELD_OUT = 4  # the last questions, whose turns are the held-out continuation


def texts(model: LoadedModel, length: int, tokens: int) -> tuple[list[int], list[int]]:
    """The context's ``length`` token ids and the held-out continuation's ``tokens`` (see the module docstring)."""
    questions = builtin_questions()
    context = model.tokenizer.encode("\n\n".join(turn for q in questions[:-HELD_OUT] for turn in q.turns))
    held_out = model.tokenizer.encode("\n\n" + "\n\n".join(turn for q in questions[-HELD_OUT:] for turn in q.turns))
    return (context * math.ceil(length / len(context)))[:length], held_out[:tokens]


@torch.inference_mode()
def compare(
    model: LoadedModel, context: list[int], continuation: list[int], config: DoubleSparsity, steps: int
) -> dict[str, dict]:
    """Prefill, greedy decode and the continuation's perplexity under full attention and under ``config``, each on
    a cache of its own; the decode steps of the two take turns, so that a busy machine slows both alike."""
    transformer = model.transformer
    settings = {"full": (None, None), "sparse": (config, calibrated_channels(model, config.channels))}
    results: dict[str, dict] = {}
    caches = {}
    for name, setting in settings.items():
        transformer.use_sparse_attention(*setting)
        caches[name] = cache = transformer.new_cache(len(context) + max(steps, len(continuation)))
        start = time.perf_counter()
        for first in range(0, len(context) - 1, CHUNK):
            chunk = torch.tensor([context[first : min(first + CHUNK, len(context) - 1)]])
            transformer.hidden_states(chunk, cache)
            cache.commit_all(chunk.shape[1])
        results[name] = {"prefill_s": round(time.perf_counter() - start, 2), "greedy": [], "step_s": []}
    for _ in range(steps):
        for name, setting in settings.items():
            transformer.use_sparse_attention(*setting)
            result = results[name]
            token = result["greedy"][-1] if result["greedy"] else context[-1]
            start = time.perf_counter()
            logits = transformer(torch.tensor([[token]]), caches[name])
            result["step_s"].append(time.perf_counter() - start)
            caches[name].commit_all(1)
            result["greedy"].append(int(logits[0, -1].argmax()))
    for name, setting in settings.items():
        transformer.use_sparse_attention(*setting)
        cache, result = caches[name], results[name]
        cache.lengths = [len(context) - 1]  # back to the context: the continuation overwrites the greedy tokens
        logits = transformer(torch.tensor([[context[-1], *continuation[:-1]]]), cache)
        result["perplexity"] = round(math.exp(float(F.cross_entropy(logits[0], torch.tensor(continuation)))), 3)
        result["step_ms"] = round(1000 * statistics.median(result.pop("step_s")), 2)
    results["sparse"]["label_scoring_us"] = label_scoring_us(model, caches["sparse"], config)
    transformer.use_sparse_attention(None)
    return results


def label_scoring_us(model: LoadedModel, cache: object, config: DoubleSparsity, repeats: int = 20) -> dict:
    """Median microseconds to score one query's slots on layer 0: from the label cache, and from labels gathered
    from the cached keys (what keeping no label cache would cost a step, per layer)."""
    cfg, width = model.cfg, cache.lengths[0]
    channels = calibrated_channels(model, config.channels)[0]
    keys, _ = cache.view(0, width)
    q = torch.randn(1, cfg.heads, 1, cfg.head_dim, dtype=model.dtype)
    timings = {}
    for name, labels in (
        ("stored", lambda: cache.labels[0, ..., :width]),
        ("gathered", lambda: key_labels(keys, channels)),
    ):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            label_scores(q, labels(), channels)
            times.append(time.perf_counter() - start)
        timings[name] = round(1e6 * statistics.median(times))
    return timings


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["length"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label in (("full", "full attention"), ("sparse", "Double Sparsity")):
        axes[0].plot(lengths, [row[key]["step_ms"] for row in rows], "o-", label=label)
        axes[1].plot(lengths, [row[key]["perplexity"] for row in rows], "o-", label=label)
    axes[2].plot(lengths, [row["agreement"] for row in rows], "o-", color="C2")
    for ax, ylabel in zip(axes, ("decode step (ms, median)", "held-out perplexity", "greedy agreement"), strict=True):
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].set_ylim(0, 1.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for result.json and sparse_attention.png")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000], metavar="N")
    parser.add_argument("--attention", default="double_sparsity", help="the sparse attention's spec")
    parser.add_argument("--tokens", type=int, default=64, help="greedy steps and held-out tokens (default: 64)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    config = parse_attention(args.attention)
    if config is None:
        parser.error("--attention must name a sparse attention")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(None, dtype="float32")
    if max(args.lengths) + args.tokens > model.cfg.context_window:
        parser.error(f"a length plus --tokens exceeds the context window of {model.cfg.context_window}")
    start = time.perf_counter()
    calibrated_channels(model, config.channels)
    meta = {
        "command": shlex.join(["python", *sys.argv]),
        "model": model.name,
        "dtype": model.weights,
        "attention": attention_spec(config),
        "calibration_s": round(time.perf_counter() - start, 1),
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows = []
    for length in args.lengths:
        context, continuation = texts(model, length, args.tokens)
        full, sparse = compare(model, context, continuation, config, args.tokens).values()
        same = [a == b for a, b in zip(full["greedy"], sparse["greedy"], strict=True)]
        row = {
            "length": length,
            "full": full,
            "sparse": sparse,
            "agreement": round(sum(same) / len(same), 3),
            "first_difference": same.index(False) if not all(same) else None,
        }
        rows.append(row)
        print(
            f"{length:>5} tokens: step {full['step_ms']:.1f} -> {sparse['step_ms']:.1f} ms, perplexity "
            f"{full['perplexity']:.2f} -> {sparse['perplexity']:.2f}, greedy agreement {row['agreement']:.2f}, "
            f"prefill {full['prefill_s']:.1f} -> {sparse['prefill_s']:.1f} s, label scores "
            f"{sparse['label_scoring_us']['stored']} us stored / {sparse['label_scoring_us']['gathered']} us gathered",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    title = (
        f"{model.name} {model.weights}, {meta['attention']}, {meta['threads']} threads, {machine_name(meta['machine'])}"
    )
    plot(rows, title, out / "sparse_attention.png")
    print(f"results: {out / 'result.json'}  chart: {out / 'sparse_attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
