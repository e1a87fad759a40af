"""Double Sparsity attention (runtime/sparse_attention.py): exactly full attention while every token is kept, the
selection of a hand-made case, calibration finding a planted outlier channel, speculative methods lossless
relative to sparse attention on a context far past the token budget, and bad options refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, write_tiny_llama
from safetensors.torch import load_file, save_file

from decodekit import Engine, InvalidParameter
from decodekit.cli import main
from decodekit.runtime import cpu
from decodekit.runtime.loader import LoadedModel, load_model
from decodekit.runtime.sparse_attention import (
    DoubleSparsity,
    attention_spec,
    calibrate,
    calibrated_channels,
    calibration_batches,
    kept_slots,
    key_labels,
    parse_attention,
)

SMALL = "double_sparsity:channels=8,tokens=16,recent=16"  # a budget of 32 tokens


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny Llama with a 4096-token window and head_dim 64, which the CPU attention kernel serves."""
    return load_model(write_tiny_llama(tmp_path_factory.mktemp("long"), max_position_embeddings=4096, head_dim=64))


@pytest.fixture(scope="module")
def long_prompt(long_model: LoadedModel) -> list[int]:
    return long_model.tokenizer.encode(CORPUS * 4)[:600]


@pytest.fixture(autouse=True)
def full_attention_after(tiny_model: LoadedModel) -> Iterator[None]:
    """Leave the shared tiny model as other tests expect it (an engine sets its attention on the model)."""
    yield
    tiny_model.transformer.use_sparse_attention(None)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise where the CPU kernels compute attention (a query's output is a function of what it sees), else close."""
    return torch.equal(a, b) if cpu.available() else torch.allclose(a, b, atol=1e-5)


def test_keeping_every_token_is_full_attention(tiny_model: LoadedModel, long_model: LoadedModel) -> None:
    # the tiny model's window (256) is within the default budget (256 + 16): every step keeps every token
    full = Engine(tiny_model, "ar").generate("the quick brown fox", max_new_tokens=24)
    kept = Engine(tiny_model, "ar", attention="double_sparsity").generate("the quick brown fox", max_new_tokens=24)
    assert kept.token_ids == full.token_ids
    transformer, tokens = tiny_model.transformer, torch.tensor([full.prompt_ids + full.token_ids])
    logits_full = transformer(tokens, transformer.new_cache(tokens.shape[1]))
    transformer.use_sparse_attention(DoubleSparsity(), calibrated_channels(tiny_model, 16))
    try:
        logits_kept = transformer(tokens, transformer.new_cache(tokens.shape[1]))
    finally:
        transformer.use_sparse_attention(None)
    torch.testing.assert_close(logits_kept, logits_full, rtol=0, atol=0)
    # in one chunk of 64 queries under a budget of 32, the first 32 see at most 32 tokens: full attention's logits
    transformer, tokens = long_model.transformer, torch.tensor([list(range(3, 67))])
    logits_full = transformer(tokens, transformer.new_cache(64))
    transformer.use_sparse_attention(parse_attention(SMALL), calibrated_channels(long_model, 8))
    try:
        logits_sparse = transformer(tokens, transformer.new_cache(64))
    finally:
        transformer.use_sparse_attention(None)
    assert same(logits_sparse[:, :32], logits_full[:, :32])
    assert not torch.allclose(logits_sparse[:, 32:], logits_full[:, 32:])


def test_selection_on_a_hand_made_case() -> None:
    # one KV head shared by two query heads, head_dim 4, label channel 2; channel 0 is large but not a label
    keys = torch.zeros(1, 1, 8, 4)
    keys[0, 0, :, 2] = torch.tensor([5.0, -1.0, 3.0, 0.0, 2.0, 9.0, 1.0, 4.0])
    keys[0, 0, :, 0] = torch.arange(8.0) * 100
    channels = torch.tensor([[2]])
    labels = key_labels(keys, channels)
    assert labels.shape == (1, 1, 1, 8) and labels.dtype == torch.float64

    def chosen(q: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
        kept = kept_slots(q, labels, channels, mask, tokens=2, recent=1)
        return [row.nonzero().flatten().tolist() for row in kept[0, 0]]

    q = torch.zeros(1, 2, 1, 4)
    q[0, :, 0, 2] = torch.tensor([1.0, 0.5])
    q[0, :, 0, 0] = -7.0
    assert chosen(q, None) == [[0, 5, 7]]  # the two best of slots 0-6 by label score, and the newest
    assert chosen(-q, None) == [[1, 3, 7]]  # the heads' scores summed: the lowest keys now score best
    # three queries of a tree, each choosing among the slots it may see (in slot order = sequence order)
    mask = torch.zeros(1, 1, 3, 8, dtype=torch.bool)
    mask[0, 0, 0, [0, 1, 2, 3, 4, 6]] = True
    mask[0, 0, 1, [0, 1, 2, 3, 4, 5, 7]] = True
    mask[0, 0, 2, [0, 1, 6]] = True  # sees no more than tokens + recent: keeps all it sees
    assert chosen(q.expand(1, 2, 3, 4), mask) == [[0, 2, 6], [0, 5, 7], [0, 1, 6]]


def test_calibration_picks_the_planted_outlier_channel(tmp_path: Path) -> None:
    # channel 7 of every query and key head scaled 20x (head_dim 16: the slowest-turning rotary pair, so it stays
    # channel 7 after rotation)
    directory = write_tiny_llama(tmp_path)
    state = load_file(directory / "model.safetensors")
    for name, weight in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weight.view(-1, 16, weight.shape[1])[:, 7] *= 20
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    model = load_model(directory)
    batches = calibration_batches(model, max_tokens=512)
    assert sum(batch.shape[1] for batch in batches) == 512
    channels = calibrate(model.transformer, batches, 1)
    assert channels.shape == (2, 2, 1) and channels.dtype == torch.int64
    assert channels.flatten().tolist() == [7, 7, 7, 7]
    ranked = calibrate(model.transformer, batches, 100)  # clamped to head_dim, each channel once
    assert ranked.shape == (2, 2, 16) and (ranked.sort(-1).values == torch.arange(16)).all()
    assert model.transformer.sparse_attention is None


def test_a_small_budget_stays_lossless_for_speculative_methods(long_model: LoadedModel, long_prompt: list[int]) -> None:
    sparse = Engine(long_model, "ar", attention=SMALL).generate(long_prompt, max_new_tokens=32, chat=False)
    full = Engine(long_model, "ar").generate(long_prompt, max_new_tokens=32, chat=False)
    assert len(sparse.token_ids) == 32 and all(0 <= t < long_model.cfg.vocab_size for t in sparse.token_ids)
    agreement = sum(a == b for a, b in zip(sparse.token_ids, full.token_ids, strict=True)) / 32
    print(f"greedy agreement with full attention, 32 of 600+ tokens kept: {agreement:.2f}")
    assert 0.0 <= agreement <= 1.0
    recycling = Engine(long_model, "recycling", attention=SMALL)
    result = recycling.generate(long_prompt, max_new_tokens=32, chat=False)
    assert result.token_ids == sparse.token_ids
    assert max(result.stats.accepted_lengths) > 1  # trees were verified, not only roots
    # two requests of different lengths in one batch (masks per row), one leaving before the other
    batch = Engine(long_model, "recycling", max_batch=2, attention=SMALL)
    short = long_prompt[:450]
    alone = Engine(long_model, "ar", attention=SMALL).generate(short, max_new_tokens=8, chat=False)
    first = batch.submit(batch.request(long_prompt, max_new_tokens=32, chat=False))
    second = batch.submit(batch.request(short, max_new_tokens=8, chat=False))
    while not (first.done and second.done):
        batch.step()
    assert first.result().token_ids == sparse.token_ids
    assert second.result().token_ids == alone.token_ids


def test_a_prompt_chunk_scores_as_its_tokens_one_by_one(long_model: LoadedModel, long_prompt: list[int]) -> None:
    transformer, tokens = long_model.transformer, torch.tensor([long_prompt[:200]])
    transformer.use_sparse_attention(None)  # as an engine may have left it
    unlabelled = transformer.new_cache(200)
    transformer.use_sparse_attention(parse_attention(SMALL), calibrated_channels(long_model, 8))
    try:
        chunked, steps = transformer.new_cache(200), transformer.new_cache(200)
        for cache in (chunked, steps):
            transformer(tokens[:, :100], cache)
            cache.commit_all(100)
        whole = transformer(tokens[:, 100:], chunked)
        one_by_one = []
        for i in range(100, 200):
            one_by_one.append(transformer(tokens[:, i : i + 1], steps))
            steps.commit_all(1)
        with pytest.raises(RuntimeError, match="without its label cache"):
            transformer(tokens[:, :1], unlabelled)  # made before the model used sparse attention
    finally:
        transformer.use_sparse_attention(None)
    assert same(whole, torch.cat(one_by_one, dim=1))


def test_bad_options_are_refused(tiny_model: LoadedModel, tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    for spec, says in [
        ("double_sparsity:tokens=8", r"option tokens of attention double_sparsity: '8' must be in \[16, 8192\]"),
        ("double_sparsity:channels=0", r"channels.*must be in \[1, 128\]"),
        ("double_sparsity:recent=2000", r"recent.*must be in \[0, 1024\]"),
        ("double_sparsity:channels=many", "channels.*expects an integer"),
        ("double_sparsity:window=3", r"bad option 'window=3'.*\(options: channels, tokens, recent\)"),
        ("double_sparsity:tokens", "bad option 'tokens'"),
        ("sparse", "unknown attention 'sparse'; available: full, double_sparsity"),
        ("full:tokens=3", "attention full takes no options"),
    ]:
        with pytest.raises(InvalidParameter, match=says):
            parse_attention(spec)
    with pytest.raises(InvalidParameter, match=r"tokens.*must be in"):
        DoubleSparsity(tokens=10)
    with pytest.raises(InvalidParameter, match=r"channels.*expects an integer"):
        DoubleSparsity(channels=True)
    with pytest.raises(InvalidParameter, match="must be in"):
        Engine(tiny_model, "ar", attention="double_sparsity:tokens=1")
    engine = Engine(tiny_model, "ar", attention="double_sparsity")
    with pytest.raises(InvalidParameter, match="strategies run with full attention"):
        engine.request("hello", strategy="momentum")
    assert main(["generate", "hi", "--model", str(tiny_dir), "--attention", "double_sparsity:recent=-1"]) == 1
    assert "recent of attention double_sparsity: '-1' must be in [0, 1024]" in capsys.readouterr().err


def test_specs_round_trip_and_results_record_them(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = parse_attention("double_sparsity:tokens=512, channels=8")
    assert config == DoubleSparsity(channels=8, tokens=512, recent=16)
    assert parse_attention(config.spec) == config and attention_spec(None) == "full"
    assert parse_attention("full") is None and parse_attention(None) is None
    args = ["generate", "the fox", "--model", str(tiny_dir), "--max-new-tokens", "8", "--compare", "--json"]
    assert main([*args, "--attention", "double_sparsity:tokens=32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attention"] == "double_sparsity:channels=16,tokens=32,recent=16" and out["identical"] is True
