"""What every decoding strategy is: a rule that decides the output itself, so the output differs from plain
decoding by design (never lossless), run one request at a time on its own cache (:class:`Rows`).

A strategy is built once per spec and model (its options checked as a method's are) and may be reused for any
number of requests; :meth:`Strategy.decode` returns its completions' token ids, best first.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from decodekit.errors import InvalidParameter
from decodekit.runtime.loader import LoadedModel, load_model
from decodekit.runtime.rows import Rows

MAX_BRANCH = 64  # nodes a strategy may score past its sequence at once (Rows.branch)


class Strategy:
    """Subclasses set ``paper`` (what they follow), and override :attr:`count` where they return more than one
    completion."""

    paper: ClassVar[str] = ""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.eos = model.eos_token_ids

    @property
    def count(self) -> int:
        """Completions this strategy returns per request."""
        return 1

    def decode(self, prompt_ids: list[int], max_new_tokens: int) -> list[list[int]]:
        """The completions' token ids after ``prompt_ids``, best first: each ends at its first EOS (kept) or after
        ``max_new_tokens`` tokens."""
        raise NotImplementedError

    def rows(self, prompt_ids: list[int], max_new_tokens: int, model: LoadedModel | None = None) -> Rows:
        """A one-row :class:`Rows` on ``model`` (None: the target) with room for the request, holding every
        prompt token but the last (the first step feeds it)."""
        model = model or self.model
        rows = Rows(model.transformer, len(prompt_ids) + max_new_tokens + 1 + MAX_BRANCH)
        if len(prompt_ids) > 1:
            rows.extend(torch.tensor([prompt_ids[:-1]]))
        return rows

    def second_model(self, path: str, role: str) -> LoadedModel:
        """The checkpoint at ``path`` (a strategy's option), loaded as the target is, with the target's vocabulary
        (a model with another one is refused: its token ids would mean other tokens)."""
        if not path:
            raise InvalidParameter(f"{type(self).__name__} needs its {role} model: set the option {role}=PATH")
        other = load_model(path, dtype=self.model.dtype_option, device=self.model.device.type)
        if other.cfg.vocab_size != self.model.cfg.vocab_size or other.tokenizer.get_vocab() != (
            self.model.tokenizer.get_vocab()
        ):
            raise InvalidParameter(f"the {role} model's vocabulary differs from the target's: it must share it")
        return other


class TokenByToken(Strategy):
    """A strategy that commits one token a step, chosen by its rule: subclasses say how it starts (:meth:`begin`,
    given the whole prompt) and how it chooses (:meth:`choose`, given the output so far); :meth:`advance` then
    feeds the chosen token wherever the rule needs it."""

    def decode(self, prompt_ids: list[int], max_new_tokens: int) -> list[list[int]]:
        self.begin(prompt_ids, max_new_tokens)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = self.choose(out)
            out.append(token)
            if token in self.eos or len(out) == max_new_tokens:
                break
            self.advance(token)
        return [out]

    def begin(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        raise NotImplementedError

    def choose(self, out: list[int]) -> int:
        raise NotImplementedError

    def advance(self, token: int) -> None:
        raise NotImplementedError
