"""pushfan's wire contracts, version 1: pydantic models plus generated JSON Schemas.

- :class:`NotificationJob` — a message on the jobs topic (:func:`decode_job`
  to read one, :meth:`NotificationJob.to_bytes` to write one).
- :class:`InvalidTokenEvent` — a provider rejected a device token for good.
- :class:`DeadLetter` — a message that could not be processed, with the reason.

All models are frozen and reject unknown fields; all timestamps must carry a
UTC offset. ``python -m schemas.export`` regenerates ``schemas/json/``.
"""

from schemas.common import (
    MAX_PAYLOAD_BYTES,
    MAX_TOKEN_LENGTH,
    SCHEMA_VERSION,
    AwareDatetime,
    JobId,
    NotificationType,
    Platform,
    SegmentName,
    UserId,
    format_validation_error,
)
from schemas.events import DeadLetter, InvalidTokenEvent, token_fingerprint
from schemas.job import (
    AllAudience,
    AndroidOptions,
    ApnsOptions,
    Audience,
    NotificationJob,
    Payload,
    SegmentAudience,
    UserAudience,
    UsersAudience,
    decode_job,
)

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_TOKEN_LENGTH",
    "SCHEMA_VERSION",
    "AllAudience",
    "AndroidOptions",
    "ApnsOptions",
    "Audience",
    "AwareDatetime",
    "DeadLetter",
    "InvalidTokenEvent",
    "JobId",
    "NotificationJob",
    "NotificationType",
    "Payload",
    "Platform",
    "SegmentAudience",
    "SegmentName",
    "UserAudience",
    "UserId",
    "UsersAudience",
    "decode_job",
    "format_validation_error",
    "token_fingerprint",
]
