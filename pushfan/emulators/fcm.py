"""An FCM HTTP v1 emulator: ``messages:send`` plus the OAuth2 token endpoint.

Served by :class:`~pushfan.emulators.server.HttpServer` (HTTP/2 and HTTP/1.1, TLS), it is
close enough to ``fcm.googleapis.com`` that firebase-admin's real code path runs against
it and maps every answer to its own exception. Routes of :meth:`FcmEmulator.handle`:

- ``POST /v1/projects/{project}/messages:send``: bearer auth, project, scripted outage,
  message validation, scripted per-token verdict, then ``{"name": ...}`` or the error
  body real FCM sends (see :data:`FCM_ERRORS`);
- ``POST /token``: the OAuth2 JWT-bearer grant google-auth's service-account flow calls
  (the service account's ``token_uri`` must point here);
- ``/_emulator/...``: the scripting and delivery-log API (:func:`script.control`).

Telling the two kinds of INVALID_ARGUMENT apart (senders must, to delete only bad
tokens): a malformed or scripted-invalid token is answered with the message
:data:`INVALID_TOKEN_MESSAGE` (real FCM's wording) and a field violation on
``message.token`` (or ``message.fid``); every payload problem has another message and a
field violation on the offending payload field. Real FCM does not always send the
``google.rpc.BadRequest`` detail, so senders should match on the message first.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import jwt

from pushfan.emulators.credentials import Credentials
from pushfan.emulators.script import CONTROL_PREFIX, Script, control
from pushfan.emulators.server import Request, Response

STATIC_TOKEN = "pushfan-emulator-token"  # accepted without the OAuth flow
TOKEN_PATH = "/token"
TOKEN_LIFETIME = 3600  # seconds, as Google issues them
DEFAULT_RETRY_AFTER = 1  # seconds, on 429/503 when no outage says otherwise
MAX_MESSAGE_BYTES = 4096
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs service-account assertions for Google's endpoint whatever the
# account's token_uri says, so that audience is accepted besides the token_uri.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

#: FCM error code -> (HTTP status, canonical status, message), as real FCM v1 answers.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Sending limit exceeded for the message target."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
}
FCM_ERROR_CODES = frozenset(FCM_ERRORS)

INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"
TOO_BIG_MESSAGE = "Message is too big"
_AUTH_HELP = (
    "Expected OAuth 2 access token, login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MISSING_CREDENTIALS_MESSAGE = f"Request is missing required authentication credential. {_AUTH_HELP}"
INVALID_CREDENTIALS_MESSAGE = f"Request had invalid authentication credentials. {_AUTH_HELP}"

_SEND_PATH = re.compile(r"/v1/projects/(?P<project>[^/]+)/messages:send")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_:\-]{20,4096}")
_TOPIC_RE = re.compile(r"[A-Za-z0-9\-_.~%]{1,900}")
_DURATION_RE = re.compile(r"\d+(\.\d{1,9})?s")
_TARGETS = ("token", "fid", "topic", "condition")
_TOP_LEVEL = {"message", "validate_only", "validateOnly"}
_JSON = ("content-type", "application/json; charset=UTF-8")


class _Invalid(Exception):
    """A payload problem: answered as INVALID_ARGUMENT with one field violation."""

    def __init__(self, message: str, field: str, description: str) -> None:
        super().__init__(message)
        self.message, self.field, self.description = message, field, description


class FcmEmulator:
    """The FCM v1 endpoint and its token endpoint, for one :class:`Credentials` set.

    ``script`` decides errors and keeps the delivery log. Its ``errors`` counter gets
    one count per rejected send, keyed by FCM error code, or by ``UNAUTHENTICATED`` /
    ``PERMISSION_DENIED`` for a bad bearer token / a foreign project (no FcmError applies).
    Deliveries are logged per target (token, fid, ``/topics/{name}`` or
    ``condition:{expr}``) and per project. Not thread-safe: serve it from one event loop.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        script: Script | None = None,
        static_tokens: Iterable[str] = (STATIC_TOKEN,),
        token_lifetime: int = TOKEN_LIFETIME,
    ) -> None:
        self.credentials = credentials
        self.script = (
            script
            if script is not None
            else Script(dead_code="UNREGISTERED", known_codes=FCM_ERROR_CODES)
        )
        self.static_tokens = frozenset(static_tokens)
        self.token_lifetime = token_lifetime
        self.tokens_issued = 0
        account = json.loads(credentials.fcm_service_account_file.read_text())
        self._client_email: str = account["client_email"]
        self._audiences = [account["token_uri"], GOOGLE_TOKEN_AUDIENCE]
        self._public_key = credentials.fcm_public_key()
        self._issued: dict[str, float] = {}  # access token -> expiry (time.monotonic)
        # Real ids are long decimal numbers; start high so every id has 19 digits.
        self._ids = itertools.count(10**18 + secrets.randbelow(10**17))

    def expire_tokens(self) -> None:
        """Forget every issued access token, as if all had expired (static ones stay)."""
        self._issued.clear()

    def handle(self, request: Request) -> Response:
        """The :data:`~pushfan.emulators.server.Handler` for :class:`HttpServer`."""
        path = request.path.split("?", 1)[0]
        if path.startswith(CONTROL_PREFIX):
            return control(self.script, request)
        if request.method == "POST":
            if path == TOKEN_PATH:
                return self._token(request)
            match = _SEND_PATH.fullmatch(path)
            if match is not None:
                return self._send(request, match["project"])
        return _google_error(404, "NOT_FOUND", f"Not found: {request.method} {path}")

    # -- messages:send ----------------------------------------------------------------

    def _send(self, request: Request, project: str) -> Response:
        # Order matters to senders: auth, project, outage, payload, then the token.
        delay = self.script.latency
        header = request.headers.get("authorization", "")
        if not self._authorized(header):
            self.script.record_error("UNAUTHENTICATED")
            text = INVALID_CREDENTIALS_MESSAGE if header else MISSING_CREDENTIALS_MESSAGE
            response = _google_error(401, "UNAUTHENTICATED", text, delay)
            response.headers.append(
                ("www-authenticate", 'Bearer realm="https://accounts.google.com/"')
            )
            return response
        if project != self.credentials.fcm_project_id:
            # What Google answers for a project the caller may not use: no FcmError detail.
            self.script.record_error("PERMISSION_DENIED")
            text = (
                "Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            )
            return _google_error(403, "PERMISSION_DENIED", text, delay)
        outage = self.script.current_outage()
        if outage is not None:
            return self._error(outage.code, retry_after=outage.retry_after)
        try:
            message, validate_only = _parse(request.body)
            field, target = _validate(message)
        except _Invalid as exc:
            return self._error("INVALID_ARGUMENT", invalid=exc)
        code = self.script.error_for(target)
        if code == "INVALID_ARGUMENT" and field in ("token", "fid"):
            return self._error(code, invalid=_invalid_token(field))
        if code is not None:
            return self._error(code)
        if validate_only:
            name = f"projects/{project}/messages/fake_message_id"
        else:
            name = f"projects/{project}/messages/{next(self._ids)}"
            self.script.record_delivery(target, project)
        body = json.dumps({"name": name}).encode()
        return Response(200, body, [_JSON], delay=delay)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        if token in self.static_tokens:
            return True
        expiry = self._issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    def _error(
        self, code: str, *, invalid: _Invalid | None = None, retry_after: int | None = None
    ) -> Response:
        """Real FCM's error body for ``code``; records the error."""
        self.script.record_error(code)
        status, canonical, text = FCM_ERRORS[code]
        details: list[dict[str, Any]] = [{"@type": FCM_ERROR_TYPE, "errorCode": code}]
        if invalid is not None:
            text = invalid.message
            violation = {"field": invalid.field, "description": invalid.description}
            details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]})
        response = _google_error(status, canonical, text, self.script.latency, details)
        if status in (429, 503):
            response.headers.append(("retry-after", str(retry_after or DEFAULT_RETRY_AFTER)))
        return response

    # -- OAuth2 -----------------------------------------------------------------------

    def _token(self, request: Request) -> Response:
        """Verify a service-account JWT assertion and issue an access token.

        The assertion must be RS256-signed by the service account's key, issued by its
        ``client_email``, addressed to the ``token_uri`` or Google's token endpoint, and
        unexpired.
        """
        form = parse_qs(request.body.decode("utf-8", "replace"))
        grant = form.get("grant_type", [""])[0]
        if grant != JWT_BEARER:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant}")
        try:
            jwt.decode(
                form.get("assertion", [""])[0],
                self._public_key,
                algorithms=["RS256"],
                audience=self._audiences,
                issuer=self._client_email,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            return _oauth_error("invalid_grant", f"Invalid JWT: {exc}")
        now = time.monotonic()
        # Drop expired tokens here (issuing is rare) so the table cannot grow unbounded.
        self._issued = {t: exp for t, exp in self._issued.items() if exp > now}
        token = "ya29." + secrets.token_urlsafe(48)
        self._issued[token] = now + self.token_lifetime
        self.tokens_issued += 1
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        return Response(200, json.dumps(body).encode(), [_JSON])


def _parse(raw: bytes) -> tuple[dict[str, Any], bool]:
    """The request's ``message`` and ``validate_only``; raises :class:`_Invalid`."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid("Invalid JSON payload received.", "", str(exc)) from None
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received.", "", "expected a JSON object")
    for name in body.keys() - _TOP_LEVEL:
        text = f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
        raise _Invalid(text, name, text)
    message = body.get("message")
    if not isinstance(message, dict):
        raise _Invalid(FCM_ERRORS["INVALID_ARGUMENT"][2], "message", "message is required")
    return message, body.get("validate_only", body.get("validateOnly")) is True


def _validate(message: dict[str, Any]) -> tuple[str, str]:
    """Check ``message`` as FCM does; return (target field, target key for the log).

    Payload checks come first, the token's format last, so a request with both problems
    reads as a payload error and never gets a good token deleted.
    """
    generic = FCM_ERRORS["INVALID_ARGUMENT"][2]
    targets = [name for name in _TARGETS if message.get(name) is not None]
    if len(targets) != 1:
        raise _Invalid(generic, "message", "Exactly one of token, fid, topic or condition")
    field = targets[0]
    value = message[field]
    if not isinstance(value, str) or not value:
        raise _Invalid(generic, f"message.{field}", f"Invalid value for {field}")
    data = message.get("data", {})
    if not isinstance(data, dict):
        raise _Invalid(generic, "message.data", "data must be a map of strings")
    for key, item in data.items():
        if not isinstance(item, str):
            raise _Invalid(generic, f"message.data[{key}]", "data values must be strings")
    android = message.get("android")
    ttl = android.get("ttl") if isinstance(android, dict) else None
    if ttl is not None and not (isinstance(ttl, str) and _DURATION_RE.fullmatch(ttl)):
        text = (
            "Invalid value at 'message.android.ttl' "
            f"(type.googleapis.com/google.protobuf.Duration), {json.dumps(ttl)}"
        )
        raise _Invalid(text, "message.android.ttl", "Invalid duration")
    # FCM's limit is on the payload: the target (token, topic...) does not count.
    payload = {k: v for k, v in message.items() if k not in ("token", "fid", "topic", "condition")}
    size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_MESSAGE_BYTES:
        text = f"Message size {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"
        raise _Invalid(TOO_BIG_MESSAGE, "message", text)
    if field in ("token", "fid"):
        if not _TOKEN_RE.fullmatch(value):
            raise _invalid_token(field)
        return field, value
    if field == "topic":
        if not _TOPIC_RE.fullmatch(value):
            raise _Invalid(generic, "message.topic", "Invalid topic name")
        return field, f"/topics/{value}"
    return field, f"condition:{value}"


def _invalid_token(field: str) -> _Invalid:
    return _Invalid(INVALID_TOKEN_MESSAGE, f"message.{field}", "Invalid registration token")


def _google_error(
    status: int,
    canonical: str,
    message: str,
    delay: float = 0.0,
    details: list[dict[str, Any]] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": canonical}
    if details:
        error["details"] = details
    return Response(status, json.dumps({"error": error}).encode(), [_JSON], delay=delay)


def _oauth_error(error: str, description: str) -> Response:
    body = {"error": error, "error_description": description}
    return Response(400, json.dumps(body).encode(), [_JSON])
