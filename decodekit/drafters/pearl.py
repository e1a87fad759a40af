"""PEARL: parallel speculative decoding with adaptive draft length (Liu et al., 2024). A draft model drafts on a
core of its own while the target verifies, so that neither waits for the other.

A worker thread (one per engine and draft model, on one torch thread) keeps each request's chain ahead of the
committed text: the draft model's greedy continuation of it, up to ``2 * max_nodes + 1`` tokens. While the target
verifies a draft, the worker goes on drafting past its end as if all of it were accepted (PEARL's post-verify);
when the step commits exactly the chain's first tokens (its bonus token included), the rest of the chain stays and
the next draft is ready. When the step disagrees, the chain starts over from the committed text and the next step
verifies no draft: the target computes the next token while the worker drafts from it (PEARL's pre-verify, which
there checks the first draft token while the rest is drafted). Draft lengths adapt by the draft model's own
chance of the chain: a draft ends where that chance falls below ``min_prob``, or at ``max_nodes`` tokens.

A draft is a function of the text alone (``propose`` waits for the worker when it is behind), so greedy and sampled
outputs are those of any deterministic draft: greedy output identical to ``ar``, sampled output exactly
distributed, a seeded request reproducible. The engine runs the target's forward on one thread fewer while a
request of this method is live (``Drafter.drafts_in_parallel``).

Memory: the draft model's weights (once per engine and path) and a KV cache per drafter over the sequence so far
plus its chain, in the target's dtype.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Annotated

import torch

from decodekit.drafters.options import ModelPath, Range, checked_options
from decodekit.drafters.trie import chain_draft
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, DraftModel, StepOutcome, TargetInfo

IDLE_SECONDS = 30.0  # the worker thread ends after this long with nothing to draft, and starts again on demand


class Chain:
    """One request's text and the draft model's greedy chain past it. Guarded by its worker's lock; the chain only
    ever grows by the worker (:meth:`extend`), and moves on or starts over by the drafter (:meth:`follow`)."""

    def __init__(self, model: DraftModel, ahead: int) -> None:
        self.model, self.ahead = model, ahead
        self.text = torch.empty(0, dtype=torch.int64)  # the committed sequence
        self.tokens: list[int] = []  # the draft model's greedy continuation of text
        self.probs: list[float] = []  # its probability of each of them, given all before
        self.epoch = 0  # counts restarts: a token drafted from an older text is dropped
        self.error: Exception | None = None
        self.busy = False  # the worker is running the model for it
        self.held = False  # the drafter is running the model itself (a prompt, in begin): the worker keeps off

    def restart(self, text: torch.Tensor) -> None:
        self.text = text.to(torch.int64).cpu().clone()
        self.tokens, self.probs = [], []
        self.epoch += 1
        self.error = None

    def agrees(self, committed: list[int]) -> bool | None:
        """Whether the chain begins with ``committed`` (with its first ``ahead`` tokens, when ``committed`` runs
        past what the chain may hold: a hybrid's step can commit other parts' tokens); None while the chain is too
        short to tell and agrees so far."""
        n = min(len(committed), self.ahead)
        if len(self.tokens) >= n and self.tokens[:n] == committed[:n]:
            return True
        return None if self.tokens == committed[: len(self.tokens)] and self.error is None else False

    def follow(self, committed: list[int], kept: bool) -> None:
        """Append ``committed`` to the text; keep the chain past it (``kept``: see :meth:`agrees`), else start
        over."""
        text = torch.cat([self.text, torch.tensor(committed, dtype=torch.int64)])
        if kept:
            self.text = text
            del self.tokens[: len(committed)], self.probs[: len(committed)]
        else:
            self.restart(text)

    def extend(self, epoch: int, token: int, prob: float) -> None:
        """Append a token the worker drafted from the text of ``epoch`` (dropped when the chain has restarted since:
        moving on keeps text + chain as they were, so a token drafted before that still fits)."""
        if epoch == self.epoch:
            self.tokens.append(token)
            self.probs.append(prob)

    @property
    def wants(self) -> bool:
        return not self.held and self.error is None and self.text.numel() > 0 and len(self.tokens) < self.ahead

    def ready(self, max_nodes: int, min_prob: float) -> int | None:
        """How many chain tokens the next draft takes, or None while the worker has yet to decide it: the longest
        prefix, at most ``max_nodes``, whose chance (the product of its probabilities) stays at least ``min_prob``."""
        chance = 1.0
        for n, prob in enumerate(self.probs[:max_nodes]):
            chance *= prob
            if chance < min_prob:
                return n
        return max_nodes if len(self.probs) >= max_nodes else None


class Worker:
    """The thread that drafts for every :class:`Chain` of one engine and draft model, the shortest chain first."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.chains: weakref.WeakSet[Chain] = weakref.WeakSet()  # a chain lives as long as its drafter
        self.thread: threading.Thread | None = None
        self.stopped = False
        atexit.register(self.stop)  # a thread left inside a forward while the interpreter ends would abort it

    def stop(self) -> None:
        """End the thread after its current forward, for good."""
        with self.lock:
            self.stopped, thread = True, self.thread
            self.lock.notify_all()
        if thread is not None:
            thread.join()

    def add(self, chain: Chain) -> None:
        with self.lock:
            self.chains.add(chain)
            self.wake()

    def wake(self) -> None:
        """Tell the thread there is work, starting it if it has ended (call with the lock held)."""
        if self.thread is None and not self.stopped:
            self.thread = threading.Thread(target=self._run, name="decodekit-pearl", daemon=True)
            self.thread.start()
        self.lock.notify_all()

    def _run(self) -> None:
        torch.set_num_threads(1)  # this thread's own setting: the engine leaves it one core
        while True:
            with self.lock:
                if self.stopped:
                    self.thread = None
                    return
                chain = min((c for c in self.chains if c.wants), key=lambda c: len(c.tokens), default=None)
                if chain is None:
                    if not self.lock.wait(IDLE_SECONDS):
                        self.thread = None
                        return
                    continue
                context = torch.cat([chain.text, torch.tensor(chain.tokens, dtype=torch.int64)])
                epoch, chain.busy = chain.epoch, True
            try:
                probs = torch.softmax(chain.model.logits(context).float(), dim=-1)
                prob, token = probs.max(dim=-1)
            except Exception as err:  # fails this chain's requests only (propose raises it), until it restarts
                with self.lock:
                    chain.error, chain.busy = err, False
                    self.lock.notify_all()
                continue
            with self.lock:
                chain.extend(epoch, int(token), float(prob))
                chain.busy = False
                self.lock.notify_all()


