"""decodekit's own tokenizer and cached runtime config, which let a model load without importing transformers:
both must give exactly what transformers gives (token ids, text, rendered chat templates, config values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_gemma, write_tokenizer
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from decodekit.runtime import loader
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.tokenizer import Tokenizer

TEXTS = [
    "Why is the sky blue?",
    "  leading and trailing spaces  ",
    "naïve café — 東京 🚀 \u00a0non-breaking",
    "line one\n\nline two\ttab",
    "<eos> written as text, and <|im_end|> too",
    "x" * 300,
]
CONVERSATIONS = [[{"role": "user", "content": text}] for text in TEXTS] + [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
]
# what chat templates use beyond plain loops: loop controls, tojson (non-ASCII kept), raise_exception, namespace,
# the special tokens, `tools` given as None, and the generation tag
FEATURE_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% if tools is not none %}{{ raise_exception('no tools') }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}[{{ ns.n }}] {{ m['role'] }}: {{ m['content'] | tojson }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def assert_same_tokenizer(ours: Tokenizer, reference) -> None:
    assert len(ours) == len(reference) and ours.get_vocab() == reference.get_vocab()
    assert ours.eos_token_id == reference.eos_token_id
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    if reference.chat_template:
        for messages in CONVERSATIONS:
            for prompt in (False, True):
                expected = reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
                assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_the_tiny_tokenizer_equals_transformers(tiny_dir):
    assert_same_tokenizer(Tokenizer.from_directory(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir))


def test_a_template_using_jinja_features_renders_as_in_transformers(tmp_path):
    reference = write_tokenizer(tmp_path)
    reference.chat_template = FEATURE_TEMPLATE
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_directory(tmp_path)
    assert ours.chat_template == FEATURE_TEMPLATE
    assert_same_tokenizer(ours, AutoTokenizer.from_pretrained(tmp_path))
    assert "东京" in ours.apply_chat_template([{"role": "user", "content": "东京"}])  # tojson keeps non-ASCII


def test_the_default_models_tokenizer_equals_transformers(default_model):
    assert isinstance(default_model.tokenizer, Tokenizer)
    assert_same_tokenizer(default_model.tokenizer, AutoTokenizer.from_pretrained(default_model.path))


@pytest.mark.skipif(find_spec(loader.NAMED_MODELS["gemma3-270m"]) is None, reason="gemma3-270m is not installed")
def test_gemma3_270m_tokenizer_equals_transformers():
    directory = loader.resolve_checkpoint("gemma3-270m")
    assert_same_tokenizer(Tokenizer.from_directory(directory), AutoTokenizer.from_pretrained(directory))


def test_a_damaged_tokenizer_file_names_the_directory(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(loader.ModelFileError, match="cannot load the tokenizer in"):
        Tokenizer.from_directory(tmp_path)


def assert_same_config(a: ModelConfig, b: ModelConfig) -> None:
    for field in fields(ModelConfig):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "rope_inv_freq":
            assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)
        elif field.name == "sliding_rope" and x is not None:
            assert torch.equal(x[0], y[0]) and x[1] == y[1]
        else:
            assert x == y, field.name


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "yarn-rope", "gemma"])
def test_a_config_survives_its_json_copy_exactly(tmp_path, tiny_dir, kind):
    if kind == "gemma":
        directory = write_tiny_gemma(tmp_path)
    else:
        hf = AutoConfig.from_pretrained(tiny_dir).to_dict()
        rope = {"llama": None, "llama3-rope": "llama3", "yarn-rope": "yarn"}[kind]
        if rope == "llama3":
            hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}  # fmt: skip
        elif rope == "yarn":
            hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 64}  # fmt: skip
        directory = tmp_path
        LlamaConfig.from_dict(hf).save_pretrained(directory)
    translated = ModelConfig.from_hf(AutoConfig.from_pretrained(directory))
    assert_same_config(ModelConfig.from_json(translated.to_json()), translated)
    copy = loader.runtime_config(directory, tmp_path / "cache")
    assert_same_config(copy, translated)
    assert len(list((tmp_path / "cache" / "configs").glob("*.json"))) == 1
    assert_same_config(loader.runtime_config(directory, tmp_path / "cache"), translated)  # read from the copy


def test_a_stale_or_damaged_config_copy_is_translated_again(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    expected = loader.runtime_config(tiny_dir, cache)
    (copy,) = (cache / "configs").glob("*.json")
    for damage in ("{broken", json.dumps({**json.loads(copy.read_text()), "format": "another version"})):
        copy.write_text(damage)
        assert_same_config(loader.runtime_config(tiny_dir, cache), expected)
        assert ModelConfig.from_json(copy.read_text()) is not None


def test_a_second_load_imports_neither_transformers_nor_fastapi(tmp_path, tiny_dir):
    script = (
        "import sys\nfrom decodekit import Engine, load_model\n"
        "model = load_model(sys.argv[1])\nEngine(model, method='hybrid').generate('Hello', max_new_tokens=4)\n"
        "print(sorted(m for m in ('transformers', 'fastapi') if m in sys.modules))\n"
    )
    env = {**os.environ, "DECODEKIT_CACHE": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", script, str(tiny_dir)], capture_output=True, text=True, env=env)
        for _ in range(2)
    ]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr
    assert runs[0].stdout.strip() == "['transformers']"  # the first load translates its config through transformers
    assert runs[1].stdout.strip() == "[]"


def test_a_missing_config_names_the_file(tmp_path):
    with pytest.raises(loader.ModelFileError, match=r"config\.json"):
        loader.runtime_config(Path(tmp_path), tmp_path / "cache")
