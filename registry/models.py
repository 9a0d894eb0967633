"""The registry API's request and response bodies, and the rules bad input breaks.

Every rule here answers 422 with the field and the reason, never a 5xx: APNs tokens are
64 hex digits (stored lower-case, so one device is one row whatever the app sent); FCM
tokens (android, web) are 20-1024 characters of FCM's alphabet; time zones must exist in
the IANA database; quiet hours are two different local times ("HH:MM" or "HH:MM:SS").
Validation errors never echo the token.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import time
from functools import cache
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from schemas.common import MAX_TOKEN_LENGTH, NotificationType, Platform, UserId

_TOKEN_CHARS = r"[A-Za-z0-9_:\-]"  # FCM's alphabet; APNs hex is a subset
_APNS_TOKEN = re.compile(r"[0-9a-fA-F]{64}")
_FCM_TOKEN = re.compile(rf"{_TOKEN_CHARS}{{20,{MAX_TOKEN_LENGTH}}}")
_LOCAL_TIME = r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?$"

DeviceId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f-\x9f]+$")
]
AppId = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._\-]+$")
]
AppVersion = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[ -~]+$")]
Locale = Annotated[
    str,
    StringConstraints(
        min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,8}([_-][A-Za-z0-9]{1,8})*$"
    ),
]


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_time_zone(name: str) -> str:
    if name not in _zones():
        raise ValueError(f"unknown IANA time zone {name!r}")
    return name


class _ListZones:
    """Lists the zones :func:`check_time_zone` knows in the JSON Schema, so the document
    calls valid exactly the names the API takes. Computed when a schema is built, not
    on import: listing the zones reads the whole zone database."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["enum"] = sorted(_zones())
        return schema


TimeZone = Annotated[str, AfterValidator(check_time_zone), _ListZones()]


def _token_per_platform(schema: dict[str, Any]) -> None:
    # The token's rule depends on the platform (the model validator below). JSON Schema
    # 2020-12, which OpenAPI 3.1 uses, can say so, and a document that did not would call
    # valid a registration this API refuses.
    ios = {"properties": {"platform": {"const": "ios"}}, "required": ["platform"]}
    schema["if"] = ios
    schema["then"] = {"properties": {"token": {"pattern": f"^{_APNS_TOKEN.pattern}$"}}}
    schema["else"] = {"properties": {"token": {"pattern": f"^{_FCM_TOKEN.pattern}$"}}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class DeviceIn(_Body):
    """``POST /v1/devices``: register or refresh a token for the caller."""

    model_config = ConfigDict(json_schema_extra=_token_per_platform)

    token: str = Field(description="The platform's device token (a secret).")
    platform: Platform
    device_id: DeviceId = Field(description="Stable id of this install on this device.")
    app_id: AppId = Field(description="The app's bundle id or package name.")
    app_version: AppVersion | None = None
    locale: Locale | None = None
    time_zone: TimeZone | None = Field(None, description="IANA time zone, e.g. Europe/Berlin.")

    @model_validator(mode="after")
    def _token_for_platform(self) -> Self:
        if self.platform == "ios":
            if not _APNS_TOKEN.fullmatch(self.token):
                raise ValueError("an ios (APNs) token is 64 hexadecimal characters")
            if self.token != self.token.lower():
                return self.model_copy(update={"token": self.token.lower()})
        elif not _FCM_TOKEN.fullmatch(self.token):
            raise ValueError(
                f"an {self.platform} (FCM) token is 20-{MAX_TOKEN_LENGTH} characters"
                " of A-Z a-z 0-9 _ : -"
            )
        return self


class TokenIn(_Body):
    """``POST /v1/devices/unregister``: log a token out (kept out of URLs and their logs)."""

    # No token of another alphabet was ever registered, and a NUL byte would otherwise
    # reach PostgreSQL, which refuses it (a 500).
    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH, pattern=rf"^{_TOKEN_CHARS}+$")

    @field_validator("token")
    @classmethod
    def _as_stored(cls, value: str) -> str:
        # APNs tokens are stored lower-case (DeviceIn); any other token is case-sensitive.
        return value.lower() if _APNS_TOKEN.fullmatch(value) else value


class DeviceOut(_Body):
    id: int
    token: str = Field(description="Masked: the token's fingerprint, never the token.")
    platform: Platform
    device_id: str | None
    app_id: str
    app_version: str | None
    locale: str | None
    time_zone: str | None
    created_at: str
    last_seen_at: str


class DeviceList(_Body):
    """``GET /v1/devices``."""

    devices: list[DeviceOut]


class DeviceRef(_Body):
    """``DELETE /v1/devices/{device_id}?app_id=``: the path and query, checked like bodies."""

    device_id: DeviceId
    app_id: AppId | None = None


class UserRef(_Body):
    """The user a request is about (``?user_id=``, or the caller's own ``sub``)."""

    user_id: UserId


class RegisteredOut(_Body):
    id: int
    change: str = Field(description="created, refreshed, reactivated or moved.")
    replaced: int = Field(description="Older tokens of this device deactivated.")
    token: str = Field(description="Masked.")


def _local_time(value: Any) -> Any:
    # pydantic alone would also take seconds since midnight (79200) and UTC offsets
    # ("22:00Z"); quiet hours are wall-clock times in the user's time_zone, and what the
    # OpenAPI document promises is exactly this pattern.
    if isinstance(value, time):
        return value
    if not isinstance(value, str) or not re.fullmatch(_LOCAL_TIME, value):
        raise ValueError("a local time is HH:MM or HH:MM:SS (no date, no UTC offset)")
    return value


LocalTime = Annotated[
    time,
    BeforeValidator(_local_time),
    WithJsonSchema({"type": "string", "pattern": _LOCAL_TIME, "examples": ["22:00"]}),
]


class QuietHours(_Body):
    start: LocalTime = Field(description="Local time quiet hours begin, e.g. 22:00.")
    end: LocalTime = Field(description="Local time they end, e.g. 07:00 (may be the next day).")

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        # Equal ends could mean "never quiet" or "always quiet"; whichever we stored, the
        # app that sent it meant something else. Off is said by leaving quiet_hours out.
        if self.start == self.end:
            raise ValueError(
                "quiet_hours start and end are equal, an empty window:"
                " omit quiet_hours to turn them off"
            )
        return self


class PreferencesBody(_Body):
    """``GET``/``PUT /v1/preferences``: a PUT replaces all of them."""

    time_zone: TimeZone = Field("UTC", description="IANA time zone the quiet hours are in.")
    quiet_hours: QuietHours | None = None
    # Strict: pydantic would otherwise take 0, 1, "yes" and "off" for booleans too.
    types: dict[NotificationType, StrictBool] = Field(
        default_factory=dict,
        description="Push on/off per notification type; a type not listed is on.",
        max_length=200,
    )
