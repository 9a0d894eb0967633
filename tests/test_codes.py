"""The error taxonomy (:mod:`worker.senders.fcm_codes`, :mod:`worker.senders.apns_codes`)
read against the answers the emulators really give.

Each answer is produced by calling the emulator's ``handle`` with a built
:class:`~pushfan.emulators.server.Request` (no sockets), then decoded the way a sender
does (JSON body, ``retry-after`` header) and classified. Only the proxy answers, which
no emulator gives, are written by hand.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest

from pushfan.emulators.apns import REASON_STATUS, ApnsEmulator
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.emulators.fcm import (
    BAD_REQUEST_TYPE,
    FCM_ERROR_CODES,
    INVALID_TOKEN_MESSAGE,
    MAX_MESSAGE_BYTES,
    STATIC_TOKEN,
    TOO_BIG_MESSAGE,
    FcmEmulator,
)
from pushfan.emulators.server import Request, Response
from worker.senders import apns_codes, fcm_codes
from worker.senders.base import DELIVERED, Outcome, OutcomeKind

K = OutcomeKind
_connections = itertools.count(1)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory: Path = tmp_path_factory.mktemp("codes-credentials")
    return ensure_credentials(directory, token_uri="https://127.0.0.1:1/token")


def header(response: Response, name: str) -> str | None:
    return next((v for k, v in response.headers if k.lower() == name), None)


def retry_after_of(response: Response) -> float | None:
    value = header(response, "retry-after")
    return None if value is None else float(value)


def json_body(response: Response) -> Any:
    try:
        return json.loads(response.body)
    except ValueError:
        return None


# ==========================================================================================
# FCM
# ==========================================================================================

PROJECT = "pushfan-demo"
GOOD_TOKEN = "fcm-token-" + "a" * 40  # matches the emulator's token syntax


@pytest.fixture(scope="module")
def fcm(creds: Credentials) -> FcmEmulator:
    return FcmEmulator(creds)


@pytest.fixture(autouse=True)
def _fresh_scripts(request: pytest.FixtureRequest) -> None:
    for name in ("fcm", "apns"):
        if name in request.fixturenames:
            emulator = request.getfixturevalue(name)
            assert isinstance(emulator, FcmEmulator | ApnsEmulator)
            emulator.script.reset()


def fcm_request(
    message: dict[str, Any] | None = None,
    *,
    token: str = GOOD_TOKEN,
    raw: bytes | None = None,
    bearer: str | None = STATIC_TOKEN,
    project: str = PROJECT,
    path: str | None = None,
    method: str = "POST",
) -> Request:
    if raw is None:
        raw = json.dumps({"message": {"token": token} if message is None else message}).encode()
    headers = {"content-type": "application/json"}
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    return Request(
        method=method,
        path=path or f"/v1/projects/{project}/messages:send",
        headers=headers,
        body=raw,
        http2=True,
        connection_id=next(_connections),
    )


def fcm_outcome(response: Response) -> Outcome:
    return fcm_codes.classify_response(
        response.status, json_body(response), retry_after_of(response)
    )


def fcm_send(emulator: FcmEmulator, request: Request) -> tuple[Response, Outcome]:
    response = emulator.handle(request)
    return response, fcm_outcome(response)


def error_code(response: Response) -> str:
    """The FcmError errorCode of an emulator answer (checks the answer is what we think)."""
    details = json_body(response)["error"].get("details", [])
    return next(str(d["errorCode"]) for d in details if "errorCode" in d)


def field_violations(response: Response) -> list[str]:
    details = json_body(response)["error"].get("details", [])
    return [
        v["field"] for d in details if d["@type"] == BAD_REQUEST_TYPE for v in d["fieldViolations"]
    ]


def test_fcm_delivered(fcm: FcmEmulator) -> None:
    response, outcome = fcm_send(fcm, fcm_request())
    assert response.status == 200
    assert outcome == DELIVERED


# Every code the FCM emulator can answer, scripted on one token: (kind, reason, retry-after).
FCM_EXPECTED: dict[str, tuple[OutcomeKind, str, float | None]] = {
    "UNREGISTERED": (K.INVALID_TOKEN, "UNREGISTERED", None),
    # Scripted on a token target, the emulator answers as for a malformed token.
    "INVALID_ARGUMENT": (K.INVALID_TOKEN, fcm_codes.MALFORMED_TOKEN_REASON, None),
    "SENDER_ID_MISMATCH": (K.INVALID_TOKEN, "SENDER_ID_MISMATCH", None),
    "QUOTA_EXCEEDED": (K.QUOTA, "QUOTA_EXCEEDED", 1.0),
    "UNAVAILABLE": (K.RETRY, "UNAVAILABLE", 1.0),
    "INTERNAL": (K.RETRY, "INTERNAL", None),
    "THIRD_PARTY_AUTH_ERROR": (K.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR", None),
}


def test_the_fcm_table_covers_every_code_the_emulator_knows() -> None:
    assert set(FCM_EXPECTED) == FCM_ERROR_CODES


@pytest.mark.parametrize("code", sorted(FCM_EXPECTED))
def test_fcm_scripted_token_error(fcm: FcmEmulator, code: str) -> None:
    fcm.script.configure({"token_errors": {GOOD_TOKEN: code}})
    response, outcome = fcm_send(fcm, fcm_request())
    assert response.status != 200
    assert error_code(response) == code
    kind, reason, retry_after = FCM_EXPECTED[code]
    assert outcome == Outcome(kind, reason, retry_after)


def test_fcm_dead_token_is_unregistered(fcm: FcmEmulator) -> None:
    fcm.script.configure({"dead_tokens": [GOOD_TOKEN]})
    response, outcome = fcm_send(fcm, fcm_request())
    assert response.status == 404
    assert outcome == Outcome(K.INVALID_TOKEN, "UNREGISTERED")
    assert outcome.reason in fcm_codes.DEAD_TOKEN_CODES


@pytest.mark.parametrize("field", ["token", "fid"])
@pytest.mark.parametrize("bad", ["short", "has spaces in it, which no token has", ""])
def test_fcm_malformed_token_is_an_invalid_token(fcm: FcmEmulator, field: str, bad: str) -> None:
    response, outcome = fcm_send(fcm, fcm_request({field: bad}))
    assert response.status == 400
    assert error_code(response) == "INVALID_ARGUMENT"
    assert field_violations(response) == [f"message.{field}"]
    assert outcome == Outcome(K.INVALID_TOKEN, fcm_codes.MALFORMED_TOKEN_REASON)
    assert outcome.reason in fcm_codes.SUSPECT_TOKEN_CODES


def test_fcm_malformed_token_is_recognised_by_the_message_alone(fcm: FcmEmulator) -> None:
    # Real FCM does not always send the google.rpc.BadRequest detail.
    response = fcm.handle(fcm_request({"token": "short"}))
    body = json_body(response)
    assert body["error"]["message"] == INVALID_TOKEN_MESSAGE
    body["error"]["details"] = [
        d for d in body["error"]["details"] if d["@type"] != BAD_REQUEST_TYPE
    ]
    outcome = fcm_codes.classify_response(response.status, body, None)
    assert outcome == Outcome(K.INVALID_TOKEN, fcm_codes.MALFORMED_TOKEN_REASON)


def big_data() -> dict[str, str]:
    return {"blob": "x" * (MAX_MESSAGE_BYTES + 1)}


# Payload problems: INVALID_ARGUMENT that must never blame the token.
PAYLOAD_ERRORS: dict[str, dict[str, Any]] = {
    "too big": {"token": GOOD_TOKEN, "data": big_data()},
    "non-string data value": {"token": GOOD_TOKEN, "data": {"n": 1}},
    "data not a map": {"token": GOOD_TOKEN, "data": ["a"]},
    "bad ttl": {"token": GOOD_TOKEN, "android": {"ttl": "soon"}},
    "two targets": {"token": GOOD_TOKEN, "topic": "news"},
    "no target": {"data": {"a": "b"}},
    "bad topic": {"topic": "no spaces allowed"},
    # Payload checks come first: a bad payload to a malformed token is a payload error.
    "too big, malformed token": {"token": "short", "data": big_data()},
}


@pytest.mark.parametrize("case", sorted(PAYLOAD_ERRORS))
def test_fcm_payload_invalid_argument_is_permanent(fcm: FcmEmulator, case: str) -> None:
    response, outcome = fcm_send(fcm, fcm_request(PAYLOAD_ERRORS[case]))
    assert response.status == 400
    assert error_code(response) == "INVALID_ARGUMENT"
    assert not set(field_violations(response)) & fcm_codes.TOKEN_FIELDS
    assert outcome == Outcome(K.PERMANENT, "INVALID_ARGUMENT")


def test_fcm_too_big_is_permanent_with_its_own_message(fcm: FcmEmulator) -> None:
    response, outcome = fcm_send(fcm, fcm_request(PAYLOAD_ERRORS["too big"]))
    assert json_body(response)["error"]["message"] == TOO_BIG_MESSAGE
    assert outcome.kind is K.PERMANENT


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1, 2]", b'{"mesage": {}}', b"{}"], ids=["text", "list", "typo", "empty"]
)
def test_fcm_malformed_request_is_permanent(fcm: FcmEmulator, raw: bytes) -> None:
    response, outcome = fcm_send(fcm, fcm_request(raw=raw))
    assert response.status == 400
    assert outcome == Outcome(K.PERMANENT, "INVALID_ARGUMENT")


def test_fcm_scripted_invalid_argument_on_a_topic_blames_no_token(fcm: FcmEmulator) -> None:
    fcm.script.configure({"token_errors": {"/topics/news": "INVALID_ARGUMENT"}})
    response, outcome = fcm_send(fcm, fcm_request({"topic": "news"}))
    assert response.status == 400
    assert outcome == Outcome(K.PERMANENT, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    ("code", "kind", "retry_after"),
    [
        ("QUOTA_EXCEEDED", K.QUOTA, 7.0),
        ("UNAVAILABLE", K.RETRY, 7.0),
        ("INTERNAL", K.RETRY, None),  # 500: the emulator sends no Retry-After
    ],
)
def test_fcm_outage_retry_after_comes_from_the_header(
    fcm: FcmEmulator, code: str, kind: OutcomeKind, retry_after: float | None
) -> None:
    fcm.script.start_outage(60, code, retry_after=7)
    response, outcome = fcm_send(fcm, fcm_request())
    assert outcome == Outcome(kind, code, retry_after)
    if retry_after is not None:
        assert header(response, "retry-after") == "7"


def test_fcm_quota_default_retry_after(fcm: FcmEmulator) -> None:
    fcm.script.configure({"token_errors": {GOOD_TOKEN: "QUOTA_EXCEEDED"}})
    response, outcome = fcm_send(fcm, fcm_request())
    assert response.status == 429
    assert header(response, "retry-after") == "1"
    assert outcome == Outcome(K.QUOTA, "QUOTA_EXCEEDED", 1.0)


@pytest.mark.parametrize("bearer", ["not-a-token-we-issued", None], ids=["wrong", "missing"])
def test_fcm_bad_bearer_token_is_a_configuration_error(
    fcm: FcmEmulator, bearer: str | None
) -> None:
    response, outcome = fcm_send(fcm, fcm_request(bearer=bearer))
    assert response.status == 401
    assert json_body(response)["error"]["status"] == "UNAUTHENTICATED"
    assert outcome == Outcome(K.CONFIG_ERROR, "UNAUTHENTICATED")


def test_fcm_401_without_a_status_is_still_unauthenticated(fcm: FcmEmulator) -> None:
    # The emulator's 401 body, less the canonical status a front end may leave out.
    response = fcm.handle(fcm_request(bearer="expired"))
    body = json_body(response)
    del body["error"]["status"]
    outcome = fcm_codes.classify_response(response.status, body, None)
    assert outcome == Outcome(K.CONFIG_ERROR, "UNAUTHENTICATED")


def test_fcm_foreign_project_is_a_configuration_error(fcm: FcmEmulator) -> None:
    response, outcome = fcm_send(fcm, fcm_request(project="someone-elses-project"))
    assert response.status == 403
    assert outcome == Outcome(K.CONFIG_ERROR, "PERMISSION_DENIED")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/projects/pushfan-demo/messages:sendAll"), ("GET", None)],
)
def test_fcm_wrong_route_404_blames_no_token(
    fcm: FcmEmulator, method: str, path: str | None
) -> None:
    # 404 NOT_FOUND like UNREGISTERED, but without the FcmError detail: not a dead token.
    response, outcome = fcm_send(fcm, fcm_request(method=method, path=path))
    assert response.status == 404
    assert outcome == Outcome(K.PERMANENT, "NOT_FOUND")


# -- answers from a proxy or load balancer (not FCM's JSON) -------------------------------


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "expected"),
    [
        (502, None, None, Outcome(K.RETRY, "HTTP_502")),
        (503, "<html>Service Unavailable</html>", 5.0, Outcome(K.RETRY, "HTTP_503", 5.0)),
        (504, {"message": "upstream timed out"}, None, Outcome(K.RETRY, "HTTP_504")),
        (429, None, 30.0, Outcome(K.QUOTA, "HTTP_429", 30.0)),
        (429, ["rate", "limited"], None, Outcome(K.QUOTA, "HTTP_429")),
        (404, "<html>Not Found</html>", None, Outcome(K.PERMANENT, "HTTP_404")),
        (400, {"error": "bad_request"}, None, Outcome(K.PERMANENT, "HTTP_400")),
    ],
)
def test_fcm_non_json_proxy_answers(
    status: int, body: object, retry_after: float | None, expected: Outcome
) -> None:
    assert fcm_codes.classify_response(status, body, retry_after) == expected


def test_fcm_proxy_bodies_decoded_as_a_sender_does() -> None:
    for status, kind in [(502, K.RETRY), (429, K.QUOTA), (404, K.PERMANENT)]:
        response = Response(status, b"<html><body>nginx</body></html>", [("retry-after", "2")])
        outcome = fcm_outcome(response)
        assert outcome.kind is kind
        assert outcome.reason == f"HTTP_{status}"
        assert outcome.retry_after == (None if kind is K.PERMANENT else 2.0)


@pytest.mark.parametrize(("status", "kind"), [(503, K.RETRY), (502, K.RETRY), (429, K.QUOTA)])
def test_fcm_json_error_without_a_known_code_falls_back_to_the_http_status(
    status: int, kind: OutcomeKind
) -> None:
    body = {"error": {"code": status, "message": "Try again later."}}
    assert fcm_codes.classify_response(status, body, 2.0).kind is kind


def test_fcm_unknown_code_never_blames_the_token() -> None:
    outcome = fcm_codes.classify("SOMETHING_NEW", message=INVALID_TOKEN_MESSAGE + "?")
    assert outcome.kind is K.PERMANENT
    assert fcm_codes.classify("").reason == "HTTP_400"


# ==========================================================================================
# APNs
# ==========================================================================================

TOPIC = "com.example.pushfan"
APNS_TOKEN = "ab" * 32


@pytest.fixture(scope="module")
def apns(creds: Credentials) -> ApnsEmulator:
    return ApnsEmulator(creds)


@pytest.fixture(scope="module")
def provider_token(creds: Credentials) -> str:
    """One JWT for the module (a new one per request would be a too-fast refresh)."""
    return make_jwt(creds)


def make_jwt(creds: Credentials, *, iat: int | None = None, kid: str | None = None) -> str:
    return jwt.encode(
        {"iss": creds.apns_team_id, "iat": int(time.time()) if iat is None else iat},
        creds.apns_key_file.read_text(),
        algorithm="ES256",
        headers={"kid": kid or creds.apns_key_id},
    )


def apns_request(
    bearer: str | None,
    *,
    token: str = APNS_TOKEN,
    headers: dict[str, str] | None = None,
    body: bytes = b'{"aps": {"alert": "hi"}}',
    http2: bool = True,
    connection_id: int | None = None,
) -> Request:
    base = {"apns-topic": TOPIC, "apns-push-type": "alert"}
    if bearer is not None:
        base["authorization"] = f"bearer {bearer}"
    base.update(headers or {})
    return Request(
        method="POST",
        path=f"/3/device/{token}",
        headers={k: v for k, v in base.items() if v != ""},
        body=body,
        http2=http2,
        connection_id=next(_connections) if connection_id is None else connection_id,
    )


def apns_outcome(response: Response) -> Outcome:
    body = json_body(response) if response.body else None
    reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
    timestamp = body.get("timestamp") if isinstance(body, dict) else None
    return apns_codes.classify(
        response.status,
        reason,
        timestamp_ms=timestamp if isinstance(timestamp, int) else None,
        retry_after=retry_after_of(response),
    )


def apns_send(emulator: ApnsEmulator, request: Request) -> tuple[Response, Outcome]:
    response = emulator.handle(request)
    return response, apns_outcome(response)


APNS_SETS: dict[str, frozenset[str]] = {
    "DEAD_TOKEN_REASONS": apns_codes.DEAD_TOKEN_REASONS,
    "SUSPECT_TOKEN_REASONS": apns_codes.SUSPECT_TOKEN_REASONS,
    "RETRY_REASONS": apns_codes.RETRY_REASONS,
    "QUOTA_REASONS": apns_codes.QUOTA_REASONS,
    "CONFIG_REASONS": apns_codes.CONFIG_REASONS,
    "PERMANENT_REASONS": apns_codes.PERMANENT_REASONS,
}
SET_KIND = {
    "DEAD_TOKEN_REASONS": K.INVALID_TOKEN,
    "SUSPECT_TOKEN_REASONS": K.INVALID_TOKEN,
    "RETRY_REASONS": K.RETRY,
    "QUOTA_REASONS": K.QUOTA,
    "CONFIG_REASONS": K.CONFIG_ERROR,
    "PERMANENT_REASONS": K.PERMANENT,
}


def test_apns_sets_do_not_overlap() -> None:
    names = sorted(APNS_SETS)
    for a, b in itertools.combinations(names, 2):
        assert not APNS_SETS[a] & APNS_SETS[b], (a, b)


@pytest.mark.parametrize("reason", sorted(REASON_STATUS))
def test_every_apns_reason_is_in_exactly_one_set(reason: str) -> None:
    holders = [name for name, reasons in APNS_SETS.items() if reason in reasons]
    assert len(holders) == 1, holders


# What each of Apple's reasons must mean (independent of the sets, to check them).
APNS_EXPECTED: dict[str, OutcomeKind] = {
    "BadCollapseId": K.PERMANENT,
    "BadDeviceToken": K.INVALID_TOKEN,
    "BadExpirationDate": K.PERMANENT,
    "BadMessageId": K.PERMANENT,
    "BadPriority": K.PERMANENT,
    "BadTopic": K.CONFIG_ERROR,
    "DeviceTokenNotForTopic": K.INVALID_TOKEN,
    "DuplicateHeaders": K.PERMANENT,
    "IdleTimeout": K.RETRY,
    "InvalidPushType": K.PERMANENT,
    "MissingDeviceToken": K.PERMANENT,
    "MissingTopic": K.CONFIG_ERROR,
    "PayloadEmpty": K.PERMANENT,
    "TopicDisallowed": K.CONFIG_ERROR,
    "BadCertificate": K.CONFIG_ERROR,
    "BadCertificateEnvironment": K.CONFIG_ERROR,
    "ExpiredProviderToken": K.CONFIG_ERROR,
    "Forbidden": K.CONFIG_ERROR,
    "InvalidProviderToken": K.CONFIG_ERROR,
    "MissingProviderToken": K.CONFIG_ERROR,
    "BadPath": K.PERMANENT,
    "MethodNotAllowed": K.PERMANENT,
    "ExpiredToken": K.INVALID_TOKEN,
    "Unregistered": K.INVALID_TOKEN,
    "PayloadTooLarge": K.PERMANENT,
    "TooManyProviderTokenUpdates": K.CONFIG_ERROR,
    "TooManyRequests": K.QUOTA,
    "InternalServerError": K.RETRY,
    "ServiceUnavailable": K.RETRY,
    "Shutdown": K.RETRY,
}


def test_the_apns_table_covers_every_reason_the_emulator_knows() -> None:
    assert set(APNS_EXPECTED) == set(REASON_STATUS)


@pytest.mark.parametrize("reason", sorted(REASON_STATUS))
def test_apns_scripted_reason_through_the_emulator(
    apns: ApnsEmulator, provider_token: str, reason: str
) -> None:
    apns.script.configure({"token_errors": {APNS_TOKEN: reason}})
    response, outcome = apns_send(apns, apns_request(provider_token))
    assert response.status == REASON_STATUS[reason]
    assert json_body(response)["reason"] == reason
    assert outcome.kind is APNS_EXPECTED[reason]
    assert outcome.reason == reason
    (holder,) = [name for name, reasons in APNS_SETS.items() if reason in reasons]
    assert outcome.kind is SET_KIND[holder]
    if outcome.kind is K.INVALID_TOKEN:
        assert (outcome.invalid_since is not None) == (response.status == 410)


def test_apns_delivered(apns: ApnsEmulator, provider_token: str) -> None:
    response, outcome = apns_send(apns, apns_request(provider_token))
    assert response.status == 200
    assert outcome == DELIVERED


def test_apns_410_timestamp_becomes_invalid_since_in_utc(
    apns: ApnsEmulator, provider_token: str
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    apns.script.configure({"dead_tokens": [APNS_TOKEN]})
    response, outcome = apns_send(apns, apns_request(provider_token))
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert response.status == 410
    timestamp = json_body(response)["timestamp"]
    assert isinstance(timestamp, int)
    assert outcome.kind is K.INVALID_TOKEN
    assert outcome.reason == "Unregistered"
    since = outcome.invalid_since
    assert since is not None
    assert since.utcoffset() == timedelta(0)
    assert since == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=timestamp)
    assert before <= since <= after


def test_apns_invalid_since_is_exact_to_the_millisecond() -> None:
    ms = 1_714_521_600_123  # 2024-05-01T00:00:00.123Z
    outcome = apns_codes.classify(410, "Unregistered", timestamp_ms=ms)
    assert outcome.invalid_since == datetime(2024, 5, 1, 0, 0, 0, 123000, tzinfo=UTC)


def test_apns_bad_device_token_from_a_malformed_token(
    apns: ApnsEmulator, provider_token: str
) -> None:
    response, outcome = apns_send(apns, apns_request(provider_token, token="not-hex"))
    assert response.status == 400
    assert outcome == Outcome(K.INVALID_TOKEN, "BadDeviceToken")
    assert outcome.reason in apns_codes.SUSPECT_TOKEN_REASONS


@pytest.mark.parametrize(
    ("headers", "body", "reason", "kind"),
    [
        ({"apns-topic": ""}, None, "MissingTopic", K.CONFIG_ERROR),
        ({"apns-topic": "com.other.app"}, None, "TopicDisallowed", K.CONFIG_ERROR),
        ({"apns-push-type": "shout"}, None, "InvalidPushType", K.PERMANENT),
        ({"apns-priority": "7"}, None, "BadPriority", K.PERMANENT),
        ({"apns-expiration": "tomorrow"}, None, "BadExpirationDate", K.PERMANENT),
        ({"apns-collapse-id": "c" * 65}, None, "BadCollapseId", K.PERMANENT),
        ({"apns-id": "not-a-uuid"}, None, "BadMessageId", K.PERMANENT),
        ({}, b"", "PayloadEmpty", K.PERMANENT),
        ({}, b'{"aps": "' + b"x" * 4096 + b'"}', "PayloadTooLarge", K.PERMANENT),
    ],
)
def test_apns_request_checks(
    apns: ApnsEmulator,
    provider_token: str,
    headers: dict[str, str],
    body: bytes | None,
    reason: str,
    kind: OutcomeKind,
) -> None:
    request = apns_request(provider_token, headers=headers)
    if body is not None:
        request.body = body
    response, outcome = apns_send(apns, request)
    assert json_body(response)["reason"] == reason
    assert outcome == Outcome(kind, reason)


def test_apns_provider_token_errors(apns: ApnsEmulator, creds: Credentials) -> None:
    cases = [
        (None, "MissingProviderToken"),
        ("garbage", "InvalidProviderToken"),
        (make_jwt(creds, kid="OTHERKEY01"), "InvalidProviderToken"),
        (make_jwt(creds, iat=int(time.time()) - 2 * 3600), "ExpiredProviderToken"),
    ]
    for bearer, reason in cases:
        response, outcome = apns_send(apns, apns_request(bearer))
        assert response.status == 403
        assert outcome == Outcome(K.CONFIG_ERROR, reason)


def test_apns_too_many_provider_token_updates_is_a_configuration_error(
    apns: ApnsEmulator, creds: Credentials
) -> None:
    connection = next(_connections)
    now = int(time.time())
    first, second = make_jwt(creds, iat=now - 10), make_jwt(creds, iat=now)
    assert apns_send(apns, apns_request(first, connection_id=connection))[1] == DELIVERED
    response, outcome = apns_send(apns, apns_request(second, connection_id=connection))
    assert response.status == 429
    assert outcome == Outcome(K.CONFIG_ERROR, "TooManyProviderTokenUpdates")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("ServiceUnavailable", K.RETRY),
        ("Shutdown", K.RETRY),
        ("InternalServerError", K.RETRY),
        ("TooManyRequests", K.QUOTA),
    ],
)
def test_apns_outage_retry_after_comes_from_the_header(
    apns: ApnsEmulator, provider_token: str, code: str, kind: OutcomeKind
) -> None:
    apns.script.start_outage(60, code, retry_after=9)
    response, outcome = apns_send(apns, apns_request(provider_token))
    assert header(response, "retry-after") == "9"
    assert outcome == Outcome(kind, code, 9.0)


def test_apns_route_errors_are_permanent(apns: ApnsEmulator, provider_token: str) -> None:
    request = apns_request(provider_token)
    request.path = "/2/device/" + APNS_TOKEN
    assert apns_send(apns, request)[1] == Outcome(K.PERMANENT, "BadPath")
    request = apns_request(provider_token)
    request.method = "GET"
    assert apns_send(apns, request)[1] == Outcome(K.PERMANENT, "MethodNotAllowed")


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (429, "", Outcome(K.QUOTA, "HTTP_429", 3.0)),
        (503, "", Outcome(K.RETRY, "HTTP_503", 3.0)),
        (502, "SomethingNew", Outcome(K.RETRY, "SomethingNew", 3.0)),
        (400, "SomethingNew", Outcome(K.PERMANENT, "SomethingNew")),
        (404, "", Outcome(K.PERMANENT, "HTTP_404")),
    ],
)
def test_apns_unknown_reasons_fall_back_to_the_status(
    status: int, reason: str, expected: Outcome
) -> None:
    assert apns_codes.classify(status, reason, retry_after=3.0) == expected


def test_apns_unknown_reason_with_410_blames_no_token() -> None:
    outcome = apns_codes.classify(410, "SomethingNew", timestamp_ms=1)
    assert outcome.kind is not K.INVALID_TOKEN
