"""Pacing of sends: a rate limit per platform service, and a pause after an outage.

Both are per worker process. A project's FCM quota is shared by all its workers, so
``fcm_per_minute`` is the quota divided by the number of workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket: ``per_minute`` sends, in bursts of at most one second's worth.

    ``per_minute`` 0 means no limit. Waiters are served in arrival order, so a big
    chunk cannot be starved by small ones.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.clock = clock
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` sends may start (a request over the burst size borrows ahead)."""
        if self.rate <= 0:
            return
        async with self._lock:
            now = self.clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                # Sleeping inside the lock keeps arrival order: later callers wait behind.
                await asyncio.sleep(-self._tokens / self.rate)


class PlatformGate:
    """Closed for a while after a platform failed a whole chunk past the retry budget.

    While closed, that platform's tokens are parked on the retry topic without being
    sent: an outage of one platform never stalls the worker or the other platform.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until = float("-inf")
        self.reason = ""

    def close_for(self, seconds: float, reason: str) -> None:
        self._until = max(self._until, self.clock() + seconds)
        self.reason = reason

    @property
    def remaining(self) -> float:
        """Seconds until it opens again; 0 when open."""
        return max(0.0, self._until - self.clock())
