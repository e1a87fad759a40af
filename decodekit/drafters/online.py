"""Online speculative decoding (OSD; Liu et al., 2024): a trained drafter keeps learning from the traffic it drafts
for, so acceptance rises on the traffic's own distribution.

Every request's drafter turns what verification committed into training units (heads: :class:`TrafficRows`, the
target's hidden state at a position and the tokens after it; ``eagle``: the accepted path's features and tokens,
a sequence per request) and hands them to the one :class:`OnlineLearner` its engine shares for that file and rate
(``ModelAccess.shared``). The learner takes optimiser steps in a background thread, off the request path, on
units drawn from a buffer of the newest ones, and after each batch of steps publishes a frozen copy of the part
that drafters pick up (heads at their next ``propose``, ``eagle`` at its next request, its cache being the
layer's own).

Learning never changes what is generated: the part only chooses what is drafted, and verification keeps exactly
the tokens the target would have produced (greedy output equals ``ar``; sampled output follows the target, the
drafts being deterministic). A step that fails stops the learning, never the serving: drafting goes on with the
last published part.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F

from decodekit.drafters.eagle import EagleLayer, eagle_loss
from decodekit.drafters.heads import TrainedHeads, TrainedPart, for_inference, head_logits, read_trained
from decodekit.protocol import ModelAccess

MAX_LOSSES = 100_000
REPLAYS = 4  # steps per batch of new units
LEARNING_SHARE = 0.25  # of the wall time, at most, the learning thread spends stepping (on one core)
IDLE_SECONDS = 30.0  # the learning thread ends after this long without a full batch; the next units start another
P = TypeVar("P", bound=TrainedPart)
log = logging.getLogger("decodekit")


class Objective:
    """What a part learns from units of traffic, ``batch_size`` units a step from the newest ``buffer_size``, over
    the part's tokens ``vocab``: ``columns`` int64 ``[V]`` (a token's column, -100 for none) and ``output``
    (:meth:`ModelAccess.output_map` over them)."""

    batch_size: ClassVar[int]
    buffer_size: ClassVar[int]

    def __init__(self, vocab: torch.Tensor, target: ModelAccess) -> None:
        self.target = target
        self.columns = torch.full((target.vocab_size,), -100, dtype=torch.int64)
        self.columns[vocab] = torch.arange(len(vocab))
        self.output = target.output_map(vocab)

    def loss(self, part: TrainedPart, units: list) -> torch.Tensor | None:
        """The part's training loss on ``units`` (differentiable in its weights); None when they teach nothing."""
        raise NotImplementedError


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

    def step(self, hidden: torch.Tensor | None, committed: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Add a step: ``hidden [m, H]`` the states at the root and the accepted drafts (None where the step gave
        none of ours), ``committed`` its tokens. Returns the rows now ready: ``(hidden [H], ahead int64
        [depth + 1])`` each."""
        base = len(self.tokens) - 1
        if hidden is not None:
            self.pending += [(base + i, state) for i, state in enumerate(hidden)]
        self.tokens += committed
        last = len(self.tokens) - self.depth - 2  # the last index whose tokens ahead are all known
        ready = [
            (state, torch.tensor(self.tokens[at + 1 : at + self.depth + 2])) for at, state in self.pending if at <= last
        ]
        self.pending = self.pending[len(ready) :]
        return ready


class HeadsObjective(Objective):
    """Heads learn rows ``(hidden [H], ahead [depth + 1])`` as ``decodekit train`` teaches them: cross-entropy of
    each head's guess of its token."""

    batch_size, buffer_size = 64, 4096

    def loss(self, part: TrainedHeads, units: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        hidden, ahead = torch.stack([h for h, _ in units]).float(), torch.stack([a for _, a in units])
        labels = self.columns[ahead[:, 1:]]  # [B, depth]: the columns the heads should choose
        if not bool((labels >= 0).any()):
            return None
        embedded = self.target.embed(ahead[:, :-1]).float().clone()  # out of inference mode: autograd takes it
        logits = head_logits(part, hidden, embedded, self.output, self.target.norm_eps)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


class OnlineLearner(Generic[P]):
    """Trains ``part`` (float32, as :func:`read_trained` gives it with its ``vocab`` and ``accept``; this learner's
    own) at learning rate ``rate`` by ``objective`` on the units drafters :meth:`add`, in a background thread;
    :attr:`current` is the latest frozen copy for drafting. Every ``objective.batch_size`` new units buy ``REPLAYS``
    steps, each on that many units drawn from the newest ``objective.buffer_size``. The thread runs torch on one
    core and rests between batches, so that it steps ``LEARNING_SHARE`` of the time at most: decoding keeps the
    machine."""

    def __init__(
        self, part: P, vocab: torch.Tensor, accept: torch.Tensor, target: ModelAccess, rate: float, objective: Objective
    ) -> None:
        self.training, self.vocab, self.accept = part.train(), vocab, accept
        self.target, self.objective, self.batch_size = target, objective, objective.batch_size
        self.optimizer = torch.optim.AdamW(part.parameters(), lr=rate, weight_decay=0.0)
        self.current = for_inference(copy.deepcopy(part), target)
        self.steps, self.failed = 0, False
        self.losses: deque[float] = deque(maxlen=MAX_LOSSES)  # the last steps' training losses
        self.buffer: deque = deque(maxlen=objective.buffer_size)
        self._fresh = 0  # units added since the last batch was taken (at most a buffer's worth)
        self._stepping = False
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draw = torch.Generator().manual_seed(0)

    def add(self, units: list) -> None:
        """Add units of traffic (as the objective takes them)."""
        with self._ready:
            if self.failed or not units:
                return
            self.buffer.extend(units)
            self._fresh = min(self._fresh + len(units), len(self.buffer))
            if self._fresh < self.batch_size:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._learn, name="decodekit-online-learning", daemon=True)
                self._thread.start()
            self._ready.notify()

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until the steps every full batch of new units bought are taken (for tests and measurements); False
        on ``timeout``."""
        with self._ready:
            idle = lambda: self.failed or (self._fresh < self.batch_size and not self._stepping)  # noqa: E731
            return self._ready.wait_for(idle, timeout)

    def _learn(self) -> None:
        torch.set_num_threads(1)  # this thread's own setting: decoding keeps its threads
        pause = 0.0
        while True:
            time.sleep(pause)
            with self._ready:
                self._stepping = False
                self._ready.notify_all()  # wake wait(): the last batch is learned
                if not self._ready.wait_for(lambda: self._fresh >= self.batch_size, IDLE_SECONDS):
                    self._thread = None
                    return
                self._fresh -= self.batch_size
                self._stepping = True
                drawn = torch.randint(len(self.buffer), (REPLAYS, self.batch_size), generator=self._draw).tolist()
                batches = [[self.buffer[i] for i in rows] for rows in drawn]  # add() may push these out meanwhile
            start = time.perf_counter()
            try:
                for units in batches:
                    self._step(units)
                self.current = for_inference(copy.deepcopy(self.training), self.target)
            except Exception:  # learning is an extra: it must never take serving down with it
                log.exception("online learning failed; drafting goes on with the part it has")
                with self._ready:
                    self.failed, self._thread, self._stepping = True, None, False
                    self._ready.notify_all()
                return
            pause = (time.perf_counter() - start) * (1 / LEARNING_SHARE - 1)

    def _step(self, units: list) -> None:
        loss = self.objective.loss(self.training, units)
        if loss is None:
            return
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.losses.append(loss.item())


class EagleObjective(Objective):
    """``eagle`` learns sequences ``(features [n, H] at unit RMS, tokens int64 [n - 1])``: a request's slots and the
    token after each, as ``decodekit train eagle`` teaches it (:func:`decodekit.drafters.eagle.eagle_loss`)."""

    batch_size, buffer_size = 2, 64

    def loss(self, part: EagleLayer, units: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        sequences = [(features, tokens, self.target.embed(tokens).float().clone()) for features, tokens in units]
        return eagle_loss(part, sequences, self.output, self.columns)


def learner(
    target: ModelAccess,
    path: Path,
    cls: type[P],
    rate: float,
    objective: type[Objective],
) -> OnlineLearner:
    """The learner of the ``cls`` part in ``path`` at ``rate`` that every drafter of ``target``'s engine shares
    (built on first use; ``objective(vocab, target)`` says what it learns)."""

    def make() -> OnlineLearner:
        part, vocab, accept = read_trained(path, cls, target)
        return OnlineLearner(part, vocab, accept, target, rate, objective(vocab, target))

    return target.shared(("online", cls.kind, str(path.resolve()), rate), make)
