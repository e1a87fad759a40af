"""EAGLE: the layer's cache gives step by step what the whole sequence gives, a drafted node attends to the committed
text and its own ancestors only, the training passes are the drafter's own computations, `decodekit train eagle` on
a tiny model (the loss falls, the file loads back, --resume continues, other weights are refused), lossless decoding
alone, in a hybrid and while learning online from traffic (the every-method tests in test_engine, test_batch,
test_sampling and test_lossless_default_model run it too), and the prompts the target writes itself for training."""

from __future__ import annotations

import pytest
import torch
from helpers import write_tiny_llama

from decodekit import Engine, InvalidParameter, ModelFileError, load_model
from decodekit.cli import main
from decodekit.decoding import target_info
from decodekit.drafters import make_drafter
from decodekit.drafters.eagle import EagleLayer
from decodekit.drafters.heads import load_trained, read_trained, save_trained, unit_rms
from decodekit.engine import encode_prompt
from decodekit.prompts import builtin_questions
from decodekit.runtime.runner import TargetModel
from decodekit.train import eagle as trainer
from decodekit.train import kangaroo as kangaroo_trainer  # makes the corpus eagle trains on
from decodekit.train.prompts import generated_prompts

PROMPTS = ["the quick brown fox", "tell me about the weather tomorrow in the hills", "a b c a b c a b c"]


def random_layer(depth: int = 2, hidden: int = 128) -> EagleLayer:
    torch.manual_seed(0)
    layer = EagleLayer(depth, hidden)
    for block in layer.blocks:
        torch.nn.init.normal_(block.attention.out.weight, std=0.1)
        torch.nn.init.normal_(block.down.weight, std=0.1)
    return layer.requires_grad_(False)


def test_the_layer_step_by_step_equals_the_whole_sequence():
    layer = random_layer()
    features, embedded = unit_rms(torch.randn(9, 128)), torch.randn(9, 128)
    whole = layer(features, embedded)
    caches = layer.new_caches(16)
    cuts = [(0, 4), (4, 5), (5, 9)]
    parts = [layer(features[a:b], embedded[a:b], a, caches) for a, b in cuts]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_a_drafted_node_sees_the_committed_slots_and_its_ancestors_only():
    layer = random_layer()
    features, embedded = unit_rms(torch.randn(8, 128)), torch.randn(8, 128)
    caches = layer.new_caches(16)
    layer(features[:5], embedded[:5], 0, caches)  # five committed slots
    # slots 5, 6: two siblings at position 5; slot 7: a child of slot 6 at position 6
    visible = torch.zeros(3, 8, dtype=torch.bool)
    visible[:, :5] = True
    visible[0, 5] = visible[1, 6] = visible[2, 6] = visible[2, 7] = True
    tree = layer(features[5:8], embedded[5:8], 5, caches, torch.tensor([5, 5, 6]), visible)
    for slot, path in ((0, [5]), (1, [6]), (2, [6, 7])):  # each node against its own path run as a chain
        chain = layer(torch.cat([features[:5], features[path]]), torch.cat([embedded[:5], embedded[path]]))
        assert torch.allclose(tree[slot], chain[-1], atol=1e-5)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle")
    model = load_model(tiny_dir)
    said: list[str] = []
    path = trainer.train_eagle(model, out, 1, prompts=24, max_new_tokens=24, epochs=6, say=said.append)
    return model, out, path, said


def test_the_second_training_pass_is_what_the_drafter_computes(trained):
    """Pass 2 feeds each first-pass prediction with the next token, seeing the target's features before it: the
    drafter's depth-1 node after the committed text."""
    model, out, path, _ = trained
    layer, vocab, _ = load_trained(path, EagleLayer, TargetModel(model))
    corpus = trainer.Corpus.load(out / "corpus.safetensors")
    output = model.transformer.output_map()[:, vocab].contiguous()
    with torch.no_grad():
        (taught, _, _, _), (fed_back, _, _, _) = layer.two_passes(
            *trainer.sequence(model, corpus, 0, output.device), output
        )
        stream, ids, answer_start = corpus.sequence(0)
        features = unit_rms(stream[answer_start - 1 :])
        embedded = model.transformer.embedded(ids[answer_start:]).float()
        j = 3  # committed slots 0..j, then the prediction at slot j fed with the token after it
        caches = layer.new_caches(32)
        committed = layer(features[: j + 1], embedded[: j + 1], 0, caches)
        assert torch.allclose(committed[j], taught[j], atol=1e-4)
        drafted = layer(committed[j : j + 1], embedded[j + 1 : j + 2], j + 1, caches, torch.tensor([j + 1]))
    assert torch.allclose(drafted[0], fed_back[j], atol=1e-4)


