"""Online speculative decoding (OSD; Liu et al., 2024): trained heads keep learning from the traffic they draft
for, so acceptance rises on the traffic's own distribution.

Every request's drafter turns what verification committed into training rows (:class:`TrafficRows`: the target's
hidden state at a position, the tokens after it) and hands them to the one :class:`OnlineLearner` its engine
shares (``ModelAccess.shared``). The learner takes optimiser steps in a background thread, off the request path,
replaying the newest rows, and after each batch of steps publishes a frozen copy of the heads that drafters pick up
at their next ``propose``.

Learning never changes what is generated: the heads only choose what is drafted, and verification keeps exactly
the tokens the target would have produced (greedy output equals ``ar``; sampled output follows the target, the
drafts being deterministic). A step that fails stops the learning, never the serving: drafting goes on with the
last published heads.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque

import torch
import torch.nn.functional as F

from decodekit.drafters.heads import TrainedHeads, for_inference, head_logits
from decodekit.protocol import ModelAccess

MAX_LOSSES = 100_000
BUFFER_ROWS = 4096  # the newest rows, replayed
REPLAYS = 4  # steps per batch of new rows
IDLE_SECONDS = 30.0  # the learning thread ends after this long without a full batch; the next rows start another
log = logging.getLogger("decodekit")


class TrafficRows:
    """One request's stream of committed tokens and the target's hidden states along it, turned into training rows
    for heads ``depth`` tokens ahead: a row is ``(hidden [H] at position t, the tokens at t + 1 .. t + depth + 1)``,
    ready once those tokens are committed (a request's last ``depth + 1`` positions give none)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.tokens: list[int] = []  # the request's tokens from the prompt's last one on
        self.pending: list[tuple[int, torch.Tensor]] = []  # (index into tokens, hidden state there)

    def begin(self, last_prompt_token: int) -> None:
        self.tokens, self.pending = [last_prompt_token], []

    def step(self, hidden: torch.Tensor | None, committed: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Add a step: ``hidden [m, H]`` the states at the root and the accepted drafts (None where the step gave
        none of ours), ``committed`` its tokens. Returns the rows now ready, ``(hidden [r, H], ahead int64
        [r, depth + 1])``, or None."""
        base = len(self.tokens) - 1
        if hidden is not None:
            self.pending += [(base + i, state) for i, state in enumerate(hidden)]
        self.tokens += committed
        last = len(self.tokens) - self.depth - 2  # the last index whose tokens ahead are all known
        ready = [(at, state) for at, state in self.pending if at <= last]
        if not ready:
            return None
        self.pending = self.pending[len(ready) :]
        ahead = torch.tensor([self.tokens[at + 1 : at + self.depth + 2] for at, _ in ready], dtype=torch.int64)
        return torch.stack([state for _, state in ready]), ahead


class OnlineLearner:
    """Trains ``heads`` (float32, as :func:`read_trained` gives them with their ``vocab`` and ``accept``; this
    learner's own) at learning rate ``rate`` on the rows drafters :meth:`add`, in a background thread; :attr:`current`
    is the latest frozen copy for drafting. The rows wait in a replay buffer of the newest ``BUFFER_ROWS``; every
    ``batch_size`` new rows buy ``REPLAYS`` steps, each on ``batch_size`` rows drawn from the buffer. Tokens outside
    ``vocab`` (int64 ``[S]``, what the heads choose among) are not learned; the tree stays the one ``accept`` chose."""

    def __init__(
        self,
        heads: TrainedHeads,
        vocab: torch.Tensor,
        accept: torch.Tensor,
        target: ModelAccess,
        rate: float,
        batch_size: int = 64,
    ) -> None:
        self.training, self.vocab, self.accept = heads.train(), vocab, accept
        self.target, self.batch_size = target, batch_size
        self.optimizer = torch.optim.AdamW(heads.parameters(), lr=rate, weight_decay=0.0)
        self.columns = torch.full((target.vocab_size,), -100, dtype=torch.int64)  # a token's column, -100 if none
        self.columns[vocab] = torch.arange(len(vocab))
        self.output = target.output_map(vocab)
        self.current = for_inference(copy.deepcopy(heads), target)
        self.steps, self.failed = 0, False
        self.losses: deque[float] = deque(maxlen=MAX_LOSSES)  # the last steps' training losses
        self._hidden = torch.empty(BUFFER_ROWS, target.hidden_size)  # the replay buffer: a ring of rows
        self._ahead = torch.empty(BUFFER_ROWS, heads.depth + 1, dtype=torch.int64)
        self._written = 0  # rows ever added: row i sits in slot i % BUFFER_ROWS
        self._fresh = 0  # rows added since the last batch was taken (at most a buffer's worth)
        self._stepping = False
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draw = torch.Generator().manual_seed(0)

    def add(self, hidden: torch.Tensor, ahead: torch.Tensor) -> None:
        """Add rows: ``hidden [r, H]`` and ``ahead`` int64 ``[r, depth + 1]`` (as :meth:`TrafficRows.step`)."""
        with self._ready:
            if self.failed:
                return
            slots = torch.arange(self._written, self._written + len(hidden)) % BUFFER_ROWS
            self._hidden[slots], self._ahead[slots] = hidden.float(), ahead
            self._written += len(hidden)
            self._fresh = min(self._fresh + len(hidden), BUFFER_ROWS)
            if self._fresh < self.batch_size:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._learn, name="decodekit-online-learning", daemon=True)
                self._thread.start()
            self._ready.notify()

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until the steps every full batch of new rows bought are taken (for tests and measurements); False
        on ``timeout``."""
        with self._ready:
            idle = lambda: self.failed or (self._fresh < self.batch_size and not self._stepping)  # noqa: E731
            return self._ready.wait_for(idle, timeout)

    def _learn(self) -> None:
        while True:
            with self._ready:
                self._stepping = False
                self._ready.notify_all()  # wake wait(): the last batch is learned
                if not self._ready.wait_for(lambda: self._fresh >= self.batch_size, IDLE_SECONDS):
                    self._thread = None
                    return
                self._fresh -= self.batch_size
                self._stepping = True
                drawn = torch.randint(min(self._written, BUFFER_ROWS), (REPLAYS, self.batch_size), generator=self._draw)
                hidden, ahead = self._hidden[drawn], self._ahead[drawn]  # copies: add() may refill the slots
            try:
                for step in range(REPLAYS):
                    self._step(hidden[step], ahead[step])
                self.current = for_inference(copy.deepcopy(self.training), self.target)
            except Exception:  # learning is an extra: it must never take serving down with it
                log.exception("online learning failed; drafting goes on with the heads it has")
                with self._ready:
                    self.failed, self._thread, self._stepping = True, None, False
                    self._ready.notify_all()
                return

    def _step(self, hidden: torch.Tensor, ahead: torch.Tensor) -> None:
        """One optimiser step on rows (see :meth:`add`)."""
        labels = self.columns[ahead[:, 1:]]  # [B, depth]: the columns the heads should choose
        if not bool((labels >= 0).any()):
            return
        embedded = self.target.embed(ahead[:, :-1]).float().clone()  # out of inference mode: autograd takes it
        logits = head_logits(self.training, hidden.float().clone(), embedded, self.output, self.target.norm_eps)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.losses.append(loss.item())
