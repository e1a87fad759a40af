"""Command line: ``decodekit generate``, ``decodekit bench``, ``decodekit serve``.

Every user error ends as one line on stderr and exit status 1; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from decodekit import NAMED_MODELS, WEIGHT_CHOICES, DecodekitError, InvalidParameter, SamplingParams
from decodekit.engine import POOL_BYTES, PREFILL_CHUNK
from decodekit.server.guard import MAX_BODY_BYTES

DTYPE_HELP = (
    "the weights: auto (default) runs a GGUF file's own quantized weights (gguf; a Gemma 3 file in float32) and a "
    "checkpoint directory in float32; float32/bfloat16 de-quantize a GGUF file"
)
MODEL_HELP = f"checkpoint directory, .gguf file or {', '.join(NAMED_MODELS)} (default: SmolLM2-135M-Instruct)"
SPECULATIVE_CONFIG_HELP = (
    "vLLM's speculative config as JSON (method ngram, suffix, draft_model or medusa; num_speculative_tokens, "
    "prompt_lookup_min/max, suffix_decoding_max_tree_depth/min_token_prob, model), instead of a method"
)
STRATEGY_HELP = (
    "a decoding strategy, as name:key=value,... (see 'decodekit methods'): it CHANGES the output by design "
    "(diverse, less repetitive or guided text), greedy only, instead of a method"
)
ATTENTION_HELP = (
    "full (default), or double_sparsity[:channels=16,tokens=256,recent=16]: sparse attention (Double Sparsity, "
    "Yang et al. 2024) is APPROXIMATE: each query attends to its top tokens, found with a few calibrated channels; "
    "the output is lossless relative to sparse attention only, and may differ from full attention's"
)
DEFAULT_PROMPT = (
    "Explain how a refrigerator keeps food cold, step by step, for a curious twelve-year-old. "
    "Then list three tips for using a refrigerator efficiently."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decodekit", description="Lossless speculative decoding for local LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt", nargs="?", help="the prompt ('-' reads stdin; default: a built-in prompt)")
    gen.add_argument("--method", help="a method, as name:key=value,... (default: hybrid)")
    gen.add_argument("--speculative-config", metavar="JSON", help=SPECULATIVE_CONFIG_HELP)
    gen.add_argument("--strategy", metavar="SPEC", help=STRATEGY_HELP)
    gen.add_argument("--model", help=MODEL_HELP)
    gen.add_argument("--attention", metavar="SPEC", help=ATTENTION_HELP)
    gen.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    gen.add_argument("--dtype", default="auto", choices=WEIGHT_CHOICES, help=DTYPE_HELP)
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument(
        "--chat-file", metavar="JSON", help="continue a conversation: OpenAI-style messages (a list or {messages})"
    )
    gen.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    gen.add_argument("--stream", action="store_true", help="print text as it is committed")
    gen.add_argument("--compare", action="store_true", help="also run plain decoding (ar) and report the speedup")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and statistics")
    gen.add_argument(
        "--cache-dir", help="where converted GGUF weights are kept (default: $DECODEKIT_CACHE or ~/.cache/decodekit)"
    )
    add_sampling_args(gen)
    bench = commands.add_parser("bench", help="measure methods and peers side by side on a question set")
    bench.add_argument("--methods", nargs="+", default=["ar", "recycling"], metavar="SPEC", help="decodekit methods")
    bench.add_argument("--speculative-config", metavar="JSON", help=SPECULATIVE_CONFIG_HELP + " (added to --methods)")
    bench.add_argument(
        "--strategies",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="decoding strategies too (they change the output by design: compare their repetition, distinct-2 and "
        "answers, not their identity)",
    )
    bench.add_argument(
        "--peers",
        nargs="*",
        default=["hf"],
        metavar="PEER",
        help="hf, hf-lookup, hf-decodekit (our hybrid inside transformers' generate), llamacpp, llamacpp-lookup, "
        "vllm, vllm-ngram, vllm-suffix, vllm-decodekit (our hybrid as vLLM's proposer; these in the environment "
        "`make vllm-env` makes) (default: hf)",
    )
    bench.add_argument(
        "--checkout",
        nargs="*",
        default=[],
        metavar="DIR",
        help="also run every method as this checkout of decodekit has it (a worktree of another commit), as METHOD@DIR",
    )
    bench.add_argument("--baseline", help="runner the speedups divide by (default: hf if run, else the first method)")
    bench.add_argument(
        "--dataset",
        help="a Spec-Bench question.jsonl file, or a built-in set: prompts (the default) or short-answers (questions "
        "with reference answers: the share of answers stating them is reported)",
    )
    bench.add_argument("--categories", nargs="+", metavar="NAME", help="tasks or categories to keep")
    bench.add_argument("--per-category", type=int, metavar="N", help="first N questions of each task")
    bench.add_argument("--limit", type=int, metavar="N", help="first N questions after the other filters")
    bench.add_argument("--first-turn-only", action="store_true", help="run only the first turn of each question")
    bench.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    bench.add_argument("--model", help=MODEL_HELP)
    bench.add_argument("--attention", metavar="SPEC", help=ATTENTION_HELP + " (the methods'; peers run full attention)")
    bench.add_argument("--dtype", default="auto", choices=WEIGHT_CHOICES, help=DTYPE_HELP)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--cache-dir", help="where converted GGUF weights are kept")
    bench.add_argument("--output", default="bench-out", help="directory for result.json and speedup.png")
    bench.add_argument("--report", metavar="RESULT.json", help="re-render table and chart from a saved run")
    bench.add_argument(
        "--resume",
        action="store_true",
        help="keep the questions already in --output's result.json (saved after each question) and run the rest",
    )
    add_sampling_args(bench)

    commands.add_parser("methods", help="list the methods, their options, defaults and allowed values")
    train = commands.add_parser(
        "train",
        help="train the parts a method needs for a model (medusa, hydra: heads; kangaroo: an adapter; eagle: "
        "a feature predictor)",
    )
    train.add_argument("kind", choices=["medusa", "hydra", "kangaroo", "eagle"], help="the method whose part to train")
    train.add_argument("--model", help=MODEL_HELP)
    train.add_argument("--dtype", default="auto", choices=WEIGHT_CHOICES, help=DTYPE_HELP)
    train.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    train.add_argument(
        "--out", metavar="DIR", help="where the heads, data and checkpoints go (default: the cache, where the method "
        "finds them)"
    )  # fmt: skip
    train.add_argument("--heads", type=int, default=4, metavar="K", help="tokens ahead the heads learn (default: 4)")
    train.add_argument(
        "--exit-layer", type=int, metavar="L", help="kangaroo: the target layers under the adapter (default: a tenth)"
    )
    train.add_argument("--blocks", type=int, default=1, metavar="N", help="eagle: the layer's blocks (default: 1)")
    train.add_argument(
        "--layer", metavar="FILE", help="eagle: train only the acceptance head of this trained layer (written with it "
        "into --out)"
    )  # fmt: skip
    train.add_argument("--prompts", type=int, default=400, metavar="N", help="training prompts (default: 400)")
    train.add_argument(
        "--generated", type=int, default=0, metavar="N", help="more prompts, written by the model itself (default: 0)"
    )
    train.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length (default: 128)")
    train.add_argument(
        "--epochs", type=int, metavar="N", help="passes over the data (default: 4; kangaroo: 20; eagle: 10)"
    )
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--resume", action="store_true", help="reuse --out's data and continue from its checkpoint")
    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/...)")
    serve.add_argument("--model", help=MODEL_HELP)
    serve.add_argument("--dtype", default="auto", choices=WEIGHT_CHOICES, help=DTYPE_HELP)
    serve.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--method", help="method of requests that name none (default: hybrid)")
    serve.add_argument(
        "--speculative-config", metavar="JSON", help=SPECULATIVE_CONFIG_HELP + ", for requests that name none"
    )
    serve.add_argument("--max-prompt-tokens", type=int, metavar="N", help="refuse longer prompts (default: context)")
    serve.add_argument("--max-tokens-cap", type=int, metavar="N", help="refuse a larger max_tokens (default: context)")
    serve.add_argument("--queue-size", type=int, default=16, metavar="N", help="requests that may wait (default: 16)")
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together (default: 8)")
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        metavar="N",
        help=f"prompt tokens prefilled between two decode steps, in whole chunks of {PREFILL_CHUNK}, at least one "
        f"(default: {PREFILL_CHUNK}; more: long prompts start sooner, other streams pause longer)",
    )
    serve.add_argument(
        "--speculation",
        default="adaptive",
        choices=["adaptive", "full"],
        help="adaptive: draft as much as pays at the current load (default); full: every drafter's whole tree",
    )
    serve.add_argument("--cache-dir", help="where converted GGUF weights are kept")
    serve.add_argument(
        "--allow-methods", metavar="NAMES", help="methods a request may name, comma-separated (default: all)"
    )
    serve.add_argument(
        "--allow-strategies",
        metavar="NAMES",
        help="strategies a request may name, comma-separated, or 'all' (default: none); a strategy changes the output "
        "by design and runs whole while the batch waits",
    )
    serve.add_argument(
        "--allow-method-options",
        action="store_true",
        help="let a request set its method's numeric and boolean options, within their bounds (default: name only)",
    )
    serve.add_argument(
        "--drafter-pool-bytes",
        type=int,
        default=POOL_BYTES,
        metavar="N",
        help=f"bytes that idle drafters kept for later requests may hold (default: {POOL_BYTES >> 20} MiB)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        metavar="N",
        help=f"refuse larger request bodies (default: {MAX_BODY_BYTES >> 20} MiB)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("DECODEKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $DECODEKIT_API_KEY)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds that queued and running requests get to finish (default: 30)",
    )
    return parser


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (default: greedy; every method keeps the target distribution)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    group.add_argument("--min-p", type=float, default=0.0, metavar="P", help="0 = off")
    group.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off")
    group.add_argument("--seed", type=int, help="random seed (default: a fresh one per request)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)


def _require_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse an integer option given as zero or less (None: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidParameter(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _read_prompt(arg: str | None) -> str:
    if arg is None:
        return DEFAULT_PROMPT
    if arg == "-":
        try:
            return sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidParameter(f"the prompt on stdin is not UTF-8 text (byte {err.start})") from None
    return arg


def _read_conversation(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise InvalidParameter(f"cannot read chat file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InvalidParameter(f"chat file {path} is not JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise InvalidParameter(f"chat file {path} is not UTF-8 text (byte {err.start})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise InvalidParameter(f"chat file {path} must hold a list of messages or an object with 'messages'")
    return messages


def _stats_table(rows: list[tuple[str, dict]]) -> str:
    width = max(24, *(len(name) + 2 for name, _ in rows))
    lines = [f"{'method':<{width}}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'MAT':>7}"]
    for name, s in rows:
        mat = f"{s['mean_accepted']:>7.2f}" if s["steps"] else f"{'-':>7}"  # a strategy has no verification steps
        lines.append(f"{name:<{width}}{s['new_tokens']:>8}{s['wall_s']:>10.2f}{s['tokens_per_s']:>10.2f}{mat}")
    return "\n".join(lines)


def _read_speculative_config(args: argparse.Namespace) -> None:
    """Turn ``--speculative-config`` into the method it means: ``args.method`` (refused beside ``--method``), or one
    more of bench's ``args.methods``; ``args.method`` defaults to hybrid."""
    config = getattr(args, "speculative_config", None)
    if hasattr(args, "methods"):
        if config is not None:
            from decodekit.engine import method_from_speculative_config

            args.methods = [*args.methods, method_from_speculative_config(config)]
        return
    if not hasattr(args, "method"):
        return
    if getattr(args, "strategy", None) is not None:
        if args.method is not None or config is not None:
            raise InvalidParameter("a strategy decides the output by its own rule: give no --method beside it")
        return
    if config is not None:
        if args.method is not None:
            raise InvalidParameter("give --method or --speculative-config, not both")
        from decodekit.engine import method_from_speculative_config

        args.method = method_from_speculative_config(config)
    elif args.method is None:
        args.method = "hybrid"


