"""The FCM v1 emulator, exercised through firebase-admin's real async code path.

firebase-admin has no endpoint override: the module fixture points the class attribute
``_MessagingService.FCM_URL`` at the emulator (read when an app's messaging service is
first built) and makes httpx (``SSL_CERT_FILE``) and google-auth's ``requests`` token
fetch (``REQUESTS_CA_BUNDLE``) trust the local CA. Apps are bound to the session event
loop; each gets a unique name and is deleted at module end (its httpx client is closed
in the loop first, because ``delete_app`` itself calls ``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import firebase_admin
import google.oauth2.credentials
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from firebase_admin import credentials as fb_credentials
from firebase_admin import exceptions, messaging

from pushfan.emulators.credentials import Credentials
from pushfan.emulators.fcm import (
    INVALID_TOKEN_MESSAGE,
    JWT_BEARER,
    STATIC_TOKEN,
    TOO_BIG_MESSAGE,
    FcmEmulator,
)
from pushfan.emulators.server import HttpServer, Request
from tests.firebase_emulator import threaded_fcm

PROJECT = "pushfan-demo"
MESSAGE_NAME = re.compile(rf"projects/{PROJECT}/messages/\d{{16,}}")
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


@dataclass
class Env:
    creds: Credentials
    emulator: FcmEmulator
    server: HttpServer
    apps: list[Any] = field(default_factory=list)

    def static_app(self) -> Any:
        """An app with a fixed bearer token (no OAuth flow)."""
        # google-auth's constructor has no annotations.
        make = google.oauth2.credentials.Credentials
        cred = make(token=STATIC_TOKEN)  # type: ignore[no-untyped-call]
        return self._app(cred)

    def service_account_app(self) -> Any:
        """An app whose token comes from the emulator's /token via google-auth."""
        return self._app(fb_credentials.Certificate(str(self.creds.fcm_service_account_file)))

    def _app(self, cred: Any) -> Any:
        name = f"fcm-test-{uuid.uuid4().hex[:8]}"
        app = firebase_admin.initialize_app(cred, {"projectId": PROJECT}, name=name)
        self.apps.append(app)
        return app

    def client(self, *, http2: bool = True) -> httpx.AsyncClient:
        """A raw client trusting the local CA (its own context: httpcore sets ALPN on it)."""
        return httpx.AsyncClient(
            base_url=self.server.url, http2=http2, verify=self.creds.client_ssl_context()
        )

    async def raw_send(
        self,
        body: dict[str, Any] | bytes,
        *,
        bearer: str | None = STATIC_TOKEN,
        project: str = PROJECT,
    ) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if bearer is not None:
            headers["authorization"] = f"Bearer {bearer}"
        async with self.client() as client:
            return await client.post(
                f"/v1/projects/{project}/messages:send", content=content, headers=headers
            )


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with threaded_fcm(tmp_path_factory.mktemp("fcm-emulator")) as fcm:
        yield Env(fcm.creds, fcm.emulator, fcm.server, fcm.apps)


@pytest.fixture(scope="module")
def app(env: Env) -> Any:
    return env.static_app()


@pytest.fixture(scope="module")
def sa_app(env: Env) -> Any:
    return env.service_account_app()


@pytest.fixture(autouse=True)
def _fresh_script(env: Env) -> Iterator[None]:
    env.emulator.script.reset()
    yield
    env.emulator.script.reset()


def tokens(n: int, label: str = "tok") -> list[str]:
    return [f"{label}-{uuid.uuid4().hex}" for _ in range(n)]


async def multicast(app: Any, targets: list[str], *, fid: bool = False, **kw: Any) -> Any:
    if fid:
        msg = messaging.MulticastMessage(fids=targets, **kw)
    else:
        with warnings.catch_warnings():  # 7.x deprecates tokens= for fids=
            warnings.simplefilter("ignore", DeprecationWarning)
            msg = messaging.MulticastMessage(tokens=targets, **kw)
    return await messaging.send_each_for_multicast_async(msg, app=app)


async def send_one(app: Any, token: str, **kw: Any) -> Any:
    """The one response of a one-token multicast."""
    batch = await multicast(app, [token], **kw)
    assert len(batch.responses) == 1
    return batch.responses[0]


def violations(error: Any) -> list[dict[str, str]]:
    body = error.http_response.json() if hasattr(error, "http_response") else error.json()
    out: list[dict[str, str]] = []
    for detail in body["error"].get("details", []):
        if detail["@type"] == BAD_REQUEST_TYPE:
            out.extend(detail["fieldViolations"])
    return out


