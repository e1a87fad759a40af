"""``decodekit train medusa``: Medusa-1 heads for a frozen target, by self-distillation.

1. Answers: the target's own greedy answers to the built-in training prompts (decodekit/train/prompts.py), made
   by the engine with batching and the default lossless method (the fastest way to plain greedy output).
2. Hidden states: one teacher-forced forward per prompt + answer gives the residual stream leaving the last
   block at every answer position (and the last prompt position); row t's label for head k is the token
   ``k + 1`` places after t. Kept in ``OUT/corpus.safetensors``, so ``--resume`` skips steps 1-2.
3. Training: the heads only (decodekit/drafters/medusa.py); the target's final norm and LM head are frozen and
   taken as one matrix (``Transformer.output_map``) restricted to the tokens the answers hold (a vocabulary of a
   few thousand instead of the whole one: the loss costs that much less, and the drafter proposes from the same
   tokens). Cross-entropy per head, AdamW; a checkpoint per epoch (``OUT/checkpoint.pt``) and the loss curve
   (``OUT/loss.png``).
4. Accept rates: on held-out answers (the last ``HELD_OUT`` share of the sequences), how often head k's rank-r
   candidate is the right token: the tree of the drafter is built from them. Then ``OUT/medusa.safetensors``.
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

from decodekit.drafters.medusa import KIND, Heads, save_heads, unit_rms
from decodekit.engine import Engine
from decodekit.errors import InvalidParameter, ModelFileError
from decodekit.runtime.loader import LoadedModel
from decodekit.train.prompts import training_prompts

HELD_OUT = 0.1  # share of the sequences kept out of training, for the accept rates
RANKS = 10  # candidates per head whose accept rate is measured
CHECK_PROMPTS = 4
log = logging.getLogger("decodekit")


@dataclass
class Corpus:
    """Rows of training data: ``hidden`` float32 ``[N, H]`` (the residual stream leaving the last block at a
    position t), ``labels`` int64 ``[N, K]`` (the token k + 1 places after t for head k = 1..K; -1 past the end),
    ``held_out`` bool ``[N]`` (rows of held-out sequences), ``prompts`` the prompts' texts."""

    hidden: torch.Tensor
    labels: torch.Tensor
    held_out: torch.Tensor
    prompts: list[str]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"hidden": self.hidden, "labels": self.labels, "held_out": self.held_out}
        save_file(tensors, path, metadata={"prompts": json.dumps(self.prompts)})

    @staticmethod
    def load(path: Path) -> Corpus:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            return Corpus(f.get_tensor("hidden"), f.get_tensor("labels"), f.get_tensor("held_out"), prompts)


def answers(
    model: LoadedModel, prompts: list[str], max_new_tokens: int, max_batch: int = 4
) -> list[tuple[list[int], int]]:
    """The target's greedy prompt + answer token ids for each prompt (in order) and the prompt's length, decoded
    by the engine in batches of ``max_batch`` with the default lossless method."""
    engine = Engine(model, method="hybrid", max_batch=max_batch)
    requests = [engine.request(prompt, max_new_tokens=max_new_tokens) for prompt in prompts]
    sequences: list[list[int] | None] = [None] * len(prompts)
    waiting, live = list(enumerate(requests)), {}
    with tqdm(total=len(prompts), desc="answers", unit="prompt") as bar:
        while waiting or live:
            while waiting and not engine.full:
                index, request = waiting.pop(0)
                live[engine.submit(request)] = index
            for decoding, result in engine.step():
                if isinstance(result, Exception):
                    raise result
                if decoding.done:
                    index = live.pop(decoding)
                    sequences[index] = decoding.sequence[: decoding.length].tolist()
                    bar.update()
    return [(sequence, len(request.prompt_ids)) for sequence, request in zip(sequences, requests, strict=True)]


