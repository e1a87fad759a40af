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
3. Accept rates: on held-out sequences, how often the rank-r candidate of each pass (depth 1 and 2 of a draft) is
   the target's token. Then ``OUT/eagle.safetensors`` and the check against ``ar`` on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from decodekit.drafters.eagle import EagleLayer, eagle_loss
from decodekit.drafters.heads import unit_rms
from decodekit.runtime.loader import LoadedModel
from decodekit.train.heads import (
    CHECK_PROMPTS,
    RANKS,
    answer_vocabulary,
    check,
    check_counts,
    data_counts,
    fit,
    write_part,
)
from decodekit.train.kangaroo import SEQUENCES_PER_BATCH, Corpus, sequence_corpus

VOCAB = 4096  # the drafter's tokens: the answers' most frequent (95% of the default model's answer tokens)


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
    say: Callable[[str], None] = print,
) -> Path:
    """Train an EAGLE layer of ``blocks`` decoder blocks for ``model`` into ``out`` (a directory; see the module
    docstring); returns the layer's file. ``resume``: reuse ``out``'s answers and features and continue from its
    checkpoint."""
    check_counts(("blocks", blocks, 1), *data_counts(prompts, generated, max_new_tokens, epochs))
    corpus = sequence_corpus(model, out, model.cfg.layers, prompts, generated, max_new_tokens, resume, say)
    train = (~corpus.held_out).nonzero().flatten()
    answer_ids = [ids[answer_start:] for _, ids, answer_start in map(corpus.sequence, train.tolist())]
    vocab, index, output = answer_vocabulary(model, torch.cat(answer_ids), VOCAB)
    device = model.device
    layer = EagleLayer(blocks, model.cfg.hidden_size).to(device)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        return eagle_loss(layer, [sequence(model, corpus, s, device) for s in batch.tolist()], output, index)

    fit(layer, train, SEQUENCES_PER_BATCH, loss_of, epochs, lr, out, resume, say, "sequences")

    accept = accept_rates(layer, model, corpus, output, index)
    meta = {"prompts": len(corpus.prompts), "sequences": len(train), "epochs": epochs}
    layer_file, size = write_part(model, layer, out, vocab, accept, meta)
    rates = ", ".join(f"depth {d + 1}: {float(accept[d, 0]):.2f}" for d in range(2))
    say(f"wrote {layer_file} ({size:.1f} MiB); top-1 accept rates on held-out answers: {rates}")
    check(model, f"eagle:layer={layer_file}", corpus.prompts[-CHECK_PROMPTS:], max_new_tokens, say)
    return layer_file
