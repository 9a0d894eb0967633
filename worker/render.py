"""Render stage: a job's payload becomes one request body per platform, once per job.

Sending then only splices each token into the FCM body (:func:`fcm_body`) or the APNs
path; nothing is encoded per token. The mappings follow the platforms' documented
formats: FCM HTTP v1 ``projects.messages`` and APNs' ``aps`` dictionary with headers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from schemas import NotificationJob
from worker.senders.base import TOKEN_SLOT, Message

# Placeholder that survives JSON encoding unchanged; swapped for TOKEN_SLOT afterwards.
_SLOT_TEXT = "\u0000PUSHFAN_TOKEN\u0000"
_SLOT_JSON = json.dumps(_SLOT_TEXT).encode()  # with its quotes and \u0000 escapes


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def render_fcm(job: NotificationJob, *, now: datetime | None = None) -> Message:
    """The FCM v1 ``messages:send`` body for ``job``, with :data:`TOKEN_SLOT` for the token.

    ``android.ttl`` is the job's Android ttl, else the time left until ``expires_at``
    (so a notification is not shown after the job expired), measured from ``now``.
    """
    p = job.payload
    message: dict[str, Any] = {"token": _SLOT_TEXT}
    notification = {
        k: v for k, v in (("title", p.title), ("body", p.body), ("image", p.image)) if v
    }
    if notification:
        message["notification"] = notification
    if p.data:
        message["data"] = dict(p.data)
    android: dict[str, Any] = {}
    opts = p.android
    priority = (opts.priority if opts and opts.priority else None) or (
        "high" if job.priority == "urgent" else None
    )
    if priority:
        android["priority"] = priority.upper()
    if opts and opts.collapse_key:
        android["collapse_key"] = opts.collapse_key
    ttl = opts.ttl if opts and opts.ttl is not None else seconds_left(job.expires_at, now)
    if ttl is not None:
        android["ttl"] = f"{ttl}s"
    if opts and opts.channel_id:
        android["notification"] = {"channel_id": opts.channel_id}
    if android:
        message["android"] = android
    # "token" is the first key, so the first placeholder is the slot even if the payload
    # happens to contain the placeholder text too.
    body = _compact({"message": message}).replace(_SLOT_JSON, b'"' + TOKEN_SLOT + b'"', 1)
    return Message(
        source=p,
        body=body,
        headers=(("content-type", "application/json; charset=UTF-8"),),
        priority=job.priority,
        expires_at=job.expires_at,
    )


def fcm_body(message: Message, token: str) -> bytes:
    """``message``'s FCM body with ``token`` in its slot (tokens are JSON-safe ASCII).

    The slot holds raw NUL bytes, which JSON-encoded content never contains, so it is the
    only occurrence."""
    return message.body.replace(TOKEN_SLOT, token.encode(), 1)


def fcm_bodies(message: Message, tokens: Sequence[str]) -> list[bytes]:
    """:func:`fcm_body` for each of ``tokens``: the body is cut at its slot once."""
    head, _, tail = message.body.partition(TOKEN_SLOT)
    return [b"".join((head, t.encode(), tail)) for t in tokens]


def render_apns(job: NotificationJob, *, topic: str) -> Message:
    """The APNs payload and headers for ``job`` (the token goes in the path)."""
    p = job.payload
    opts = p.apns
    push_type = opts.push_type if opts else "alert"
    aps: dict[str, Any] = {}
    alert = {k: v for k, v in (("title", p.title), ("body", p.body)) if v}
    if alert and push_type != "background":
        aps["alert"] = alert
    if opts:
        for key, value in (
            ("sound", opts.sound),
            ("badge", opts.badge),
            ("thread-id", opts.thread_id),
            ("category", opts.category),
            ("interruption-level", opts.interruption_level),
        ):
            if value is not None:
                aps[key] = value
    if push_type == "background" or (opts and opts.content_available):
        aps["content-available"] = 1
    if p.image or (opts and opts.mutable_content):
        aps["mutable-content"] = 1  # lets a notification service extension fetch the image
    # Custom data sits beside "aps", which stays Apple's whatever the data holds; the
    # job's image wins over a data key of the same name.
    payload: dict[str, Any] = {**p.data, "aps": aps}
    if p.image:
        payload["image"] = p.image
    headers = [
        ("apns-topic", topic),
        ("apns-push-type", push_type),
        # Apple requires 5 for background pushes; low-priority jobs may be coalesced too.
        ("apns-priority", "5" if push_type == "background" or job.priority == "low" else "10"),
    ]
    expiration = opts.expiration if opts and opts.expiration else job.expires_at
    if expiration is not None:
        headers.append(("apns-expiration", str(int(expiration.timestamp()))))
    if opts and opts.collapse_id:
        headers.append(("apns-collapse-id", opts.collapse_id))
    return Message(
        source=p,
        body=_compact(payload),
        headers=tuple(headers),
        priority=job.priority,
        expires_at=job.expires_at,
    )


def seconds_left(expires_at: datetime | None, now: datetime | None = None) -> int | None:
    """Whole seconds until ``expires_at`` (never negative); None without an expiry."""
    if expires_at is None:
        return None
    start = now or datetime.now(expires_at.tzinfo)
    return max(0, int((expires_at - start).total_seconds()))


__all__ = ["fcm_bodies", "fcm_body", "render_apns", "render_fcm", "seconds_left"]
