"""Liveness and readiness, each answered from state kept up to date in the background, so neither probe
ever waits on the database.

Liveness (/healthz): the event loop turns (a ticker measures how late it wakes up) and the encoder pool takes
work. Readiness (/readyz): the driver's own server monitoring (its heartbeats) knows a server that takes writes.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from .db import Database

TICK_SECONDS = 0.1
STALLED_LOOP_SECONDS = 5.0


class Health:
    def __init__(self, db: Database, encoders_usable: Callable[[], bool]) -> None:
        self.db = db
        self.encoders_usable = encoders_usable
        self.last_tick = time.monotonic()
        self.loop_lag = 0.0  # seconds the ticker woke up late, the last time
        self.ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.ticker = asyncio.create_task(self._tick(), name="health-ticker")

    async def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)
            self.last_tick = time.monotonic()
            self.loop_lag = max(0.0, self.last_tick - before - TICK_SECONDS)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        ticking = self.ticker is not None and not self.ticker.done() and time.monotonic() - self.last_tick < STALLED_LOOP_SECONDS
        encoders = self.encoders_usable()
        body = {
            "loop_lag_ms": round(self.loop_lag * 1000, 1),
            "event_loop": "ok" if ticking else "stalled",
            "encoders": "ok" if encoders else "unusable",
        }
        return ticking and encoders, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ready, error = self.db.server_state()
        body: dict[str, Any] = {"database": "ok" if ready else "unavailable"}
        if not ready:
            body["error"] = error
        return ready, body
