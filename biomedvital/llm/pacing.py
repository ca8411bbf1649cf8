"""Pacing: token buckets that keep a run under a provider's per-minute limits."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Allows ``rate_per_minute`` units a minute on average, in bursts up to ``capacity``.

    ``rate_per_minute=None`` disables pacing. A request larger than the capacity waits for a full
    bucket and then goes (otherwise it could never go).
    """

    def __init__(self, rate_per_minute: float | None, capacity: float | None = None) -> None:
        if rate_per_minute is not None and rate_per_minute <= 0:
            raise ValueError(f"rate per minute must be > 0, got {rate_per_minute}")
        self.rate = None if rate_per_minute is None else rate_per_minute / 60.0
        self.capacity = capacity if capacity is not None else (rate_per_minute or 0.0)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, amount: float = 1.0) -> None:
        """Wait until ``amount`` units are available, then take them."""
        if self.rate is None:
            return
        amount = min(amount, self.capacity)
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)
