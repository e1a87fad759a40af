"""Regenerate BENCHMARKS.md from the saved runs under benchmarks/ (each a `decodekit bench` result.json).

    python scripts/render_benchmarks.py

Sections follow benchmarks/INDEX.md's order: a line ``run: NAME`` there inserts the tables and chart of
benchmarks/NAME/result.json, ``compare: NAME NAME ...`` one table of those runs' overall numbers side by side,
``include: FILE`` the text of benchmarks/FILE (written by a script, e.g. scripts/profile_step.py), ``server: FILE``
the levels of a scripts/load_test.py result, ``gpu: FILE`` the tables of a scripts/gpu_check.py result, ``sparse:
NAME`` the rows of a scripts/sparse_attention_bench.py result in benchmarks/NAME, ``online: NAME`` a
scripts/online_learning.py result in benchmarks/NAME; every
other line is copied as written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from decodekit.bench import QUALITY, chart_title, machine_name, plot, plot_outputs, summarize

ROOT = Path(__file__).resolve().parents[1]


def run_section(name: str) -> str:
    directory = ROOT / "benchmarks" / name
    data = json.loads((directory / "result.json").read_text())
    meta = data["meta"]
    summary = summarize(data["records"], meta["baseline"])
    where = machine_name(meta["machine"])
    plot(summary, meta["baseline"], directory / "speedup.png", chart_title(meta))
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {where}, {meta['machine']['threads']} threads, torch {meta['machine']['torch']}; "
        f"{meta['date']}; dataset {meta['dataset']}"
        + (", first turns only" if meta.get("first_turn_only") else ", all turns"),
        "",
        f"Speedup over `{meta['baseline']}` (Spec-Bench definition), tokens/s in brackets:",
        "",
    ]
    runners = list(summary)
    tasks = list(summary[runners[0]])
    lines.append("| runner | " + " | ".join(tasks) + " |")
    lines.append("|---" * (len(tasks) + 1) + "|")
    for r in runners:
        cells = [
            f"{summary[r][t]['speedup']:.2f}x ({summary[r][t]['tokens_per_s']:.1f})"
            if "speedup" in summary[r][t]
            else f"failed ({summary[r][t]['errors']})"
            for t in tasks
        ]
        lines.append(f"| `{r}` | " + " | ".join(cells) + " |")
    if meta.get("strategies"):
        lines += ["", outputs_table(summary, meta["reference"])]
        plot_outputs(summary, meta["baseline"], directory / "outputs.png", chart_title(meta))
        lines += [f"![what the strategies change](benchmarks/{name}/outputs.png)", ""]
        return "\n".join(lines)
    lines += [
        "",
        "Mean accepted tokens per step (MAT), acceptance rate, outputs identical to "
        f"`{meta['reference']}`, milliseconds per step in the drafter and in forward + verification, per-position "
        "acceptance (overall):",
        "",
    ]
    lines.append("| runner | MAT | acceptance | identical | draft ms | forward ms | per-position acceptance |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in runners:
        s = summary[r]["overall"]
        pos = " ".join(f"{p:.2f}" for p in s.get("per_position", [])[:8]) or "-"
        mat = f"{s['mat']:.2f}" if "mat" in s else "-"
        acc = f"{s['acceptance_rate']:.3f}" if "acceptance_rate" in s else "-"
        same = f"{s['identical_share']:.0%}" if "identical_share" in s else "-"
        draft = f"{s['draft_ms_per_step']:.2f}" if "draft_ms_per_step" in s else "-"
        forward = f"{s['forward_ms_per_step']:.1f}" if "forward_ms_per_step" in s else "-"
        lines.append(f"| `{r}` | {mat} | {acc} | {same} | {draft} | {forward} | {pos} |")
    lines += ["", f"![speedup per task](benchmarks/{name}/speedup.png)", ""]
    return "\n".join(lines)


def outputs_table(summary: dict, reference: str) -> str:
    """The outputs' measures (overall) of a run with strategies, which change the output by design."""
    measures = [m for m in QUALITY if any(m in summary[r]["overall"] for r in summary)]
    lines = [
        f"What the outputs are like (overall; identical: outputs equal to `{reference}`'s):",
        "",
        "| runner | " + " | ".join(QUALITY[m] for m in measures) + " | identical |",
        "|---" * (len(measures) + 2) + "|",
    ]
    for r, entry in summary.items():
        s = entry["overall"]
        cells = [f"{s[m]:.3f}" if m in s else "-" for m in measures]
        same = f"{s['identical_share']:.0%}" if "identical_share" in s else "-"
        lines.append(f"| `{r}` | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(lines) + "\n"


def compare_section(names: list[str]) -> str:
    """Overall speedup (over each run's baseline and over its `ar`) and MAT of the runners the runs share: one
    column per run, e.g. the same methods greedy and sampled."""
    runs = []
    for name in names:
        data = json.loads((ROOT / "benchmarks" / name / "result.json").read_text())
        runs.append((data["meta"], summarize(data["records"], data["meta"]["baseline"])))
    runners = [r for r in runs[0][1] if all(r in summary for _, summary in runs)]
    heads = []
    for meta, _ in runs:
        s = meta.get("sampling", {})
        heads.append("greedy" if not s.get("temperature") else f"T={s['temperature']}, top-p {s['top_p']}")
    lines = [
        f"Overall speedup over `{runs[0][0]['baseline']}` / over `ar` [MAT], runs: "
        + ", ".join(f"`{name}`" for name in names),
        "",
        "| runner | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
    ]
    for r in runners:
        cells = []
        for _, summary in runs:
            s, ar = summary[r]["overall"], summary.get("ar", {}).get("overall", {})
            over_ar = f" / {s['tokens_per_s'] / ar['tokens_per_s']:.2f}x" if "tokens_per_s" in ar else ""
            mat = f" [{s['mat']:.2f}]" if "mat" in s else ""
            cells.append(f"{s['speedup']:.2f}x{over_ar}{mat}" if "speedup" in s else "failed")
        lines.append(f"| `{r}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def server_section(name: str) -> str:
    """The levels of a scripts/load_test.py result (medians over rounds, where it ran several)."""
    data = json.loads((ROOT / "benchmarks" / name).read_text())
    rows = data.get("summary", data["levels"])
    lines = [f"Command: `{data['command']}`", ""]
    lines += ["| method | speculation | clients | tokens/s | vs ar | each round | p50 s | p99 s | TTFT p50 s | p99 s |"]
    lines += ["|---" * 10 + "|"]
    for r in rows:
        speculation = "-" if r["method"] == "ar" else r.get("speculation", "full")
        rounds = " / ".join(f"{t:.1f}" for t in r.get("tokens_per_s_rounds", [r["tokens_per_s"]]))
        vs_ar = f"{r['vs_ar']:.2f}x" if "vs_ar" in r else "-"
        checkout = r.get("checkout", ".")  # another commit's worktree, in a side-by-side comparison
        method = f"`{r['method']}`" + ("" if checkout == "." else f" at {Path(checkout).name}")
        refused = f" ({r['refused']:.0f} refused)" if r.get("refused") else ""  # turned away: a full queue
        lines.append(
            f"| {method} | {speculation} | {r['clients']} | {r['tokens_per_s']:.1f}{refused} | {vs_ar} | {rounds} | "
            f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def gpu_section(name: str) -> str:
    data = json.loads((ROOT / "benchmarks" / name).read_text())
    lines = [f"{data['gpu']}, torch {data['torch']}, random weights (`scripts/gpu_check.py`).", ""]
    lines += [
        "| dtype | recycling == ar | published tree == ar | ar == transformers | ours ar tokens/s | "
        "ours, cuDNN attention allowed | transformers tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in ("float32", "bfloat16"):
        d = data[f"smol_{dtype}"]
        equal = {key: f"{sum(r[key] for r in d['rows'])}/{len(d['rows'])}" for key in d["rows"][0] if "equal" in key}
        cudnn = d.get("ours_ar_tokens_per_s_cudnn_attention")
        lines.append(
            f"| {dtype} | {equal['recycling_equal']} | {equal['published_equal']} | {equal['hf_equal']} | "
            f"{d['ours_ar_tokens_per_s']:.1f} | {'-' if cudnn is None else f'{cudnn:.1f}'} | "
            f"{d['hf_tokens_per_s']:.1f} |"
        )
    for key, label in (("step_ms_smol_bf16", "SmolLM2-135M shape"), ("step_ms_llama7b_bf16", "Llama-2-7B shape")):
        costs = data[key]
        lines += ["", f"Forward of k tree nodes over a 512-token cache, bfloat16, {label} (ms):", ""]
        lines += ["| k | " + " | ".join(costs) + " |", "|---" * (len(costs) + 1) + "|"]
        lines += ["| ms | " + " | ".join(f"{v:.1f}" for v in costs.values()) + " |"]
    if "profile_smol_bf16" in data:
        lines += ["", "Host side of one forward, bfloat16, SmolLM2-135M shape (torch profiler, per forward):", ""]
        lines += ["| k | kernel launches | syncs with the GPU | copies | top host time (ms) |", "|---|---|---|---|---|"]
        for prof in data["profile_smol_bf16"]:
            per_step, top = prof["per_step"], list(prof["top_self_cpu_ms_per_step"].items())[:5]
            syncs = sum(v for k, v in per_step.items() if "Synchronize" in k or k.startswith("aten::"))
            copies = sum(v for k, v in per_step.items() if k.startswith("cudaMemcpy"))
            lines.append(
                f"| {prof['k']} | {prof['launches_per_step']:.0f} | {syncs:.1f} | {copies:.0f} | "
                + ", ".join(f"{name} {ms:.1f}" for name, ms in top)
                + " |"
            )
    return "\n".join(lines) + "\n"


def sparse_section(name: str) -> str:
    """The rows of a scripts/sparse_attention_bench.py result: full attention against sparse, per context length."""
    data = json.loads((ROOT / "benchmarks" / name / "result.json").read_text())
    meta = data["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {machine_name(meta['machine'])}, {meta['threads']} threads; {meta['date']}; {meta['attention']}",
        "",
        "| context | step ms, full -> sparse | perplexity, full -> sparse | greedy agreement (first difference) |"
        " prefill s, full -> sparse |",
        "|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        full, sparse = row["full"], row["sparse"]
        lines.append(
            f"| {row['length']} | {full['step_ms']:.1f} -> {sparse['step_ms']:.1f} | {full['perplexity']:.2f} -> "
            f"{sparse['perplexity']:.2f} | {row['agreement']:.2f} ({row['first_difference']}) | "
            f"{full['prefill_s']:.1f} -> {sparse['prefill_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def online_section(name: str) -> str:
    """A scripts/online_learning.py result: each method's MAT over the stream of requests, and its chart."""
    data = json.loads((ROOT / "benchmarks" / name / "result.json").read_text())
    window = data["window"]
    lines = [
        f"Command: `{data['command']}`  ",
        f"Machine: {machine_name(data['machine'])}, {data['machine']['threads']} threads; "
        f"answers identical across methods: {'yes' if data['identical'] else 'NO'}",
        "",
        f"| method | MAT, first {window} requests | last {window} | all | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for method, row in data["summary"].items():
        lines.append(
            f"| `{method}` | {row['mat_first']:.2f} | {row['mat_last']:.2f} | {row['mat']:.2f} | "
            f"{row['tokens_per_s']:.1f} |"
        )
    lines += ["", f"![MAT by request](benchmarks/{name}/mat.png)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    index = (ROOT / "benchmarks" / "INDEX.md").read_text().splitlines()
    out = ["<!-- generated by `python scripts/render_benchmarks.py` from benchmarks/; edit benchmarks/INDEX.md -->"]
    for line in index:
        kind, _, arg = line.partition(":")
        if kind == "run":
            out.append(run_section(arg.strip()))
        elif kind == "include":
            out.append((ROOT / "benchmarks" / arg.strip()).read_text())
        elif kind == "compare":
            out.append(compare_section(arg.split()))
        elif kind == "server":
            out.append(server_section(arg.strip()))
        elif kind == "gpu":
            out.append(gpu_section(arg.strip()))
        elif kind == "sparse":
            out.append(sparse_section(arg.strip()))
        elif kind == "online":
            out.append(online_section(arg.strip()))
        else:
            out.append(line)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(out) + "\n")
    print("wrote BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
