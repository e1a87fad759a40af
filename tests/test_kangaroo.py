"""Kangaroo's early exit: the adapter's cache gives step-by-step what the whole sequence gives, an untrained
adapter is the plain early exit, the exit's cache follows the committed text through rewinds, `decodekit train
kangaroo` on a tiny model (the loss falls, the file loads back, --resume continues, other weights are refused) and
lossless decoding with the trained adapter (the every-method tests in test_engine, test_batch, test_sampling and
test_lossless_default_model run it too)."""

from __future__ import annotations

import pytest
import torch
from helpers import write_tiny_llama

from decodekit import Engine, InvalidParameter, ModelFileError, load_model
from decodekit.cli import main
from decodekit.drafters.heads import load_trained
from decodekit.drafters.kangaroo import AdapterExit, KangarooAdapter
from decodekit.runtime.runner import ModelRunner, TargetModel
from decodekit.train import kangaroo as trainer

PROMPTS = ["the quick brown fox", "tell me about the weather tomorrow in the hills", "a b c a b c a b c"]


def random_adapter(depth: int, hidden: int) -> KangarooAdapter:
    torch.manual_seed(0)
    adapter = KangarooAdapter(depth, hidden)
    torch.nn.init.normal_(adapter.out.weight, std=0.1)
    return adapter.requires_grad_(False)


def test_the_adapter_step_by_step_equals_the_whole_sequence():
    adapter = random_adapter(1, 128)
    x = torch.randn(9, 128)
    whole = adapter(x)
    cache = adapter.new_cache(16)
    parts = [adapter(x[:4], 0, cache), adapter(x[4:5], 4, cache), adapter(x[5:], 5, cache)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
    later = adapter(x[3:4] + 1.0, 3, cache)  # a rewind to position 3 overwrites what followed
    assert torch.allclose(later, adapter(torch.cat([x[:3], x[3:4] + 1.0]))[-1:], atol=1e-5)
    assert not torch.allclose(later, whole[3:4])


def test_an_untrained_adapter_is_the_plain_early_exit(tiny_model):
    access = TargetModel(tiny_model)
    every_token = torch.arange(tiny_model.cfg.vocab_size)
    exit = AdapterExit(KangarooAdapter(1, tiny_model.cfg.hidden_size), access, every_token)
    sequence = torch.tensor([5, 9, 17, 3, 44, 8])
    plain, early = ModelRunner(tiny_model.transformer, [0]), ModelRunner(tiny_model.transformer, [0], exit)
    reference = plain.logits(sequence)  # the exit's head runs on 8-bit blocks (ModelAccess.head_over): close
    assert torch.allclose(early.logits(sequence), reference, atol=0.02 * float(reference.abs().max()))
    assert torch.equal(early.greedy(sequence), plain.greedy(sequence))


def test_the_exits_cache_follows_the_committed_text_through_rewinds(tiny_model):
    access = TargetModel(tiny_model)
    vocab = torch.arange(0, tiny_model.cfg.vocab_size, 3)
    exit = AdapterExit(random_adapter(1, tiny_model.cfg.hidden_size), access, vocab)
    runner = ModelRunner(tiny_model.transformer, [0], exit)
    history = [[5, 9, 17, 3], [5, 9, 17, 3, 44, 8, 2], [5, 9, 17, 6], [5, 9, 17, 6, 7, 7, 7, 1], [5, 9]]
    for sequence in map(torch.tensor, history):  # drafts grown, rejected, rewound
        logits = runner.logits(sequence)
        fresh = ModelRunner(tiny_model.transformer, [0], exit).logits(sequence)
        assert torch.allclose(logits, fresh, atol=1e-5)
        others = torch.ones(tiny_model.cfg.vocab_size, dtype=torch.bool)
        others[vocab] = False
        assert torch.isinf(logits[others]).all() and torch.isfinite(logits[vocab]).all()


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kangaroo")
    model = load_model(tiny_dir)
    said: list[str] = []
    path = trainer.train_kangaroo(model, out, 1, prompts=24, max_new_tokens=24, epochs=3, say=said.append)
    return model, out, path, said


def test_training_lowers_the_loss_and_writes_an_adapter_that_loads(trained):
    model, out, path, said = trained
    losses = torch.load(out / "checkpoint.pt", weights_only=True)["losses"]
    batches = len(losses) // 3
    assert sum(losses[-batches:]) < sum(losses[:batches])  # the last epoch against the first
    assert (out / "loss.png").stat().st_size > 1000
    adapter, vocab, accept = load_trained(path, KangarooAdapter, TargetModel(model))
    assert adapter.depth == 1 and float(adapter.out(torch.ones(1, model.cfg.hidden_size)).abs().sum()) > 0
    assert accept.shape == (1, trainer.RANKS) and 0 < float(accept[0, 0]) <= 1
    assert vocab.numel() > 10 and int(vocab.max()) < model.cfg.vocab_size
    assert any("4/4 identical to ar" in line for line in said), said


def test_the_trained_adapter_decodes_exactly_what_plain_decoding_does(trained):
    model, _, path, _ = trained
    plain = Engine(model, "ar")
    for spec in (f"kangaroo:adapter={path},min_prob=0,max_nodes=6", f"kangaroo:adapter={path},min_prob=0,branch=3"):
        drafting, drafted = Engine(model, spec), 0
        for prompt in PROMPTS:
            reference = plain.generate(prompt, max_new_tokens=32)
            result = drafting.generate(prompt, max_new_tokens=32)
            assert result.token_ids == reference.token_ids
            drafted += sum(result.stats.draft_sizes)
        assert drafted > 0


def test_inside_a_hybrid_with_copy_drafters(trained):
    model, _, path, _ = trained
    plain, mixed = Engine(model, "ar"), Engine(model, f"hybrid:parts=kangaroo:adapter={path}+copyspec")
    for prompt in PROMPTS[:2]:
        assert (
            mixed.generate(prompt, max_new_tokens=32).token_ids == plain.generate(prompt, max_new_tokens=32).token_ids
        )


def test_resume_continues_from_the_checkpoint_without_new_answers(trained, monkeypatch):
    model, out, _, _ = trained
    monkeypatch.setattr(trainer, "answers", lambda *args, **kwargs: pytest.fail("resume made new answers"))
    before = len(torch.load(out / "checkpoint.pt", weights_only=True)["losses"])
    trainer.train_kangaroo(model, out, 1, epochs=4, resume=True, say=lambda text: None)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 4 and len(saved["losses"]) == before * 4 // 3


def test_an_adapter_of_other_weights_or_another_kind_is_refused(trained, tmp_path):
    model, _, path, _ = trained
    other = load_model(write_tiny_llama(tmp_path, initializer_range=0.3))
    with pytest.raises(InvalidParameter, match="trained for other weights"):
        Engine(other, f"kangaroo:adapter={path}").generate("Hello", max_new_tokens=4)
    with pytest.raises(ModelFileError, match="is not a medusa file"):
        Engine(model, f"medusa:heads={path}").generate("Hello", max_new_tokens=4)


def test_a_missing_adapter_names_the_command(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    with pytest.raises(InvalidParameter, match="decodekit train kangaroo --model MODEL"):
        Engine(tiny_model, "kangaroo").generate("Hello", max_new_tokens=4)


def test_train_command_refuses_an_exit_layer_outside_the_model(tiny_dir, capsys):
    assert main(["train", "kangaroo", "--model", str(tiny_dir), "--exit-layer", "2"]) == 1
    assert "exit layer must be an integer in [1, 2)" in capsys.readouterr().err