# -- success paths ------------------------------------------------------------------------


async def test_multicast_delivers_each_token_exactly_once(env: Env, app: Any) -> None:
    targets = tokens(5)
    batch = await multicast(app, targets, data={"k": "v"})
    assert batch.success_count == 5
    assert all(MESSAGE_NAME.fullmatch(r.message_id) for r in batch.responses)
    assert len({r.message_id for r in batch.responses}) == 5
    snap = env.emulator.script.snapshot()
    assert snap["per_token"] == dict.fromkeys(targets, 1)
    assert snap["per_target"] == {PROJECT: 5}
    assert snap["errors"] == {}


async def test_fid_target_is_accepted(env: Env, app: Any) -> None:
    fids = tokens(3, "fid")
    batch = await multicast(app, fids, fid=True)
    assert batch.success_count == 3
    assert env.emulator.script.delivered == dict.fromkeys(fids, 1)


async def test_topic_and_condition_targets(env: Env, app: Any) -> None:
    batch = await messaging.send_each_async(
        [messaging.Message(topic="news"), messaging.Message(condition="'a' in topics")], app=app
    )
    assert batch.success_count == 2
    assert env.emulator.script.delivered == {"/topics/news": 1, "condition:'a' in topics": 1}


async def test_validate_only_validates_without_delivering(env: Env, app: Any) -> None:
    msg = messaging.MulticastMessage(fids=tokens(1))
    batch = await messaging.send_each_for_multicast_async(msg, dry_run=True, app=app)
    assert batch.responses[0].message_id == f"projects/{PROJECT}/messages/fake_message_id"
    bad = messaging.MulticastMessage(fids=["short"])
    batch = await messaging.send_each_for_multicast_async(bad, dry_run=True, app=app)
    assert isinstance(batch.responses[0].exception, exceptions.InvalidArgumentError)
    assert env.emulator.script.snapshot()["total"] == 0


async def test_android_ttl_from_the_sdk_passes_and_a_bad_one_is_rejected(
    env: Env, app: Any
) -> None:
    android = messaging.AndroidConfig(ttl=dt.timedelta(seconds=90, microseconds=5))
    ok = await send_one(app, tokens(1)[0], android=android)
    assert ok.success
    resp = await env.raw_send({"message": {"token": tokens(1)[0], "android": {"ttl": "90"}}})
    assert resp.status_code == 400
    assert resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in violations(resp)] == ["message.android.ttl"]


# -- errors as firebase-admin's own exceptions ---------------------------------------------


async def test_unregistered_token(env: Env, app: Any) -> None:
    dead, alive = tokens(2)
    env.emulator.script.dead_tokens = {dead}
    batch = await multicast(app, [dead, alive])
    assert isinstance(batch.responses[0].exception, messaging.UnregisteredError)
    assert batch.responses[0].exception.http_response.status_code == 404
    assert batch.responses[1].success
    snap = env.emulator.script.snapshot()
    assert snap["per_token"] == {alive: 1}
    assert snap["errors"] == {"UNREGISTERED": 1}


async def test_malformed_token_is_distinct_from_payload_errors(env: Env, app: Any) -> None:
    good, scripted = tokens(2)
    env.emulator.script.token_errors = {scripted: "INVALID_ARGUMENT"}
    malformed = await send_one(app, "not-a-token")
    too_big = await send_one(app, good, data={"blob": "x" * 5000})
    invalid_scripted = await send_one(app, scripted)

    for resp in (malformed, invalid_scripted):
        assert isinstance(resp.exception, exceptions.InvalidArgumentError)
        assert str(resp.exception) == INVALID_TOKEN_MESSAGE
        assert [v["field"] for v in violations(resp.exception)] == ["message.token"]
    # A payload error: same exception class and errorCode, other message and field.
    assert isinstance(too_big.exception, exceptions.InvalidArgumentError)
    assert str(too_big.exception) == TOO_BIG_MESSAGE
    assert INVALID_TOKEN_MESSAGE not in str(too_big.exception)
    assert [v["field"] for v in violations(too_big.exception)] == ["message"]
    body = too_big.exception.http_response.json()["error"]
    assert body["code"] == 400
    assert {"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"} in body["details"]
    snap = env.emulator.script.snapshot()
    assert snap["total"] == 0
    assert snap["errors"] == {"INVALID_ARGUMENT": 3}


