"""Trained draft heads (medusa, hydra): the tree rule, the heads' starting point, `decodekit train` on a tiny model
(the loss falls, the file loads back, --resume continues, other weights are refused), lossless decoding with
the trained heads (the every-method tests in test_engine, test_batch, test_sampling and
test_lossless_default_model run both too), and online learning from traffic (``learn=``)."""

from __future__ import annotations

import pytest
import torch
from helpers import write_tiny_llama

from decodekit import Engine, InvalidParameter, ModelFileError, load_model
from decodekit.cli import main
from decodekit.decoding import target_info
from decodekit.drafters import make_drafter, online
from decodekit.drafters.heads import best_paths, load_trained, read_trained, shipped_file, unit_rms
from decodekit.drafters.hydra import HydraHead
from decodekit.drafters.medusa import MedusaHeads
from decodekit.drafters.online import OnlineLearner, TrafficRows
from decodekit.runtime.runner import TargetModel
from decodekit.sampling import SamplingParams
from decodekit.train import heads as trainer
from decodekit.train.prompts import all_prompts

PROMPTS = ["the quick brown fox", "tell me about the weather tomorrow in the hills", "a b c a b c a b c"]


def test_the_tree_takes_the_likeliest_rank_paths_parents_first():
    accept = torch.tensor([[0.6, 0.2], [0.5, 0.1]])
    # chances: (0,) .6, (0, 0) .3, (1,) .2, (1, 0) .1, (0, 1) .06, (1, 1) .02
    assert best_paths(accept, 4) == [(0,), (0, 0), (1,), (1, 0)]
    assert best_paths(accept, 100) == [(0,), (0, 0), (1,), (1, 0), (0, 1), (1, 1)]


@pytest.mark.parametrize("cls", [MedusaHeads, HydraHead])
def test_untrained_heads_repeat_the_targets_own_guess(tiny_model, cls):
    access = TargetModel(tiny_model)
    hidden = torch.randn(5, tiny_model.cfg.hidden_size) * 3
    heads = cls(3, tiny_model.cfg.hidden_size)
    embedded = access.embed(torch.randint(0, tiny_model.cfg.vocab_size, (5, 3))).float()
    guesses = access.head(heads.states(unit_rms(hidden), embedded))  # [5, 3, V]
    own = access.head(hidden)  # [5, V]
    assert torch.allclose(guesses, own[:, None].expand_as(guesses), atol=1e-4)


def test_a_hydra_head_reads_the_tokens_before():
    head = HydraHead(2, 8)
    torch.nn.init.normal_(head.out.weight)
    z, embedded = unit_rms(torch.randn(1, 8)), torch.randn(1, 2, 8)
    other = embedded.clone()
    other[0, 0] += 1.0  # another first token: the second state changes too
    first, second = head.states(z, embedded)[0], head.states(z, other)[0]
    assert not torch.allclose(first[1], second[1])
    assert torch.equal(head.states(z, embedded)[0, 1], head.step(head.step(z, embedded[:, 0]), embedded[:, 1])[0])


def test_the_output_map_gives_the_models_logits(tiny_model):
    transformer = tiny_model.transformer
    hidden = torch.randn(4, tiny_model.cfg.hidden_size)
    rms = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + tiny_model.cfg.norm_eps)
    assert torch.allclose((hidden * rms) @ transformer.output_map(), transformer.logits(hidden), atol=1e-4)


@pytest.fixture(scope="module", params=["medusa", "hydra"])
def trained(request, tiny_dir, tmp_path_factory):
    kind = request.param
    out = tmp_path_factory.mktemp(kind)
    model = load_model(tiny_dir)
    said: list[str] = []
    path = trainer.train_heads(kind, model, out, heads=3, prompts=24, max_new_tokens=24, epochs=3, say=said.append)
    return kind, model, out, path, said


def test_training_lowers_the_loss_and_writes_heads_that_load(trained):
    kind, model, out, path, said = trained
    losses = torch.load(out / "checkpoint.pt", weights_only=True)["losses"]
    batches = len(losses) // 3
    assert sum(losses[-batches:]) < sum(losses[:batches])  # the last epoch against the first
    assert (out / "loss.png").stat().st_size > 1000
    heads, vocab, accept = load_trained(path, trainer.KINDS[kind], TargetModel(model))
    z, embedded = torch.ones(1, model.cfg.hidden_size), torch.ones(1, 3, model.cfg.hidden_size)
    assert heads.depth == 3 and not torch.equal(heads.states(z, embedded), z[:, None].expand(1, 3, -1))  # trained
    assert accept.shape == (3, trainer.RANKS) and 0 < float(accept[0, 0]) <= 1
    assert vocab.numel() > 10 and int(vocab.max()) < model.cfg.vocab_size
    assert any("4/4 identical to ar" in line for line in said), said