@checked_options
class Pearl(Drafter):
    """Method ``pearl``: ``model`` (a checkpoint directory or a .gguf file with the target's tokenizer) drafts on a
    thread of its own; each step verifies up to ``max_nodes`` tokens of its greedy chain, as long as the draft model's
    chance of them is at least ``min_prob``."""

    wants_step_logits = False
    drafts_in_parallel = True

    def __init__(
        self,
        target: TargetInfo,
        model: Annotated[str, ModelPath()] = "",
        max_nodes: Annotated[int, Range(1, 32)] = 4,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.0,
    ) -> None:
        if not model:
            raise InvalidParameter("method pearl needs a draft model: pearl:model=PATH (a checkpoint or a .gguf)")
        if target.model is None:
            raise InvalidParameter("method pearl runs a model: build it through an Engine")
        self.max_nodes, self.min_prob = max_nodes, min_prob
        self.chain = Chain(target.model.checkpoint(model), 2 * max_nodes + 1)
        self.worker: Worker = target.model.shared(("pearl", model), Worker)
        self.worker.add(self.chain)
        self.pre_verify = True  # the next step verifies no draft: the chain has just started over

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        """Start over from ``prompt``, which the draft model scores here, on every thread the engine has (its
        cache then holds the prompt, and the worker's first forward is one token)."""
        chain, lock = self.chain, self.worker.lock
        with lock:
            chain.restart(prompt)
            chain.held = True
            while chain.busy:  # a forward from the last request's text
                lock.wait()
        error = None
        try:
            chain.model.logits(prompt)
        except Exception as err:  # propose raises it
            error = err
        with lock:
            chain.held, chain.error = False, error
            self.worker.wake()
        self.pre_verify = True

    def propose(self, sequence: torch.Tensor) -> Draft:
        chain, root = self.chain, int(sequence[-1])
        if chain.text.numel() != sequence.numel() or int(chain.text[-1]) != root:
            self.begin(sequence, None)  # a text this drafter did not follow (a drafter reused without begin)
        if self.pre_verify:
            self.pre_verify = False
            return chain_draft(root, [])
        with self.worker.lock:
            while (n := chain.ready(self.max_nodes, self.min_prob)) is None and chain.error is None:
                self.worker.wake()
                self.worker.lock.wait()
            if chain.error is not None:
                raise chain.error
            return chain_draft(root, chain.tokens[:n])

    def observe(self, outcome: StepOutcome) -> None:
        """Move the chain on with the text, or start it over. Whether it is kept must not depend on how far the
        worker got (the next draft would): a drafted step waits until the chain is long enough to tell."""
        chain, committed = self.chain, outcome.committed
        with self.worker.lock:
            while (kept := chain.agrees(committed)) is None and outcome.drafted:
                self.worker.wake()
                self.worker.lock.wait()
            chain.follow(committed, bool(kept))
            self.worker.wake()
        self.pre_verify = not kept

    def end(self) -> None:
        """Drop the chain: the worker drafts no further past an answer that has ended."""
        with self.worker.lock:
            self.chain.restart(torch.empty(0, dtype=torch.int64))

    def memory_bytes(self) -> int:
        return self.chain.model.memory_bytes()
