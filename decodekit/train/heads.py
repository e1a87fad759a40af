"""``decodekit train medusa|hydra``: draft heads for a frozen target (decodekit/drafters/heads.py), by
self-distillation.

1. Answers: the target's own greedy answers to the built-in training prompts (decodekit/train/prompts.py), made
   by the engine with batching and the default lossless method (the fastest way to plain greedy output).
2. Hidden states: one teacher-forced forward per prompt + answer gives the residual stream leaving the last
   block at every answer position (and the last prompt position), with the K + 1 tokens after it: the heads learn
   the tokens 2 .. K + 1 places ahead (a Hydra head reading the ones before, teacher-forced). Kept in
   ``OUT/corpus.safetensors``, so ``--resume`` skips steps 1-2.
3. Training: the heads only; the target's final norm and LM head are frozen and
   taken as one matrix (``Transformer.output_map``) restricted to the tokens the answers hold (a vocabulary of a
   few thousand instead of the whole one: the loss costs that much less, and the drafter proposes from the same
   tokens). Cross-entropy per head, AdamW; a checkpoint per epoch (``OUT/checkpoint.pt``) and the loss curve
   (``OUT/loss.png``).
4. Accept rates: on held-out answers (the last ``HELD_OUT`` share of the sequences), how often head k's rank-r
   candidate is the right token: the tree of the drafter is built from them. Then ``OUT/KIND.safetensors``.
5. A check: the engine decodes a few held-out prompts with ``ar`` and with the new heads; prints both outputs'
   agreement (they must be identical) and the mean accepted tokens per step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from decodekit.drafters.heads import TrainedHeads, TrainedPart, head_logits, save_trained
from decodekit.drafters.hydra import HydraHead
from decodekit.drafters.medusa import MedusaHeads
from decodekit.engine import Engine
from decodekit.errors import InvalidParameter, ModelFileError
from decodekit.runtime.loader import LoadedModel
from decodekit.train.prompts import answers, prompt_set

HELD_OUT = 0.1  # share of the sequences kept out of training, for the accept rates
RANKS = 10  # candidates per head whose accept rate is measured
CHECK_PROMPTS = 4
KINDS: dict[str, type[TrainedHeads]] = {cls.kind: cls for cls in (MedusaHeads, HydraHead)}
log = logging.getLogger("decodekit")


@dataclass
class Corpus:
    """Rows of training data: ``hidden`` float32 ``[N, H]`` (the residual stream leaving the last block at a
    position t), ``ahead`` int64 ``[N, K + 1]`` (the tokens at t + 1 .. t + K + 1; -1 past the end), ``held_out``
    bool ``[N]`` (rows of held-out sequences), ``prompts`` the prompts' texts."""

    hidden: torch.Tensor
    ahead: torch.Tensor
    held_out: torch.Tensor
    prompts: list[str]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"hidden": self.hidden, "ahead": self.ahead, "held_out": self.held_out}
        save_file(tensors, path, metadata={"prompts": json.dumps(self.prompts)})

    @staticmethod
    def load(path: Path) -> Corpus:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            return Corpus(f.get_tensor("hidden"), f.get_tensor("ahead"), f.get_tensor("held_out"), prompts)


def build_corpus(model: LoadedModel, prompts: list[str], sequences: list[tuple[list[int], int]], heads: int) -> Corpus:
    """Teacher-forced hidden states and the tokens ahead of every answer position (see :class:`Corpus`);
    ``sequences`` as :func:`answers` returns them."""
    transformer = model.transformer
    hidden, labels, held_out = [], [], []
    first_held_out = len(sequences) - max(1, round(HELD_OUT * len(sequences)))
    for index, (sequence, prompt_length) in enumerate(tqdm(sequences, desc="hidden states")):
        ids = torch.tensor(sequence, dtype=torch.int64)
        cache = transformer.new_cache(len(ids))
        states = transformer.hidden_states(ids[None].to(model.device), cache)[0].float().cpu()  # [n, H]
        rows = torch.arange(prompt_length - 1, len(ids) - 1)
        at = rows[:, None] + torch.arange(1, heads + 2)  # positions t + 1 .. t + K + 1
        hidden.append(states[rows])
        labels.append(torch.where(at < len(ids), ids[at.clamp(max=len(ids) - 1)], -1))
        held_out.append(torch.full((len(rows),), index >= first_held_out))
    return Corpus(torch.cat(hidden), torch.cat(labels), torch.cat(held_out), prompts)