def test_trained_heads_decode_exactly_what_plain_decoding_does(trained):
    kind, model, _, path, _ = trained
    plain, drafting = Engine(model, "ar"), Engine(model, f"{kind}:heads={path},max_nodes=12")
    drafted = 0
    for prompt in PROMPTS:
        reference = plain.generate(prompt, max_new_tokens=32)
        result = drafting.generate(prompt, max_new_tokens=32)
        assert result.token_ids == reference.token_ids
        drafted += sum(result.stats.draft_sizes)
    assert drafted > 0


def test_inside_a_hybrid_with_copy_drafters(trained):
    kind, model, _, path, _ = trained
    plain, mixed = Engine(model, "ar"), Engine(model, f"hybrid:parts={kind}:heads={path}+copyspec")
    for prompt in PROMPTS[:2]:
        assert (
            mixed.generate(prompt, max_new_tokens=32).token_ids == plain.generate(prompt, max_new_tokens=32).token_ids
        )


def test_traffic_rows_pair_each_state_with_the_tokens_after_it():
    rows = TrafficRows(depth=2)
    rows.begin(10)

    def step(hidden, committed):
        return [(state.tolist(), ahead.tolist()) for state, ahead in rows.step(hidden, committed)]

    assert step(torch.tensor([[0.0]]), [11]) == []  # the root (10) at index 0: its 3 tokens ahead unknown
    assert step(torch.tensor([[1.0], [2.0]]), [12, 13]) == [([0.0], [11, 12, 13])]  # states at 11, 12
    # no states this step (13 gets none); the tokens still count
    assert step(None, [14, 15]) == [([1.0], [12, 13, 14]), ([2.0], [13, 14, 15])]
    assert step(torch.tensor([[5.0]]), [16]) == []  # the state at 15 waits for 16, 17, 18
    rows.begin(20)  # a new request forgets the last one's waiting states
    assert rows.tokens == [20] and rows.pending == []


def learning_drafter(trained, rate: float = 0.005):
    """A drafter of the fixture's heads that learns online, and its learner (small batches: tiny requests)."""
    kind, model, _, path, _ = trained
    drafter = make_drafter(f"{kind}:heads={path},learn={rate}", target_info(model))
    drafter.learner.batch_size = 16
    return drafter, drafter.learner


def test_heads_learning_from_traffic_still_decode_what_plain_decoding_does(trained):
    kind, model, _, path, _ = trained
    drafter, learner = learning_drafter(trained)
    plain, learning = Engine(model, "ar"), Engine(model, drafter)
    for _ in range(3):
        for prompt in PROMPTS:
            assert learning.generate(prompt, 32).token_ids == plain.generate(prompt, 32).token_ids
            learner.wait()  # learned sampled traffic too (sampled drafts are deterministic: exact for any heads)
            assert len(learning.generate(prompt, 32, sampling=SamplingParams(temperature=0.8)).token_ids) > 0
    assert learner.wait() and learner.steps >= 6 and not learner.failed
    before = read_trained(path, trainer.KINDS[kind], TargetModel(model))[0].state_dict()
    after = learner.training.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    learner.batch_size = 10**6  # no more steps: the next request drafts with the last heads published
    learning.generate(PROMPTS[0], 8)
    assert drafter.heads is learner.current


def test_heads_learn_the_traffic_they_see(trained):
    drafter, learner = learning_drafter(trained, rate=0.01)
    engine = Engine(trained[1], drafter)
    for _ in range(12):  # one request again and again: its rows get easier to predict
        engine.generate(PROMPTS[1], 48)
        learner.wait()
    losses = list(learner.losses)
    assert len(losses) >= 12 and sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_the_replay_buffer_keeps_the_newest_rows(trained, monkeypatch):
    monkeypatch.setattr(online.HeadsObjective, "buffer_size", 32)
    _, learner = learning_drafter(trained)
    learner._thread = object()  # as if its thread were busy: no batch is taken
    for token in range(50):
        learner.add([(torch.full((trained[1].cfg.hidden_size,), float(token)), torch.full((4,), token))])
    assert [int(ahead[0]) for _, ahead in learner.buffer] == list(range(18, 50)) and learner._fresh == 32