async def test_payload_validation_over_raw_requests(env: Env) -> None:
    token = tokens(1)[0]
    cases: list[tuple[dict[str, Any] | bytes, str]] = [
        (b"{not json", ""),
        ({"message": {"token": token, "data": {"n": 1}}}, "message.data[n]"),
        ({"message": {"token": token, "topic": "news"}}, "message"),
        ({"message": {"data": {"a": "b"}}}, "message"),
        ({"message": {"token": token}, "bogus": 1}, "bogus"),
        ({"message": {"token": token, "data": {"d": "é" * 2100}}}, "message"),
    ]
    for body, field_name in cases:
        resp = await env.raw_send(body)
        assert resp.status_code == 400, body
        error = resp.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert error["message"] != INVALID_TOKEN_MESSAGE
        assert [v["field"] for v in violations(resp)] == [field_name]
    # Exactly at the limit passes: it counts the UTF-8 bytes of the encoded payload, the
    # target (token, topic...) excluded.
    base = json.dumps({"data": {"d": ""}}, separators=(",", ":"))
    filler = "x" * (4096 - len(base))
    resp = await env.raw_send({"message": {"token": token, "data": {"d": filler}}})
    assert resp.status_code == 200
    resp = await env.raw_send({"message": {"token": token, "data": {"d": filler + "x"}}})
    assert resp.status_code == 400
    assert env.emulator.script.delivered == {token: 1}


async def test_sender_id_mismatch(env: Env, app: Any) -> None:
    token = tokens(1)[0]
    env.emulator.script.token_errors = {token: "SENDER_ID_MISMATCH"}
    resp = await send_one(app, token)
    assert isinstance(resp.exception, messaging.SenderIdMismatchError)
    assert resp.exception.http_response.status_code == 403
    assert resp.exception.http_response.json()["error"]["status"] == "PERMISSION_DENIED"


async def test_quota_exceeded_carries_retry_after(env: Env, app: Any) -> None:
    token = tokens(1)[0]
    env.emulator.script.token_errors = {token: "QUOTA_EXCEEDED"}
    resp = await send_one(app, token)
    assert isinstance(resp.exception, messaging.QuotaExceededError)
    assert resp.exception.http_response.status_code == 429
    assert resp.exception.http_response.headers["retry-after"] == "1"
    # The async SDK does not retry 429: one attempt reached the emulator.
    assert env.emulator.script.errors == {"QUOTA_EXCEEDED": 1}

    env.emulator.script.start_outage(30, "QUOTA_EXCEEDED", retry_after=17)
    resp = await send_one(app, tokens(1)[0])
    assert isinstance(resp.exception, messaging.QuotaExceededError)
    assert resp.exception.http_response.headers["retry-after"] == "17"


async def test_outage_unavailable_counts_the_sdk_retries(env: Env, app: Any) -> None:
    env.emulator.script.start_outage(60, "UNAVAILABLE", retry_after=3)
    resp = await send_one(app, tokens(1)[0])
    assert isinstance(resp.exception, exceptions.UnavailableError)
    assert resp.exception.http_response.status_code == 503
    assert resp.exception.http_response.headers["retry-after"] == "3"
    # firebase-admin's async client retried the 503 four times by itself.
    assert env.emulator.script.errors == {"UNAVAILABLE": 5}
    assert env.emulator.script.snapshot()["total"] == 0


async def test_internal_error(env: Env, app: Any) -> None:
    token = tokens(1)[0]
    env.emulator.script.token_errors = {token: "INTERNAL"}
    resp = await send_one(app, token)
    assert isinstance(resp.exception, exceptions.InternalError)
    assert resp.exception.http_response.status_code == 500
    assert env.emulator.script.errors == {"INTERNAL": 5}  # 1 + the SDK's 4 retries


async def test_third_party_auth_error(env: Env, sa_app: Any) -> None:
    token = tokens(1)[0]
    assert (await send_one(sa_app, tokens(1)[0])).success  # the app holds a token now
    env.emulator.script.token_errors = {token: "THIRD_PARTY_AUTH_ERROR"}
    before = env.emulator.tokens_issued
    resp = await send_one(sa_app, token)
    assert isinstance(resp.exception, messaging.ThirdPartyAuthError)
    assert resp.exception.http_response.status_code == 401
    # Quirk: the SDK takes any 401 for an expired access token, refreshes it and resends,
    # twice, before giving up: 3 attempts and 2 new tokens.
    assert env.emulator.script.errors == {"THIRD_PARTY_AUTH_ERROR": 3}
    assert env.emulator.tokens_issued - before == 2


