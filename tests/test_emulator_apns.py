"""The APNs emulator, exercised through aioapns (the real client code path) and, where a
test needs to forge what aioapns would never send, through httpx over HTTP/2."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsProductionClientProtocol
from cryptography.hazmat.primitives.asymmetric import ec

from pushfan.emulators.apns import ApnsEmulator
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.emulators.server import HttpServer

TOPIC = "com.example.pushfan"
SEND_TIMEOUT_S = 10.0  # aioapns has no request timeout of its own
UPPER_UUID = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}")


def device_token(n: int) -> str:
    return f"{n:064x}"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory: Path = tmp_path_factory.mktemp("apns-credentials")
    return ensure_credentials(directory, token_uri="https://127.0.0.1:1/token")


@pytest.fixture(scope="module")
def emulator(creds: Credentials) -> ApnsEmulator:
    return ApnsEmulator(creds)


@pytest.fixture(scope="module")
async def server(emulator: ApnsEmulator, creds: Credentials) -> AsyncIterator[HttpServer]:
    srv = HttpServer(emulator.handle, ssl_context=creds.server_ssl_context())
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture(autouse=True)
def fresh_script(emulator: ApnsEmulator) -> None:
    emulator.script.reset()


@pytest.fixture
async def apns(server: HttpServer, creds: Credentials) -> AsyncIterator[APNs]:
    """An aioapns client with token auth, pointed at the emulator."""

    async def err_func(request: NotificationRequest, result: NotificationResult) -> None:
        pass  # without it aioapns logs every non-200 at ERROR

    # Built inside the running loop: the pool binds to get_event_loop() at construction.
    client = APNs(
        key=creds.apns_key_file.read_text(),
        key_id=creds.apns_key_id,
        team_id=creds.apns_team_id,
        topic=TOPIC,
        use_sandbox=False,
        ssl_context=creds.client_ssl_context(),
        err_func=err_func,
    )
    client.pool.protocol_class = type(
        "EmulatorProtocol",
        (APNsProductionClientProtocol,),
        {"APNS_SERVER": "127.0.0.1", "APNS_PORT": server.port},
    )
    yield client
    client.pool.close()


def raw_client(server: HttpServer, creds: Credentials, *, http2: bool = True) -> httpx.AsyncClient:
    """One httpx client is one connection (requests are sent one at a time)."""
    return httpx.AsyncClient(
        http2=http2, verify=creds.client_ssl_context(), base_url=server.url, timeout=10
    )


async def send(client: APNs, token: str, message: Any = None, **kwargs: Any) -> NotificationResult:
    request = NotificationRequest(
        device_token=token,
        message={"aps": {"alert": "hi"}} if message is None else message,
        **kwargs,
    )
    return await asyncio.wait_for(client.send_notification(request), SEND_TIMEOUT_S)


def provider_jwt(
    creds: Credentials,
    *,
    key: Any = None,
    kid: str | None = None,
    iss: str | None = None,
    iat: int | None = None,
    algorithm: str = "ES256",
) -> str:
    return jwt.encode(
        {"iss": iss or creds.apns_team_id, "iat": int(time.time()) if iat is None else iat},
        creds.apns_key_file.read_text() if key is None else key,
        algorithm=algorithm,
        headers={"kid": kid or creds.apns_key_id},
    )


async def post(
    client: httpx.AsyncClient,
    *,
    auth: str | None,
    token: str = device_token(1),
    headers: dict[str, str | None] | None = None,
    body: bytes = b'{"aps": {"alert": "hi"}}',
    method: str = "POST",
    path: str | None = None,
) -> httpx.Response:
    sent = {"apns-topic": TOPIC, **(headers or {})}
    if auth is not None:
        sent["authorization"] = f"bearer {auth}"
    return await client.request(
        method,
        path or f"/3/device/{token}",
        headers={k: v for k, v in sent.items() if v is not None},
        content=body if method == "POST" else None,
    )


# -- delivery and scripted errors through aioapns -----------------------------------------


async def test_delivers_each_token_exactly_once(apns: APNs, emulator: ApnsEmulator) -> None:
    tokens = [device_token(n) for n in range(3)] + ["AB" * 32]  # hex in either case
    results = [await send(apns, t) for t in tokens]
    assert [r.status for r in results] == ["200"] * 4
    log = emulator.script.snapshot()
    assert log["per_token"] == dict.fromkeys(tokens, 1)
    assert log["per_target"] == {TOPIC: 4}
    assert log["errors"] == {}


async def test_dead_token_is_unregistered_with_the_time_it_died(
    apns: APNs, emulator: ApnsEmulator
) -> None:
    dead = device_token(7)
    emulator.script.configure({"dead_tokens": [dead]})
    before = now_ms()
    first = await send(apns, dead)
    assert (first.status, first.description) == ("410", "Unregistered")
    assert isinstance(first.timestamp, int)
    assert before <= first.timestamp <= now_ms()
    await asyncio.sleep(0.01)
    second = await send(apns, dead)
    assert second.timestamp == first.timestamp  # remembered, not "now" again
    assert emulator.script.snapshot()["per_token"] == {}


@pytest.mark.parametrize("token", ["not-a-token", "ab" * 31 + "a", "g" * 64, "ab" * 33])
async def test_malformed_token_is_bad_device_token(
    apns: APNs, emulator: ApnsEmulator, token: str
) -> None:
    result = await send(apns, token)
    assert (result.status, result.description) == ("400", "BadDeviceToken")
    assert emulator.script.snapshot()["total"] == 0


@pytest.mark.parametrize(
    ("code", "status"),
    [("DeviceTokenNotForTopic", "400"), ("TooManyRequests", "429"), ("ExpiredToken", "410")],
)
async def test_scripted_token_error_hits_that_token_only(
    apns: APNs, emulator: ApnsEmulator, code: str, status: str
) -> None:
    bad, good = device_token(10), device_token(11)
    emulator.script.configure({"token_errors": {bad: code}})
    bad_result, good_result = await asyncio.gather(send(apns, bad), send(apns, good))
    assert (bad_result.status, bad_result.description) == (status, code)
    assert good_result.status == "200"
    assert (bad_result.timestamp is not None) == (status == "410")
    assert emulator.script.snapshot()["per_token"] == {good: 1}


async def test_internal_server_error_then_recovery(apns: APNs, emulator: ApnsEmulator) -> None:
    emulator.script.configure({"failure_rate": 1.0, "failure_code": "InternalServerError"})
    result = await send(apns, device_token(1))
    assert (result.status, result.description) == ("500", "InternalServerError")
    emulator.script.configure({"failure_rate": 0.0})
    assert (await send(apns, device_token(1))).status == "200"
    assert emulator.script.snapshot()["per_token"] == {device_token(1): 1}


async def test_outage_answers_503_with_retry_after_then_recovers(
    apns: APNs, server: HttpServer, creds: Credentials, emulator: ApnsEmulator
) -> None:
    seconds = 2.0
    async with raw_client(server, creds) as raw:
        started = await raw.post(
            "/_emulator/outage",
            json={"seconds": seconds, "code": "ServiceUnavailable", "retry_after": 7},
        )
        scripted_by = time.monotonic()  # the outage ends at most `seconds` after this
        assert started.status_code == 200
        during = await post(raw, auth=provider_jwt(creds))
        assert during.status_code == 503
        assert during.headers["retry-after"] == "7"
        assert during.json() == {"reason": "ServiceUnavailable"}
    result = await send(apns, device_token(2))
    assert (result.status, result.description) == ("503", "ServiceUnavailable")
    await asyncio.sleep(scripted_by + seconds + 0.05 - time.monotonic())
    assert (await send(apns, device_token(2))).status == "200"
    log = emulator.script.snapshot()
    assert log["per_token"] == {device_token(2): 1}
    assert log["errors"] == {"ServiceUnavailable": 2}


def padded_message(size: int) -> dict[str, Any]:
    """A message that aioapns serialises to exactly ``size`` bytes."""
    base = len(json.dumps({"aps": {"alert": ""}}, ensure_ascii=False).encode())
    return {"aps": {"alert": "x" * (size - base)}}


@pytest.mark.parametrize(
    ("size", "push_type", "status"),
    [
        (4096, None, "200"),
        (4097, None, "413"),
        (5120, PushType.VOIP, "200"),
        (5121, PushType.VOIP, "413"),
    ],
)
async def test_payload_size_limit(
    apns: APNs, size: int, push_type: PushType | None, status: str
) -> None:
    topic = TOPIC + ".voip" if push_type is PushType.VOIP else None
    result = await send(
        apns, device_token(3), padded_message(size), push_type=push_type, apns_topic=topic
    )
    assert result.status == status
    if status == "413":
        assert result.description == "PayloadTooLarge"


@pytest.mark.parametrize(("length", "status"), [(64, "200"), (65, "400")])
async def test_collapse_id_at_most_64_bytes(apns: APNs, length: int, status: str) -> None:
    result = await send(apns, device_token(4), collapse_key="c" * length)
    assert result.status == status
    if status == "400":
        assert result.description == "BadCollapseId"


async def test_many_concurrent_sends_each_delivered_once(
    apns: APNs, emulator: ApnsEmulator
) -> None:
    tokens = [device_token(n) for n in range(500)]
    dead = set(tokens[::10])
    emulator.script.configure({"dead_tokens": sorted(dead)})
    results = await asyncio.gather(*(send(apns, t) for t in tokens))
    for token, result in zip(tokens, results, strict=True):
        assert result.status == ("410" if token in dead else "200"), token
    log = emulator.script.snapshot()
    assert log["per_token"] == {t: 1 for t in tokens if t not in dead}
    assert log["errors"] == {"Unregistered": len(dead)}


# -- provider tokens, forged with PyJWT ----------------------------------------------------


def forged_jwt(creds: Credentials, kind: str) -> str | None:
    if kind == "missing":
        return None
    if kind == "garbage":
        return "not.a.jwt"
    if kind == "wrong kid":
        return provider_jwt(creds, kid="OTHERKEY01")
    if kind == "wrong team":
        return provider_jwt(creds, iss="OTHERTEAM1")
    if kind == "bad signature":
        return provider_jwt(creds, key=ec.generate_private_key(ec.SECP256R1()))
    if kind == "HS256":
        return provider_jwt(creds, key="a-shared-secret-of-32-bytes-or-more!", algorithm="HS256")
    if kind == "expired":
        return provider_jwt(creds, iat=int(time.time()) - 3601)
    assert kind == "valid"
    return provider_jwt(creds)


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("missing", 403, "MissingProviderToken"),
        ("garbage", 403, "InvalidProviderToken"),
        ("wrong kid", 403, "InvalidProviderToken"),
        ("wrong team", 403, "InvalidProviderToken"),
        ("bad signature", 403, "InvalidProviderToken"),
        ("HS256", 403, "InvalidProviderToken"),
        ("expired", 403, "ExpiredProviderToken"),
        ("valid", 200, None),
    ],
)
async def test_provider_token_checks(
    server: HttpServer,
    creds: Credentials,
    emulator: ApnsEmulator,
    kind: str,
    status: int,
    reason: str | None,
) -> None:
    async with raw_client(server, creds) as raw:
        response = await post(raw, auth=forged_jwt(creds, kind))
    assert response.http_version == "HTTP/2"
    assert response.status_code == status
    if reason is None:
        assert response.content == b""
        assert emulator.script.snapshot()["total"] == 1
    else:
        assert response.json() == {"reason": reason}
        assert emulator.script.snapshot()["total"] == 0


async def test_changing_jwt_within_20_minutes_on_one_connection_is_too_many_updates(
    server: HttpServer, creds: Credentials
) -> None:
    first, second = provider_jwt(creds), provider_jwt(creds)
    assert first != second  # ES256 signatures are randomised
    async with raw_client(server, creds) as conn:
        assert (await post(conn, auth=first)).status_code == 200
        refused = await post(conn, auth=second)
        assert refused.status_code == 429
        assert refused.json() == {"reason": "TooManyProviderTokenUpdates"}
        assert (await post(conn, auth=first)).status_code == 200  # it keeps the old one
    async with raw_client(server, creds) as other:
        assert (await post(other, auth=second)).status_code == 200  # a new connection may


async def test_refresh_20_minutes_after_the_previous_jwt_was_issued_is_allowed(
    server: HttpServer, creds: Credentials
) -> None:
    now = int(time.time())
    async with raw_client(server, creds) as conn:
        assert (await post(conn, auth=provider_jwt(creds, iat=now - 25 * 60))).status_code == 200
        assert (await post(conn, auth=provider_jwt(creds, iat=now))).status_code == 200
    async with raw_client(server, creds) as conn:
        assert (await post(conn, auth=provider_jwt(creds, iat=now - 10 * 60))).status_code == 200
        assert (await post(conn, auth=provider_jwt(creds, iat=now))).status_code == 429


# -- headers, apns-id, routes -----------------------------------------------------------------


async def test_apns_id_is_echoed_or_generated(server: HttpServer, creds: Credentials) -> None:
    given, token = str(uuid.uuid4()), provider_jwt(creds)
    async with raw_client(server, creds) as raw:  # one connection: one JWT
        echoed = await post(raw, auth=token, headers={"apns-id": given})
        generated = await post(raw, auth=token)
        refused = await post(raw, auth=None)
        malformed = await post(raw, auth=None, headers={"apns-id": "not-a-uuid"})
    assert (echoed.status_code, echoed.headers["apns-id"]) == (200, given)
    assert generated.status_code == 200
    assert refused.status_code == 403  # errors carry one too
    assert UPPER_UUID.fullmatch(generated.headers["apns-id"])
    assert UPPER_UUID.fullmatch(refused.headers["apns-id"])
    assert generated.headers["apns-id"] != refused.headers["apns-id"]
    assert malformed.headers["apns-id"] == "not-a-uuid"


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"headers": {"apns-topic": None}}, 400, "MissingTopic"),
        ({"headers": {"apns-topic": "com.example.other"}}, 400, "TopicDisallowed"),
        ({"headers": {"apns-push-type": "sms"}}, 400, "InvalidPushType"),
        ({"headers": {"apns-priority": "7"}}, 400, "BadPriority"),
        ({"headers": {"apns-expiration": "tomorrow"}}, 400, "BadExpirationDate"),
        ({"headers": {"apns-id": "not-a-uuid"}}, 400, "BadMessageId"),
        ({"body": b""}, 400, "PayloadEmpty"),
        ({"body": b"{not json"}, 400, "PayloadEmpty"),
        ({"body": b"[1, 2]"}, 400, "PayloadEmpty"),
        ({"token": ""}, 400, "MissingDeviceToken"),
        ({"path": "/3/devices/" + device_token(1)}, 404, "BadPath"),
        ({"method": "GET"}, 405, "MethodNotAllowed"),
        ({"method": "PUT"}, 405, "MethodNotAllowed"),
    ],
)
async def test_request_validation(
    server: HttpServer,
    creds: Credentials,
    emulator: ApnsEmulator,
    change: dict[str, Any],
    status: int,
    reason: str,
) -> None:
    async with raw_client(server, creds) as raw:
        response = await post(raw, auth=provider_jwt(creds), **change)
    assert response.status_code == status
    assert response.json() == {"reason": reason}
    log = emulator.script.snapshot()
    assert (log["total"], log["errors"]) == (0, {reason: 1})


async def test_all_optional_headers_valid_is_delivered(
    server: HttpServer, creds: Credentials, emulator: ApnsEmulator
) -> None:
    headers: dict[str, str | None] = {
        "apns-push-type": "background",
        "apns-priority": "5",
        "apns-expiration": "0",
        "apns-collapse-id": "score",
        "apns-id": str(uuid.uuid4()).upper(),
    }
    async with raw_client(server, creds) as raw:
        response = await post(raw, auth=provider_jwt(creds), headers=headers)
    assert response.status_code == 200
    assert emulator.script.snapshot()["per_token"] == {device_token(1): 1}


async def test_http1_is_refused_but_control_api_answers(
    server: HttpServer, creds: Credentials, emulator: ApnsEmulator
) -> None:
    async with raw_client(server, creds, http2=False) as raw:
        refused = await post(raw, auth=provider_jwt(creds))
        log = await raw.get("/_emulator/deliveries")
    assert refused.http_version == "HTTP/1.1"
    assert refused.status_code == 505
    assert "reason" in refused.json()
    assert log.status_code == 200
    assert log.json()["total"] == 0


async def test_latency_delays_responses(apns: APNs, server: HttpServer, creds: Credentials) -> None:
    async with raw_client(server, creds) as raw:
        assert (await raw.put("/_emulator/script", json={"latency_ms": 300})).status_code == 200
    started = time.monotonic()
    assert (await send(apns, device_token(5))).status == "200"
    assert time.monotonic() - started >= 0.29  # a lower bound only: cannot flake


# -- the control API over HTTP ------------------------------------------------------------


async def test_control_api_scripts_and_reports(
    apns: APNs, server: HttpServer, creds: Credentials
) -> None:
    dead, alive = device_token(20), device_token(21)
    async with raw_client(server, creds) as raw:
        before = now_ms()
        scripted = await raw.put("/_emulator/script", json={"dead_tokens": [dead]})
        after = now_ms()
        assert scripted.status_code == 200
        assert (await raw.put("/_emulator/script", json={"bogus": 1})).status_code == 400
        await asyncio.sleep(0.05)

        gone = await send(apns, dead)
        assert (gone.status, gone.description) == ("410", "Unregistered")
        assert gone.timestamp is not None
        assert before <= gone.timestamp <= after  # when it was scripted dead, not now
        assert (await send(apns, alive)).status == "200"

        log = (await raw.get("/_emulator/deliveries")).json()
        assert log == {
            "total": 1,
            "per_token": {alive: 1},
            "per_target": {TOPIC: 1},
            "errors": {"Unregistered": 1},
        }

        outage = await raw.post(
            "/_emulator/outage", json={"seconds": 60, "code": "Shutdown", "retry_after": 30}
        )
        assert outage.status_code == 200
        result = await send(apns, alive)
        assert (result.status, result.description) == ("503", "Shutdown")
        unknown = await raw.post("/_emulator/outage", json={"seconds": 1, "code": "Nope"})
        assert unknown.status_code == 400

        assert (await raw.post("/_emulator/reset")).status_code == 200
        log = (await raw.get("/_emulator/deliveries")).json()
        assert log == {"total": 0, "per_token": {}, "per_target": {}, "errors": {}}
    assert (await send(apns, dead)).status == "200"  # reset forgot the outage and the dead
