"""The notification job: one message on the jobs topic, fanned out to every device.

A job names *who* (``audience``), *what* (``payload``) and *how* (priority,
platform filter, expiry). Producers in any language write it as UTF-8 JSON; the
JSON Schema in ``schemas/json/notification-job.v1.schema.json`` is generated
from these models, which remain the authority for the rules a schema cannot
express (the encoded payload size, reserved data keys, byte-length limits).
"""

from collections import Counter
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticSerializationError

from schemas.common import (
    MAX_PAYLOAD_BYTES,
    ApnsPushType,
    AwareDatetime,
    CollapseId,
    DataKey,
    HttpsUrl,
    JobId,
    NotificationType,
    Platform,
    SegmentName,
    UserId,
)

__all__ = [
    "AllAudience",
    "AndroidOptions",
    "ApnsOptions",
    "Audience",
    "NotificationJob",
    "Payload",
    "SegmentAudience",
    "UserAudience",
    "UsersAudience",
    "decode_job",
]


class ApnsOptions(BaseModel):
    """APNs options; applied to iOS tokens only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    push_type: ApnsPushType = "alert"
    collapse_id: CollapseId | None = None
    sound: str | None = None
    badge: int | None = Field(default=None, ge=0)
    thread_id: str | None = None
    category: str | None = None
    expiration: AwareDatetime | None = None
    content_available: bool = False
    mutable_content: bool = False
    interruption_level: Literal["passive", "active", "time-sensitive", "critical"] | None = None


class AndroidOptions(BaseModel):
    """FCM Android options; applied to Android tokens only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel_id: str | None = None
    collapse_key: str | None = Field(default=None, max_length=100)
    ttl: int | None = Field(
        default=None, ge=0, le=2_419_200, description="Seconds; FCM's maximum is 28 days."
    )
    priority: Literal["normal", "high"] | None = None


class Payload(BaseModel):
    """What the device shows or receives.

    At least one of title, body or data is required, unless the push is silent
    (apns.push_type "background" or apns.content_available true).

    Size limit: this object, re-encoded by the worker as compact JSON (no
    whitespace, null fields omitted, defaults filled in) in UTF-8, must be at
    most 4096 bytes, the FCM and APNs limit. JSON Schema cannot express this;
    producers should leave a margin.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str | None = None
    body: str | None = None
    data: dict[DataKey, StrictStr] = Field(
        default_factory=dict,
        description="String values only. Keys 'from', 'notification', 'message_type' "
        "and keys starting with 'google.' or 'gcm.' are reserved by FCM.",
    )
    image: HttpsUrl | None = None
    apns: ApnsOptions | None = None
    android: AndroidOptions | None = None

    def encoded_size(self) -> int:
        """Bytes of ``model_dump_json(exclude_none=True)`` encoded as UTF-8."""
        return len(self.model_dump_json(exclude_none=True).encode())

    @model_validator(mode="after")
    def _check_content_and_size(self) -> Self:
        silent = self.apns is not None and (
            self.apns.push_type == "background" or self.apns.content_available
        )
        if not (self.title or self.body or self.data or silent):
            raise PydanticCustomError(
                "payload_empty",
                "payload needs a title, a body or data "
                "(only silent APNs background pushes may be empty)",
            )
        try:
            size = self.encoded_size()
        except PydanticSerializationError as exc:
            # Only reachable from Python callers: JSON input cannot carry lone surrogates.
            raise PydanticCustomError(
                "payload_unencodable",
                "payload is not encodable as UTF-8 JSON: {error}",
                {"error": str(exc)},
            ) from exc
        if size > MAX_PAYLOAD_BYTES:
            raise PydanticCustomError(
                "payload_too_large",
                "encoded payload is {size} bytes, over the {limit}-byte limit",
                {"size": size, "limit": MAX_PAYLOAD_BYTES},
            )
        return self


class UserAudience(BaseModel):
    """Every device of one user."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["user"] = "user"
    user_id: UserId


class UsersAudience(BaseModel):
    """Every device of each listed user; ids must be distinct."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["users"] = "users"
    user_ids: list[UserId] = Field(
        min_length=1, max_length=10_000, json_schema_extra={"uniqueItems": True}
    )

    @field_validator("user_ids")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        duplicates = sorted(uid for uid, n in Counter(value).items() if n > 1)
        if duplicates:
            shown = ", ".join(repr(uid) for uid in duplicates[:5])
            raise PydanticCustomError(
                "duplicate_user_ids",
                "user_ids contains {count} duplicated id(s): {shown}",
                {"count": len(duplicates), "shown": shown},
            )
        return value


class SegmentAudience(BaseModel):
    """Every device of the users in a named segment, resolved at fanout time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["segment"] = "segment"
    segment: SegmentName


class AllAudience(BaseModel):
    """Every registered device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["all"] = "all"


Audience = Annotated[
    UserAudience | UsersAudience | SegmentAudience | AllAudience, Field(discriminator="kind")
]


class NotificationJob(BaseModel):
    """One message on the jobs topic (UTF-8 JSON, version 1).

    job_id is the idempotency key: re-delivering a job with the same id must not
    notify a device twice. created_at is stamped by the producer. A job whose
    expires_at has passed is dropped, never sent late. Timestamps are RFC 3339
    with a UTC offset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    job_id: JobId
    type: NotificationType
    priority: Literal["urgent", "normal", "low"] = "normal"
    audience: Audience
    platforms: tuple[Platform, ...] | None = Field(
        default=None,
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Only send to these platforms; absent means all.",
    )
    payload: Payload
    # Declared before expires_at so the expires_at validator can see it.
    created_at: AwareDatetime
    expires_at: AwareDatetime | None = Field(
        default=None, description="Must be after created_at; absent means never."
    )
    campaign_id: str | None = Field(default=None, min_length=1, max_length=128)
    dry_run: bool = False

    @field_validator("platforms")
    @classmethod
    def _distinct_platforms(cls, value: tuple[Platform, ...] | None) -> tuple[Platform, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise PydanticCustomError("duplicate_platforms", "platforms contains duplicates")
        return value

    @field_validator("expires_at")
    @classmethod
    def _after_created(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        created_at = info.data.get("created_at")
        if value is not None and created_at is not None and value <= created_at:
            raise PydanticCustomError(
                "expires_before_created",
                "expires_at {expires_at} is not after created_at {created_at}",
                {"expires_at": value.isoformat(), "created_at": created_at.isoformat()},
            )
        return value

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON without null fields; :func:`decode_job` reads it back equal."""
        return self.model_dump_json(exclude_none=True).encode()

    def is_expired(self, now: datetime) -> bool:
        """Whether ``expires_at`` is at or before ``now`` (which must be timezone-aware)."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        return self.expires_at is not None and self.expires_at <= now


def decode_job(raw: bytes) -> NotificationJob:
    """Parse one jobs-topic message value.

    Raises :class:`pydantic.ValidationError` for anything that is not a valid
    job: bytes that are not UTF-8 JSON, a JSON value that is not an object, or
    content breaking a rule. Decoding is strict: JSON types must match exactly
    (``"1"`` is not an integer, ``1`` is not a boolean or a timestamp).
    """
    return NotificationJob.model_validate_json(raw, strict=True)
