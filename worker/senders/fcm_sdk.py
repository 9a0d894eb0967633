"""The FCM reference sender: firebase-admin's ``send_each_for_multicast_async``.

The lean sender (:mod:`worker.senders.fcm`) is the fast path; this one goes through
Google's own client, selectable by a setting, as the reference its answers are checked
against. It builds a :class:`messaging.MulticastMessage` from the job's payload
(``Message.source``) with the mapping :func:`worker.render.render_fcm` uses, so both paths
send the same message, and reads every answer with :mod:`worker.senders.fcm_codes`.

What firebase-admin (7.x) does by itself, and what that means here:

- A multicast call fires all of its messages at once (up to 500, FCM's limit per call):
  tokens go in chunks of ``min(500, concurrency)``, one chunk after another.
- The async client retries HTTP 500 and 503 by itself, up to 4 times (backoff 0.5 s
  doubling: about 7 s in all; Retry-After ignored); it does not retry 429 or connection
  errors. The retry policy must count those attempts in rather than multiply them: give
  it ``sdk_attempts=`` :attr:`FcmSdkSender.SDK_ATTEMPTS`.
- Retry-After reaches us only on ``exc.http_response.headers``.
- A dropped connection or GOAWAY surfaces as ``UnknownError`` (retryable here);
  connection refused as ``UnavailableError``; a timeout as ``DeadlineExceededError``.
- Some failures raise out of the whole call instead of one response (a credential that
  cannot be refreshed after a 401, for one). Every token of that chunk then gets a
  ``RETRY`` outcome with reason ``SDK_<ExceptionName>``. Beware: the other requests of
  the chunk were already in flight and may have been delivered (``asyncio.gather``
  keeps them running), so a retry can deliver those twice. A ``ValueError`` out of the
  SDK's own message validation is deterministic: ``PERMANENT``, ``SDK_ValueError``.
- Its httpx client is bound to the event loop that first used it: one app per loop.
  Its request timeout is the app's ``httpTimeout`` option (default 120 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import firebase_admin
import structlog
from firebase_admin import exceptions, messaging

from schemas import Platform
from worker.render import seconds_left
from worker.senders import fcm_codes
from worker.senders.base import DELIVERED, Message, Outcome, OutcomeKind, retry_after_seconds
from worker.senders.breaker import guard_batch

log = structlog.get_logger(__name__)

MAX_MULTICAST = 500  # FCM's (and firebase-admin's) limit of messages per multicast call
CLOSE_GRACE_S = 10.0  # how long close() waits for batches in flight

# firebase-admin's exception classes -> FCM code, for errors without an FCM JSON body
# (the most specific classes first: each subclasses a canonical error class).
_EXCEPTION_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (messaging.UnregisteredError, "UNREGISTERED"),
    (messaging.SenderIdMismatchError, "SENDER_ID_MISMATCH"),
    (messaging.QuotaExceededError, "QUOTA_EXCEEDED"),
    (messaging.ThirdPartyAuthError, "THIRD_PARTY_AUTH_ERROR"),
    (exceptions.InvalidArgumentError, "INVALID_ARGUMENT"),
    (exceptions.UnavailableError, "UNAVAILABLE"),
    (exceptions.InternalError, "INTERNAL"),
    (exceptions.DeadlineExceededError, "DEADLINE_EXCEEDED"),
    # GOAWAY and dropped connections arrive as UnknownError: retryable.
    (exceptions.UnknownError, "UNKNOWN"),
)


class FcmSdkSender:
    """FCM through firebase-admin: one outcome per token, in order."""

    platform: Platform = "android"

    #: Attempts firebase-admin makes per request on 500/503 (1 + its 4 retries): pass as
    #: ``RetryPolicy(sdk_attempts=FcmSdkSender.SDK_ATTEMPTS)``.
    SDK_ATTEMPTS = 5

    def __init__(self, app: firebase_admin.App, *, concurrency: int = 500) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.app = app
        self.chunk_size = min(MAX_MULTICAST, concurrency)
        #: The configuration error of the last batch, if it had one (for alerting).
        self.last_config_error: str | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def send(self, tokens: Sequence[str], message: Message) -> list[Outcome]:
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._send(tokens, message)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _send(self, tokens: Sequence[str], message: Message) -> list[Outcome]:
        outcomes: list[Outcome] = [DELIVERED] * len(tokens)
        # An empty token makes the SDK reject the whole call: it is malformed, so answer
        # it here as FCM would, and send the others.
        malformed = Outcome(OutcomeKind.INVALID_TOKEN, fcm_codes.MALFORMED_TOKEN_REASON)
        sendable: list[int] = []
        for i, token in enumerate(tokens):
            if token:
                sendable.append(i)
            else:
                outcomes[i] = malformed
        for start in range(0, len(sendable), self.chunk_size):
            chunk = sendable[start : start + self.chunk_size]
            results = await self._send_chunk([tokens[i] for i in chunk], message)
            for i, outcome in zip(chunk, results, strict=True):
                outcomes[i] = outcome
        guarded, config = guard_batch(outcomes, fcm_codes.SUSPECT_TOKEN_CODES)
        self.last_config_error = config
        if config is not None:
            log.warning("fcm_config_error", sender="fcm_sdk", reason=config, batch=len(tokens))
        return guarded

    async def _send_chunk(self, tokens: list[str], message: Message) -> list[Outcome]:
        try:
            multicast = multicast_message(tokens, message)
            batch = await messaging.send_each_for_multicast_async(multicast, app=self.app)
        except ValueError as exc:  # the SDK's own validation: this will never pass
            log.warning("fcm_sdk_call_failed", error=type(exc).__name__, detail=str(exc))
            return [Outcome(OutcomeKind.PERMANENT, "SDK_ValueError")] * len(tokens)
        except Exception as exc:  # the whole call failed: see the module doc
            log.warning("fcm_sdk_call_failed", error=type(exc).__name__, detail=str(exc))
            return [Outcome(OutcomeKind.RETRY, f"SDK_{type(exc).__name__}")] * len(tokens)
        responses = list(batch.responses)
        if len(responses) != len(tokens):  # never seen; do not guess which is which
            return [Outcome(OutcomeKind.RETRY, "SDK_RESPONSE_COUNT")] * len(tokens)
        return [
            DELIVERED if r.exception is None else classify_exception(r.exception) for r in responses
        ]

    async def close(self) -> None:
        """Wait for batches in flight (at most :data:`CLOSE_GRACE_S`), then close the app's
        messaging HTTP client: the app cannot send through messaging afterwards."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), CLOSE_GRACE_S)
        try:
            service = messaging._get_messaging_service(self.app)
        except ValueError:  # a deleted app, or one without a project id
            return
        client = getattr(service, "_async_client", None)
        if client is not None:
            await client.aclose()