def test_an_engine_shows_its_learners_and_the_server_their_progress(trained):
    from prometheus_client import generate_latest

    from decodekit.server.metrics import Metrics

    kind, model, _, path, _ = trained
    engine = Engine(model, f"{kind}:heads={path},learn=0.01", max_batch=2)
    assert engine.learners == []  # made with the first drafter that learns
    for prompt in PROMPTS * 2:
        engine.generate(prompt, 48)
    (learner,) = engine.learners
    assert learner.wait() and learner.steps > 0
    metrics = Metrics()
    metrics.observe_learning(engine.learners)
    scraped = generate_latest(metrics.registry).decode()
    assert f'decodekit:online_learning_steps{{part="{kind}"}} {float(learner.steps)}' in scraped
    assert f'decodekit:online_learning_loss{{part="{kind}"}}' in scraped


def test_a_failing_learner_stops_learning_not_decoding(trained, monkeypatch, caplog):
    def broken(self, hidden, ahead):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(OnlineLearner, "_step", broken)
    drafter, learner = learning_drafter(trained)
    plain, learning = Engine(trained[1], "ar"), Engine(trained[1], drafter)
    for prompt in PROMPTS * 2:
        assert learning.generate(prompt, 32).token_ids == plain.generate(prompt, 32).token_ids
        learner.wait()
    assert learner.failed and learner.steps == 0 and "online learning failed" in caplog.text


def test_resume_continues_from_the_checkpoint_without_new_answers(trained, monkeypatch):
    kind, model, out, _, _ = trained
    monkeypatch.setattr(trainer, "answers", lambda *args, **kwargs: pytest.fail("resume made new answers"))
    before = len(torch.load(out / "checkpoint.pt", weights_only=True)["losses"])
    trainer.train_heads(kind, model, out, heads=3, epochs=4, resume=True, say=lambda text: None)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 4 and len(saved["losses"]) == before * 4 // 3


def test_heads_of_other_weights_or_kinds_are_refused(trained, tmp_path):
    kind, _, _, path, _ = trained
    other = load_model(write_tiny_llama(tmp_path, initializer_range=0.3))
    with pytest.raises(InvalidParameter, match="trained for other weights"):
        Engine(other, f"{kind}:heads={path}").generate("Hello", max_new_tokens=4)
    wrong = "hydra" if kind == "medusa" else "medusa"
    with pytest.raises(ModelFileError, match=f"is not a {wrong} file"):
        Engine(trained[1], f"{wrong}:heads={path}").generate("Hello", max_new_tokens=4)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_missing_heads_name_the_command(tiny_model, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    with pytest.raises(InvalidParameter, match=f"decodekit train {kind} --model MODEL"):
        Engine(tiny_model, kind).generate("Hello", max_new_tokens=4)


def test_train_command_refuses_bad_counts(capsys):
    assert main(["train", "hydra", "--heads", "0"]) == 1
    assert "heads must be an integer >= 1" in capsys.readouterr().err


def test_training_prompts_are_none_of_the_benchmark_questions():
    from decodekit.prompts import builtin_questions

    ours = set(all_prompts())
    assert len(ours) > 2000
    assert not ours & {turn for q in builtin_questions() for turn in q.turns}
    spec_bench = trainer.Path(__file__).parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
    if spec_bench.is_file():
        import json

        turns = {turn for line in spec_bench.read_text().splitlines() for turn in json.loads(line)["turns"]}
        assert not ours & turns


def test_the_default_models_weights_share_one_identity_and_its_shipped_heads(
    default_model, default_model_gguf, default_model_bf16
):
    """GGUF, float32 and bfloat16 weights of one model are one target for trained parts; the package ships heads for
    the default model, which load for each of them."""
    assert default_model.identity == default_model_gguf.identity == default_model_bf16.identity
    for kind, cls in trainer.KINDS.items():
        path = shipped_file(kind, default_model.identity)
        assert path is not None and path.stat().st_size < 4 * 2**20, kind
        for model in (default_model, default_model_gguf):
            heads, _, accept = load_trained(path, cls, TargetModel(model))
            assert heads.hidden == model.cfg.hidden_size and accept[0, 0] > 0.3