def build_corpus(model: LoadedModel, prompts: list[str], sequences: list[tuple[list[int], int]], heads: int) -> Corpus:
    """Teacher-forced hidden states and head labels of every answer (see :class:`Corpus`); ``sequences`` as
    :func:`answers` returns them."""
    transformer = model.transformer
    hidden, labels, held_out = [], [], []
    first_held_out = len(sequences) - max(1, round(HELD_OUT * len(sequences)))
    for index, (sequence, prompt_length) in enumerate(tqdm(sequences, desc="hidden states")):
        ids = torch.tensor(sequence, dtype=torch.int64)
        cache = transformer.new_cache(len(ids))
        states = transformer.hidden_states(ids[None].to(model.device), cache)[0].float().cpu()  # [n, H]
        rows = torch.arange(prompt_length - 1, len(ids) - 1)
        ahead = rows[:, None] + torch.arange(2, heads + 2)  # position of head k's token: t + 1 + k
        label = torch.where(ahead < len(ids), ids[ahead.clamp(max=len(ids) - 1)], -1)
        hidden.append(states[rows])
        labels.append(label)
        held_out.append(torch.full((len(rows),), index >= first_held_out))
    return Corpus(torch.cat(hidden), torch.cat(labels), torch.cat(held_out), prompts)


def logits_of(heads: Heads, hidden: torch.Tensor, output: torch.Tensor, eps: float) -> torch.Tensor:
    """The heads' logits ``[B, K, S]`` over the vocabulary whose columns ``output`` ``[H, S]`` holds
    (``Transformer.output_map`` restricted), from residual-stream rows ``hidden`` ``[B, H]``."""
    r = heads(unit_rms(hidden))
    return (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)) @ output


def accept_rates(heads: Heads, corpus: Corpus, output: torch.Tensor, index: torch.Tensor, eps: float) -> torch.Tensor:
    """float ``[K, RANKS]``: on held-out rows, how often head k's rank-r candidate is its label."""
    rows = corpus.held_out.nonzero().flatten()
    counts = torch.zeros(heads.weight.shape[0], RANKS)
    totals = torch.zeros(heads.weight.shape[0])
    with torch.no_grad():
        for batch in rows.split(512):
            logits = logits_of(heads, corpus.hidden[batch], output, eps)
            labels = corpus.labels[batch]
            valid = (labels >= 0) & (index[labels.clamp(min=0)] >= 0)
            target = logits.gather(-1, index[labels.clamp(min=0)].clamp(min=0)[..., None])
            rank = (logits > target).sum(-1)  # [B, K]
            for k in range(counts.shape[0]):
                hits = rank[valid[:, k], k]
                counts[k] += torch.bincount(hits[hits < RANKS], minlength=RANKS).float()
                totals[k] += valid[:, k].sum()
    return counts / totals.clamp(min=1)[:, None]


