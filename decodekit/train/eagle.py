"""``decodekit train eagle``: the feature predictor of EAGLE (decodekit/drafters/eagle.py) for a frozen target, by
self-distillation.

1. Answers and features: the target's own greedy answers to the training prompts, and the residual stream
   leaving its last block at every position of each prompt + answer (one teacher-forced forward each), made and
   kept as for Kangaroo (:func:`decodekit.train.kangaroo.sequence_corpus`, with the stream of the last block).
2. Training: the layer only, on whole answers from the prompt's last position on (where the drafter's own cache
   starts), a few sequences a batch. Two passes per sequence: the first feeds the target's features (teacher-forced)
   and learns the feature at each next position (smooth L1, at unit RMS) and, through the target's frozen final norm
   and LM head over the answers' ``VOCAB`` most frequent tokens, the token after it (cross-entropy, weight
   ``decodekit.drafters.eagle.CE_WEIGHT``: EAGLE's loss); the
   second feeds the first pass's predictions in place of the features, each attending to the target's features
   before it, as the drafter feeds its own prediction at the root and below (one step of EAGLE-3's training-time
   test), with the same two losses one position further. AdamW; a checkpoint per epoch and the loss curve.
3. The acceptance head (SpecDec++), the layer frozen: on the same two passes, a logistic model of whether each of
   a node's ``ACCEPT_RANKS`` most likely candidates is the target's token (binary cross-entropy, AdamW,
   ``HEAD_EPOCHS`` passes); on held-out sequences, the candidates accepted against the number the head and the
   layer's own probabilities expect, and the log loss of both. ``--layer FILE`` trains only the head, for a layer
   trained before (the file is rewritten with it into ``OUT``).
4. Accept rates: on held-out sequences, how often the rank-r candidate of each pass (depth 1 and 2 of a draft) is
   the target's token. Then ``OUT/eagle.safetensors`` and the check against ``ar`` on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from decodekit.drafters.eagle import ACCEPT_RANKS, EagleLayer, eagle_loss
from decodekit.drafters.heads import read_trained, unit_rms
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.runner import TargetModel
from decodekit.train.heads import (
    CHECK_PROMPTS,
    RANKS,
    answer_vocabulary,
    check,
    check_counts,
    data_counts,
    fit,
    vocabulary_map,
    write_part,
)
from decodekit.train.kangaroo import SEQUENCES_PER_BATCH, Corpus, sequence_corpus

VOCAB = 4096  # the drafter's tokens: the answers' most frequent (95% of the default model's answer tokens)
HEAD_EPOCHS = 3
HEAD_LR = 1e-2


def sequence(model: LoadedModel, corpus: Corpus, s: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Sequence ``s`` of ``corpus`` as :meth:`EagleLayer.two_passes` takes it: features, tokens, embeddings."""
    stream, ids, answer_start = corpus.sequence(s)
    first = answer_start - 1  # the prompt's last position: the drafter's first slot
    with torch.inference_mode():
        embedded = model.transformer.embedded(ids[first + 1 :].to(device)).float()  # [m, H]
    return unit_rms(stream[first:].to(device)), ids[first + 1 :], embedded.clone()


