"""The command line: output formats, and one clear error line with exit status 1 for every bad input."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from decodekit.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_with_compare(capsys, tiny_dir):
    code, out, _err = run_cli(
        capsys, "the quick brown fox", "--model", str(tiny_dir), "--max-new-tokens", "12", "--compare", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["identical"] is True and result["token_ids"] == result["baseline"]["token_ids"]
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) <= 12
    assert result["speedup"] == pytest.approx(
        result["stats"]["tokens_per_s"] / result["baseline"]["stats"]["tokens_per_s"]
    )


def test_human_output_and_stream(capsys, tiny_dir):
    code, _out, err = run_cli(
        capsys,
        "foxes",
        "--model",
        str(tiny_dir),
        "--max-new-tokens",
        "8",
        "--stream",
        "--compare",
        "--method",
        "recycling:tree=8",
    )
    assert code == 0
    assert "identical token ids: yes" in err and "tokens/s" in err


def test_chat_file_continues_the_conversation(capsys, tiny_dir, tmp_path):
    conversation = [
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over the lazy dog."},
        {"role": "user", "content": "and then?"},
    ]
    (tmp_path / "chat.json").write_text(json.dumps({"messages": conversation}))
    args = ["--model", str(tiny_dir), "--max-new-tokens", "8", "--json", "--method", "copyspec", "--compare"]
    code, out, _ = run_cli(capsys, "--chat-file", str(tmp_path / "chat.json"), *args)
    assert code == 0
    result = json.loads(out)
    assert result["identical"] is True and result["stats"]["prompt_tokens"] > 20


def test_entry_point_runs_as_a_program(tiny_dir):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "decodekit.cli",
            "generate",
            "hello",
            "--model",
            str(tiny_dir),
            "--max-new-tokens",
            "4",
            "--json",
            "--no-chat",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) <= 4
    bad = subprocess.run(
        [sys.executable, "-m", "decodekit.cli", "generate", "hello", "--model", str(tiny_dir), "--method", "warp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("decodekit: error: unknown method 'warp'; available: ar, recycling, ")


def write_gguf(path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    corrupt = root / "corrupt.gguf"
    corrupt.write_bytes(b"this is not a gguf file" * 10)
    falcon = root / "falcon.gguf"
    write_gguf(falcon, "falcon")
    gpt2 = root / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    no_weights = root / "no-weights"
    (root / "chat-bad.json").write_text('{"messages": [{"role": "assistant", "content": "hi"}]}')
    (root / "chat-broken.json").write_text("[{")
    (root / "chat-utf16.json").write_bytes(b"\xff\xfe" + '[{"role": "user", "content": "hi"}]'.encode("utf-16-le"))

    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=2).save_pretrained(
        no_weights
    )
    return {
        "chat-bad": root / "chat-bad.json",
        "chat-broken": root / "chat-broken.json",
        "chat-utf16": root / "chat-utf16.json",
        "corrupt": corrupt,
        "falcon": falcon,
        "gpt2": gpt2,
        "no-weights": no_weights,
        "missing": root / "nope.gguf",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--model", "{tiny}"], "the prompt is empty"),
        (["hi", "--model", "{tiny}", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["hi", "--model", "{tiny}", "--max-new-tokens", "-5"], "max_new_tokens must be a positive integer"),
        (["hi", "--model", "{tiny}", "--max-new-tokens", "100000000"], "exceeds the context window"),
        (["hi", "--model", "{tiny}", "--method", "eagle9"], "unknown method 'eagle9'"),
        (["hi", "--model", "{tiny}", "--method", "medusa"], "no medusa file for this model: train it with"),
        (["hi", "--model", "{tiny}", "--method", "recycling:k=banana"], "expects an integer"),
        (["hi", "--model", "{tiny}", "--method", "recycling:k=1000000000000"], "must be in [1, 64]"),
        (["hi", "--no-chat", "--model", "{tiny}", "--method", "hybrid:max_nodes=100000"], "max_nodes"),
        (["hi \udcff there", "--model", "{tiny}"], "the prompt is not valid text"),
        (["hi", "--model", "{tiny}", "--stop", "\ud800"], "a stop string is not valid text"),
        (["--chat-file", "{chat-utf16}", "--model", "{tiny}"], "is not UTF-8 text"),
        (["hi", "--cache-dir", "{chat-bad}"], "cannot write converted weights into"),
        (["hi", "--model", "{tiny}", "--method", "recycling:depth=2"], "bad option"),
        (["fox " * 400, "--model", "{tiny}"], "context window holds 256"),
        (["hi", "--model", "{missing}"], "model path not found"),
        (["hi", "--model", "{corrupt}"], "cannot read GGUF file"),
        (["hi", "--model", "{falcon}"], "unsupported architecture 'falcon'"),
        (["hi", "--model", "{gpt2}"], "unsupported architecture 'gpt2'"),
        (["hi", "--model", "{no-weights}"], "no .safetensors weights"),
        (["hi", "--model", "{tiny}", "--device", "tpu"], "device"),
        (["--chat-file", "{missing}", "--model", "{tiny}"], "cannot read chat file"),
        (["--chat-file", "{chat-broken}", "--model", "{tiny}"], "is not JSON"),
        (["--chat-file", "{chat-bad}", "--model", "{tiny}"], "must end with a non-empty user message"),
        (["hi", "--chat-file", "{chat-bad}", "--model", "{tiny}"], "give no prompt"),
    ],
)
def test_bad_input_gives_one_error_line(capsys, tiny_dir, bad_models, args, message):
    paths = {f"{{{k}}}": str(v) for k, v in bad_models.items()} | {"{tiny}": str(tiny_dir)}
    code, out, err = run_cli(capsys, *[paths.get(a, a) for a in args])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decodekit: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "hi", "--model", str(tiny_dir), "--device", "cuda")
    assert code == 1 and err.strip() == "decodekit: error: CUDA was asked for but no CUDA device is available"


def test_sampled_generation_is_reproducible_and_not_compared_token_for_token(capsys, tiny_dir):
    args = ["the quick brown fox", "--model", str(tiny_dir), "--max-new-tokens", "12", "--json", "--compare"]
    sampled = [*args, "--temperature", "0.8", "--top-p", "0.9", "--seed", "7"]
    first = json.loads(run_cli(capsys, *sampled)[1])
    again = json.loads(run_cli(capsys, *sampled)[1])
    assert first["token_ids"] == again["token_ids"] and first["stats"]["seed"] == 7
    assert "identical" not in first  # equal in distribution, not token for token


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "-1"), ("--top-p", "0"), ("--top-k", "-2"), ("--seed", "-5")]
)
def test_bad_sampling_parameters_get_one_line(capsys, flag, value):
    code, out, err = run_cli(capsys, "hello", flag, value)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and flag.removeprefix("--").replace("-", "_") in err


def test_a_prompt_on_stdin_that_is_not_utf8_gets_one_line(capsys, monkeypatch, tiny_dir):
    class Stdin:
        buffer = io.BytesIO(b"hi \xff there")

    monkeypatch.setattr(sys, "stdin", Stdin)
    code, out, err = run_cli(capsys, "-", "--model", str(tiny_dir))
    assert code == 1 and out == "" and err == "decodekit: error: the prompt on stdin is not UTF-8 text (byte 3)\n"


def test_methods_lists_every_option_with_its_bounds(capsys):
    from decodekit.drafters import METHODS, method_options

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert out.count(f"\n{name}") + out.startswith(name) == 1
        for option in method_options(name).values():
            assert f"  {option.name}={option.default}" in out and option.describe() in out
