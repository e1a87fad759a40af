"""Suffix decoding: draft from occurrence counts of every recent substring (after SuffixDecoding, Oliaro et al., arXiv
2411.04975, and SAM-Decoding, Hu et al., arXiv 2411.10666).

Two :class:`SuffixTrie` parts: one over the current request (prompt and output so far), one over the outputs of
earlier requests of this drafter (at most ``history`` tokens, oldest output dropped first). Each step, each part
finds the longest suffix of the sequence (at most ``max_match`` tokens) that occurred before with a continuation,
then expands that node's subtree best-first by score: the empirical probability (child count over the parent's
continued count, multiplied along the path) discounted by how short the context behind each token is (see
``CONTEXT_PRIOR``). Both parts' expansions merge into one :class:`DraftTrie`, a node keeping the better of its two
scores, and the ``max_nodes`` best nodes scoring at least ``min_prob`` are verified; with no match the draft is the
root alone. Merging rather than preferring the request's own match: both scores estimate the same chance of
acceptance, and a match in the request itself is longer and its counts are less spread, so it wins wherever it is
better; measured on the default model (54 prompts, 128 tokens), merging gave MAT 1.98 at 4.5 nodes a step, using the
earlier outputs only where the request has no match 1.91 at 3.5 (about the same time per token), the request alone
1.84 at 3.0 (lookup: 1.88 at 6.1).
"""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo

# How far a count ratio is trusted given the context behind it: a token predicted from L tokens of context (the
# match and the draft tokens above it) is taken to be accepted L / (L + CONTEXT_PRIOR) times as often as its count
# ratio says. Fitted on the default model (54 prompts, 128 tokens each): first-level draft nodes from a match of
# 2, 3, 4, 6, 10 or 16 tokens in the request itself were accepted 46, 60, 68, 74, 81 and 95% of the time
# (L / (L + 2): 50, 60, 67, 75, 83, 89%), and a node's chance rose the same way with its depth below the match.
# CPython 3.11, measured with tracemalloc: a trie node (five array slots and its edge in the dict), a list slot
NODE_BYTES, TOKEN_BYTES = 125, 36
CONTEXT_PRIOR = 2.0


