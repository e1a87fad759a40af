"""Input-guided Aggressive Decoding (Sun et al., 2021, "Instantaneous grammatical error correction with shallow
aggressive decoding"; Ge et al., 2022, "Lossless acceleration for Seq2seq generation with aggressive decoding").

For edit-like requests (correct, rewrite, translate in place, summarize with quotes) the output mostly copies the
input, so the draft is the source text that follows the point the output has reached. The source is the
request's prompt (its last ``source_tokens`` tokens when that is > 0). The drafter keeps an anchor ``a``, the
source position where the output is believed to continue (``source[a - 1]`` is the root); the draft is the chain
``source[a : a + length]``.

- After a step whose committed tokens (accepted drafts and the bonus token) equal ``source[a : a + c]``, the anchor
  just advances by ``c``.
- Otherwise it re-anchors on the shortest suffix of the sequence, at least ``min_match`` and at most
  ``MAX_SUFFIX`` tokens long, that occurs exactly once in the source with a source token after it; the anchor is
  the position after that occurrence. No such suffix (none matches, or the matches stay ambiguous): no anchor,
  the step is the root alone, and the search is retried after the next step.
- The start of the output uses the same rule on the end of the prompt rather than a special case. A single-turn
  chat prompt ends with the template's assistant header, which occurs only at the source's end where nothing
  follows, so the first step drafts nothing for the price of one dict lookup; the next steps may anchor on a
  suffix that crosses into the prompt (``"\\nDear"`` when the source holds a letter). A multi-turn prompt anchors
  on the previous assistant turn, which a revision request ("fix the typos in your answer") copies.

Draft length adapts to the request: ``length`` is the largest ``L <= max_nodes`` with ``p ** L >= ACCEPT_FLOOR``,
where ``p`` estimates the chance that the next draft token is accepted given the previous one was: accepted draft
tokens over those plus rejections, counted from a prior of ``PRIOR`` and decayed by ``DECAY`` per drafting step so
that the last few drafts dominate. Whole accepted drafts raise ``p`` and the length, early rejections lower both;
a request that stops copying is back to 1-2 tokens within ~15 steps.

Defaults, from replaying the greedy outputs of SmolLM2-135M (24 edit, translation and summarization prompts, 128
tokens; a step costs ~41 ms plus ~1.5 ms per node on this CPU, see ``ACCEPT_FLOOR``): ``min_match=1`` beats 2 and
3 (1.68 vs 1.60 and 1.47 tokens per step, modelled speedups 1.56x, 1.51x, 1.41x), this length rule beats doubling
on whole acceptance / cutting to the accepted count on rejection (1.68 vs 1.56 tokens per step), and ``max_nodes``
8, 16 or 32 are within 0.02. Resolving an ambiguous suffix by the candidate nearest the point where the output left
the source, or searching a window there first, gained at most 0.04 tokens per step (0.01x) and is left out.

Memory: the source (at most the prompt) and an index of one follow position per source token, keyed by its
``min_match`` preceding tokens, so O(len(source)); nothing grows with the output.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import Range, Renamed, checked_options
from decodekit.drafters.trie import chain_draft
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo

SOURCE_TOKEN_BYTES = 110  # CPython 3.11, measured with tracemalloc: a source token and its share of ``follows``
MAX_SUFFIX = 32  # longest suffix tried when re-anchoring: a search does at most MAX_SUFFIX * len(source) work

# A draft node pays when its chance of acceptance exceeds what it costs in tokens: on this CPU a step takes
# ~41 ms plus ~1.5 ms per node, so the bar is 1.5 * (tokens per step) / (ms per step), 0.05-0.15 for 1.5-5
# tokens per step on drafts of 2-16 nodes.
ACCEPT_FLOOR = 0.1
PRIOR = (4.0, 1.0)  # (accepted, rejected) pseudo-counts: p = 0.8, a first draft of 10 tokens
DECAY = 0.8  # weight of the past per drafting step; 0.5-1.0 all measured within 0.02 tokens per step


@checked_options
class AggressiveDecoding(Drafter):
    """Method ``aggressive``. Options: ``max_nodes`` (longest draft), ``min_match`` (shortest anchoring suffix),
    ``source_tokens`` (the source is the prompt's last ``source_tokens`` tokens; 0: the whole prompt).

    Memory: ``source`` (``<= len(prompt)`` ints) and ``follows`` (``len(source) - min_match`` positions), reset by
    ``begin``; the output is never stored.
    """

    wants_step_logits = False  # observe never reads StepOutcome.logits

    def __init__(
        self,
        target: TargetInfo,
        max_nodes: Annotated[int, Range(1, MAX_DRAFT_NODES - 1), Renamed("max_draft")] = 16,
        min_match: Annotated[int, Range(1, MAX_SUFFIX)] = 1,
        source_tokens: Annotated[int, Range(0, 1 << 20)] = 0,
    ) -> None:
        self.max_nodes, self.min_match, self.source_tokens = max_nodes, min_match, source_tokens
        self.source: list[int] = []
        self.follows: dict[tuple[int, ...], list[int]] = {}  # min_match-gram -> positions j after it, j < len
        self.anchor: int | None = None
        self.accepted, self.rejected = PRIOR
        self.length = self._length()

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        source = prompt.tolist()
        self.source = source[-self.source_tokens :] if self.source_tokens else source
        n, self.follows = self.min_match, {}
        for j in range(n, len(self.source)):
            self.follows.setdefault(tuple(self.source[j - n : j]), []).append(j)
        self.anchor = None
        self.accepted, self.rejected = PRIOR
        self.length = self._length()

    def find(self, tail: list[int]) -> int | None:
        """The position after the only source occurrence (with a continuation) of the shortest suffix of ``tail``
        that has ``>= min_match`` tokens and occurs once, or None."""
        n = self.min_match
        if len(tail) < n:
            return None
        positions = self.follows.get(tuple(tail[-n:]), [])
        while len(positions) > 1 and n < min(len(tail), MAX_SUFFIX):
            n += 1
            positions = [j for j in positions if j >= n and self.source[j - n] == tail[-n]]
        return positions[0] if len(positions) == 1 else None

    def propose(self, sequence: torch.Tensor) -> Draft:
        if self.anchor is None:
            self.anchor = self.find(sequence[-MAX_SUFFIX:].tolist())
        draft = [] if self.anchor is None else self.source[self.anchor : self.anchor + self.length]
        return chain_draft(int(sequence[-1]), draft)

    def observe(self, outcome: StepOutcome) -> None:
        drafted, accepted = outcome.draft.tree.size - 1, outcome.accepted.numel() - 1
        if drafted:
            self.accepted = DECAY * self.accepted + accepted
            self.rejected = DECAY * self.rejected + (accepted < drafted)
            self.length = self._length()
        committed = outcome.committed
        if self.anchor is not None and self.source[self.anchor : self.anchor + len(committed)] == committed:
            self.anchor += len(committed)
        else:
            self.anchor = None

    def memory_bytes(self) -> int:
        return SOURCE_TOKEN_BYTES * len(self.source)

    def _length(self) -> int:
        """The largest L in [1, max_nodes] with p ** L >= ACCEPT_FLOOR."""
        p = self.accepted / (self.accepted + self.rejected)
        length = 1
        while length < self.max_nodes and p ** (length + 1) >= ACCEPT_FLOOR:
            length += 1
        return length
