"""decodekit's drafters as vLLM proposers (vLLM's ``custom_class`` speculative method):

    vllm serve DIR --speculative-config '{"method": "custom_class",
        "model": "decodekit.integrations.vllm.Hybrid", "num_speculative_tokens": 8}'

vLLM builds the class with its ``VllmConfig`` and, after every step, asks it for one draft chain per request in
the batch (``propose``); vLLM verifies the chains itself, so its output is what it would be without them (greedy:
token for token). Classes: ``Lookup``, ``CopySpec``, ``Suffix``, ``Aggressive`` (each our method of that name with
its defaults), ``Hybrid`` (suffix + copyspec), or ``Proposer`` with a spec of those in ``$DECODEKIT_VLLM_METHOD``.
vLLM tells a proposer only the tokens it committed (no logits, no hidden states, no verdict off the accepted path),
so the methods that learn from more (recycling, aded, lookahead, the model drafters, ...) are refused at start.

State per request: vLLM names no request to a proposer, so a request is known by its tokens. Each batch row's
tokens so far must extend what a drafter saw at its last call (checked on the row it was on, then on the others:
rows move when requests leave); a row that extends none is a new request (its drafter begins on its tokens). A
drafter no row extends at a call is dropped there: its request ended, was aborted or was preempted (a preempted
request starts a fresh drafter when it returns). Two requests with the same text so far take different drafters.

Each call a row's drafter observes the step vLLM verified: the tokens committed since its last call and how many of
its chain's tokens they began with (``StepOutcome`` over the accepted path, the committed tokens as the target's
verdicts), then proposes a tree from which the chain is its best path: from the root, each node's best-ranked
child (nodes come best first), up to ``num_speculative_tokens`` tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from decodekit.drafters import METHODS, make_drafter
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo

METHOD_ENV = "DECODEKIT_VLLM_METHOD"
VLLM_METHODS = frozenset({"lookup", "copyspec", "suffix", "aggressive", "hybrid"})


def best_path(draft: Draft, limit: int) -> list[int]:
    """The node indices (root excluded) of the path from ``draft``'s root through each node's first child, at most
    ``limit`` of them: its own best chain, since drafts list nodes best first."""
    first_child: dict[int, int] = {}
    for node, parent in enumerate(draft.tree.parents.tolist()):
        if node:
            first_child.setdefault(parent, node)
    path, node = [], 0
    while node in first_child and len(path) < limit:
        node = first_child[node]
        path.append(node)
    return path


def check_usable(drafter: Drafter, spec: str) -> None:
    """Refuse a drafter that learns from more than the committed tokens and the accepted count: vLLM tells a
    proposer nothing else (no logits, no hidden states, no verdicts off the accepted path)."""
    usable = tuple(METHODS[name] for name in sorted(VLLM_METHODS - {"hybrid"}))
    for part in getattr(drafter, "parts", [drafter]):
        if not isinstance(part, usable):
            raise InvalidParameter(
                f"{spec}: in vLLM a proposer learns from committed tokens only; the methods that need no more are "
                f"{', '.join(sorted(VLLM_METHODS))} (hybrid of the others)"
            )


class _Request:
    """One request's drafter, the tokens it has seen (prompt and output), the draft it proposed after them and the
    nodes of the chain vLLM got from it."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.tokens = np.zeros(0, dtype=np.int64)
        self.draft: Draft | None = None
        self.path: list[int] = []

    @property
    def chain(self) -> list[int]:
        """The chain's tokens."""
        return [] if self.draft is None else self.draft.tokens[self.path].tolist()


class Proposer:
    """A decodekit method as vLLM's ``custom_class`` proposer (see the module docstring); ``method``: the spec used
    when ``$DECODEKIT_VLLM_METHOD`` names none."""

    method = "hybrid:parts=suffix+copyspec"

    def __init__(self, vllm_config: object, *args: object, **kwargs: object) -> None:
        self.spec = os.environ.get(METHOD_ENV) or self.method
        self.width = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_len = int(vllm_config.model_config.max_model_len)
        self.target = TargetInfo(vllm_config.model_config.get_vocab_size())
        check_usable(make_drafter(self.spec, self.target), self.spec)
        self.requests: dict[int, _Request] = {}  # by the batch row each was on at the last call

    def load_model(self, *args: object, **kwargs: object) -> None:
        """Nothing to load (vLLM calls it on every drafter)."""

    def propose(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: Sequence[int],
        token_ids_cpu: np.ndarray,
        *args: object,
        **kwargs: object,
    ) -> list[list[int]]:
        """One draft chain per batch row (empty: none): row i's tokens are ``token_ids_cpu[i, :num_tokens_no_spec[i]]``;
        a row that sampled nothing this step (still prefilling) or is at the model's length limit gets none."""
        kept: dict[int, _Request] = {}
        drafts = []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[row])
            if not len(sampled) or n == 0 or n >= self.max_len:
                drafts.append([])
                continue
            tokens = np.array(token_ids_cpu[row, :n], dtype=np.int64)  # a copy: vLLM rewrites its rows
            request = self._find(row, tokens, kept)
            kept[row] = request
            drafts.append(self._step(request, tokens))
        ongoing = {id(request) for request in kept.values()}
        for request in self.requests.values():
            if id(request) not in ongoing:
                request.drafter.end()  # its request is gone, and the drafter with it
        self.requests = kept
        return drafts

    def _find(self, row: int, tokens: np.ndarray, taken: dict[int, _Request]) -> _Request:
        """The request whose seen tokens ``tokens`` extend (its last row first), else a new one."""
        used = {id(request) for request in taken.values()}
        candidates = [self.requests[row]] if row in self.requests else []
        candidates += [request for r, request in self.requests.items() if r != row]
        for request in candidates:
            seen = len(request.tokens)
            if id(request) not in used and seen <= len(tokens) and np.array_equal(tokens[:seen], request.tokens):
                return request
        return _Request(make_drafter(self.spec, self.target))

    def _step(self, request: _Request, tokens: np.ndarray) -> list[int]:
        """Let ``request``'s drafter observe what was committed since its last call, then its next chain."""
        sequence = torch.from_numpy(tokens)  # shares the copy above, which nothing changes
        if request.draft is None:
            request.drafter.begin(sequence, None)
        else:
            new = tokens[len(request.tokens) :].tolist()
            if not new:
                return request.chain
            chain, accepted = request.chain, 0
            while accepted < min(len(chain), len(new) - 1) and chain[accepted] == new[accepted]:
                accepted += 1
            on_path = torch.tensor([0, *request.path[:accepted]], dtype=torch.int64)
            verdicts = torch.full((request.draft.tree.size,), -1, dtype=torch.int64)  # -1: vLLM does not say
            verdicts[on_path] = torch.tensor(new[: accepted + 1], dtype=torch.int64)
            logits = torch.empty(request.draft.tree.size, 0)
            request.drafter.observe(StepOutcome(request.draft, logits, on_path, new, greedy_choices=verdicts))
        request.tokens = tokens
        request.draft = request.drafter.propose(sequence)
        request.path = best_path(request.draft, self.width)
        return request.chain


class Lookup(Proposer):
    method = "lookup"


class CopySpec(Proposer):
    method = "copyspec"


class Suffix(Proposer):
    method = "suffix"


class Aggressive(Proposer):
    method = "aggressive"


class Hybrid(Proposer):
    """The default: suffix + copyspec."""
