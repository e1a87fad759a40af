"""`decodekit bench` on a tiny model: schema, speedup arithmetic, identical-output share, bad input."""

import json
from pathlib import Path
from statistics import mean

import pytest
from helpers import write_tiny_llama

import decodekit
from decodekit.bench import select, summarize, task_of
from decodekit.cli import main
from decodekit.prompts import builtin_questions, load_questions


def bench(model_dir, out, *args: str) -> int:
    """``decodekit bench`` on ``model_dir``, writing into ``out``."""
    return main(["bench", "--model", str(model_dir), "--output", str(out), *args])


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The tiny model with room for the built-in conversations (its byte-level tokenizer makes long prompts)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-wide"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def result(wide_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    methods = ["--methods", "ar", "recycling", "recycling:tree=4", "--peers", "hf", "hf-decodekit"]
    selection = ["--categories", "conversation", "qa", "--per-category", "1", "--max-new-tokens", "12"]
    code = bench(wide_dir, out, *methods, *selection)
    assert code == 0
    return out, json.loads((out / "result.json").read_text())


def test_result_schema_and_chart(result):
    out, data = result
    assert set(data) == {"meta", "summary", "records"}
    assert data["meta"]["baseline"] == "hf" and data["meta"]["questions"] == 2
    assert "decodekit_commit" in data["meta"]["machine"] and data["meta"]["machine"]["cpu_id"].startswith("family")
    assert data["meta"]["runs"][0]["machine"] == data["meta"]["machine"]
    assert data["meta"]["options"]["recycling:tree=4"] == {"k": 8, "tree": "4", "seed_prompt": True}
    assert (out / "speedup.png").stat().st_size > 1000
    # conversation questions have two turns, qa one; five runners each
    assert len(data["records"]) == (2 + 1) * 5
    for r in data["records"]:
        assert {"question_id", "task", "turn", "runner", "new_tokens", "wall_s", "identical"} <= set(r)
        assert 0 < r["new_tokens"] <= 12 and r["wall_s"] > 0 and r["peak_rss_mb"] > 100


def test_speedup_is_ratio_of_mean_question_tokens_per_s(result):
    _, data = result

    def question_tps(runner):
        per_q = {}
        for r in data["records"]:
            if r["runner"] == runner:
                tokens, wall = per_q.get(r["question_id"], (0, 0.0))
                per_q[r["question_id"]] = (tokens + r["new_tokens"], wall + r["wall_s"])
        return mean(t / w for t, w in per_q.values())

    for runner in ("ar", "recycling", "recycling:tree=4", "hf"):
        assert data["summary"][runner]["overall"]["speedup"] == pytest.approx(question_tps(runner) / question_tps("hf"))
    assert data["summary"]["hf"]["overall"]["speedup"] == pytest.approx(1.0)


def test_lossless_methods_are_identical_to_reference(result):
    _, data = result
    for runner in ("recycling", "recycling:tree=4"):
        assert data["summary"][runner]["overall"]["identical_share"] == 1.0
        assert data["summary"][runner]["overall"]["mat"] >= 1.0
    assert data["summary"]["ar"]["overall"]["mat"] == 1.0


def test_our_method_inside_transformers_gives_transformers_greedy(result):
    _, data = result
    same = {}  # (question, turn) -> whether each transformers runner's output equals ar's
    for r in data["records"]:
        if r["runner"] in ("hf", "hf-decodekit"):
            same.setdefault((r["question_id"], r["turn"]), {})[r["runner"]] = r["identical"]
    assert len(same) == 3 and all(flags["hf"] == flags["hf-decodekit"] for flags in same.values())


def test_report_rerenders_a_saved_run(result, capsys):
    out, data = result
    (out / "speedup.png").unlink()
    assert main(["bench", "--report", str(out / "result.json")]) == 0
    assert "recycling" in capsys.readouterr().out
    assert (out / "speedup.png").exists()
    rerun = summarize(data["records"], "hf")
    assert rerun["recycling"]["overall"]["speedup"] == pytest.approx(data["summary"]["recycling"]["overall"]["speedup"])


def test_turns_that_do_not_fit_are_skipped(tiny_dir, tmp_path):
    """The tiny model's 256-token window holds a conversation's first turn, not its second."""
    selection = ["--categories", "conversation", "--limit", "1", "--max-new-tokens", "16"]
    code = bench(tiny_dir, tmp_path, "--methods", "ar", "--peers", *selection)
    data = json.loads((tmp_path / "result.json").read_text())
    assert code == 0
    assert [r["turn"] for r in data["records"]] == [0, 1] and "skipped" in data["records"][1]