def test_training_lowers_the_loss_and_writes_a_layer_that_loads(trained):
    model, out, path, said = trained
    losses = torch.load(out / "checkpoint.pt", weights_only=True)["losses"]
    batches = len(losses) // 6
    assert sum(losses[-batches:]) < sum(losses[:batches])  # the last epoch against the first
    assert (out / "loss.png").stat().st_size > 1000
    layer, vocab, accept = load_trained(path, EagleLayer, TargetModel(model))
    assert layer.depth == 1 and float(layer.blocks[0].down(torch.ones(1, model.cfg.hidden_size)).abs().sum()) > 0
    assert accept.shape == (2, trainer.RANKS) and 0 <= float(accept[0].sum()) <= 1
    assert vocab.numel() > 10 and int(vocab.max()) < model.cfg.vocab_size
    assert any("4/4 identical to ar" in line for line in said), said


def test_the_trained_layer_decodes_exactly_what_plain_decoding_does(trained):
    model, _, path, _ = trained
    plain = Engine(model, "ar")
    specs = {"min_prob=0": 8, "min_prob=0,branch=4,max_nodes=12,max_depth=3": 12, "branch=1,max_nodes=1": 1}
    specs["min_prob=0,accept_head=true"] = 8  # its acceptance head instead of the layer's probabilities
    for options, max_nodes in specs.items():
        drafting, drafted = Engine(model, f"eagle:layer={path},{options}"), 0
        for prompt in PROMPTS:
            reference = plain.generate(prompt, max_new_tokens=32)
            result = drafting.generate(prompt, max_new_tokens=32)
            assert result.token_ids == reference.token_ids
            assert max(result.stats.draft_sizes) <= max_nodes
            drafted += sum(result.stats.draft_sizes)
        assert drafted > 0


def test_the_acceptance_head_is_trained_and_predicts_better_than_the_probabilities(trained):
    model, out, path, said = trained
    layer, vocab, _ = read_trained(path, EagleLayer, TargetModel(model))
    assert bool(layer.acceptance.trained)
    assert any(line.startswith("acceptance head, held-out candidates") for line in said), said
    corpus = trainer.Corpus.load(out / "corpus.safetensors")
    index, output = trainer.vocabulary_map(model, vocab)
    head_loss = probs_loss = 0.0
    with torch.no_grad():
        for s in (~corpus.held_out).nonzero().flatten().tolist():  # what it was fitted on
            for logits, probs, accepted in trainer.acceptance_terms(layer, model, corpus, s, output, index):
                head_loss += float(
                    torch.nn.functional.binary_cross_entropy_with_logits(logits, accepted, reduction="sum")
                )
                probs_loss += float(
                    torch.nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), accepted, reduction="sum")
                )
    assert head_loss < probs_loss


def test_a_layer_file_without_an_acceptance_head_drafts_by_probability(trained, tmp_path):
    model, _, path, _ = trained
    layer, vocab, accept = read_trained(path, EagleLayer, TargetModel(model))
    del layer.acceptance  # as files written before the head was added
    meta = {"identity": model.identity, "model": model.name, "vocab_size": model.cfg.vocab_size}
    old_file = tmp_path / "old.safetensors"
    save_trained(old_file, layer, vocab, accept, meta)
    target = target_info(model)
    for spec, by_head in ((f"eagle:layer={path},accept_head=true", True), (f"eagle:layer={path}", False),
                          (f"eagle:layer={old_file},accept_head=true", False)):  # fmt: skip
        assert make_drafter(spec, target).by_head is by_head
    plain, old = Engine(model, "ar"), Engine(model, f"eagle:layer={old_file},min_prob=0,accept_head=true")
    assert (
        old.generate(PROMPTS[1], max_new_tokens=24).token_ids == plain.generate(PROMPTS[1], max_new_tokens=24).token_ids
    )
    layer.bogus = torch.nn.Linear(2, 2)  # a weight the kind does not have
    save_trained(tmp_path / "odd.safetensors", layer, vocab, accept, meta)
    with pytest.raises(InvalidParameter, match="does not fit this model's shape"):
        make_drafter(f"eagle:layer={tmp_path / 'odd.safetensors'}", target)


def test_the_acceptance_head_alone_for_a_layer_trained_before(trained, tmp_path):
    model, _, path, _ = trained
    layer, vocab, accept = read_trained(path, EagleLayer, TargetModel(model))
    del layer.acceptance
    meta = {"identity": model.identity, "model": model.name, "vocab_size": model.cfg.vocab_size}
    save_trained(tmp_path / "old.safetensors", layer, vocab, accept, meta)
    written = trainer.train_eagle(
        model,
        tmp_path / "out",
        prompts=8,
        max_new_tokens=16,
        layer_path=tmp_path / "old.safetensors",
        say=lambda text: None,
    )
    again, again_vocab, _ = read_trained(written, EagleLayer, TargetModel(model))
    assert bool(again.acceptance.trained) and torch.equal(again_vocab, vocab)
    assert torch.equal(again.fc.weight, layer.fc.weight)  # the layer itself as it was
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # no layer training