async def test_third_party_auth_error_with_a_static_token_fails_the_whole_batch(
    env: Env, app: Any
) -> None:
    # Quirk: a credential that cannot refresh raises out of the SDK's 401 handling, and
    # send_each_for_multicast_async then fails the whole call, not one response.
    bad, good = tokens(2)
    env.emulator.script.token_errors = {bad: "THIRD_PARTY_AUTH_ERROR"}
    with pytest.raises(exceptions.UnknownError, match="necessary fields need to refresh"):
        await multicast(app, [bad, good])


# -- auth ---------------------------------------------------------------------------------


async def test_bad_or_missing_bearer_token_is_401(env: Env) -> None:
    body = {"message": {"token": tokens(1)[0]}}
    for bearer, wording in ((None, "is missing required"), ("nope", "had invalid")):
        resp = await env.raw_send(body, bearer=bearer)
        assert resp.status_code == 401
        error = resp.json()["error"]
        assert error["status"] == "UNAUTHENTICATED"
        assert wording in error["message"]
        assert "details" not in error  # not an FcmError: not THIRD_PARTY_AUTH_ERROR
    assert env.emulator.script.errors == {"UNAUTHENTICATED": 2}
    assert env.emulator.script.snapshot()["total"] == 0


async def test_foreign_project_is_403_without_fcm_error(env: Env) -> None:
    resp = await env.raw_send({"message": {"token": tokens(1)[0]}}, project="someone-else")
    assert resp.status_code == 403
    assert resp.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "details" not in resp.json()["error"]


async def test_service_account_token_is_fetched_once_and_cached(env: Env) -> None:
    sa = env.service_account_app()  # fresh: no token yet
    before = env.emulator.tokens_issued
    for _ in range(3):
        batch = await multicast(sa, tokens(4))
        assert batch.success_count == 4
    assert env.emulator.tokens_issued - before == 1
    assert env.emulator.script.snapshot()["total"] == 12


async def test_expired_access_token_is_refreshed_by_the_sdk(env: Env, sa_app: Any) -> None:
    assert (await send_one(sa_app, tokens(1)[0])).success
    before = env.emulator.tokens_issued
    env.emulator.expire_tokens()
    assert (await send_one(sa_app, tokens(1)[0])).success
    assert env.emulator.tokens_issued - before == 1
    assert env.emulator.script.errors == {"UNAUTHENTICATED": 1}


def _assertion(env: Env, **overrides: Any) -> str:
    account = json.loads(env.creds.fcm_service_account_file.read_text())
    now = int(time.time())
    claims = {"iss": account["client_email"], "aud": account["token_uri"]}
    claims |= {"iat": now, "exp": now + 3600, "scope": "x"}
    key = overrides.pop("key", account["private_key"])
    claims |= overrides
    return jwt.encode(claims, key, algorithm="RS256")


async def test_token_endpoint_verifies_the_assertion(env: Env) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    bad = [
        _assertion(env, key=other_key),
        _assertion(env, aud="https://elsewhere/token"),
        _assertion(env, iss="mallory@example.com"),
        _assertion(env, iat=now - 7200, exp=now - 3600),
        "garbage",
    ]
    async with env.client() as client:
        for assertion in bad:
            form = {"grant_type": JWT_BEARER, "assertion": assertion}
            resp = await client.post("/token", data=form)
            assert resp.status_code == 400
            assert resp.json()["error"] == "invalid_grant"
        resp = await client.post("/token", data={"grant_type": "password"})
        assert resp.status_code == 400
        resp = await client.post(
            "/token", data={"grant_type": JWT_BEARER, "assertion": _assertion(env)}
        )
        assert resp.status_code == 200
        issued = resp.json()
    assert issued["token_type"] == "Bearer"
    assert issued["expires_in"] == 3600
    resp = await env.raw_send({"message": {"token": tokens(1)[0]}}, bearer=issued["access_token"])
    assert resp.status_code == 200


# -- outages, control API, transports, latency ---------------------------------------------


