"""Pool connections the registration path keeps between requests.

asyncpg's pool spends ~19 µs of CPU on each acquire and release (a Task to shield every
release, a timeout context, an inactivity timer armed and cancelled, a proxy object):
16% of a registration's instructions (callgrind, 625k -> 528k). A registration is one
statement that leaves no session state behind, so its connection can go straight to the
next registration instead.

The connections stay the pool's: each is taken with ``pool.acquire()``; a call that
raises or is cancelled hands its connection back to the pool, which checks, resets or
closes it; so does every :data:`RECYCLE`-th call, so the pool's ``max_queries`` still
applies; and a connection the server has closed meanwhile goes back for a new one. At
most ``size`` are kept, so the pool always has connections for the other routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

P = ParamSpec("P")
T = TypeVar("T")

#: Every this many calls, the connection goes back through the pool (and is taken anew).
RECYCLE = 1_000


class KeptConnections:
    """Up to ``size`` connections of ``pool``, kept from one :meth:`run` to the next
    (``size`` 0: none kept, each call takes one from the pool and gives it back)."""

    def __init__(self, pool: asyncpg.Pool, size: int) -> None:
        self.pool = pool
        self.size = size
        # One slot per connection that may be kept: the connection, or None while it is
        # yet to be taken from the pool. Last in, first out, so that a quiet API keeps
        # only as many connections as registrations ran at once.
        self._slots: asyncio.LifoQueue[PoolConnectionProxy | None] = asyncio.LifoQueue()
        for _ in range(size):
            self._slots.put_nowait(None)
        self._calls = 0
        self._closed = False

    async def run(
        self,
        fn: Callable[Concatenate[PoolConnectionProxy, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(connection, *args, **kwargs)`` on a kept connection (or the pool's)."""
        if not self.size or self._closed:
            async with self.pool.acquire() as conn:
                return await fn(conn, *args, **kwargs)
        conn = await self._take()
        try:
            result = await fn(conn, *args, **kwargs)
        except BaseException:
            await self._give_back(conn)
            raise
        self._calls += 1
        if self._calls % RECYCLE == 0 or self._closed:
            await self._give_back(conn)
        else:
            self._slots.put_nowait(conn)
        return result

    async def _take(self) -> PoolConnectionProxy:
        slot = await self._slots.get()  # waits while all ``size`` are in use
        try:
            if slot is not None:
                if _open(slot):
                    return slot
                await self.pool.release(slot)  # the pool connects anew on the next acquire
            return await self.pool.acquire()
        except BaseException:
            self._slots.put_nowait(None)
            raise

    async def _give_back(self, conn: PoolConnectionProxy) -> None:
        try:
            await self.pool.release(conn)
        finally:
            self._slots.put_nowait(None)

    async def close(self) -> None:
        """Give the kept connections back (before the pool closes, which waits for them);
        calls still running give theirs back as they end."""
        self._closed = True
        kept = [self._slots.get_nowait() for _ in range(self._slots.qsize())]
        for _ in kept:
            self._slots.put_nowait(None)
        for conn in kept:
            if conn is not None:
                await self.pool.release(conn)


def _open(conn: PoolConnectionProxy) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # released: the pool took it back when it was closed
        return False
