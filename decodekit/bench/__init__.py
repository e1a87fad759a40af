"""``decodekit bench``: every method and peer on the same prompt token ids, interleaved, in one run.

Per question the runners take turns (A B C, A B C, ...) so drift of the machine hits all of them alike. A
multi-turn question runs turn by turn, each runner's own answer carried into its next turn. Only the generation
call is timed: templating and tokenization happen before the clock starts, bookkeeping after it stops.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import textwrap
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from statistics import mean

import torch

from decodekit import InvalidParameter, LoadedModel
from decodekit.bench.runners import PeerError, make_runners
from decodekit.engine import encode_prompt
from decodekit.prompts import Question

# Spec-Bench's MT-Bench categories all belong to the multi-turn conversation task
CONVERSATION = {
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
    "conversation",
}
# what the outputs are like, beside how fast they came (strategies change them by design)
QUALITY = {
    "repetition": "repeated 4-grams (share)",
    "distinct_2": "distinct-2 across a request's outputs",
    "correct": "answers stating the reference (share)",
    "s_per_output": "seconds per returned output",
}
__all__ = [
    "answers",
    "distinct_n",
    "make_runners",
    "plot",
    "plot_outputs",
    "render_table",
    "repetition",
    "resume",
    "run_bench",
    "save",
    "select",
    "summarize",
    "task_of",
]


def task_of(category: str) -> str:
    return "conversation" if category in CONVERSATION else category


def select(
    questions: list[Question], categories: list[str] | None, per_category: int | None, limit: int | None
) -> list[Question]:
    """Filter by task or category name, keep the first ``per_category`` of each task, then the first ``limit``."""
    chosen = [q for q in questions if not categories or q.category in categories or task_of(q.category) in categories]
    if per_category is not None:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for q in chosen:
            if seen[task_of(q.category)] < per_category:
                seen[task_of(q.category)] += 1
                kept.append(q)
        chosen = kept
    chosen = chosen[:limit] if limit is not None else chosen
    if not chosen:
        raise InvalidParameter("the selection holds no questions (check --categories, --per-category, --limit)")
    return chosen


def run_bench(
    model: LoadedModel,
    runners: list,
    questions: list[Question],
    max_new_tokens: int,
    all_turns: bool = True,
    progress: Callable | None = None,
    compare_outputs: bool = True,
    on_question: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run every runner on every question, interleaved; return one record per question, turn and runner.

    ``compare_outputs``: record whether each output is identical to the first runner's (greedy runs; a sampled
    run records None). ``on_question`` gets each question's records once all its turns ran (a checkpoint).

    A turn whose prompt would not leave room for ``max_new_tokens`` in the context window ends its question with a
    ``skipped`` record (the question's earlier turns stay counted). A peer that fails on a turn gets an ``error``
    record and sits out the rest of that question.
    """
    warm = encode_prompt(model, [{"role": "user", "content": "Say hello."}])
    for runner in runners:
        runner.run(warm, 8)
    records = []
    reference = runners[0].name
    window = model.cfg.context_window
    for question in progress(questions) if progress else questions:
        first = len(records)
        turns = question.turns if all_turns else question.turns[:1]
        history: dict[str, list[dict]] = {r.name: [] for r in runners}
        outputs: dict[tuple[int, str], list[int]] = {}
        failed: set[str] = set()
        for turn, text in enumerate(turns):
            prompts = {}
            for runner in runners:
                history[runner.name].append({"role": "user", "content": text})
                prompts[runner.name] = encode_prompt(model, history[runner.name])
            if max(map(len, prompts.values())) + max_new_tokens > window:
                records.append(
                    {
                        "question_id": question.question_id,
                        "task": task_of(question.category),
                        "turn": turn,
                        "skipped": f"prompt + {max_new_tokens} tokens exceed the window",
                    }
                )
                break
            for runner in runners:
                if runner.name in failed:
                    continue
                prompt_ids = prompts[runner.name]
                try:
                    with PeakMemory(getattr(runner, "pid", "self")) as memory:
                        run = runner.run(prompt_ids, max_new_tokens)
                except PeerError as err:
                    failed.add(runner.name)  # its later turns would need this answer
                    records.append(
                        {
                            "question_id": question.question_id,
                            "task": task_of(question.category),
                            "turn": turn,
                            "runner": runner.name,
                            "error": str(err),
                        }
                    )
                    continue
                answer = model.tokenizer.decode(run.token_ids, skip_special_tokens=True)
                outputs_text = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in run.completions]
                history[runner.name].append({"role": "assistant", "content": answer})
                outputs[turn, runner.name] = run.token_ids
                row = asdict(run)
                row.pop("token_ids")
                row.pop("completions")
                accepted = question.references[turn] if turn < len(question.references) else None
                records.append(
                    {
                        "question_id": question.question_id,
                        "category": question.category,
                        "task": task_of(question.category),
                        "turn": turn,
                        "runner": runner.name,
                        "prompt_tokens": len(prompt_ids),
                        "new_tokens": len(run.token_ids),
                        "identical": run.token_ids == outputs.get((turn, reference)) if compare_outputs else None,
                        "peak_rss_mb": memory.peak_mb,
                        "repetition": repetition(run.token_ids),
                        **({"distinct_2": distinct_n(run.completions, 2)} if run.completions else {}),
                        **({"correct": answers(answer, accepted)} if accepted is not None else {}),
                        **({"completions": len(outputs_text)} if outputs_text else {}),
                        **row,
                    }
                )
        if on_question:
            on_question(records[first:])
    return records


