"""Stopping long-running commands on SIGINT and SIGTERM, from the running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal


def stop_on_signals() -> asyncio.Event:
    """An event SIGINT or SIGTERM sets (installed on the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_stop_signal() -> None:
    """Return once SIGINT or SIGTERM arrives; the handlers are removed again."""
    try:
        await stop_on_signals().wait()
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
