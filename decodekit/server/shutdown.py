"""Graceful shutdown: uvicorn's server, drained on SIGTERM or SIGINT before it stops listening."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from types import FrameType

import uvicorn

log = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM or SIGINT, awaits ``drain()`` while still listening (the app refuses new work with
    503 meanwhile), then stops as uvicorn does; a second signal stops at once. The signal is handled, not recorded,
    so uvicorn (>= 0.29) does not raise it again after shutdown: a drained server returns normally (status 0)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[object]]) -> None:
        super().__init__(config)
        self.drain = drain
        self.draining: Future | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining is None:  # Python runs this on the loop's thread, perhaps inside a callback: hand it over
            log.info("Draining requests before shutting down (send the signal again to force quit)")
            self.draining = asyncio.run_coroutine_threadsafe(self._drain_then_exit(), asyncio.get_running_loop())
        else:
            self.should_exit = self.force_exit = True

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain()
        finally:
            self.should_exit = True