def repetition(tokens: list[int], n: int = 4) -> float:
    """The share of ``tokens``' n-grams that repeat an earlier n-gram of theirs (0: no repetition)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(outputs: list[list[int]], n: int = 2) -> float:
    """Distinct-n of several outputs: their distinct n-grams over all their n-grams (1: no n-gram shared or
    repeated)."""
    grams = [tuple(ids[i : i + n]) for ids in outputs for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def answers(text: str, accepted: tuple[str, ...]) -> bool:
    """``text`` states one of the ``accepted`` answers (case and spacing aside): the exact-match proxy of a
    short-answer question."""
    squeeze = lambda s: " ".join(s.lower().split())  # noqa: E731
    return any(squeeze(answer) in squeeze(text) for answer in accepted)


def _rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process in MiB (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class PeakMemory:
    """Samples a process's resident memory every 10 ms while in use; ``peak_mb`` is the highest seen."""

    def __init__(self, pid: int | str = "self") -> None:
        self.pid, self.peak_mb = pid, _rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, _rss_mb(self.pid))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb(self.pid))


def summarize(records: list[dict], baseline: str) -> dict:
    """Per runner and task (and ``overall``): Spec-Bench speedup, tokens/s, MAT, acceptance, identical share.

    A question's tokens/s is its new tokens over its wall time, summed over its turns; speedup is the mean of a
    runner's question tokens/s over the baseline's mean, on the same questions.
    """
    per_question: dict[tuple[str, str, int], dict] = {}
    errors = [r for r in records if "error" in r]
    records = [r for r in records if "skipped" not in r and "error" not in r]
    if not records:
        raise InvalidParameter("no turn was run: every selected prompt leaves too little room in the context window")
    for r in records:
        q = per_question.setdefault((r["runner"], r["task"], r["question_id"]), {"tokens": 0, "wall": 0.0, "runs": []})
        q["tokens"] += r["new_tokens"]
        q["wall"] += r["wall_s"]
        q["runs"].append(r)
    runners = list(dict.fromkeys(r["runner"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    if baseline not in runners:
        raise InvalidParameter(f"baseline {baseline!r} is not among the runners: {', '.join(runners)}")
    summary: dict[str, dict] = {}
    for runner in runners:
        summary[runner] = {}
        for task in [*tasks, "overall"]:
            keys = [k for k in per_question if k[0] == runner and (task == "overall" or k[1] == task)]
            base_keys = [(baseline, k[1], k[2]) for k in keys if (baseline, k[1], k[2]) in per_question]
            keys = [k for k in keys if (baseline, k[1], k[2]) in per_question]  # questions both sides finished
            failures = sum(1 for e in errors if e["runner"] == runner and task in ("overall", e["task"]))
            entry: dict = {"questions": len(keys), "errors": failures}
            if keys:
                tps = mean(per_question[k]["tokens"] / per_question[k]["wall"] for k in keys)
                base_tps = mean(per_question[k]["tokens"] / per_question[k]["wall"] for k in base_keys)
                runs = [run for k in keys for run in per_question[k]["runs"]]
                entry |= {"tokens_per_s": tps, "speedup": tps / base_tps} | _acceptance(runs)
            summary[runner][task] = entry
    return summary


def _acceptance(runs: list[dict]) -> dict:
    lengths = [n for r in runs for n in r["accepted_lengths"]]
    sizes = [n for r in runs for n in r["draft_sizes"]]
    accepted = [n for r in runs for n in r["accepted_drafts"]]
    compared = [r["identical"] for r in runs if r["identical"] is not None]
    out = {"identical_share": mean(compared)} if compared else {}
    out["repetition"] = mean(r.get("repetition", 0.0) for r in runs)
    out["s_per_output"] = mean(r["wall_s"] / r.get("completions", 1) for r in runs)
    for measure in ("distinct_2", "correct"):  # where the runner returns several outputs; questions with answers
        values = [r[measure] for r in runs if measure in r]
        if values:
            out[measure] = mean(values)
    if lengths and all(r.get("draft_s") is not None for r in runs):  # our engine's runs: where a step's time went
        out["draft_ms_per_step"] = 1000 * sum(r["draft_s"] for r in runs) / len(lengths)
        out["forward_ms_per_step"] = 1000 * sum(r["forward_s"] for r in runs) / len(lengths)
    counted = [r for r in runs if r.get("steps")]
    if not lengths and counted and len(counted) == len(runs):  # a peer that counts its steps only (vLLM)
        out["mat"] = sum(r["new_tokens"] for r in counted) / sum(r["steps"] for r in counted)
    if lengths:
        out["mat"] = sum(lengths) / len(lengths)
        out["acceptance_rate"] = sum(accepted) / sum(sizes) if sum(sizes) else 0.0
        depth = max(accepted, default=0)
        out["per_position"] = [sum(a > p for a in accepted) / len(accepted) for p in range(depth)]
    return out


def render_table(summary: dict) -> str:
    runners = list(summary)
    tasks = list(next(iter(summary.values())))
    lines = ["speedup (tokens/s) [MAT]", f"{'task':<16}" + "".join(f"{r[:22]:>24}" for r in runners)]
    for task in tasks:
        cells = []
        for r in runners:
            s = summary[r][task]
            mat = f" [{s['mat']:.2f}]" if "mat" in s else ""
            cells.append(f"{s['speedup']:.2f}x ({s['tokens_per_s']:.1f}){mat}" if "speedup" in s else "failed")
        lines.append(f"{task:<16}" + "".join(f"{c:>24}" for c in cells))
    several = any("distinct_2" in summary[r]["overall"] for r in runners)  # some runner returns several outputs
    for measure, label in QUALITY.items():
        values = {r: summary[r]["overall"].get(measure) for r in runners}
        shown = several if measure == "s_per_output" else len(set(values.values()) - {None}) > 1
        if shown:  # where outputs differ (strategies change them): lossless methods share ar's
            lines.append(
                f"{label}: " + "  ".join(f"{r}: " + ("n/a" if v is None else f"{v:.3f}") for r, v in values.items())
            )
    shares = {r: summary[r]["overall"].get("identical_share") for r in runners}
    if any(share is not None for share in shares.values()):  # sampled runs are not compared
        cells = "  ".join(f"{r}: " + ("n/a" if v is None else f"{v:.0%}") for r, v in shares.items())
        lines.append(f"identical to {runners[0]}: {cells}")
    return "\n".join(lines)


def machine_name(info: dict) -> str:
    """The GPU, or the CPU with its family/model and features where recorded (``machine()``'s dict)."""
    if info.get("gpu"):
        return info["gpu"]
    details = ", ".join(filter(None, [info.get("cpu_id"), " ".join(info.get("isa", []))]))
    return f"{info['cpu']} ({details})" if details else info["cpu"]


def chart_title(meta: dict) -> str:
    """One line naming what a saved run measured: model, dtype, decoding, questions, tokens, machine."""
    where = machine_name(meta["machine"])
    temperature = meta.get("sampling", {}).get("temperature", 0)
    decoding = "greedy" if not temperature else f"T={temperature}"
    questions = meta["questions"]
    if meta.get("selected", questions) > questions:  # a run cut short, to be resumed
        questions = f"{questions} of {meta['selected']}"
    return (
        f"{meta['model']}, {meta['dtype']}, {decoding}, {questions} questions, "
        f"{meta['max_new_tokens']} tokens - {where}"
    )


def plot(summary: dict, baseline: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = [r for r in summary if r != baseline]
    tasks = list(next(iter(summary.values())))
    width = 0.8 / max(1, len(runners))
    colors = plt.get_cmap("tab10" if len(runners) <= 10 else "tab20").colors  # one color per runner
    fig_width = min(14, max(7, 1.3 * len(tasks) * max(1, len(runners)) ** 0.5))
    fig, ax = plt.subplots(figsize=(fig_width, 4.2))
    for i, runner in enumerate(runners):
        xs = [t + (i - (len(runners) - 1) / 2) * width for t in range(len(tasks))]
        speedups = [summary[runner][t].get("speedup", 0.0) for t in tasks]
        ax.bar(xs, speedups, width, label=runner, color=colors[i % len(colors)])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel(f"speedup over {baseline}")
    ax.set_title(textwrap.fill(title, int(11 * fig_width)), fontsize=10)  # ~11 characters an inch at size 10
    if runners:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_outputs(summary: dict, baseline: str, path: Path, title: str) -> None:
    """What strategies change, one panel per measure the run has (overall): tokens/s over the baseline's,
    repeated 4-grams, distinct-2 across a request's outputs, answers stating the reference, seconds per output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = list(summary)
    panels = [("speedup", f"tokens/s over {baseline}")]
    panels += [(m, label) for m, label in QUALITY.items() if any(m in summary[r]["overall"] for r in runners)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.35 * len(runners) + 1.6), sharey=True)
    for ax, (measure, label) in zip(axes, panels, strict=True):
        values = [summary[r]["overall"].get(measure, 0.0) for r in runners]
        ax.barh(range(len(runners)), values, color="tab:blue")
        ax.set_title(textwrap.fill(label, 28), fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(runners)), runners)
    axes[0].invert_yaxis()
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")  # CPU features that change our kernels' speed


def machine() -> dict:
    """What ran a benchmark: CPU (name, family/model and the features in ISA, as cloud CPUs often hide their
    name), threads, versions, GPU and commit."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info = {
        "cpu": fields.get("model name") or platform.processor(),
        "cpu_id": f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}",
        "isa": [flag for flag in ISA if flag in fields.get("flags", "").split()],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["decodekit_commit"] = _commit()
    return info


def _commit() -> str | None:
    """The source checkout's commit ("+dirty" with uncommitted changes), or None outside a git checkout."""
    root = str(Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode:
            return None
        status = ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "decodekit"]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


# what a resumed run must share with the saved one for their records to be comparable
SETTINGS = (
    "model",
    "dtype",
    "device",
    "dataset",
    "max_new_tokens",
    "sampling",
    "first_turn_only",
    "baseline",
    "reference",
    "runners",
    "options",
    "attention",
)
FORMER_SETTINGS = {"attention": "full"}  # what runs saved before a setting was recorded ran with


def resume(path: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    """The records and runs of a saved run with the same settings as ``meta``; nothing if there is none yet."""
    if not path.exists():
        return [], []
    try:
        saved = json.loads(path.read_text())
        records, old = saved["records"], saved["meta"]
    except (OSError, ValueError, KeyError) as err:
        raise InvalidParameter(f"cannot resume from {path}: {err}") from None
    differ = [key for key in SETTINGS if old.get(key, FORMER_SETTINGS.get(key)) != meta[key]]
    if differ:
        raise InvalidParameter(f"cannot resume {path}: it was run with other {', '.join(differ)}")
    return records, old.get("runs", [])


def save(result: dict, output: Path) -> Path:
    """Write ``output/result.json`` whole or not at all (a run killed mid-write keeps its last checkpoint)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "result.json"
    partial = path.with_name("result.json.partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, path)
    return path