def logits_of(
    heads: TrainedHeads, model: LoadedModel, hidden: torch.Tensor, ahead: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """The heads' logits ``[B, K, S]`` over the vocabulary whose columns ``output`` ``[H, S]`` holds
    (``Transformer.output_map`` restricted), from residual-stream rows ``hidden`` ``[B, H]`` and the tokens after
    them ``ahead`` ``[B, K + 1]`` (teacher-forced)."""
    with torch.inference_mode():
        embedded = model.transformer.embedded(ahead[:, :-1].clamp(min=0).to(model.device)).float()
    return head_logits(heads, hidden, embedded.clone(), output, model.cfg.norm_eps)


def accept_rates(
    heads: TrainedHeads, model: LoadedModel, corpus: Corpus, output: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """float ``[K, RANKS]``: on held-out rows, how often the rank-r candidate at depth k is the target's token."""
    rows = corpus.held_out.nonzero().flatten()
    counts = torch.zeros(heads.depth, RANKS)
    totals = torch.zeros(heads.depth)
    with torch.no_grad():
        for batch in rows.split(512):
            hidden = corpus.hidden[batch].to(output.device)
            logits = logits_of(heads, model, hidden, corpus.ahead[batch], output).cpu()
            labels = corpus.ahead[batch, 1:]
            valid = (labels >= 0) & (index[labels.clamp(min=0)] >= 0)
            target = logits.gather(-1, index[labels.clamp(min=0)].clamp(min=0)[..., None])
            rank = (logits > target).sum(-1)  # [B, K]
            for k in range(counts.shape[0]):
                hits = rank[valid[:, k], k]
                counts[k] += torch.bincount(hits[hits < RANKS], minlength=RANKS).float()
                totals[k] += valid[:, k].sum()
    return counts / totals.clamp(min=1)[:, None]


def train_heads(
    kind: str,
    model: LoadedModel,
    out: Path,
    heads: int = 4,
    prompts: int = 400,
    generated: int = 0,
    max_new_tokens: int = 128,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 256,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Train ``kind`` heads (medusa, hydra) for ``model`` into ``out`` (a directory; see the module docstring) for
    ``heads`` tokens ahead; returns the heads file. ``resume``: reuse ``out``'s corpus and continue from its
    checkpoint."""
    if kind not in KINDS:
        raise InvalidParameter(f"unknown kind {kind!r}: decodekit trains {', '.join(KINDS)}")
    check_counts(
        ("heads", heads, 1), *data_counts(prompts, generated, max_new_tokens, epochs), ("batch_size", batch_size, 1)
    )
    out.mkdir(parents=True, exist_ok=True)
    corpus_file = out / "corpus.safetensors"
    if resume and corpus_file.is_file():
        corpus = Corpus.load(corpus_file)
        if corpus.ahead.shape[1] != heads + 1:
            raise InvalidParameter(f"{corpus_file} holds tokens for {corpus.ahead.shape[1] - 1} heads, not {heads}")
        say(f"resuming: {len(corpus.prompts)} prompts, {len(corpus.hidden)} rows from {corpus_file}")
    else:
        chosen = prompt_set(model, prompts, generated)
        start = time.perf_counter()
        sequences = answers(model, chosen, max_new_tokens)
        corpus = build_corpus(model, chosen, sequences, heads)
        corpus.save(corpus_file)
        say(f"corpus: {len(chosen)} prompts, {len(corpus.hidden)} rows in {time.perf_counter() - start:.0f} s")
    if corpus.hidden.shape[1] != model.cfg.hidden_size:
        raise ModelFileError(f"{corpus_file} was made for another model (hidden size {corpus.hidden.shape[1]})")
    train_rows = (~corpus.held_out).nonzero().flatten()
    vocab = answer_vocabulary(model, corpus.ahead[train_rows, 1:])
    index, output = vocabulary_map(model, vocab)
    device = model.device
    trained = KINDS[kind](heads, model.cfg.hidden_size).to(device)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        labels = corpus.ahead[batch, 1:]
        columns = torch.where(labels >= 0, index[labels.clamp(min=0)], -100).to(device)
        logits = logits_of(trained, model, corpus.hidden[batch].to(device), corpus.ahead[batch], output)
        return F.cross_entropy(logits.flatten(0, 1), columns.flatten(), ignore_index=-100)

    fit(trained, train_rows, batch_size, loss_of, epochs, lr, out, resume, say, "rows")
    accept = accept_rates(trained, model, corpus, output, index)
    meta = {"prompts": len(corpus.prompts), "rows": len(train_rows), "epochs": epochs}
    heads_file, size = write_part(model, trained, out, vocab, accept, meta)
    rates = ", ".join(f"depth {k + 1}: {float(accept[k, 0]):.2f}" for k in range(heads))
    say(f"wrote {heads_file} ({size:.1f} MiB); top-1 accept rates on held-out answers: {rates}")
    check(model, f"{kind}:heads={heads_file}", corpus.prompts[-CHECK_PROMPTS:], max_new_tokens, say)
    return heads_file


def check_counts(*rules: tuple[str, object, int]) -> None:
    """InvalidParameter unless every ``(name, value, least)`` has an integer ``value`` of at least ``least``."""
    for name, value, least in rules:
        if not isinstance(value, int) or value < least:
            raise InvalidParameter(f"{name} must be an integer >= {least}, got {value!r}")


def data_counts(prompts: object, generated: object, max_new_tokens: object, epochs: object) -> list[tuple]:
    """The :func:`check_counts` rules of the settings every trainer takes."""
    return [("prompts", prompts, 2), ("generated", generated, 0), ("max_new_tokens", max_new_tokens, 2),
            ("epochs", epochs, 1)]  # fmt: skip


def write_part(
    model: LoadedModel, part: TrainedPart, out: Path, vocab: torch.Tensor, accept: torch.Tensor, meta: dict
) -> tuple[Path, float]:
    """``part`` saved as ``out/KIND.safetensors`` for ``model`` (its identity, name and vocabulary size in the
    metadata, with ``meta``); returns the file and its size in MiB."""
    path = out / f"{part.kind}.safetensors"
    target = {"identity": model.identity, "model": model.name, "vocab_size": model.cfg.vocab_size}
    save_trained(path, part.cpu(), vocab, accept, target | meta)
    return path, path.stat().st_size / 2**20


def answer_vocabulary(model: LoadedModel, tokens: torch.Tensor, most: int | None = None) -> torch.Tensor:
    """What a trained part chooses among, from the training answers' ``tokens`` (int64, -1 where none): the
    distinct tokens ``vocab [S]``, ascending (the ``most`` most frequent of them, if given)."""
    counts = torch.bincount(tokens[tokens >= 0], minlength=model.cfg.vocab_size)
    vocab = counts.nonzero().flatten()
    if most is not None and len(vocab) > most:
        vocab = counts.topk(most).indices.sort().values
    return vocab


def vocabulary_map(model: LoadedModel, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a trained part's tokens ``vocab [S]``: ``index [V]`` (a token's column, -1 elsewhere) and the target's
    final norm and LM head restricted to them (``Transformer.output_map``, ``[H, S]`` on the model's device)."""
    index = torch.full((model.cfg.vocab_size,), -1, dtype=torch.int64)
    index[vocab] = torch.arange(len(vocab))
    return index, model.transformer.output_map()[:, vocab].contiguous().to(model.device)


def fit(
    part: TrainedPart,
    units: torch.Tensor,
    batch_size: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    out: Path,
    resume: bool,
    say: Callable[[str], None],
    unit: str,
) -> None:
    """Train ``part`` with AdamW for ``epochs`` passes over ``units`` (int64 ``[N]``, shuffled by a seeded
    generator, in batches of ``batch_size``; ``loss_of(batch)`` gives a batch's loss). A checkpoint after each epoch
    (``out/checkpoint.pt``), which ``resume`` continues where it was made for a part of the same kind and depth;
    then the loss curve (``out/loss.png``)."""
    checkpoint_file = out / "checkpoint.pt"
    optimizer = torch.optim.AdamW(part.parameters(), lr=lr, weight_decay=0.0)
    state = {"epoch": 0, "losses": []}
    if resume and checkpoint_file.is_file():
        saved = torch.load(checkpoint_file, weights_only=True, map_location=next(part.parameters()).device)
        if saved.get("kind") == part.kind and saved["depth"] == part.depth:
            part.load_state_dict(saved["part"])
            optimizer.load_state_dict(saved["optimizer"])
            state = {"epoch": saved["epoch"], "losses": saved["losses"]}
            say(f"resuming after epoch {state['epoch']}")
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for epoch in range(state["epoch"], epochs):
        order = units[torch.randperm(len(units), generator=generator)]
        for batch in tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch"):
            loss = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state["losses"].append(loss.item())
        state["epoch"] = epoch + 1
        saved = {"part": part.state_dict(), "optimizer": optimizer.state_dict(), "kind": part.kind, "depth": part.depth}
        saved |= state
        torch.save(saved, checkpoint_file)
    say(f"trained {epochs} epochs over {len(units)} {unit} in {time.perf_counter() - start:.0f} s")
    plot_losses(state["losses"], out / "loss.png", f"{part.kind}: training loss")


def check(model: LoadedModel, method: str, prompts: list[str], max_new_tokens: int, say) -> None:
    """Decode held-out ``prompts`` with ``ar`` and ``method`` (the new heads); say whether every output is
    identical and the heads' mean accepted tokens per step."""
    plain, drafting = Engine(model, method="ar"), Engine(model, method=method)
    same, lengths = 0, []
    for prompt in prompts:
        reference = plain.generate(prompt, max_new_tokens=max_new_tokens)
        result = drafting.generate(prompt, max_new_tokens=max_new_tokens)
        same += result.token_ids == reference.token_ids
        lengths += result.stats.accepted_lengths
    mat = sum(lengths) / max(1, len(lengths))
    say(f"check on {len(prompts)} held-out prompts: {same}/{len(prompts)} identical to ar, MAT {mat:.2f} (ar 1.00)")


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    """The training loss per batch (and its running mean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.tensor(losses)
    window = max(1, len(losses) // 50)
    smooth = values.unfold(0, window, 1).mean(-1) if len(losses) >= window else values
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values, alpha=0.3, label="batch")
    ax.plot(range(window - 1, window - 1 + len(smooth)), smooth, label=f"mean of {window}")
    ax.set_xlabel("batch")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
