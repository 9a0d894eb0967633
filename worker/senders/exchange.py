"""What a platform sender needs of an HTTP/2 connection pool, whichever implements it.

The lean pool (:mod:`worker.senders.h2client`) and the reference pool on the ``h2``
library (:mod:`worker.senders.h2ref`) both keep this contract, so the FCM and APNs
senders run unchanged on either and a benchmark compares the two in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pushfan.metrics import Traffic

Headers = Sequence[tuple[str, str]]


class H2Error(Exception):
    """A request got no answer. ``retryable``: it may be sent again (it may have been
    processed when the connection dropped mid-flight); ``unprocessed``: the server said
    it never saw it (GOAWAY above its last stream id, REFUSED_STREAM)."""

    def __init__(self, reason: str, *, retryable: bool, unprocessed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.unprocessed = unprocessed


@dataclass(slots=True)
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Replies:
    """What a batch of requests (:meth:`Exchange.send_many`) came to, by request index.

    ``status[i]`` is request ``i``'s HTTP status, or 0 when it got no answer; its
    :class:`H2Error` is then ``errors[i]``. Answers other than 2xx keep their headers and
    body in ``answers[i]`` (2xx bodies are dropped: the senders read nothing from them).
    """

    status: list[int]
    answers: dict[int, H2Response] = field(default_factory=dict)
    errors: dict[int, H2Error] = field(default_factory=dict)


def batch_size(paths: str | Sequence[str], bodies: bytes | Sequence[bytes]) -> int:
    """How many requests ``paths`` and ``bodies`` describe (see :meth:`Exchange.send_many`)."""
    sizes = {len(x) for x in (paths, bodies) if not isinstance(x, str | bytes)}
    if len(sizes) != 1:
        raise ValueError("paths and bodies: at least one per request, and as many of each")
    return sizes.pop()


class Exchange(Protocol):
    """An HTTP/2 connection pool to one origin."""

    traffic: Traffic  # latency, status classes, in flight: read by /metrics

    async def send_many(
        self,
        method: str,
        paths: str | Sequence[str],
        headers: Headers,
        bodies: bytes | Sequence[bytes],
    ) -> Replies:
        """Many requests at once, one reply each, in order. Never raises
        :class:`H2Error` (a request's failure is in :attr:`Replies.errors`); raises
        :class:`~pushfan.errors.SetupError` when the server will not speak HTTP/2.

        ``paths`` and ``bodies`` are each one value shared by every request or one per
        request; at least one of them is a sequence, and their lengths agree. A shared
        path may be indexed in the server's HPACK table, per-request paths never are.
        ``headers`` are the same for every request and should repeat across batches.
        """
        ...

    async def close(self) -> None:
        """Let in-flight requests finish (within their deadlines), then close."""
        ...