def cmd_generate(args: argparse.Namespace) -> int:
    from decodekit import Engine, load_model
    from decodekit.engine import check_attention, check_method, check_strategy

    sampling = sampling_from_args(args)
    attention = check_attention(args.attention)  # reject bad options before the model loads
    if args.strategy is not None:
        check_strategy(args.strategy, sampling=sampling)
        if attention != "full":
            raise InvalidParameter("a strategy runs with full attention: give no --attention beside it")
    else:
        check_method(args.method)
    if args.chat_file and (args.prompt is not None or args.no_chat):
        raise InvalidParameter("--chat-file takes the whole conversation: give no prompt and no --no-chat")
    prompt = _read_conversation(args.chat_file) if args.chat_file else _read_prompt(args.prompt)
    model = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    engine = Engine(model, args.method or "ar", attention=args.attention)
    request = engine.request(prompt, args.max_new_tokens, args.stop, not args.no_chat, sampling, strategy=args.strategy)
    label = args.method or f"strategy {args.strategy}"

    baseline = None
    if args.compare:
        plain = Engine(model, "ar", attention=args.attention)
        plain.run(replace(request, max_new_tokens=4))  # warm the runtime (allocator, oneDNN) for both sides
        baseline = plain.run(replace(request, strategy=None))

    def show(chunk) -> None:
        print(chunk.text, end="", flush=True)

    streaming = args.stream and not args.json
    result = engine.run(request, on_chunk=show if streaming else None)

    if args.json:
        out = {
            "method": args.method,
            "strategy": args.strategy,
            "attention": attention,
            "model": model.name,
            "text": result.text,
            "token_ids": result.token_ids,
            "stats": result.stats.to_dict(),
        }
        if result.completions:
            out["completions"] = [asdict(completion) for completion in result.completions]
        if baseline is not None:
            out["baseline"] = {"method": "ar", "token_ids": baseline.token_ids, "stats": baseline.stats.to_dict()}
            out["speedup"] = result.stats.tokens_per_s / baseline.stats.tokens_per_s
            if sampling.greedy and args.strategy is None:  # sampled outputs: equal in distribution only
                out["identical"] = result.token_ids == baseline.token_ids
        print(json.dumps(out))
        return 0

    if result.completions:
        for i, completion in enumerate(result.completions):
            print(f"--- completion {i + 1} of {len(result.completions)} ({completion.finish_reason}) ---")
            print(completion.text)
    else:
        print("" if streaming else result.text)
    if args.strategy is not None:
        print(f"\nstrategy {args.strategy}: the output differs from plain decoding by design", file=sys.stderr)
    if attention != "full":
        print(f"\nattention {attention}: approximate, the output may differ from full attention's", file=sys.stderr)
    rows = [("ar", baseline.stats.to_dict())] if baseline is not None else []
    rows.append((label, result.stats.to_dict()))
    print("\n" + _stats_table(rows), file=sys.stderr)
    if baseline is not None:
        speedup = result.stats.tokens_per_s / baseline.stats.tokens_per_s
        equal = result.token_ids == baseline.token_ids
        same = "yes" if equal else "NO"
        if args.strategy:
            same = f"{'yes' if equal else 'no'} (a strategy may differ by design)"
        elif not sampling.greedy:
            same = "n/a (sampled)"
        print(f"speedup {speedup:.2f}x over ar; identical token ids: {same}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from decodekit import bench

    if args.report:
        try:
            saved = json.loads(Path(args.report).read_text())
            records, meta = saved["records"], saved["meta"]
        except (OSError, ValueError, KeyError) as err:
            raise InvalidParameter(f"cannot read bench result {args.report}: {err}") from None
        summary = bench.summarize(records, meta["baseline"])
        print(bench.render_table(summary))
        chart = Path(args.report).with_name("speedup.png")
        bench.plot(summary, meta["baseline"], chart, bench.chart_title(meta))
        print(f"chart: {chart}", file=sys.stderr)
        return 0

    from tqdm import tqdm

    from decodekit import load_model
    from decodekit.engine import check_attention, check_method, check_strategy, resolved_options
    from decodekit.prompts import load_questions

    for method in args.methods:
        check_method(method)
    attention = check_attention(args.attention)
    if attention != "full" and args.strategies:
        raise InvalidParameter("strategies run with full attention: give no --attention beside --strategies")
    sampling = sampling_from_args(args)
    for strategy in args.strategies:
        check_strategy(strategy, sampling=sampling)
    if not sampling.greedy and sampling.seed is None:
        sampling = replace(sampling, seed=0)  # a benchmark is rerun exactly
    _require_positive(args, "per_category", "limit", "max_new_tokens")
    questions = bench.select(load_questions(args.dataset), args.categories, args.per_category, args.limit)
    baseline = args.baseline or ("hf" if "hf" in args.peers else args.methods[0])
    model = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    checkouts = [Path(checkout) for checkout in args.checkout]
    runners, notes = bench.make_runners(
        model, args.methods, args.peers, sampling, checkouts, args.strategies, args.attention
    )
    for note in notes:
        print(f"decodekit: {note}", file=sys.stderr)
    if baseline not in [r.name for r in runners]:
        raise InvalidParameter(f"baseline {baseline!r} is not among the methods and peers that can run")
    meta = {
        "command": shlex.join(["decodekit", *sys.argv[1:]]),
        "model": model.name,
        "dtype": model.weights,
        "device": model.device.type,
        "dataset": args.dataset or "built-in",
        "max_new_tokens": args.max_new_tokens,
        "sampling": sampling.to_dict(),
        "first_turn_only": args.first_turn_only,
        "baseline": baseline,
        "reference": runners[0].name,
        "runners": [r.name for r in runners],
        "options": {spec: resolved_options(spec) for spec in args.methods},
        "attention": attention,
        "strategies": args.strategies,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": bench.machine(),
        "peer_builds": {r.name: r.info["build"] for r in runners if "build" in getattr(r, "info", {})},
        "notes": notes,
    }
    output = Path(args.output)
    records, runs = bench.resume(output / "result.json", meta) if args.resume else ([], [])
    done = {r["question_id"] for r in records}
    if any(run.get("machine", {}).get("cpu_id") != meta["machine"]["cpu_id"] for run in runs):
        print(
            "decodekit: resuming on another machine than (or one unrecorded by) an earlier part of this run: "
            "runners still take turns per question, but rates mix machines (meta.runs says which did what)",
            file=sys.stderr,
        )
    meta["runs"] = [*runs, {"date": meta["date"], "machine": meta["machine"], "questions": 0}]
    meta["selected"] = len({q.question_id for q in questions} | done)
    meta["questions"] = len(done)

    def checkpoint(question_records: list[dict]) -> None:
        records.extend(question_records)
        meta["runs"][-1]["questions"] += 1
        meta["questions"] = len({r["question_id"] for r in records})
        bench.save({"meta": meta, "records": records}, output)

    todo = [q for q in questions if q.question_id not in done]
    if done:
        print(f"decodekit: resuming: {len(done)} questions already measured, {len(todo)} to run", file=sys.stderr)
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` or kill: checkpoint kept
    try:
        if todo:
            bench.run_bench(
                model,
                runners,
                todo,
                args.max_new_tokens,
                not args.first_turn_only,
                lambda qs: tqdm(qs, desc="questions"),
                compare_outputs=sampling.greedy,
                on_question=checkpoint,
            )
    except KeyboardInterrupt:
        print(
            f"decodekit: stopped; {len(records)} records kept in {output / 'result.json'} "
            "(the same command with --resume goes on)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, on_term)
        for runner in runners:
            getattr(runner, "close", lambda: None)()
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        print(f"skipped {len(skipped)} turns whose prompt left no room in the context window", file=sys.stderr)
    path = bench.save({"meta": meta, "records": records}, output)  # raw numbers first, whatever follows
    for error in (r for r in records if "error" in r):
        print(f"decodekit: question {error['question_id']}: {error['error']}", file=sys.stderr)
    summary = bench.summarize(records, baseline)
    bench.save({"meta": meta, "summary": summary, "records": records}, output)
    print(bench.render_table(summary))
    bench.plot(summary, baseline, path.with_name("speedup.png"), bench.chart_title(meta))
    print(f"results: {path}  chart: {path.with_name('speedup.png')}", file=sys.stderr)
    if args.strategies:
        bench.plot_outputs(summary, baseline, path.with_name("outputs.png"), bench.chart_title(meta))
        print(f"what the strategies change: {path.with_name('outputs.png')}", file=sys.stderr)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from decodekit.engine import describe_methods, describe_strategies

    def show(name: str, options: list[tuple[str, object, str]]) -> None:
        print(name if options else f"{name} (no options)")
        for option, default, allowed in options:
            print(f"  {option}={default!s:<{24 - len(option)}} {allowed}")

    print("methods (--method: lossless, the output is plain decoding's)")
    for name, options in describe_methods().items():
        show(name, options)
    print("\nstrategies (--strategy: the output differs from plain decoding by design)")
    for name, (paper, options) in describe_strategies().items():
        show(f"{name}  [{paper}]", options)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from decodekit import load_model

    if args.layer and args.kind != "eagle":
        raise InvalidParameter(f"--layer names an eagle layer whose acceptance head to train, not a {args.kind} part")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    out = Path(args.out) if args.out else model.trained_file(args.kind).parent
    settings = {"prompts": args.prompts, "generated": args.generated, "max_new_tokens": args.max_new_tokens}
    settings |= {"lr": args.lr, "resume": args.resume}
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    if args.kind == "kangaroo":
        from decodekit.train.kangaroo import train_kangaroo

        train_kangaroo(model, out, args.exit_layer, **settings)
    elif args.kind == "eagle":
        from decodekit.train.eagle import train_eagle

        train_eagle(model, out, args.blocks, layer_path=Path(args.layer) if args.layer else None, **settings)
    else:
        from decodekit.train.heads import train_heads

        train_heads(args.kind, model, out, args.heads, **settings)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from decodekit import load_model
    from decodekit.engine import check_method, client_policy, strategy_policy
    from decodekit.server.app import create_app
    from decodekit.server.guard import is_loopback
    from decodekit.server.shutdown import DrainingServer

    check_method(args.method)  # check what can be checked before the model loads
    allow_methods = None if args.allow_methods is None else args.allow_methods.split(",")
    client_policy(allow_methods, args.allow_method_options)
    allow_strategies = [] if args.allow_strategies is None else args.allow_strategies.split(",")
    allow_strategies = None if allow_strategies == ["all"] else allow_strategies
    strategy_policy(allow_strategies)
    _require_positive(
        args, "max_prompt_tokens", "max_tokens_cap", "queue_size", "max_batch", "max_body_bytes", "prefill_chunk"
    )
    if args.drafter_pool_bytes < 0:
        raise InvalidParameter(f"--drafter-pool-bytes must be >= 0, got {args.drafter_pool_bytes}")
    if not 0 <= args.port < 65536:
        raise InvalidParameter(f"--port must be in [0, 65535], got {args.port}")
    if not args.drain_timeout >= 0:
        raise InvalidParameter(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    if args.api_key == "":
        raise InvalidParameter("--api-key (or DECODEKIT_API_KEY) is empty")
    loopback = is_loopback(args.host)
    if not loopback and args.api_key is None:
        print(
            f"decodekit: warning: serving on {args.host} without an API key: whoever reaches this port may use it "
            "(set --api-key or DECODEKIT_API_KEY)",
            file=sys.stderr,
        )
    model = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    app = create_app(
        model,
        args.method,
        args.queue_size,
        args.max_prompt_tokens,
        args.max_tokens_cap,
        args.max_batch,
        adaptive=args.speculation == "adaptive",
        allow_methods=allow_methods,
        allow_method_options=args.allow_method_options,
        allow_strategies=allow_strategies,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key,
        loopback_only=loopback,
        prefill_chunk=args.prefill_chunk,
        drafter_pool_bytes=args.drafter_pool_bytes,
    )
    # the drain bounds the generations; the grace period after it, the flushing of their last bytes
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    DrainingServer(config, lambda: app.state.scheduler.drain(args.drain_timeout)).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="decodekit: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "generate": cmd_generate,
            "bench": cmd_bench,
            "methods": cmd_methods,
            "train": cmd_train,
            "serve": cmd_serve,
        }
        _read_speculative_config(args)
        return commands[args.command](args)
    except DecodekitError as err:
        print(f"decodekit: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
