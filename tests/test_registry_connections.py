"""Connections kept between registrations: reused, bounded, and always the pool's again
when anything goes wrong or the API stops."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

from registry import connections
from registry.connections import KeptConnections


async def _backend(conn: PoolConnectionProxy) -> int:
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    assert isinstance(pid, int)
    return pid


async def test_one_connection_serves_call_after_call(db: asyncpg.Pool) -> None:
    kept = KeptConnections(db, 3)
    try:
        pids = {await kept.run(_backend) for _ in range(5)}
    finally:
        await kept.close()
    assert len(pids) == 1


async def test_no_more_than_size_run_at_once(db: asyncpg.Pool) -> None:
    kept = KeptConnections(db, 2)
    running, most = 0, 0
    two = asyncio.Event()  # the first two calls wait for each other, so both are in use

    async def call(conn: PoolConnectionProxy) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 2:
            two.set()
        await two.wait()
        pid = await _backend(conn)
        running -= 1
        return pid

    try:
        pids = await asyncio.gather(*(kept.run(call) for _ in range(12)))
    finally:
        await kept.close()
    assert most == 2
    assert len(set(pids)) == 2


async def test_close_gives_every_connection_back(db: asyncpg.Pool) -> None:
    kept = KeptConnections(db, 4)
    await asyncio.gather(*(kept.run(_backend) for _ in range(8)))
    assert db.get_idle_size() < db.get_size()

    await kept.close()

    assert db.get_idle_size() == db.get_size()
    await kept.run(_backend)  # still answers, through the pool
    assert db.get_idle_size() == db.get_size()


async def test_a_failed_call_gives_its_connection_back(db: asyncpg.Pool) -> None:
    kept = KeptConnections(db, 2)

    async def fail(conn: PoolConnectionProxy) -> None:
        await conn.execute("SELECT 1/0")

    try:
        idle = db.get_idle_size()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await kept.run(fail)
        assert db.get_idle_size() == idle
        await kept.run(_backend)  # the slot it had is free again
    finally:
        await kept.close()


async def test_a_connection_closed_by_the_server_is_replaced(db: asyncpg.Pool) -> None:
    kept = KeptConnections(db, 1)
    first: list[PoolConnectionProxy] = []

    async def remember(conn: PoolConnectionProxy) -> int:
        first.append(conn)
        return await _backend(conn)

    try:
        pid = await kept.run(remember)
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):  # until the client has read the server's goodbye
            try:
                if first[0].is_closed():
                    break
            except asyncpg.InterfaceError:  # closed, and handed back to the pool already
                break
            await asyncio.sleep(0.01)

        assert await kept.run(_backend) != pid
    finally:
        await kept.close()


async def test_every_recycle_th_call_goes_back_through_the_pool(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "RECYCLE", 2)
    kept = KeptConnections(db, 1)
    try:
        idle = db.get_idle_size()
        await kept.run(_backend)
        after_first = db.get_idle_size()
        await kept.run(_backend)
        assert (after_first, db.get_idle_size()) == (idle - 1, idle)
    finally:
        await kept.close()


async def test_size_zero_keeps_nothing(db: asyncpg.Pool) -> None:
    kept = KeptConnections(db, 0)
    idle = db.get_idle_size()
    await kept.run(_backend)
    assert db.get_idle_size() == idle