def accept_rates(
    layer: EagleLayer, model: LoadedModel, corpus: Corpus, output: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """float ``[2, RANKS]``: on held-out sequences, how often the rank-r candidate at depth 1 and 2 is the target's
    token."""
    counts, totals = torch.zeros(2, RANKS), torch.zeros(2)
    with torch.no_grad():
        for s in corpus.held_out.nonzero().flatten().tolist():
            passes = layer.two_passes(*sequence(model, corpus, s, output.device), output)
            for depth, (_, _, logits, chosen) in enumerate(passes):
                known = index[chosen] >= 0
                target = logits.cpu()[known].gather(-1, index[chosen[known]][:, None])
                rank = (logits.cpu()[known] > target).sum(-1)
                counts[depth] += torch.bincount(rank[rank < RANKS], minlength=RANKS).float()
                totals[depth] += len(chosen)
    return counts / totals.clamp(min=1)[:, None]


def acceptance_terms(
    layer: EagleLayer, model: LoadedModel, corpus: Corpus, s: int, output: torch.Tensor, index: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each pass over sequence ``s`` (depth 1 and 2; the layer frozen), about the R = ``ACCEPT_RANKS`` most
    likely candidates at each position (all, for fewer tokens): the acceptance head's logits ``[k, R]``
    (differentiable in the head), the layer's probabilities of them and whether each is the target's token there
    (float 0/1)."""
    terms = []
    with torch.no_grad():
        passes = layer.two_passes(*sequence(model, corpus, s, output.device), output)
    for depth, (predicted, _, logits, chosen) in enumerate(passes, start=1):
        probs = torch.softmax(logits, dim=-1)
        ranks = min(ACCEPT_RANKS, probs.shape[-1])  # a drafter of fewer tokens has fewer candidates
        top = probs.topk(ranks, dim=-1)
        accepted = top.indices.cpu() == index[chosen][:, None]  # columns of the drafter's tokens
        head = layer.acceptance(predicted[:-1], probs, top.values, depth)
        terms.append((head, top.values.cpu(), accepted.float()))
    return terms


def train_acceptance(
    layer: EagleLayer,
    model: LoadedModel,
    corpus: Corpus,
    output: torch.Tensor,
    index: torch.Tensor,
    say: Callable[[str], None],
) -> None:
    """Fit ``layer.acceptance`` on the training sequences, the rest of the layer frozen, and say how well it and
    the layer's own probabilities predict the held-out candidates' acceptance (see the module docstring)."""
    head = layer.acceptance
    layer.requires_grad_(False)
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=HEAD_LR, weight_decay=0.0)
    train = (~corpus.held_out).nonzero().flatten()
    generator = torch.Generator().manual_seed(1)
    for epoch in range(HEAD_EPOCHS):
        order = train[torch.randperm(len(train), generator=generator)]
        for batch in tqdm(order.split(4 * SEQUENCES_PER_BATCH), desc=f"acceptance head {epoch + 1}/{HEAD_EPOCHS}"):
            terms = [t for s in batch.tolist() for t in acceptance_terms(layer, model, corpus, s, output, index)]
            logits = torch.cat([t[0] for t in terms]).flatten()
            loss = F.binary_cross_entropy_with_logits(logits, torch.cat([t[2] for t in terms]).flatten().to(logits))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.trained.fill_(True)
    layer.requires_grad_(True)
    accepted = expected = by_probs = loss_head = loss_probs = count = 0.0
    with torch.no_grad():
        for s in corpus.held_out.nonzero().flatten().tolist():
            for logits, probs, labels in acceptance_terms(layer, model, corpus, s, output, index):
                chance = torch.sigmoid(logits).cpu().clamp(1e-6, 1 - 1e-6)
                probs = probs.clamp(1e-6, 1 - 1e-6)
                accepted, expected, by_probs = accepted + labels.sum(), expected + chance.sum(), by_probs + probs.sum()
                loss_head += F.binary_cross_entropy(chance, labels, reduction="sum")
                loss_probs += F.binary_cross_entropy(probs, labels, reduction="sum")
                count += labels.numel()
    say(
        f"acceptance head, held-out candidates: {accepted:.0f} accepted; the head expects {expected:.0f} (log loss "
        f"{loss_head / max(count, 1):.4f}), the layer's probabilities {by_probs:.0f} ({loss_probs / max(count, 1):.4f})"
    )


def train_eagle(
    model: LoadedModel,
    out: Path,
    blocks: int = 1,
    prompts: int = 400,
    generated: int = 0,
    max_new_tokens: int = 128,
    epochs: int = 10,
    lr: float = 1e-3,
    resume: bool = False,
    layer_path: Path | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Train an EAGLE layer of ``blocks`` decoder blocks and its acceptance head for ``model`` into ``out`` (a
    directory; see the module docstring); returns the layer's file. ``resume``: reuse ``out``'s answers and
    features and continue from its checkpoint. ``layer_path``: train only the acceptance head of that layer file."""
    check_counts(("blocks", blocks, 1), *data_counts(prompts, generated, max_new_tokens, epochs))
    corpus = sequence_corpus(model, out, model.cfg.layers, prompts, generated, max_new_tokens, resume, say)
    train = (~corpus.held_out).nonzero().flatten()
    device = model.device
    if layer_path is not None:
        layer, vocab, _ = read_trained(layer_path, EagleLayer, TargetModel(model))
        layer = layer.to(device)
        index, output = vocabulary_map(model, vocab)
    else:
        answer_ids = [ids[answer_start:] for _, ids, answer_start in map(corpus.sequence, train.tolist())]
        vocab = answer_vocabulary(model, torch.cat(answer_ids), VOCAB)
        index, output = vocabulary_map(model, vocab)
        layer = EagleLayer(blocks, model.cfg.hidden_size).to(device)

        def loss_of(batch: torch.Tensor) -> torch.Tensor:
            return eagle_loss(layer, [sequence(model, corpus, s, device) for s in batch.tolist()], output, index)

        fit(layer, train, SEQUENCES_PER_BATCH, loss_of, epochs, lr, out, resume, say, "sequences")
    train_acceptance(layer, model, corpus, output, index, say)

    accept = accept_rates(layer, model, corpus, output, index)
    meta = {"prompts": len(corpus.prompts), "sequences": len(train), "epochs": epochs}
    if layer_path is not None:
        meta = {"layer": layer_path.name, "head_prompts": len(corpus.prompts)}
    layer_file, size = write_part(model, layer, out, vocab, accept, meta)
    rates = ", ".join(f"depth {d + 1}: {float(accept[d, 0]):.2f}" for d in range(2))
    say(f"wrote {layer_file} ({size:.1f} MiB); top-1 accept rates on held-out answers: {rates}")
    check(model, f"eagle:layer={layer_file}", corpus.prompts[-CHECK_PROMPTS:], max_new_tokens, say)
    return layer_file