def test_inside_a_hybrid_with_copy_drafters(trained):
    model, _, path, _ = trained
    plain, mixed = Engine(model, "ar"), Engine(model, f"hybrid:parts=eagle:layer={path}+copyspec")
    for prompt in PROMPTS:
        assert (
            mixed.generate(prompt, max_new_tokens=32).token_ids == plain.generate(prompt, max_new_tokens=32).token_ids
        )


def learning_drafter(trained, rate: float = 0.005):
    model, _, path, _ = trained
    drafter = make_drafter(f"eagle:layer={path},learn={rate}", target_info(model))
    return drafter, drafter.learner


def test_a_request_teaches_its_slots_as_training_reads_them(trained):
    """The unit a request hands the learner: the target's features from the prompt's last position on, each with
    the token after it, as the trainer's corpus holds a prompt and its answer."""
    model = trained[0]
    drafter, learner = learning_drafter(trained)
    learner.batch_size = 10**6  # no steps: this test reads the buffer
    engine = Engine(model, drafter)
    result = engine.generate(PROMPTS[1], 24)
    engine.generate(PROMPTS[0], 4)  # the next request's start hands the last one's slots over
    ((features, tokens),) = learner.buffer
    assert tokens.tolist() == result.token_ids[:-1]
    ids = torch.tensor(encode_prompt(model, PROMPTS[1]) + result.token_ids)
    stream = model.transformer.hidden_states(ids[None], model.transformer.new_cache(len(ids)))[0]
    first = len(ids) - len(result.token_ids) - 1  # the prompt's last position
    assert torch.allclose(features, unit_rms(stream[first : first + len(result.token_ids)]), atol=1e-4)


def test_a_layer_learning_from_traffic_still_decodes_what_plain_decoding_does(trained):
    model, _, path, _ = trained
    drafter, learner = learning_drafter(trained)
    plain, learning = Engine(model, "ar"), Engine(model, drafter)
    for _ in range(3):
        for prompt in PROMPTS:
            assert learning.generate(prompt, 32).token_ids == plain.generate(prompt, 32).token_ids
            learner.wait()
    assert learner.steps >= 8 and not learner.failed
    before = read_trained(path, EagleLayer, TargetModel(model))[0].state_dict()
    after = learner.training.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    learner.batch_size = 10**6  # no more steps: the next request drafts with the last layer published
    learning.generate(PROMPTS[0], 8)
    assert drafter.layer is learner.current


def test_resume_continues_from_the_checkpoint_without_new_answers(trained, monkeypatch):
    model, out, _, _ = trained
    monkeypatch.setattr(kangaroo_trainer, "answers", lambda *args, **kwargs: pytest.fail("resume made new answers"))
    before = len(torch.load(out / "checkpoint.pt", weights_only=True)["losses"])
    trainer.train_eagle(model, out, 1, epochs=7, resume=True, say=lambda text: None)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 7 and saved["kind"] == "eagle" and len(saved["losses"]) == before * 7 // 6


def test_a_layer_of_other_weights_or_another_kind_is_refused(trained, tmp_path):
    model, _, path, _ = trained
    other = load_model(write_tiny_llama(tmp_path, initializer_range=0.3))
    with pytest.raises(InvalidParameter, match="trained for other weights"):
        Engine(other, f"eagle:layer={path}").generate("Hello", max_new_tokens=4)
    with pytest.raises(ModelFileError, match="is not a kangaroo file"):
        Engine(model, f"kangaroo:adapter={path}").generate("Hello", max_new_tokens=4)


def test_a_missing_layer_names_the_command(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    with pytest.raises(InvalidParameter, match="decodekit train eagle --model MODEL"):
        Engine(tiny_model, "eagle").generate("Hello", max_new_tokens=4)


def test_train_command_refuses_bad_counts(tiny_dir, capsys):
    assert main(["train", "eagle", "--model", str(tiny_dir), "--blocks", "0"]) == 1
    assert "blocks must be an integer >= 1" in capsys.readouterr().err
    assert main(["train", "medusa", "--model", str(tiny_dir), "--layer", "x.safetensors"]) == 1
    assert "--layer names an eagle layer" in capsys.readouterr().err
    assert main(["train", "eagle", "--model", str(tiny_dir), "--generated", "-1"]) == 1
    assert "generated must be an integer >= 0" in capsys.readouterr().err


def test_the_model_writes_distinct_requests_that_are_not_our_questions(default_model):
    prompts = generated_prompts(default_model, 6)
    assert len(prompts) == 6 == len(set(prompts))
    assert all(len(text) >= 12 for text in prompts)
    assert not set(prompts) & {turn for q in builtin_questions() for turn in q.turns}
    assert generated_prompts(default_model, 6) == prompts  # seeded: the same set every time
