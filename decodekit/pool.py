"""Idle drafters kept between requests, bounded in bytes."""

from __future__ import annotations

from dataclasses import dataclass

from decodekit.protocol import Drafter

MAX_IDLE = 64  # idle drafters kept at most, whatever their size
POOL_BYTES = 256 * 2**20  # the default bound on their bytes


@dataclass
class _Idle:
    spec: str
    drafter: Drafter
    nbytes: int


class DrafterPool:
    """Idle drafters by method spec, so that what a drafter learnt (Token Recycling's matrix, say) carries over to
    a later request of the same spec. Holds at most ``max_bytes`` (as the drafters report them when they come
    back) and ``MAX_IDLE`` drafters; the least recently returned are dropped first, and a drafter larger than
    ``max_bytes`` is not kept at all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._idle: list[_Idle] = []  # least recently returned first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, spec: str) -> Drafter | None:
        """The most recently returned idle drafter of ``spec``, or None."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i].spec == spec:
                idle = self._idle.pop(i)
                self.nbytes -= idle.nbytes
                return idle.drafter
        return None

    def give(self, spec: str, drafter: Drafter) -> None:
        """Keep ``drafter`` of ``spec`` idle, dropping the oldest ones past the bounds."""
        self._idle.append(_Idle(spec, drafter, drafter.memory_bytes()))
        self.nbytes += self._idle[-1].nbytes
        while self._idle and (self.nbytes > self.max_bytes or len(self._idle) > MAX_IDLE):
            self.nbytes -= self._idle.pop(0).nbytes
