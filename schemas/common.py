"""Types and limits shared by every pushfan wire contract.

Every model in :mod:`schemas` is frozen and rejects unknown fields, so a typo
in a producer (``"titel"``) fails loudly instead of silently sending a push
without a title. Every timestamp must carry a UTC offset: a naive time means
something different on every host that reads it.
"""

from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, AwareDatetime, Field, StringConstraints, ValidationError
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_TOKEN_LENGTH",
    "SCHEMA_VERSION",
    "ApnsPushType",
    "AwareDatetime",
    "CollapseId",
    "DataKey",
    "HttpsUrl",
    "JobId",
    "NotificationType",
    "Platform",
    "SegmentName",
    "UserId",
    "format_validation_error",
]

Platform = Literal["ios", "android", "web"]
"""Where a device token was registered; decides FCM or APNs."""

SCHEMA_VERSION: Final = 1
"""The version every v1 message carries in ``schema_version``."""

MAX_PAYLOAD_BYTES: Final = 4096
# Real tokens are 64 (APNs) to ~200 (FCM) characters; the database refuses longer than this.
MAX_TOKEN_LENGTH: Final = 1024
"""Both FCM and APNs cap a notification payload at 4 KiB."""

# Whitespace and C0/C1 control characters in an id are always a producer bug
# (a stray newline, a tab from a CSV) and make log lines ambiguous.
UserId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f-\x9f]+$"),
]
"""An application user id: 1-128 characters, no whitespace or control characters."""

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"

JobId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_NAME_PATTERN)]
"""A job's idempotency key: 1-128 characters of ``[A-Za-z0-9._:-]``, alphanumeric first."""

SegmentName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_NAME_PATTERN)]
"""A named audience segment; same alphabet as :data:`JobId`."""

NotificationType = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
]
"""What the notification is about, e.g. ``order_shipped``; used in metrics labels."""

ApnsPushType = Literal[
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "location",
    "liveactivity",
    "pushtotalk",
]
"""The apns-push-type header values APNs accepts."""

# FCM refuses a whole message whose data uses one of these keys.
RESERVED_DATA_KEYS = frozenset({"from", "notification", "message_type"})
RESERVED_DATA_KEY_PREFIXES = ("google.", "gcm.")


def _check_data_key(key: str) -> str:
    if key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_KEY_PREFIXES):
        raise PydanticCustomError(
            "reserved_data_key", "data key {key} is reserved by FCM", {"key": repr(key)}
        )
    return key


DataKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        json_schema_extra={
            "not": {
                "anyOf": [
                    {"enum": sorted(RESERVED_DATA_KEYS)},
                    {"pattern": r"^(google|gcm)\."},
                ]
            }
        },
    ),
    AfterValidator(_check_data_key),
]


def _check_https_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc or any(c.isspace() for c in url):
        raise PydanticCustomError("https_url", "must be an https:// URL without whitespace")
    return url


HttpsUrl = Annotated[
    str,
    Field(
        max_length=2048, json_schema_extra={"format": "uri", "pattern": r"^https://[^\s/?#]+\S*$"}
    ),
    AfterValidator(_check_https_url),
]


def _check_collapse_id(value: str) -> str:
    # APNs counts bytes, not characters: 64 characters of "é" are 128 bytes.
    if (size := len(value.encode())) > 64:
        raise PydanticCustomError(
            "collapse_id_too_long",
            "collapse_id is {size} bytes UTF-8 encoded, over the APNs limit of 64 bytes",
            {"size": size},
        )
    return value


CollapseId = Annotated[
    str,
    Field(max_length=64, description="At most 64 bytes once UTF-8 encoded."),
    AfterValidator(_check_collapse_id),
]
"""An APNs apns-collapse-id: at most 64 bytes of UTF-8."""

MAX_ERROR_CHARS: Final = 1000


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[key]":
            # pydantic's marker for "the dict key itself was invalid".
            text += "[key]"
        else:
            # Dict keys land in the loc too; a producer's 10 KB key must not flood the line.
            part = part if len(part) <= 64 else part[:63] + "…"
            text += f".{part}" if text else part
    return text


def format_validation_error(exc: ValidationError) -> str:
    """Render ``exc`` as one line: ``loc: message`` pairs joined by ``"; "``.

    The offending input values are deliberately left out: they can hold device
    tokens or personal data, and this line is meant for logs and dead letters.
    The result is capped at about 1000 characters.
    """
    parts = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = _format_loc(error["loc"])
        parts.append(f"{loc}: {error['msg']}" if loc else error["msg"])
    text = "; ".join(parts) or str(exc.title)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text
