"""Contrastive search (Su et al., 2022, "A Contrastive Framework for Neural Text Generation").

Each step takes the target's top-k tokens and scores each by ``(1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)``:
its probability against how much its hidden state resembles any earlier token's (prompt and output), the
degeneration penalty that keeps the text from repeating itself. The k candidates are scored in one forward as k
leaves under the last token, of which only the chosen one is kept (no cache copies).

Departs from the paper: hidden states are the last block's output after the final norm (as transformers uses).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from decodekit.drafters.options import Range, checked_options
from decodekit.protocol import Tree
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.rows import Rows
from decodekit.strategies.base import MAX_BRANCH, TokenByToken


def contrastive_scores(
    probs: torch.Tensor, candidates: torch.Tensor, context: torch.Tensor, alpha: float
) -> torch.Tensor:
    """float ``[k]``: ``(1 - alpha) * probs - alpha * max cos(candidate, context)`` for candidates' probabilities
    ``probs`` ``[k]``, their hidden states ``candidates`` ``[k, H]`` and the earlier tokens' ``context`` ``[t, H]``."""
    similarity = F.cosine_similarity(candidates[:, None].float(), context[None].float(), dim=-1).amax(-1)
    return (1 - alpha) * probs - alpha * similarity


@checked_options
class ContrastiveSearch(TokenByToken):
    """The top ``k`` tokens, each scored against the degeneration penalty weighted by ``alpha``."""

    paper = "Su et al. 2022, A Contrastive Framework for Neural Text Generation"

    def __init__(
        self, model: LoadedModel, k: Annotated[int, Range(1, 32)] = 4, alpha: Annotated[float, Range(0.0, 1.0)] = 0.6
    ) -> None:
        super().__init__(model)
        self.k, self.alpha = k, alpha
        self.star = Tree.from_parents([-1] + [0] * k)  # the last token and k candidates under it

    def begin(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.seq = Rows(self.model.transformer, len(prompt_ids) + max_new_tokens + MAX_BRANCH)
        prompt = torch.tensor(prompt_ids)
        hidden = self.seq.branch(prompt, Tree.chain(len(prompt_ids)))
        self.seq.keep(torch.arange(len(prompt_ids) - 1))  # the last token is fed again as each step's root
        self.context = self.normed(hidden[:-1])  # [t, H]: the kept tokens' states
        self.root, self.logits = prompt_ids[-1], self.seq.logits(hidden[-1])

    def choose(self, out: list[int]) -> int:
        probs, candidates = self.logits.softmax(-1).topk(self.k)
        hidden = self.seq.branch(torch.tensor([self.root, *candidates.tolist()]), self.star)
        self.seq.keep(torch.zeros(1, dtype=torch.int64))
        states = self.normed(hidden)
        self.context = torch.cat([self.context, states[:1]])
        best = int(contrastive_scores(probs, states[1:], self.context, self.alpha).argmax())
        self.root, self.logits = int(candidates[best]), self.seq.logits(hidden[1 + best])
        return self.root

    def advance(self, token: int) -> None:
        pass  # choose already scored the chosen token: its logits are the next step's

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.norm(hidden)
