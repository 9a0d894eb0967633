"""The APNs provider API, emulated: ``POST /3/device/{token}`` answered as Apple does.

Contract of :meth:`ApnsEmulator.handle` (checks run in this order; the first failure
answers):

1. paths under ``/_emulator/`` go to the control API (:func:`script.control`, either HTTP
   version); any other path needs HTTP/2, as Apple's does (HTTP/1.1 gets 505 with the
   emulator-only reason ``HTTP2Required``), must start with ``/3/device/`` (else 404
   ``BadPath``) and be a POST (else 405 ``MethodNotAllowed``);
2. provider token (``authorization: bearer <ES256 JWT>``): see :meth:`_check_auth`;
3. a scripted outage answers its code, with ``retry-after`` when it has one;
4. headers: ``apns-topic`` (one of ``topics``, or one with the suffix Apple requires for
   VoIP, complication, file provider, Live Activity or push-to-talk pushes),
   ``apns-push-type``, ``apns-priority``, ``apns-expiration``, ``apns-collapse-id``
   (<= 64 bytes), ``apns-id`` (a canonical UUID);
5. payload: not empty, <= 4096 bytes (5120 for VoIP), a JSON object. Apple documents no
   reason for malformed JSON; ``PayloadEmpty`` is the only payload reason it lists, so
   malformed JSON and non-object JSON answer that;
6. the token: 64 hex digits (either case), unless the script names it;
7. :meth:`Script.error_for`; else 200 and the delivery is logged.

Every response carries ``apns-id`` (the request's verbatim, else a new upper-case UUID):
aioapns matches responses by it and its futures never resolve otherwise. Every error has
the body ``{"reason": ...}``; a 410 adds ``timestamp`` (ms since the epoch at which the
token became invalid). Scripted latency delays every device response.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable

import jwt

from pushfan.emulators.credentials import Credentials
from pushfan.emulators.script import CONTROL_PREFIX, Script, control
from pushfan.emulators.server import Request, Response

# Apple's documented reasons and their HTTP status ("Handling notification responses
# from APNs").
REASON_STATUS: dict[str, int] = {
    **dict.fromkeys(
        [
            "BadCollapseId",
            "BadDeviceToken",
            "BadExpirationDate",
            "BadMessageId",
            "BadPriority",
            "BadTopic",
            "DeviceTokenNotForTopic",
            "DuplicateHeaders",
            "IdleTimeout",
            "InvalidPushType",
            "MissingDeviceToken",
            "MissingTopic",
            "PayloadEmpty",
            "TopicDisallowed",
        ],
        400,
    ),
    **dict.fromkeys(
        [
            "BadCertificate",
            "BadCertificateEnvironment",
            "ExpiredProviderToken",
            "Forbidden",
            "InvalidProviderToken",
            "MissingProviderToken",
        ],
        403,
    ),
    "BadPath": 404,
    "MethodNotAllowed": 405,
    "ExpiredToken": 410,
    "Unregistered": 410,
    "PayloadTooLarge": 413,
    "TooManyProviderTokenUpdates": 429,
    "TooManyRequests": 429,
    "InternalServerError": 500,
    "ServiceUnavailable": 503,
    "Shutdown": 503,
}
APNS_REASONS = frozenset(REASON_STATUS)
HTTP2_REQUIRED = "HTTP2Required"  # not Apple's: Apple does not speak HTTP/1.1 at all
_STATUS = {**REASON_STATUS, HTTP2_REQUIRED: 505}

DEVICE_PATH = "/3/device/"
PUSH_TYPES = frozenset(
    [
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
    ]
)
PRIORITIES = frozenset({"1", "5", "10"})
MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID = 64
# Apple wants these suffixes on the bundle id for some push types.
TOPIC_SUFFIXES = (
    ".voip",
    ".complication",
    ".pushkit.fileprovider",
    ".push-type.liveactivity",
    ".voip-ptt",  # push-to-talk
)
DEFAULT_TOPIC = "com.example.pushfan"

_TOKEN = re.compile(r"[0-9a-fA-F]{64}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_INTEGER = re.compile(r"[0-9]+")
_JWT_CACHE_MAX = 1024
_CONNECTIONS_MAX = 10_000
_IAT_LEEWAY_S = 60  # clock skew tolerated for an iat in the future


def _now_ms() -> int:
    return int(time.time() * 1000)


class ApnsEmulator:
    """An APNs server's request handler (serve it with :class:`HttpServer`).

    ``script`` decides scripted errors and keeps the delivery log (codes are Apple's
    reason strings; dead tokens answer ``Unregistered``).
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        topics: Iterable[str] = (DEFAULT_TOPIC,),
        script: Script | None = None,
        jwt_max_age_s: int = 3600,
        min_jwt_refresh_s: int = 20 * 60,
    ) -> None:
        self.credentials = credentials
        self.script = (
            script
            if script is not None
            else Script(dead_code="Unregistered", known_codes=APNS_REASONS)
        )
        self.jwt_max_age_s = jwt_max_age_s
        self.min_jwt_refresh_s = min_jwt_refresh_s
        self._topics = frozenset(t + s for t in topics for s in ("", *TOPIC_SUFFIXES))
        self._public_key = credentials.apns_public_key()
        # Verifying ES256 costs far more than the rest of a request: remember each JWT's
        # verdict (its iat if valid); age is still checked on every request.
        self._jwt_verdicts: dict[str, int | None] = {}
        # connection id -> (its current JWT, when first seen there (monotonic), its iat)
        self._connection_jwts: dict[int, tuple[str, float, int]] = {}
        # token -> ms since epoch at which it became invalid (the 410 timestamp)
        self._invalid_since: dict[str, int] = {}
        self._dead_ref: set[str] | None = None
        self._dead_copy: frozenset[str] = frozenset()

    def handle(self, request: Request) -> Response:
        """Answer one request (see the module docstring for the contract)."""
        if request.path.startswith(CONTROL_PREFIX):
            response = control(self.script, request)
            self._sync_dead_tokens()  # stamp tokens scripted dead with the time they were
            return response
        headers = request.headers
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        out = [("apns-id", apns_id)]
        token = request.path[len(DEVICE_PATH) :]
        reason = self._check_route(request) or self._check_auth(request)
        if reason is None and (outage := self.script.current_outage()) is not None:
            reason = outage.code
            if outage.retry_after is not None:
                out.append(("retry-after", str(outage.retry_after)))
        if reason is None:
            reason = (
                self._check_headers(headers)
                or self._check_payload(request.body, headers.get("apns-push-type"))
                or self._check_token(token)
                or self.script.error_for(token)
            )
        if reason is None:
            self.script.record_delivery(token, headers["apns-topic"])
            self._invalid_since.pop(token, None)  # delivered: valid (again)
            return Response(200, b"", out, delay=self.script.latency)
        self.script.record_error(reason)
        status = _STATUS.get(reason, 400)
        body: dict[str, str | int] = {"reason": reason}
        if status == 410:
            body["timestamp"] = self._token_invalid_since(token)
        out.append(("content-type", "application/json"))
        return Response(status, json.dumps(body).encode(), out, delay=self.script.latency)

    # -- checks: each returns Apple's reason, or None when the request passes -------------

    @staticmethod
    def _check_route(request: Request) -> str | None:
        if not request.http2:
            return HTTP2_REQUIRED
        if not request.path.startswith(DEVICE_PATH):
            return "BadPath"
        if request.method != "POST":
            return "MethodNotAllowed"
        return None

    def _check_auth(self, request: Request) -> str | None:
        """Provider token auth as Apple documents it.

        No token: ``MissingProviderToken``. Not an ES256 JWT with ``kid`` = our key id,
        ``iss`` = our team id, an integer ``iat`` (at most a minute in the future) and a
        valid signature: ``InvalidProviderToken``. ``iat`` older than ``jwt_max_age_s``:
        ``ExpiredProviderToken``. A connection that switches to another JWT less than
        ``min_jwt_refresh_s`` after it first sent its previous one, when the new one was
        also issued less than ``min_jwt_refresh_s`` after the previous one, gets
        ``TooManyProviderTokenUpdates`` and keeps its previous JWT. (The iat condition
        spares a provider that opens a connection with its current JWT and refreshes it on
        schedule soon after: it did not refresh too often.)
        """
        value = request.headers.get("authorization", "").strip()
        if not value:
            return "MissingProviderToken"
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return "InvalidProviderToken"
        token = token.strip()
        if not token:
            return "MissingProviderToken"
        iat = self._jwt_iat(token)
        now = time.time()
        if iat is None or iat > now + _IAT_LEEWAY_S:
            return "InvalidProviderToken"
        if iat < now - self.jwt_max_age_s:
            return "ExpiredProviderToken"
        return self._check_refresh(request.connection_id, token, iat)

    def _jwt_iat(self, token: str) -> int | None:
        """The token's iat if it is a valid provider token for our key, else None."""
        if token in self._jwt_verdicts:
            return self._jwt_verdicts[token]
        iat = None
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") == "ES256" and header.get("kid") == self.credentials.apns_key_id:
                claims = jwt.decode(
                    token,
                    self._public_key,
                    algorithms=["ES256"],
                    # iat is checked per request (ages), exp/nbf are not Apple's claims
                    options={"verify_iat": False, "verify_exp": False, "verify_nbf": False},
                )
                value = claims.get("iat")
                if type(value) is int and claims.get("iss") == self.credentials.apns_team_id:
                    iat = value
        except jwt.PyJWTError:
            pass
        if len(self._jwt_verdicts) >= _JWT_CACHE_MAX:
            self._jwt_verdicts.clear()
        self._jwt_verdicts[token] = iat
        return iat

    def _check_refresh(self, connection_id: int, token: str, iat: int) -> str | None:
        now = time.monotonic()
        previous = self._connection_jwts.get(connection_id)
        if previous is not None and previous[0] == token:
            return None
        if (
            previous is not None
            and now - previous[1] < self.min_jwt_refresh_s
            and iat - previous[2] < self.min_jwt_refresh_s
        ):
            return "TooManyProviderTokenUpdates"
        if len(self._connection_jwts) >= _CONNECTIONS_MAX:
            # An entry first seen min_jwt_refresh_s ago can no longer cause a 429:
            # forgetting it changes no answer.
            self._connection_jwts = {
                cid: seen
                for cid, seen in self._connection_jwts.items()
                if now - seen[1] < self.min_jwt_refresh_s
            }
        self._connection_jwts[connection_id] = (token, now, iat)
        return None

    def _check_headers(self, headers: dict[str, str]) -> str | None:
        topic = headers.get("apns-topic")
        if not topic:
            return "MissingTopic"
        if topic not in self._topics:
            return "TopicDisallowed"
        push_type = headers.get("apns-push-type")
        if push_type is not None and push_type not in PUSH_TYPES:
            return "InvalidPushType"
        priority = headers.get("apns-priority")
        if priority is not None and priority not in PRIORITIES:
            return "BadPriority"
        expiration = headers.get("apns-expiration")
        if expiration is not None and not _INTEGER.fullmatch(expiration):
            return "BadExpirationDate"
        collapse_id = headers.get("apns-collapse-id")
        # The server decodes header values as latin-1: one character per byte sent.
        if collapse_id is not None and len(collapse_id) > MAX_COLLAPSE_ID:
            return "BadCollapseId"
        apns_id = headers.get("apns-id")
        if apns_id is not None and not _UUID.fullmatch(apns_id):
            return "BadMessageId"
        return None

    @staticmethod
    def _check_payload(body: bytes, push_type: str | None) -> str | None:
        if not body:
            return "PayloadEmpty"
        if len(body) > (MAX_VOIP_PAYLOAD if push_type == "voip" else MAX_PAYLOAD):
            return "PayloadTooLarge"
        try:
            payload = json.loads(body)
        except ValueError:  # also UnicodeDecodeError
            return "PayloadEmpty"
        return None if isinstance(payload, dict) else "PayloadEmpty"

    def _check_token(self, token: str) -> str | None:
        script = self.script
        if token in script.dead_tokens or token in script.token_errors:
            return None  # scripted tokens may be any string: the script answers
        if not token:
            return "MissingDeviceToken"
        return None if _TOKEN.fullmatch(token) else "BadDeviceToken"

    # -- 410 timestamps ------------------------------------------------------------------

    def _token_invalid_since(self, token: str) -> int:
        """When ``token`` became invalid: when it was scripted dead if that was seen (a
        control-API script, or the first answer after an in-process one), else when it
        first answered 410 since it was last delivered to."""
        self._sync_dead_tokens()
        return self._invalid_since.setdefault(token, _now_ms())

    def _sync_dead_tokens(self) -> None:
        # Script.configure and reset replace the set, so identity tells a change cheaply.
        dead = self.script.dead_tokens
        if dead is self._dead_ref:
            return
        now = _now_ms()
        for token in self._dead_copy - dead:
            self._invalid_since.pop(token, None)  # revived; it may die again later
        for token in dead - self._dead_copy:
            self._invalid_since.setdefault(token, now)
        self._dead_ref, self._dead_copy = dead, frozenset(dead)
