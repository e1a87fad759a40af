"""A batch of sequences that grow together over one KV cache of their own: what a decoding strategy drives.

Unlike the engine's rows, these hold no drafts and no verification: every token given is scored and kept. Rows
may be re-chosen between steps (:meth:`Rows.select`: beams that survive, a prompt forked into several), and a
step may feed embeddings instead of tokens (superposed decoding's mixed inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decodekit.protocol import Tree
from decodekit.runtime.model import Transformer


class Rows:
    """``batch`` sequences of equal length on ``transformer``, with room for ``capacity`` tokens each."""

    def __init__(self, transformer: Transformer, capacity: int, batch: int = 1) -> None:
        self.transformer = transformer
        self.cache = transformer.new_cache(capacity, batch)

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def length(self) -> int:
        """Tokens each row holds."""
        return self.cache.lengths[0]

    def extend(
        self, tokens: torch.Tensor, embeddings: torch.Tensor | None = None, exits: Sequence[int] = ()
    ) -> torch.Tensor:
        """Score and keep ``tokens`` int64 ``[B, n]`` (or ``embeddings`` ``[B, n, hidden]`` in their place, the
        stream entering the first block): float logits ``[B, vocab]`` after the last of them, or with ``exits``
        (layer indices) ``[1 + len(exits), B, vocab]``: the final logits first, then those of the stream entering
        each exit layer through the model's own final norm and LM head (early-exit logits)."""
        model = self.transformer
        n = tokens.shape[1]
        capture: dict[int, torch.Tensor | None] = dict.fromkeys(exits)
        tokens = tokens.to(model.device)
        hidden = model.hidden_states(tokens, self.cache, capture=capture if exits else None, embeddings=embeddings)
        self.cache.commit_all(n)
        if not exits:
            return model.logits(hidden[:, -1])
        last = [hidden[:, -1], *(capture[layer][:, -1] for layer in exits)]  # type: ignore[index]
        return model.logits(torch.stack(last))

    def extend_all(self, tokens: torch.Tensor) -> torch.Tensor:
        """Score and keep ``tokens`` int64 ``[B, n]``: float logits ``[B, n, vocab]`` after each of them (position
        ``i`` predicts the token after ``tokens[:, i]``)."""
        model = self.transformer
        hidden = model.hidden_states(tokens.to(model.device), self.cache)
        self.cache.commit_all(tokens.shape[1])
        return model.logits(hidden)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens of every row (at most :attr:`length`); the entries past it become
        scratch, overwritten by the next tokens given."""
        assert 0 <= length <= self.length
        self.cache.lengths = [length] * self.batch

    def branch(self, tokens: torch.Tensor, tree: Tree) -> torch.Tensor:
        """Score ``tokens`` int64 ``[n]`` laid out as ``tree`` after the sequence of a one-row batch, keeping none
        of them until :meth:`keep`: the residual stream leaving the last block ``[n, hidden]`` (logits through
        :meth:`logits`)."""
        assert self.batch == 1
        return self.transformer.hidden_states(tokens[None].to(self.transformer.device), self.cache, tree)[0]

    def keep(self, path: torch.Tensor) -> None:
        """Keep the nodes ``path`` (int64 ``[m]``, a root-first path) of the last :meth:`branch`."""
        self.cache.commit(0, path)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float logits ``[..., vocab]`` of the stream ``hidden`` ``[..., hidden]`` leaving the last block."""
        return self.transformer.logits(hidden)

    def select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep the rows ``rows`` (int64 ``[B']``, repeats allowed: a row forked into several), in that order."""
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.cache.kv.device)
        length, kv = self.length, self.cache.kv
        if index.numel() == self.batch:  # in place: only the rows that take another row's entries are copied
            moved = (index != torch.arange(self.batch, device=index.device)).nonzero()[:, 0]
            if moved.numel():
                kv[:, :, moved, :, :length] = kv[:, :, index[moved], :, :length]
            return
        self.cache = self.transformer.new_cache(self.cache.capacity, index.numel())
        self.cache.kv[:, :, :, :, :length] = kv[:, :, :, :, :length].index_select(2, index)
        self.cache.lengths = [length] * index.numel()

    def embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` int64 ``[...]`` -> the stream entering the first block ``[..., hidden]``."""
        return self.transformer.embedded(tokens.to(self.transformer.device))
