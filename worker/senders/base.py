"""The contract every platform sender keeps: a batch of tokens in, one outcome per token out.

Bad tokens are data, not exceptions: a sender returns an :class:`Outcome` for every token
it was given, in the same order, and raises only for a setup error it finds at start-up.
What an outcome means for the rest of the pipeline:

=================  ===========================================================
``DELIVERED``      accepted by the platform; counts as sent, marks the token used
``INVALID_TOKEN``  the platform says the token is dead: publish an invalid-token
                   event (``invalid_since`` is APNs' 410 timestamp when given)
``RETRY``          may pass: send again after ``retry_after`` (the retry policy)
``QUOTA``          rate limited: send again after ``retry_after`` and slow down
``CONFIG_ERROR``   our credentials, sender id or environment are wrong: alert,
                   never blame or deactivate the token
``PERMANENT``      this message will never be accepted as sent (payload error):
                   count as failed, never retry, never blame the token
=================  ===========================================================
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, Protocol

from schemas import Payload, Platform
from worker.senders.exchange import H2Response, Replies

Priority = Literal["urgent", "normal", "low"]


class OutcomeKind(StrEnum):
    DELIVERED = "delivered"
    INVALID_TOKEN = "invalid_token"
    RETRY = "retry"
    QUOTA = "quota"
    CONFIG_ERROR = "config_error"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one token. ``reason`` is the platform's own code (for example
    ``UNREGISTERED`` or ``BadDeviceToken``), a low-cardinality metric label."""

    kind: OutcomeKind
    reason: str = ""
    retry_after: float | None = None
    invalid_since: datetime | None = None


DELIVERED = Outcome(OutcomeKind.DELIVERED)


def outcome_by_status(status: int, reason: str, retry_after: float | None) -> Outcome:
    """For an answer whose code we do not know: the HTTP status decides, and the token
    is never blamed (429 quota, 5xx retry, 401/403 our configuration, else permanent)."""
    reason = reason or f"HTTP_{status}"
    if status == 429:
        return Outcome(OutcomeKind.QUOTA, reason, retry_after)
    if status >= 500:
        return Outcome(OutcomeKind.RETRY, reason, retry_after)
    if status in (401, 403):
        return Outcome(OutcomeKind.CONFIG_ERROR, reason)
    return Outcome(OutcomeKind.PERMANENT, reason)


@dataclass(frozen=True, slots=True)
class Message:
    """One notification rendered for one platform, to be sent to many tokens.

    Rendered once per job (see :mod:`worker.render`). ``body`` is the request body; for
    FCM it holds :data:`TOKEN_SLOT` where each token goes (APNs puts the token in the
    path). ``headers`` are the platform headers that do not vary per token. ``source``
    is the job's payload, from which the SDK reference senders build their own objects.
    """

    source: Payload
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    priority: Priority = "normal"
    expires_at: datetime | None = None


# A byte string no JSON encoder produces, so it cannot collide with payload content.
TOKEN_SLOT = b"\x00TOKEN\x00"


class Sender(Protocol):
    """A platform sender. Implementations live one per module, chosen from a plain dict."""

    platform: Platform

    async def send(self, tokens: Sequence[str], message: Message) -> list[Outcome]:
        """Send ``message`` to every token; return one outcome per token, in order."""
        ...

    async def close(self) -> None:
        """Finish in-flight requests and close connections."""
        ...


def outcomes_of(replies: Replies, answered: Callable[[H2Response], Outcome]) -> list[Outcome]:
    """One outcome per request of a batch: 2xx delivered, another answer as ``answered``
    classifies it, no answer a retry named by the failure (``TIMEOUT``, ``GOAWAY``...)."""
    outcomes = [DELIVERED] * len(replies.status)
    for i, response in replies.answers.items():
        outcomes[i] = answered(response)
    for i, error in replies.errors.items():
        outcomes[i] = Outcome(OutcomeKind.RETRY, error.reason.split(" ", 1)[0])
    return outcomes


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """A response's Retry-After (delta-seconds or an HTTP date) as seconds from now."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())