def multicast_message(
    tokens: Sequence[str], message: Message, *, now: datetime | None = None
) -> Any:
    """The ``messaging.MulticastMessage`` for ``tokens``, mapped as ``render_fcm`` maps.

    ``android.ttl`` is the payload's, else the seconds left until ``message.expires_at``
    from ``now`` (default: the time of sending, so a retry sends a shorter ttl).
    """
    p = message.source
    title, body, image = p.title or None, p.body or None, p.image or None
    notification = (
        messaging.Notification(title=title, body=body, image=image)
        if title or body or image
        else None
    )
    opts = p.android
    priority = (opts.priority if opts and opts.priority else None) or (
        "high" if message.priority == "urgent" else None
    )
    ttl = opts.ttl if opts and opts.ttl is not None else seconds_left(message.expires_at, now)
    collapse_key = opts.collapse_key if opts and opts.collapse_key else None
    channel_id = opts.channel_id if opts and opts.channel_id else None
    android = None
    if priority or collapse_key or ttl is not None or channel_id:
        android = messaging.AndroidConfig(
            priority=priority,
            collapse_key=collapse_key,
            ttl=ttl,
            notification=(
                messaging.AndroidNotification(channel_id=channel_id) if channel_id else None
            ),
        )
    with warnings.catch_warnings():
        # 7.x deprecates tokens= for fids=, but ours are registration tokens, sent as
        # message.token like the lean path (an FCM registration token is not an FID).
        warnings.simplefilter("ignore", DeprecationWarning)
        return messaging.MulticastMessage(
            tokens=list(tokens),
            data=dict(p.data) or None,
            notification=notification,
            android=android,
        )


def classify_exception(exc: BaseException) -> Outcome:
    """The outcome of one ``SendResponse.exception``.

    With an HTTP answer, its JSON error body is read as the lean sender reads it
    (``details[].errorCode``, else ``error.status``; field violations; Retry-After);
    without one (connection errors, timeouts), firebase-admin's exception class decides.
    """
    response = getattr(exc, "http_response", None)
    if response is not None:
        status = int(getattr(response, "status_code", 0) or 0)
        body = _json_body(response)
        if status:
            return fcm_codes.classify_response(status, body, _retry_after(response))
    code = next((c for cls, c in _EXCEPTION_CODES if isinstance(exc, cls)), None)
    if code is None:
        code = str(getattr(exc, "code", "") or "UNKNOWN")
    return fcm_codes.classify(code, message=str(exc))


def _json_body(response: Any) -> object:
    try:
        return json.loads(response.content)
    except (ValueError, TypeError, AttributeError):
        return None


def _retry_after(response: Any) -> float | None:
    return retry_after_seconds(getattr(response, "headers", None))


__all__ = ["MAX_MULTICAST", "FcmSdkSender", "classify_exception", "multicast_message"]
