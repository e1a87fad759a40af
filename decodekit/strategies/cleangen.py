"""CleanGen (Li et al., 2024, "CleanGen: Mitigating Backdoor Attacks for Generation Tasks in Large Language
Models").

The target (possibly backdoored) decodes greedily, and a reference model that shares its vocabulary checks its
tokens: a token the target favours far more than the reference does, ``p_target / p_reference > ratio`` (the
paper's suspicion score), is taken for a backdoor's trigger response and replaced by the reference's own greedy
choice there. As in the paper the target drafts a window of ``window`` tokens, the reference scores them all in
one forward, and decoding resumes after the first suspicious one (replaced), the rest of the window dropped. The
output is the same for every window: a window only saves reference forwards.

Departs from the paper: only greedy decoding is supported (the target's drafts and the reference's replacements
are both argmax choices, never sampled), and a window ends early at the target's EOS or at the token budget.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from decodekit.drafters.options import ModelPath, Range, checked_options
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.rows import Rows
from decodekit.strategies.base import Strategy


def clean_window(
    draft: torch.Tensor, target_logits: torch.Tensor, reference_logits: torch.Tensor, ratio: float
) -> list[int]:
    """The tokens to keep of a drafted window ``draft`` int64 ``[n]``, given the logits each of its tokens was
    drawn from, the target's ``target_logits`` and the reference's ``reference_logits`` (float ``[n, V]``): the
    draft up to its first token whose probability ratio target / reference exceeds ``ratio``, which is replaced by
    the reference's greedy token at its position; the whole draft when none does."""
    at = torch.arange(draft.numel())
    log_ratio = target_logits.log_softmax(-1)[at, draft] - reference_logits.log_softmax(-1)[at, draft]
    suspicious = (log_ratio > math.log(ratio)).nonzero()
    if suspicious.numel() == 0:
        return draft.tolist()
    first = int(suspicious[0, 0])
    return [*draft[:first].tolist(), int(reference_logits[first].argmax())]


@checked_options
class CleanGen(Strategy):
    """Greedy decoding whose tokens the ``reference`` model finds ``ratio`` times less likely are replaced by
    its own, checked ``window`` tokens at a time."""

    paper = "Li et al. 2024, CleanGen: Mitigating Backdoor Attacks for Generation Tasks in Large Language Models"

    def __init__(
        self,
        model: LoadedModel,
        reference: Annotated[str, ModelPath()] = "",
        ratio: Annotated[float, Range(1.0, 1000.0)] = 20.0,
        window: Annotated[int, Range(1, 8)] = 4,
    ) -> None:
        super().__init__(model)
        self.reference = self.second_model(reference, "reference")
        self.ratio, self.window = ratio, window

    def decode(self, prompt_ids: list[int], max_new_tokens: int) -> list[list[int]]:
        target = self.rows(prompt_ids, max_new_tokens)
        reference = self.rows(prompt_ids, max_new_tokens, self.reference)
        out: list[int] = []
        pending = prompt_ids[-1]  # the last committed token, which neither model holds yet
        while len(out) < max_new_tokens and not (out and out[-1] in self.eos):
            start = target.length
            draft, target_logits = self.draft(target, pending, min(self.window, max_new_tokens - len(out)))
            reference_logits = reference.extend_all(torch.tensor([[pending, *draft[:-1]]]))[0]
            kept = clean_window(torch.tensor(draft), target_logits, reference_logits, self.ratio)
            # both models hold pending and the draft but its last token: keep pending and the kept tokens but the last
            target.truncate(start + len(kept))
            reference.truncate(start + len(kept))
            out += kept
            pending = kept[-1]
        return [out]

    def draft(self, target: Rows, pending: int, most: int) -> tuple[list[int], torch.Tensor]:
        """Up to ``most`` greedy tokens after ``pending`` (fed first), ending at an EOS, and the target's logits
        each was chosen from, ``[n, V]``; ``target`` then holds ``pending`` and all of them but the last."""
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        token = pending
        while len(tokens) < most and not (tokens and tokens[-1] in self.eos):
            logits.append(target.extend(torch.tensor([[token]]))[0])
            token = int(logits[-1].argmax())
            tokens.append(token)
        return tokens, torch.stack(logits)
