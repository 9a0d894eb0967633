"""The APNs reference sender: aioapns.

The lean sender (:mod:`worker.senders.apns`) is the fast path; this one goes through
aioapns, selectable by a setting, as the reference. It sends the payload and headers
:func:`worker.render.render_apns` rendered (the same ones the lean path sends) and reads
every answer with :mod:`worker.senders.apns_codes`.

What aioapns (4.x) does and does not do, and what that means here:

- No request timeout: each send is wrapped in ``asyncio.wait_for``; a timeout is a
  ``RETRY`` outcome with reason ``TIMEOUT`` (the request may still be delivered late).
  Cancelling leaves the request's future in aioapns' table, and a late answer or a lost
  connection then raises ``InvalidStateError`` inside the protocol, which breaks the
  connection for every other request on it: the sender removes a timed-out request
  from that table.
- No response headers: no Retry-After reaches us (``retry_after`` is always None).
- Results, not exceptions, per status: ``NotificationResult(status, description,
  timestamp)``; connection failures raise (``MaxAttemptsExceeded`` after aioapns' own
  attempts, one second apart) and become ``RETRY`` outcomes ``SDK_<ExceptionName>``.
- It resends a request whose connection closed before the answer, on a new connection,
  by itself (up to ``max_connection_attempts``).
- Every non-200 is logged at ERROR unless the client has an ``err_func``.
- ``time_to_live`` is relative: the absolute ``apns-expiration`` rendered is turned into
  seconds from now, which aioapns turns back into the same timestamp.
- Its ``PushType`` lacks ``location`` and ``pushtotalk``: those are passed as a stand-in
  with the same ``.value`` (all aioapns reads of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import aioapns
import structlog
from aioapns.common import NotificationResult, PushType

from schemas import Platform
from worker.senders import apns_codes
from worker.senders.base import Message, Outcome, OutcomeKind
from worker.senders.breaker import guard_batch

log = structlog.get_logger(__name__)

TIMEOUT = Outcome(OutcomeKind.RETRY, "TIMEOUT")
_PUSH_TYPES = {p.value: p for p in PushType}


@dataclass(frozen=True, slots=True)
class _OtherPushType:
    """An ``apns-push-type`` aioapns' enum does not know; it only reads ``.value``."""

    value: str


class ApnsSdkSender:
    """APNs through aioapns: one outcome per token, in order."""

    platform: Platform = "ios"

    def __init__(
        self, client: aioapns.APNs, *, timeout_s: float = 10.0, concurrency: int = 1000
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client = client
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: The configuration error of the last batch, if it had one (for alerting).
        self.last_config_error: str | None = None

    async def send(self, tokens: Sequence[str], message: Message) -> list[Outcome]:
        payload: dict[str, Any] = json.loads(message.body)
        headers = dict(message.headers)
        self._in_flight += 1
        self._idle.clear()
        try:
            outcomes = await asyncio.gather(
                *(self._send_one(t, message, payload, headers) for t in tokens)
            )
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        guarded, config = guard_batch(list(outcomes), apns_codes.SUSPECT_TOKEN_REASONS)
        self.last_config_error = config
        if config is not None:
            log.warning("apns_config_error", sender="apns_sdk", reason=config, batch=len(tokens))
        return guarded

    async def _send_one(
        self, token: str, message: Message, payload: dict[str, Any], headers: dict[str, str]
    ) -> Outcome:
        async with self._slots:
            # Built once a slot is free: time_to_live is relative to now.
            request = notification_request(token, message, payload, headers)
            try:
                result: NotificationResult = await asyncio.wait_for(
                    self.client.send_notification(request), self.timeout_s
                )
            except TimeoutError:
                self._forget(request.notification_id)
                return TIMEOUT
            except Exception as exc:
                return Outcome(OutcomeKind.RETRY, f"SDK_{type(exc).__name__}")
        try:
            status = int(result.status)
        except (TypeError, ValueError):
            return Outcome(OutcomeKind.RETRY, "SDK_BAD_STATUS")
        timestamp = result.timestamp if isinstance(result.timestamp, int) else None
        return apns_codes.classify(status, result.description or "", timestamp_ms=timestamp)

    def _forget(self, notification_id: str) -> None:
        """Drop a timed-out (cancelled) request from aioapns' per-connection tables, so a
        late answer is ignored instead of breaking the connection (see the module doc)."""
        for connection in getattr(self.client.pool, "connections", ()):
            table = getattr(connection, "requests", None)
            if isinstance(table, dict):
                table.pop(notification_id, None)

    async def close(self) -> None:
        """Wait for batches in flight (at most ``timeout_s``), then close aioapns'
        connections (aioapns would resend a request whose connection closed under it)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
        pool = getattr(self.client, "pool", None)
        if pool is not None:
            pool.close()


def notification_request(
    token: str, message: Message, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> aioapns.NotificationRequest:
    """aioapns' request for ``token``: ``payload`` (``message.body`` decoded) and the
    rendered headers (``apns-topic``, push type, priority, collapse id, expiration)."""
    hdrs = dict(message.headers) if headers is None else headers
    push_type_value = hdrs.get("apns-push-type")
    push_type = None
    if push_type_value:
        push_type = _PUSH_TYPES.get(push_type_value) or cast(
            PushType, _OtherPushType(push_type_value)
        )
    priority = hdrs.get("apns-priority")
    expiration = hdrs.get("apns-expiration")
    return aioapns.NotificationRequest(
        device_token=token,
        message=payload,
        push_type=push_type,
        priority=int(priority) if priority else None,
        collapse_key=hdrs.get("apns-collapse-id"),
        time_to_live=int(expiration) - int(time.time()) if expiration else None,
        apns_topic=hdrs.get("apns-topic"),
    )


__all__ = ["TIMEOUT", "ApnsSdkSender", "notification_request"]