def test_selection_by_task_per_category_and_limit():
    questions = builtin_questions()
    assert len(select(questions, None, 2, None)) == 12
    assert len(select(questions, ["rag"], None, None)) == 8
    assert len(select(questions, None, None, 5)) == 5
    assert {task_of(q.category) for q in select(questions, ["conversation", "math_reasoning"], 1, None)} == {
        "conversation",
        "math_reasoning",
    }


def test_spec_bench_file_format(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"question_id": 81, "category": "writing", "turns": ["a", "b"]}\n'
        '{"question_id": 161, "category": "translation", "turns": ["c"]}\n'
    )
    qs = load_questions(path)
    assert [task_of(q.category) for q in qs] == ["conversation", "translation"] and qs[0].turns == ("a", "b")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "/nonexistent.jsonl"], "cannot read dataset"),
        (["--dataset", "{bad}"], "not a Spec-Bench question"),
        (["--methods", "ar", "warp"], "unknown method 'warp'"),
        (["--methods", "recycling:x=1"], "bad option"),
        (["--peers", "sglang"], "unknown peer 'sglang'"),
        (["--categories", "poetry"], "selection holds no questions"),
        (["--per-category", "0"], "--per-category must be a positive integer"),
        (["--report", "/nonexistent/result.json"], "cannot read bench result"),
        (["--temperature", "-0.5"], "temperature must be 0 (greedy) or at least"),
    ],
)
def test_bad_input_gives_one_error_line(tiny_dir, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": "not a list"}\n')
    args = [str(bad) if a == "{bad}" else a for a in args]
    code = bench(tiny_dir, tmp_path, "--max-new-tokens", "4", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0], err


def test_missing_peer_is_skipped_with_a_note(wide_dir, tmp_path, capsys):
    one = ["--methods", "ar", "--peers", "llamacpp", "--limit", "1", "--max-new-tokens", "4"]
    code = bench(wide_dir, tmp_path, *one, "--categories", "qa")
    err = capsys.readouterr().err
    assert code == 0 and "decodekit: llamacpp skipped:" in err
    assert json.loads((tmp_path / "result.json").read_text())["meta"]["notes"][0].startswith("llamacpp skipped")
    code = bench(wide_dir, tmp_path, *one, "--baseline", "llamacpp")
    assert code == 1 and "baseline 'llamacpp' is not among" in capsys.readouterr().err


def test_vllm_peers_without_their_environment_are_skipped_with_a_note(wide_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DECODEKIT_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    args = ["--methods", "ar", "--peers", "vllm", "vllm-decodekit", "--limit", "1", "--max-new-tokens", "4"]
    assert bench(wide_dir, tmp_path, *args) == 0
    notes = json.loads((tmp_path / "result.json").read_text())["meta"]["notes"]
    assert [note.split(":")[0] for note in notes] == ["vllm skipped", "vllm-decodekit skipped"]
    assert "make vllm-env" in notes[0] and "decodekit: vllm skipped:" in capsys.readouterr().err


def test_a_failing_peer_is_recorded_and_the_run_goes_on(tiny_model):
    from decodekit.bench import run_bench
    from decodekit.bench.runners import EngineRunner, PeerError, Run

    class Flaky:
        name = "flaky"
        calls = 0

        def run(self, prompt_ids, max_new_tokens):
            self.calls += 1
            if self.calls == 2:  # the warm-up is call 1: fail on the first question only
                raise PeerError("flaky crashed (exit status -11)")
            return Run([1] * max_new_tokens, 0.5)

    questions = [q for q in builtin_questions() if q.category == "qa"][:2]
    records = run_bench(tiny_model, [EngineRunner(tiny_model, "ar"), Flaky()], questions, 4)
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["runner"] == "flaky" and "exit status -11" in errors[0]["error"]
    summary = summarize(records, "ar")
    assert summary["flaky"]["overall"]["questions"] == 1 and summary["flaky"]["overall"]["errors"] == 1


def test_a_peer_that_counts_only_its_steps_gets_a_mat(tiny_model):
    from decodekit.bench import run_bench
    from decodekit.bench.runners import EngineRunner, Run

    class Counting:  # as the vLLM worker replies: tokens and verification steps, not each step's length
        name = "counting"

        def run(self, prompt_ids, max_new_tokens):
            return Run([1] * max_new_tokens, 0.5, steps=max_new_tokens // 2)

    questions = [q for q in builtin_questions() if q.category == "qa"][:2]
    summary = summarize(run_bench(tiny_model, [EngineRunner(tiny_model, "ar"), Counting()], questions, 6), "ar")
    assert summary["counting"]["overall"]["mat"] == 2.0 and summary["ar"]["overall"]["mat"] == 1.0


def test_sampled_run_records_its_parameters_and_compares_no_outputs(wide_dir, tmp_path):
    sampled = ["--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "6", "--limit", "2"]
    assert bench(wide_dir, tmp_path, "--methods", "ar", "recycling", "--peers", "hf", *sampled) == 0
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["meta"]["sampling"] | {"seed": None} == {
        "temperature": 0.8,
        "top_k": 0,
        "top_p": 0.9,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "seed": None,
    }
    assert data["meta"]["sampling"]["seed"] == 0  # a sampled benchmark always runs with a seed
    assert all(r["identical"] is None for r in data["records"])
    assert "identical_share" not in data["summary"]["recycling"]["overall"]


def test_a_run_resumes_where_its_checkpoint_ends(tiny_dir, tmp_path, capsys):
    """Each finished question is saved; --resume keeps them, runs only the rest and refuses other settings."""
    run = ["--methods", "ar", "--peers", "--categories", "qa", "--max-new-tokens", "4"]
    assert bench(tiny_dir, tmp_path, *run, "--limit", "1") == 0
    first = json.loads((tmp_path / "result.json").read_text())
    assert first["meta"]["questions"] == 1 and len(first["records"]) == 1
    assert bench(tiny_dir, tmp_path, *run, "--limit", "3", "--resume") == 0
    err = capsys.readouterr().err
    assert "1 questions already measured, 2 to run" in err and "another machine" not in err
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["records"][0] == first["records"][0]  # kept, not rerun
    assert len({r["question_id"] for r in data["records"]}) == len(data["records"]) == 3
    assert [r["questions"] for r in data["meta"]["runs"]] == [1, 2] and data["meta"]["selected"] == 3
    assert data["summary"]["ar"]["overall"]["questions"] == 3
    assert bench(tiny_dir, tmp_path, *run[:-1], "5", "--limit", "3", "--resume") == 1
    assert "it was run with other max_new_tokens" in capsys.readouterr().err
    assert json.loads((tmp_path / "result.json").read_text()) == data  # a refused resume loses nothing
    data["meta"]["runs"][0]["machine"]["cpu_id"] = "family 0 model 0"  # a later session got another machine
    (tmp_path / "result.json").write_text(json.dumps(data))
    assert bench(tiny_dir, tmp_path, *run, "--limit", "3", "--resume") == 0
    assert "resuming on another machine" in capsys.readouterr().err


def test_an_interrupted_run_keeps_its_finished_questions(tiny_dir, tmp_path, monkeypatch, capsys):
    from decodekit import bench as bench_module
    from decodekit.bench.runners import EngineRunner

    class Interrupted(EngineRunner):
        calls = 0

        def run(self, prompt_ids, max_new_tokens):
            self.calls += 1
            if self.calls == 3:  # warm-up, first question, then Ctrl-C during the second
                raise KeyboardInterrupt
            return super().run(prompt_ids, max_new_tokens)

    monkeypatch.setattr(bench_module, "make_runners", lambda model, *_: ([Interrupted(model, "ar")], []))
    code = bench(tiny_dir, tmp_path, "--methods", "ar", "--peers", "--categories", "qa", "--max-new-tokens", "4")
    assert code == 130 and "the same command with --resume goes on" in capsys.readouterr().err
    data = json.loads((tmp_path / "result.json").read_text())
    assert [r["question_id"] for r in data["records"]] == [builtin_questions_of("qa")[0]]
    assert data["meta"]["questions"] == 1 and data["meta"]["selected"] == 8 and "summary" not in data


def builtin_questions_of(task: str) -> list[int]:
    return [q.question_id for q in builtin_questions() if task_of(q.category) == task]


def test_a_checkout_runs_beside_this_one_and_matches_it(wide_dir, tmp_path, capsys):
    """``--checkout`` with this very checkout: every method runs twice, here and in a worker started from the
    checkout, and their outputs agree (the same code, the same weights)."""
    checkout = Path(decodekit.__file__).parent.parent
    args = [
        "--methods",
        "ar",
        "recycling",
        "--peers",
        "--checkout",
        str(checkout),
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
    ]
    assert bench(wide_dir, tmp_path, *args, "--categories", "qa") == 0
    saved = json.loads((tmp_path / "result.json").read_text())
    names = [f"ar@{checkout.name}", f"recycling@{checkout.name}"]
    assert saved["meta"]["runners"] == ["ar", "recycling", *names]
    elsewhere = [r for r in saved["records"] if r["runner"] in names]
    assert len(elsewhere) == 4 and all(r["identical"] and r["accepted_lengths"] for r in elsewhere)
    code = bench(wide_dir, tmp_path, "--methods", "ar", "--peers", "--checkout", str(tmp_path), "--limit", "1")
    assert code == 1 and "holds no decodekit package" in capsys.readouterr().err
