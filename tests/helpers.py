"""Tiny random checkpoints written with transformers, for tests that must not need the default model."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from decodekit.drafters.heads import shipped_file

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tiny model writes tiny stories about foxes, dogs and "
    "the weather. It is sunny today, and tomorrow it will rain over the hills and the river. "
) * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ~300 tokens trained on a fixed corpus, with an EOS and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def write_tiny_llama(
    directory: Path, config_class: type = LlamaConfig, model_class: type = LlamaForCausalLM, **overrides: object
) -> Path:
    """A 2-layer random Llama checkpoint (GQA, tied embeddings) with its tokenizer; or, with ``config_class`` and
    ``model_class``, one of another Llama-shaped architecture (Qwen2, ...)."""
    tokenizer = write_tokenizer(directory)
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,  # large enough that argmax choices are not near-ties
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model_class(config_class(**config)).save_pretrained(directory)
    return directory


def write_tiny_gemma(directory: Path, **overrides: object) -> Path:
    """A 3-layer random Gemma 3 (text) checkpoint with its tokenizer: two sliding-window layers (window 8) and a
    global one, each kind with its own rope (the global one linearly scaled), an attention scale apart from
    head_dim's, and random norm weights (Gemma initializes them to zero, which would leave its ``1 + weight`` and
    the q/k norms' weights untested)."""
    tokenizer = write_tokenizer(directory)
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return directory


def runnable(method: str, model: object) -> str:
    """A spec that runs ``method`` on ``model`` (a LoadedModel) with its defaults: ``draft`` also needs a draft
    checkpoint, and gets the model's own (every draft then accepted, unless sampled); ``pearl`` gets the file the
    model was made from (the default model in float32 is verified against its own Q4 copy); ``medusa``, ``hydra``,
    ``kangaroo`` and ``eagle`` need trained parts, and get the package's for the model, else ones trained here in
    seconds (:func:`quick_part`)."""
    if method == "draft":
        return f"draft:model={model.path}"
    if method == "pearl":
        return f"pearl:model={model.source}"
    if method in TRAINED_OPTION and shipped_file(method, model.identity) is None:
        option = TRAINED_OPTION[method]
        return f"{method}:{option}={quick_part(method, model)}"
    return method


TRAINED_OPTION = {"medusa": "heads", "hydra": "heads", "kangaroo": "adapter", "eagle": "layer"}  # its file's option
_QUICK_PARTS: dict[tuple[str, str], Path] = {}


def quick_part(kind: str, model: object) -> Path:
    """``kind``'s trained file for ``model`` from a few seconds of training (12 prompts, 12 tokens, one epoch),
    trained once per model and process: enough to draft, so that the engine has drafts to verify."""
    if (kind, model.identity) not in _QUICK_PARTS:
        out = Path(tempfile.mkdtemp(prefix=f"{kind}-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)  # the process's parts go with it
        if kind == "kangaroo":
            from decodekit.train.kangaroo import train_kangaroo

            path = train_kangaroo(model, out, None, 12, 0, 12, 1, say=lambda text: None)
        elif kind == "eagle":
            from decodekit.train.eagle import train_eagle

            path = train_eagle(model, out, 1, 12, 0, 12, 1, say=lambda text: None)
        else:
            from decodekit.train.heads import train_heads

            path = train_heads(kind, model, out, 2, 12, 0, 12, 1, say=lambda text: None)
        _QUICK_PARTS[kind, model.identity] = path
    return _QUICK_PARTS[kind, model.identity]


SMALL_VOCAB = ["a", "b", "c", "d", "e", "f", "g", "h"]


def write_small_vocab_llama(directory: Path) -> Path:
    """A 2-layer random Llama over 8 word tokens (no EOS): small enough to enumerate every 3-token output and
    its exact probability, for statistical tests of sampling."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SMALL_VOCAB)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="a").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(SMALL_VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.3,  # distributions neither flat nor one-hot
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