async def test_outage_that_ends_then_every_message_is_delivered_once(env: Env, app: Any) -> None:
    async with env.client() as client:
        resp = await client.post(
            "/_emulator/outage", json={"seconds": 1.5, "code": "UNAVAILABLE", "retry_after": 2}
        )
        assert resp.status_code == 200
    targets = tokens(3)
    # The SDK's own 503 retries (after 0, 1, 2 s) outlast a short outage.
    batch = await multicast(app, targets)
    assert batch.success_count == 3
    assert env.emulator.script.delivered == dict.fromkeys(targets, 1)
    failed = env.emulator.script.errors["UNAVAILABLE"]
    assert failed >= 3
    later = tokens(2)
    assert (await multicast(app, later)).success_count == 2
    assert env.emulator.script.errors["UNAVAILABLE"] == failed
    assert env.emulator.script.delivered[later[0]] == 1


async def test_control_api_over_http2(env: Env, app: Any) -> None:
    dead, alive = tokens(2)
    async with env.client() as client:
        resp = await client.put("/_emulator/script", json={"dead_tokens": [dead]})
        assert resp.status_code == 200
        assert resp.http_version == "HTTP/2"
        resp = await client.put("/_emulator/script", json={"token_errors": {dead: "NOPE"}})
        assert resp.status_code == 400

        batch = await multicast(app, [dead, alive])
        assert isinstance(batch.responses[0].exception, messaging.UnregisteredError)

        snap = (await client.get("/_emulator/deliveries")).json()
        assert snap["per_token"] == {alive: 1}
        assert snap["errors"] == {"UNREGISTERED": 1}

        resp = await client.post("/_emulator/outage", json={"seconds": 30, "code": "INTERNAL"})
        assert resp.status_code == 200
        resp = await env.raw_send({"message": {"token": alive}})
        assert resp.status_code == 500

        assert (await client.post("/_emulator/reset")).status_code == 200
        assert (await client.get("/_emulator/deliveries")).json()["total"] == 0
        assert (await multicast(app, [dead])).success_count == 1


async def test_http11_is_served(env: Env) -> None:
    token = tokens(1)[0]
    async with env.client(http2=False) as client:
        resp = await client.post(
            f"/v1/projects/{PROJECT}/messages:send",
            json={"message": {"token": token}},
            headers={"authorization": f"Bearer {STATIC_TOKEN}"},
        )
    assert resp.http_version == "HTTP/1.1"
    assert resp.status_code == 200
    assert MESSAGE_NAME.fullmatch(resp.json()["name"])
    assert env.emulator.script.delivered == {token: 1}


async def test_latency_is_applied(env: Env, app: Any) -> None:
    env.emulator.script.configure({"latency_ms": 300})
    body = json.dumps({"message": {"token": tokens(1)[0]}}).encode()
    request = Request(
        method="POST",
        path=f"/v1/projects/{PROJECT}/messages:send",
        headers={"authorization": f"Bearer {STATIC_TOKEN}"},
        body=body,
        http2=True,
        connection_id=0,
    )
    assert env.emulator.handle(request).delay == pytest.approx(0.3)
    started = time.monotonic()
    assert (await send_one(app, tokens(1)[0])).success
    assert time.monotonic() - started >= 0.25


async def test_unknown_routes_are_404(env: Env) -> None:
    async with env.client() as client:
        assert (await client.get(f"/v1/projects/{PROJECT}/messages:send")).status_code == 404
        assert (await client.post("/v1/other")).status_code == 404


def _post(path: str, body: bytes, headers: dict[str, str] | None = None) -> Request:
    return Request("POST", path, headers or {}, body, http2=True, connection_id=0)


async def test_issued_tokens_expire(env: Env) -> None:
    emulator = FcmEmulator(env.creds, token_lifetime=1)
    form = f"grant_type={JWT_BEARER}&assertion={_assertion(env)}".encode()
    issued = json.loads(emulator.handle(_post("/token", form)).body)
    assert issued["expires_in"] == 1
    send = json.dumps({"message": {"token": tokens(1)[0]}}).encode()
    auth = {"authorization": f"Bearer {issued['access_token']}"}
    path = f"/v1/projects/{PROJECT}/messages:send"
    assert emulator.handle(_post(path, send, auth)).status == 200
    await asyncio.sleep(1.1)
    assert emulator.handle(_post(path, send, auth)).status == 401
    # Static tokens never expire.
    static = {"authorization": f"Bearer {STATIC_TOKEN}"}
    assert emulator.handle(_post(path, send, static)).status == 200
