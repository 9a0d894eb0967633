"""Messages the workers emit: invalid-token events and dead letters."""

import hashlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import MAX_TOKEN_LENGTH, AwareDatetime, JobId, Platform

__all__ = ["DeadLetter", "InvalidTokenEvent", "token_fingerprint"]


def token_fingerprint(token: str) -> str:
    """A log-safe stand-in for a device token: ``sha256:`` and 12 hex digits.

    Raw device tokens must never reach logs: anyone holding one (and the app's
    credentials) can push to that device. 48 bits of the hash are plenty to
    correlate log lines about the same token.
    """
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class InvalidTokenEvent(BaseModel):
    """A provider said a device token is dead; the cleanup consumer deletes it.

    observed_at is the APNs 410 timestamp when known, else the send time. The
    cleanup consumer deletes the token only if it was registered before
    observed_at, so a device that re-registered since keeps its token.

    The token is a secret: repr() and str() show its fingerprint instead, and
    validation errors for this model never include the input.
    """

    # hide_input_in_errors: a ValidationError's str() would otherwise echo the token.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    schema_version: Literal[1] = 1
    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)
    platform: Platform
    reason: str = Field(
        min_length=1,
        max_length=64,
        description="The provider's code, e.g. UNREGISTERED, Unregistered, BadDeviceToken.",
    )
    observed_at: AwareDatetime
    job_id: JobId | None = None

    @property
    def fingerprint(self) -> str:
        """:func:`token_fingerprint` of :attr:`token`; safe to log."""
        return token_fingerprint(self.token)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield (name, token_fingerprint(value)) if name == "token" else (name, value)

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON without null fields."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Strictly parse :meth:`to_bytes` output; raises :class:`pydantic.ValidationError`."""
        return cls.model_validate_json(raw, strict=True)


class ConsumedRecord(Protocol):
    """What a dead letter keeps of a consumed record (an aiokafka ``ConsumerRecord``)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


ErrorKind = Literal["decode", "validation", "processing"]


class DeadLetter(BaseModel):
    """A message the worker could not process, with where it came from and why.

    original and key are the consumed record's raw bytes, base64 encoded in JSON
    (URL-safe alphabet with padding on output; either alphabet accepted on input),
    so undecodable originals survive byte for byte and can be replayed.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    schema_version: Literal[1] = 1
    original: bytes
    key: bytes | None = None
    topic: str = Field(min_length=1)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    error: str = Field(min_length=1, description="Why it failed, in one clear line.")
    error_kind: ErrorKind
    failed_at: AwareDatetime
    headers: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def of(cls, record: ConsumedRecord, error: str, kind: ErrorKind, failed_at: datetime) -> Self:
        """The dead letter of ``record``: its bytes, where it was, and why it failed."""
        return cls(
            original=record.value or b"",
            key=record.key,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=error,
            error_kind=kind,
            failed_at=failed_at,
            headers={k: v.decode("utf-8", "replace") for k, v in record.headers or ()},
        )

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON without null fields; :meth:`from_bytes` reads it back equal."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Strictly parse :meth:`to_bytes` output; raises :class:`pydantic.ValidationError`."""
        return cls.model_validate_json(raw, strict=True)
