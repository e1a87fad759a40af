"""Adaptive n-gram drafting in the style of ADED (Liu et al., 2024, arXiv 2407.12021).

State: a trigram table, two-token context -> decayed counts of the tokens that followed it, and a bigram table,
one token -> counts, consulted when the trigram context is unseen. Both learn online from

- the prompt, added at ``begin``;
- the target's verdict after every draft node: ``greedy_choices[i]`` is the token the model emits after node i,
  a fact for the context (parent token, node token). Along the accepted path these facts are the committed
  tokens; on rejected branches they are what the model would have said there;
- optionally the prompt's logits (``seed_logits``) and a corpus of token ids (``corpus``, loaded once).

Counts decay by ``decay`` per token of text seen (prompt or committed): recent text weighs more, and a context
last seen long ago is trusted less. The table lives as long as the drafter, so it carries over between requests.

The estimate that the model emits x after context c is ``count(c, x) / (total(c) + prior)`` (counts in units of
one fresh observation). A draft is a best-first search from the root: a node's score is the product of the
estimates along its path; the ``max_nodes`` best nodes scoring at least ``min_prob`` become the tree.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Annotated

import torch

from decodekit.drafters.options import FilePath, Range, checked_options, read_regular_file
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter, clip
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo, greedy_choice

MAX_NODES = MAX_DRAFT_NODES - 1  # the root is not counted
RESCALE_AT = 1e30  # lazy decay: counts grow by 1/decay per token and are scaled back to ~1 past this
ROW_BYTES, COUNT_BYTES = 280, 85  # CPython 3.11, measured with tracemalloc: a context's row, one count in it
CORPUS_BYTES = 16 << 20  # the largest corpus file read (~4M token ids, ~20 s to learn)
CORPUS_MASS = 4.0  # a corpus context's counts are scaled to total at most this many fresh observations

Row = dict[int, float]  # next token -> decayed count


@checked_options
class AdaptiveNgram(Drafter):
    """Method ``aded``. Drafts a tree from decayed trigram/bigram counts of the model's own behaviour.

    Options: ``max_nodes`` (tree budget, root excluded), ``min_prob`` (smallest path score drafted), ``decay``
    (count factor per token seen, 1 = no decay), ``prior`` (pseudo-count added to every context's total, in
    fresh observations), ``max_contexts`` (trigram and bigram contexts kept each; least recently used evicted),
    ``max_next`` (next tokens kept per context; the smallest count is replaced), ``seed_logits`` (also learn
    the model's predictions over the prompt: one lm_head pass at ``begin``), ``corpus`` (path of a file of
    whitespace-separated token ids learned at construction; empty = none).

    Defaults, for CPU float32 where a step costs ~41 ms + ~1.5 ms per node: a node pays when its chance of
    acceptance q exceeds ~MAT * 1.5 / (41 + 1.5 * nodes), about 0.06. Path scores are calibrated (prior 1:
    nodes scored 0.1-0.2 were accepted 15% of the time, 0.2-0.3 26%, 0.4-0.5 58%), so ``min_prob`` sits near
    that break-even. On the default model (12 built-in prompts, 2 per task, 128 tokens, one engine) the
    modelled cost per token (41 ms * steps + 1.5 ms * nodes) / tokens was flat at 23.8-24.7 ms over min_prob
    0.04-0.15 and prior 0.5-1; the defaults gave MAT 2.10 at 5.9 nodes per step (23.8 ms). ``max_nodes`` 16
    rarely binds (min_prob 0.05: 8 nodes MAT -0.06, 32 +0.00). decay 0.999, 0.9999 and 1 tied on MAT, 0.99
    lost 0.4 MAT; 0.999 lets stale contexts fade, which bounds what is worth storing (below). ``seed_logits``:
    MAT -0.005.

    Memory: at most ``max_contexts`` trigram rows + ``max_contexts`` bigram rows of ``max_next`` counts each,
    i.e. ``2 * max_contexts * max_next`` counts however much text is seen (``ROW_BYTES`` per row and
    ``COUNT_BYTES`` per count in CPython: ~31 MB when full at the defaults, ~107 MB at the largest bounds). With
    decay 0.999 a context seen once falls under ``min_prob`` after ~3300 tokens, and a request touches ~3
    contexts per token, so 16384 rows hold what can still be drafted.
    """

    wants_step_logits = False  # observe reads StepOutcome.greedy_choices only

    def __init__(
        self,
        target: TargetInfo,
        max_nodes: Annotated[int, Range(0, MAX_NODES)] = 16,
        min_prob: Annotated[float, Range(0, 1)] = 0.07,
        decay: Annotated[float, Range(0.5, 1)] = 0.999,
        prior: Annotated[float, Range(1e-3, 1e3)] = 0.5,
        max_contexts: Annotated[int, Range(1, 1 << 15)] = 16384,
        max_next: Annotated[int, Range(1, 16)] = 8,
        seed_logits: bool = False,
        corpus: Annotated[str, FilePath(CORPUS_BYTES)] = "",
    ) -> None:
        self.vocab = target.vocab_size
        self.max_nodes, self.min_prob, self.decay, self.prior = max_nodes, min_prob, decay, prior
        self.max_contexts, self.max_next = max_contexts, max_next
        self.wants_prompt_logits = seed_logits
        self.trigrams: OrderedDict[int, Row] = OrderedDict()  # key prev * vocab + token, oldest use first
        self.bigrams: OrderedDict[int, Row] = OrderedDict()
        self._unit = 1.0  # the weight of one fresh observation
        self._before_root: int | None = None  # the token before the last proposed root
        if corpus:
            self._load_corpus(corpus)

    @property
    def num_counts(self) -> int:
        """Counts stored in both tables (the quantity the memory bound caps)."""
        return sum(map(len, self.trigrams.values())) + sum(map(len, self.bigrams.values()))

    def memory_bytes(self) -> int:
        return ROW_BYTES * (len(self.trigrams) + len(self.bigrams)) + COUNT_BYTES * self.num_counts

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        tokens = prompt.tolist()
        self._before_root = tokens[-2] if len(tokens) > 1 else None
        for j in range(1, len(tokens)):
            self._tick(1)
            self._add(tokens[j - 2] if j >= 2 else None, tokens[j - 1], tokens[j])
        if prompt_logits is not None:
            first = len(tokens) - 1 - len(prompt_logits)  # the position the first logits row follows
            for i, predicted in enumerate(greedy_choice(prompt_logits).tolist(), first):
                self._add(tokens[i - 1] if i else None, tokens[i], predicted)

    def propose(self, sequence: torch.Tensor) -> Draft:
        *before, root = sequence[-2:].tolist()
        self._before_root = before[0] if before else None
        trie = DraftTrie()
        # entries: (-score, insertion order, token before, token, path below the root, scores along it)
        heap: list[tuple[float, int, int | None, int, tuple[int, ...], tuple[float, ...]]] = [
            (-1.0, 0, self._before_root, root, (), ())
        ]
        pushed = 1
        while heap and len(trie) < self.max_nodes:
            neg, _, prev, token, path, scores = heapq.heappop(heap)
            if path:
                trie.add(path, scores)
            for nxt, p in self._estimates(prev, token):
                score = -neg * p
                if score < self.min_prob:
                    break
                heapq.heappush(heap, (-score, pushed, token, nxt, (*path, nxt), (*scores, score)))
                pushed += 1
        return trie.build(root, self.max_nodes, estimates=True)

    def observe(self, outcome: StepOutcome) -> None:
        tokens = outcome.draft.tokens.tolist()
        parents = outcome.draft.tree.parents.tolist()
        self._tick(len(outcome.committed))
        for i, predicted in enumerate(outcome.greedy_choices.tolist()):
            self._add(tokens[parents[i]] if i else self._before_root, tokens[i], predicted)
        self._before_root = [tokens[0], *outcome.committed][-2]  # kept here too: a step may skip propose

    def _estimates(self, prev: int | None, token: int) -> list[tuple[int, float]]:
        """(next token, estimated probability) after the context ``(prev, token)``, most probable first."""
        row = None if prev is None else self.trigrams.get(prev * self.vocab + token)
        if row is None:
            row = self.bigrams.get(token)
            if row is None:
                return []
            self.bigrams.move_to_end(token)
        else:
            self.trigrams.move_to_end(prev * self.vocab + token)
        norm = sum(row.values()) + self.prior * self._unit
        return sorted(((t, c / norm) for t, c in row.items()), key=lambda item: -item[1])

    def _add(self, prev: int | None, token: int, nxt: int) -> None:
        """Count one observation of ``nxt`` after ``(prev, token)`` (and after ``token`` alone)."""
        if prev is not None:
            self._count(self.trigrams, prev * self.vocab + token, nxt)
        self._count(self.bigrams, token, nxt)

    def _count(self, table: OrderedDict[int, Row], key: int, nxt: int) -> None:
        """Add one fresh observation to row ``key`` of ``table``, evicting as the caps require."""
        row = table.get(key)
        if row is None:
            row = table[key] = {}
            if len(table) > self.max_contexts:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        if nxt not in row and len(row) >= self.max_next:
            del row[min(row, key=row.__getitem__)]
        row[nxt] = row.get(nxt, 0.0) + self._unit

    def _tick(self, tokens: int) -> None:
        """Advance time by ``tokens`` tokens: every stored count decays by ``decay ** tokens``."""
        self._unit /= self.decay**tokens
        if self._unit > RESCALE_AT:
            for table in (self.trigrams, self.bigrams):
                for row in table.values():
                    for t in row:
                        row[t] /= self._unit
            self._unit = 1.0

    def _load_corpus(self, path: str) -> None:
        """Learn the trigrams of a file of whitespace-separated token ids, each context's counts scaled to total
        at most ``CORPUS_MASS`` so that the model's own behaviour soon outweighs the corpus."""
        try:
            data = read_regular_file(path, CORPUS_BYTES)
        except ValueError as err:
            raise InvalidParameter(f"aded corpus {clip(path)} {err}") from None
        try:
            tokens = [int(t) for t in data.split()]
        except ValueError:  # int()'s message would quote the file
            raise InvalidParameter(f"aded corpus {clip(path)} does not hold whitespace-separated token ids") from None
        if not all(0 <= t < self.vocab for t in tokens):
            raise InvalidParameter(f"aded corpus {clip(path)} holds token ids outside [0, {self.vocab})")
        for j in range(1, len(tokens)):
            self._add(tokens[j - 2] if j >= 2 else None, tokens[j - 1], tokens[j])
        for table in (self.trigrams, self.bigrams):
            for row in table.values():
                scale = min(1.0, CORPUS_MASS / sum(row.values()))
                for t in row:
                    row[t] *= scale
