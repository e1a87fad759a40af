"""``decodekit train kangaroo``: the adapter of Kangaroo's early exit (decodekit/drafters/kangaroo.py) for a
frozen target, by self-distillation.

1. Answers: the target's own greedy answers to the built-in training prompts, made as for the heads
   (:func:`decodekit.train.heads.answers`). Kept in ``OUT/answers.json``.
2. The shallow stream: one teacher-forced forward of the target's first ``depth`` layers per prompt + answer gives
   the residual stream entering block ``depth`` at every position (the adapter attends over all of them). Kept with
   the token ids in ``OUT/corpus.safetensors``; ``--resume`` reuses both (and only the answers where the corpus
   was made for another depth).
3. Training: the adapter only, on whole sequences (a batch is a few sequences, their losses summed), with
   cross-entropy at every answer position against the token the target chose next, over the answers' tokens
   through the target's frozen final norm and LM head (``Transformer.output_map`` restricted, as for the heads).
   AdamW; a checkpoint per epoch (``OUT/checkpoint.pt``) and the loss curve (``OUT/loss.png``).
4. Accept rates: on held-out sequences, how often the adapter's rank-r candidate is the target's next token.
   Then ``OUT/kangaroo.safetensors``, and the check against ``ar`` on held-out prompts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from decodekit.drafters.kangaroo import KangarooAdapter
from decodekit.errors import InvalidParameter, ModelFileError
from decodekit.runtime.loader import LoadedModel
from decodekit.train.heads import (
    CHECK_PROMPTS,
    HELD_OUT,
    RANKS,
    answer_vocabulary,
    check,
    check_counts,
    data_counts,
    fit,
    vocabulary_map,
    write_part,
)
from decodekit.train.prompts import answers, prompt_set

SEQUENCES_PER_BATCH = 4


@dataclass
class Corpus:
    """Whole sequences, concatenated: ``stream`` float32 ``[N, H]`` (the residual stream entering block ``depth``
    at every position), ``ids`` int64 ``[N]``, ``starts`` int64 ``[S + 1]`` (sequence s is rows
    ``starts[s] .. starts[s + 1] - 1``), ``answer_starts`` int64 ``[S]`` (the row of each answer's first token),
    ``held_out`` bool ``[S]``, ``prompts`` the prompts' texts."""

    depth: int
    stream: torch.Tensor
    ids: torch.Tensor
    starts: torch.Tensor
    answer_starts: torch.Tensor
    held_out: torch.Tensor
    prompts: list[str]

    def sequence(self, s: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sequence ``s``'s stream ``[n, H]``, ids ``[n]`` and answer start (within it)."""
        a, b = int(self.starts[s]), int(self.starts[s + 1])
        return self.stream[a:b], self.ids[a:b], int(self.answer_starts[s]) - a

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"stream": self.stream, "ids": self.ids, "starts": self.starts,
                   "answer_starts": self.answer_starts, "held_out": self.held_out}  # fmt: skip
        save_file(tensors, path, metadata={"prompts": json.dumps(self.prompts), "depth": str(self.depth)})

    @staticmethod
    def load(path: Path) -> Corpus:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        return Corpus(int(meta["depth"]), t["stream"], t["ids"], t["starts"], t["answer_starts"], t["held_out"],
                      json.loads(meta["prompts"]))  # fmt: skip


def build_corpus(model: LoadedModel, prompts: list[str], sequences: list[tuple[list[int], int]], depth: int) -> Corpus:
    """The shallow stream of every sequence (see :class:`Corpus`); ``sequences`` as :func:`answers` returns them."""
    transformer = model.transformer
    streams, ids, starts, answer_starts = [], [], [0], []
    for sequence, prompt_length in tqdm(sequences, desc="shallow stream"):
        tokens = torch.tensor(sequence, dtype=torch.int64)
        cache = transformer.new_cache(len(tokens), layers=depth)
        stream = transformer.hidden_states(tokens[None].to(model.device), cache, layers=range(depth))[0]
        streams.append(stream.float().cpu())
        ids.append(tokens)
        answer_starts.append(starts[-1] + prompt_length)
        starts.append(starts[-1] + len(tokens))
    first_held_out = len(sequences) - max(1, round(HELD_OUT * len(sequences)))
    held_out = torch.arange(len(sequences)) >= first_held_out
    return Corpus(depth, torch.cat(streams), torch.cat(ids), torch.tensor(starts), torch.tensor(answer_starts),
                  held_out, prompts)  # fmt: skip


def sequence_corpus(
    model: LoadedModel,
    out: Path,
    depth: int,
    prompts: int,
    generated: int,
    max_new_tokens: int,
    resume: bool,
    say: Callable[[str], None],
) -> Corpus:
    """The stream entering block ``depth`` over the target's answers to ``prompts`` built-in and ``generated``
    training prompts (:func:`decodekit.train.prompts.prompt_set`; steps 1-2 of the module docstring), kept in
    ``out``; ``resume`` reuses ``out``'s corpus, or its answers where the corpus was
    made for another depth."""
    out.mkdir(parents=True, exist_ok=True)
    answers_file, corpus_file = out / "answers.json", out / "corpus.safetensors"
    start = time.perf_counter()
    corpus = Corpus.load(corpus_file) if resume and corpus_file.is_file() else None
    if corpus is not None and corpus.depth == depth:
        say(f"resuming: {len(corpus.prompts)} sequences from {corpus_file}")
    else:
        if resume and answers_file.is_file():
            saved = json.loads(answers_file.read_text())
            chosen, sequences = saved["prompts"], [tuple(pair) for pair in saved["sequences"]]
        else:
            chosen = prompt_set(model, prompts, generated)
            sequences = answers(model, chosen, max_new_tokens)
            answers_file.write_text(json.dumps({"prompts": chosen, "sequences": sequences}))
        corpus = build_corpus(model, chosen, sequences, depth)
        corpus.save(corpus_file)
        say(f"corpus: {len(chosen)} sequences, {len(corpus.ids)} positions in {time.perf_counter() - start:.0f} s")
    if corpus.stream.shape[1] != model.cfg.hidden_size:
        raise ModelFileError(f"{corpus_file} was made for another model (hidden size {corpus.stream.shape[1]})")
    return corpus


def sequence_logits(
    adapter: KangarooAdapter, model: LoadedModel, corpus: Corpus, s: int, output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's logits ``[m, S]`` at sequence ``s``'s positions that predict an answer token (the last prompt
    position to the second last), over the columns of ``output`` ``[H, S]``, and the tokens the target chose there
    ``[m]``."""
    stream, ids, answer_start = corpus.sequence(s)
    states = adapter(stream.to(output.device))[answer_start - 1 : -1]
    normed = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps)
    return normed @ output, ids[answer_start:]


def accept_rates(
    adapter: KangarooAdapter, model: LoadedModel, corpus: Corpus, output: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """float ``[1, RANKS]``: on held-out sequences, how often the rank-r candidate is the target's next token."""
    counts, total = torch.zeros(RANKS), 0
    with torch.no_grad():
        for s in corpus.held_out.nonzero().flatten().tolist():
            logits, chosen = sequence_logits(adapter, model, corpus, s, output)
            known = index[chosen] >= 0
            target = logits.cpu()[known].gather(-1, index[chosen[known]][:, None])
            rank = (logits.cpu()[known] > target).sum(-1)
            counts += torch.bincount(rank[rank < RANKS], minlength=RANKS).float()
            total += len(chosen)
    return (counts / max(1, total))[None]


def train_kangaroo(
    model: LoadedModel,
    out: Path,
    depth: int | None = None,
    prompts: int = 400,
    generated: int = 0,
    max_new_tokens: int = 128,
    epochs: int = 20,
    lr: float = 1e-3,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Train a Kangaroo adapter on the target's first ``depth`` layers (default: a tenth of them) for ``model``
    into ``out`` (a directory; see the module docstring); returns the adapter file. ``resume``: reuse ``out``'s
    answers and corpus and continue from its checkpoint."""
    layers = model.cfg.layers
    depth = max(1, layers // 10) if depth is None else depth
    check_counts(*data_counts(prompts, generated, max_new_tokens, epochs))
    if not isinstance(depth, int) or not 1 <= depth < layers:
        raise InvalidParameter(f"the exit layer must be an integer in [1, {layers}) for this model, got {depth!r}")
    corpus = sequence_corpus(model, out, depth, prompts, generated, max_new_tokens, resume, say)
    train = (~corpus.held_out).nonzero().flatten()
    answer_ids = [ids[answer_start:] for _, ids, answer_start in map(corpus.sequence, train.tolist())]
    vocab = answer_vocabulary(model, torch.cat(answer_ids))
    index, output = vocabulary_map(model, vocab)
    device = model.device
    adapter = KangarooAdapter(depth, model.cfg.hidden_size).to(device)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over the answer positions of the batch's sequences."""
        loss, count = torch.zeros((), device=device), 0
        for s in batch.tolist():
            logits, chosen = sequence_logits(adapter, model, corpus, s, output)
            columns = torch.where(index[chosen] >= 0, index[chosen], -100).to(device)
            loss = loss + F.cross_entropy(logits, columns, ignore_index=-100, reduction="sum")
            count += int((columns >= 0).sum())
        return loss / max(1, count)

    fit(adapter, train, SEQUENCES_PER_BATCH, loss_of, epochs, lr, out, resume, say, "sequences")

    accept = accept_rates(adapter, model, corpus, output, index)
    meta = {"prompts": len(corpus.prompts), "sequences": len(train), "epochs": epochs}
    adapter_file, size = write_part(model, adapter, out, vocab, accept, meta)
    top = ", ".join(f"{float(accept[0, : r + 1].sum()):.2f}" for r in (0, 1, 4))
    say(f"wrote {adapter_file} ({size:.1f} MiB) on {depth} of {layers} layers; the target's next token is among the "
        f"adapter's top 1 / 2 / 5 on held-out answers: {top}")  # fmt: skip
    check(model, f"kangaroo:adapter={adapter_file}", corpus.prompts[-CHECK_PROMPTS:], max_new_tokens, say)
    return adapter_file