class SuffixTrie:
    """Occurrence counts of every substring of at most ``depth`` tokens of a set of token streams.

    Node 0 is the empty string. ``count[v]``: occurrences of v's string; ``cont[v]``: those followed by one more
    token of the same stream (= the sum of v's children's counts), so ``count[c] / cont[v]`` estimates
    P(c's token | v's string). Size: every indexed token adds at most ``depth`` nodes, so ``len(self) <=
    depth * tokens`` for ``tokens`` tokens indexed and not removed. Appending a token to the open stream costs
    O(depth); removing a stream of n tokens costs O(depth * n) plus a pass over the children of nodes it empties.
    """

    def __init__(self, depth: int, vocab_size: int) -> None:
        if depth < 2:
            raise InvalidParameter(f"suffix trie depth must be >= 2, got {depth}")
        self.depth, self._vocab = depth, vocab_size
        self._edge: dict[int, int] = {}  # parent * vocab + token -> child
        self._token = array("i", [-1])
        self.count = array("i", [0])
        self.cont = array("i", [0])
        self._first = array("i", [-1])  # first child
        self._next = array("i", [-1])  # next sibling
        self._free: list[int] = []
        self._open = [0]  # open[k]: node of the open stream's last k tokens, k < depth

    def __len__(self) -> int:
        """Nodes below the root."""
        return len(self._token) - 1 - len(self._free)

    def memory_bytes(self) -> int:
        return NODE_BYTES * len(self._token)  # freed nodes included: the arrays keep their slots

    def start(self) -> None:
        """Begin a new stream: later appends do not continue substrings of the previous one."""
        self._open = [0]

    def extend(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the open stream."""
        edge, count, cont, vocab = self._edge, self.count, self.cont, self._vocab
        opened = self._open
        for token in tokens:
            following = [0]
            for node in opened:
                child = edge.get(node * vocab + token)
                if child is None:
                    child = self._new(node, token)
                count[child] += 1
                cont[node] += 1
                following.append(child)
            if len(following) > self.depth:
                following.pop()
            opened = following
        self._open = opened

    def remove(self, stream: list[int]) -> None:
        """Forget ``stream``, a whole stream indexed earlier (it must not be the open one)."""
        opened, emptied = [0], set()
        for token in stream:
            following = [0]
            for node in opened:
                child = self._edge[node * self._vocab + token]
                self.count[child] -= 1
                self.cont[node] -= 1
                if self.count[child] == 0:
                    emptied.add(node)
                if len(following) < self.depth:
                    following.append(child)
            opened = following
        for parent in emptied:  # relink each parent's children without the emptied ones, then free those
            kept, child = [], self._first[parent]
            while child >= 0:
                if self.count[child]:
                    kept.append(child)
                else:
                    del self._edge[parent * self._vocab + self._token[child]]
                    self._free.append(child)
                child = self._next[child]
            head = -1
            for child in reversed(kept):
                self._next[child], head = head, child
            self._first[parent] = head

    def find(self, tokens: list[int]) -> int:
        """The node of the string ``tokens``, or -1."""
        node = 0
        for token in tokens:
            node = self._edge.get(node * self._vocab + token, -1)
            if node < 0:
                break
        return node

    def match(self, tokens: list[int], max_len: int) -> tuple[int, int]:
        """(length, node) of the longest suffix of ``tokens``, at most ``max_len`` long and shorter than the
        depth, that occurred with a continuation; (0, 0) when none did. If a suffix is absent every longer one
        is too, so the search stops at the first absent length."""
        best = (0, 0)
        for n in range(1, min(len(tokens), max_len, self.depth - 1) + 1):
            node = self.find(tokens[-n:])
            if node < 0:
                break
            if self.cont[node]:
                best = (n, node)
        return best

    def children(self, node: int) -> list[tuple[int, int]]:
        """(token, child) pairs of ``node``."""
        out, child = [], self._first[node]
        while child >= 0:
            out.append((self._token[child], child))
            child = self._next[child]
        return out

    def _new(self, parent: int, token: int) -> int:
        if self._free:
            child = self._free.pop()
            self._token[child], self.count[child], self.cont[child], self._first[child] = token, 0, 0, -1
        else:
            child = len(self._token)
            for column, value in ((self._token, token), (self.count, 0), (self.cont, 0), (self._first, -1)):
                column.append(value)
            self._next.append(-1)
        self._next[child] = self._first[parent]
        self._first[parent] = child
        self._edge[parent * self._vocab + token] = child
        return child


def expand(part: SuffixTrie, node: int, matched: int, draft: DraftTrie, budget: int, min_prob: float) -> None:
    """Add to ``draft`` (below its root) the ``budget`` best continuations of ``node``, the match of ``matched``
    tokens, that score at least ``min_prob``, best first. A child scores its parent's score times
    ``count[child] / cont[parent]`` times ``L / (L + CONTEXT_PRIOR)``, ``L`` being the tokens of context behind
    it (the match and the draft tokens above it), so scores shrink along every path."""
    heap: list[tuple[float, int, int, int, int]] = []  # (-score, part node, draft parent, token, context)

    def push(parent: int, into: int, score: float, context: int) -> None:
        scale = score * context / (context + CONTEXT_PRIOR) / part.cont[parent]
        for token, child in part.children(parent):
            if scale * part.count[child] >= min_prob:
                heapq.heappush(heap, (-scale * part.count[child], child, into, token, context + 1))

    push(node, 0, 1.0, matched)
    for _ in range(budget):
        if not heap:
            break
        neg, child, into, token, context = heapq.heappop(heap)
        into = draft.insert(into, token, -neg)
        if part.cont[child]:
            push(child, into, -neg, context)


@checked_options
class SuffixDrafter(Drafter):
    """Method ``suffix``.

    ``max_depth``: longest substring counted (match plus continuation; drafts reach ``max_depth - match`` deep).
    ``max_match``: longest suffix matched. ``max_nodes``: draft nodes per step. ``min_prob``: the least score for
    a node to be verified: on the 2-core test CPU a step costs ~41 ms plus ~1.5 ms per node, so at MAT ~2 and ~5
    nodes a node pays when its chance of acceptance exceeds ~1.5 * 2 / 48 = 0.06. ``history``: tokens of earlier
    outputs kept. Memory: at most ``max_depth * (context + history)`` trie nodes of ~125 bytes, ``context`` being
    the current request's prompt and output (in practice ~13 nodes per token at depth 16: ~1.6 KB per token).
    Indexing costs ~30 us of CPU per token at depth 16 (a 1,000-token prompt: ~30 ms at the first step).
    """

    wants_step_logits = False  # observe never reads StepOutcome.logits

    def __init__(
        self,
        target: TargetInfo,
        max_depth: Annotated[int, Range(2, 32)] = 16,
        max_match: Annotated[int, Range(1, 31)] = 6,
        max_nodes: Annotated[int, Range(1, MAX_DRAFT_NODES - 1)] = 16,
        min_prob: Annotated[float, Range(0, 1)] = 0.07,
        history: Annotated[int, Range(0, 16384)] = 4096,
    ) -> None:
        if max_match >= max_depth:
            raise InvalidParameter(f"suffix needs max_match < max_depth, got {max_match} and {max_depth}")
        self.max_match, self.max_nodes, self.min_prob, self.history = max_match, max_nodes, min_prob, history
        self.max_depth, self.vocab_size = max_depth, target.vocab_size
        self.local = SuffixTrie(max_depth, target.vocab_size)
        self.glob = SuffixTrie(max_depth, target.vocab_size)
        self.outputs: deque[list[int]] = deque()  # the outputs indexed in ``glob``, oldest first
        self.tokens: list[int] = []  # the current request's prompt and output
        self.prompt_len = 0

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self._archive(self.tokens[self.prompt_len :])
        self.local = SuffixTrie(self.max_depth, self.vocab_size)
        self.tokens, self.prompt_len = [], prompt.numel()

    def propose(self, sequence: torch.Tensor) -> Draft:
        if sequence.numel() > len(self.tokens):
            self._extend(sequence[len(self.tokens) :].tolist())
        suffix = self.tokens[-self.max_match :]
        trie = DraftTrie()
        for part in (self.local, self.glob):
            length, node = part.match(suffix, self.max_match)
            if length:
                expand(part, node, length, trie, self.max_nodes, self.min_prob)
        return trie.build(self.tokens[-1], self.max_nodes, self.min_prob, estimates=True)

    def observe(self, outcome: StepOutcome) -> None:
        self._extend(outcome.committed)

    def memory_bytes(self) -> int:
        tokens = len(self.tokens) + sum(map(len, self.outputs))
        return self.local.memory_bytes() + self.glob.memory_bytes() + TOKEN_BYTES * tokens

    def _extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        self.local.extend(tokens)

    def _archive(self, output: list[int]) -> None:
        output = output[-self.history :] if self.history else []
        if not output:
            return
        self.glob.start()
        self.glob.extend(output)
        self.outputs.append(output)
        total = sum(map(len, self.outputs))
        while total > self.history:
            oldest = self.outputs.popleft()
            self.glob.remove(oldest)
            total -= len(oldest)