def train_medusa(
    model: LoadedModel,
    out: Path,
    heads: int = 4,
    prompts: int = 400,
    max_new_tokens: int = 128,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 256,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Train Medusa heads for ``model`` into ``out`` (a directory; see the module docstring); returns the heads
    file. ``resume``: reuse ``out``'s corpus and continue from its checkpoint."""
    for name, value, low in (("heads", heads, 1), ("prompts", prompts, 2), ("max_new_tokens", max_new_tokens, 2),
                             ("epochs", epochs, 1), ("batch_size", batch_size, 1)):  # fmt: skip
        if not isinstance(value, int) or value < low:
            raise InvalidParameter(f"{name} must be an integer >= {low}, got {value!r}")
    out.mkdir(parents=True, exist_ok=True)
    corpus_file, checkpoint_file = out / "corpus.safetensors", out / "checkpoint.pt"
    if resume and corpus_file.is_file():
        corpus = Corpus.load(corpus_file)
        if corpus.labels.shape[1] != heads:
            raise InvalidParameter(f"{corpus_file} holds labels for {corpus.labels.shape[1]} heads, not {heads}")
        say(f"resuming: {len(corpus.prompts)} prompts, {len(corpus.hidden)} rows from {corpus_file}")
    else:
        chosen = training_prompts(prompts)
        start = time.perf_counter()
        sequences = answers(model, chosen, max_new_tokens)
        corpus = build_corpus(model, chosen, sequences, heads)
        corpus.save(corpus_file)
        say(f"corpus: {len(chosen)} prompts, {len(corpus.hidden)} rows in {time.perf_counter() - start:.0f} s")
    if corpus.hidden.shape[1] != model.cfg.hidden_size:
        raise ModelFileError(f"{corpus_file} was made for another model (hidden size {corpus.hidden.shape[1]})")
    train_rows = (~corpus.held_out).nonzero().flatten()
    vocab = corpus.labels[train_rows][corpus.labels[train_rows] >= 0].unique()
    index = torch.full((model.cfg.vocab_size,), -1, dtype=torch.int64)  # token -> its column in the vocabulary
    index[vocab] = torch.arange(len(vocab))
    output = model.transformer.output_map()[:, vocab].contiguous()  # [H, S]
    eps = model.cfg.norm_eps

    device = model.device
    output = output.to(device)
    medusa = Heads(heads, model.cfg.hidden_size).to(device)
    optimizer = torch.optim.AdamW(medusa.parameters(), lr=lr, weight_decay=0.0)
    state = {"epoch": 0, "losses": []}
    if resume and checkpoint_file.is_file():
        saved = torch.load(checkpoint_file, weights_only=True, map_location=device)
        medusa.load_state_dict(saved["heads"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {"epoch": saved["epoch"], "losses": saved["losses"]}
        say(f"resuming after epoch {state['epoch']}")
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for epoch in range(state["epoch"], epochs):
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for batch in tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch"):
            labels = corpus.labels[batch]
            columns = torch.where(labels >= 0, index[labels.clamp(min=0)], -100).to(device)
            logits = logits_of(medusa, corpus.hidden[batch].to(device), output, eps)
            loss = F.cross_entropy(logits.flatten(0, 1), columns.flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state["losses"].append(loss.item())
        state["epoch"] = epoch + 1
        torch.save({"heads": medusa.state_dict(), "optimizer": optimizer.state_dict(), **state}, checkpoint_file)
    say(f"trained {epochs} epochs over {len(train_rows)} rows in {time.perf_counter() - start:.0f} s")
    plot_losses(state["losses"], out / "loss.png")

    medusa, output = medusa.cpu(), output.cpu()
    accept = accept_rates(medusa, corpus, output, index, eps)
    heads_file = out / f"{KIND}.safetensors"
    meta = {"identity": model.identity, "model": model.name, "vocab_size": model.cfg.vocab_size,
            "prompts": len(corpus.prompts), "rows": len(train_rows), "epochs": epochs}  # fmt: skip
    save_heads(heads_file, medusa, vocab, accept, meta)
    rates = ", ".join(f"head {k + 1}: {float(accept[k, 0]):.2f}" for k in range(heads))
    size = heads_file.stat().st_size / 2**20
    say(f"wrote {heads_file} ({size:.1f} MiB); top-1 accept rates on held-out answers: {rates}")
    check(model, heads_file, [p for p in corpus.prompts[-CHECK_PROMPTS:]], max_new_tokens, say)
    return heads_file


def check(model: LoadedModel, heads_file: Path, prompts: list[str], max_new_tokens: int, say) -> None:
    """Decode held-out ``prompts`` with ``ar`` and the new heads; say whether every output is identical and the
    heads' mean accepted tokens per step."""
    plain, medusa = Engine(model, method="ar"), Engine(model, method=f"medusa:heads={heads_file}")
    same, lengths = 0, []
    for prompt in prompts:
        reference = plain.generate(prompt, max_new_tokens=max_new_tokens)
        result = medusa.generate(prompt, max_new_tokens=max_new_tokens)
        same += result.token_ids == reference.token_ids
        lengths += result.stats.accepted_lengths
    mat = sum(lengths) / max(1, len(lengths))
    say(f"check on {len(prompts)} held-out prompts: {same}/{len(prompts)} identical to ar, MAT {mat:.2f} (ar 1.00)")


def plot_losses(losses: list[float], path: Path) -> None:
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
    ax.set_ylabel("cross-entropy (mean over heads)")
    ax.set_title("medusa heads: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
