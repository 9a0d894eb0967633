"""The lean senders on the reference pool (``h2``'s state machine) against the emulators."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pushfan.emulators.apns import ApnsEmulator
from pushfan.emulators.credentials import Credentials
from pushfan.emulators.runner import Emulators
from pushfan.emulators.server import HttpServer, ServerOptions
from pushfan.errors import SetupError
from pushfan.settings import load_settings
from schemas import NotificationJob
from worker.render import render_apns, render_fcm
from worker.senders.apns import ApnsSender, ProviderToken
from worker.senders.base import OutcomeKind
from worker.senders.factory import build_senders, traffic_of
from worker.senders.fcm import FcmSender, TokenSource, static_credentials
from worker.senders.h2ref import H2RefPool

STATIC = "pushfan-emulator-token"
TOPIC = "com.example.pushfan"


def _job(**payload: object) -> NotificationJob:
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": "j-h2ref",
            "type": "news",
            "audience": {"kind": "all"},
            "payload": {"title": "Hello", "body": "World", **payload},
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
    )


def fcm_token(i: int) -> str:
    return f"r{i:011d}:APA91b{'k' * 100}"


def apns_token(i: int) -> str:
    return f"{i:064x}"


def _pool(creds: Credentials, port: int, **options: Any) -> H2RefPool:
    return H2RefPool("127.0.0.1", port, ssl_context=creds.client_ssl_context(), **options)


def _fcm_sender(creds: Credentials, port: int, **options: Any) -> FcmSender:
    tokens = TokenSource(static_credentials(STATIC), refreshable=False)
    return FcmSender(_pool(creds, port, **options), creds.fcm_project_id, tokens)


def _apns_sender(creds: Credentials, port: int, **options: Any) -> ApnsSender:
    key = creds.apns_key_file.read_text()
    token = ProviderToken(key, creds.apns_key_id, creds.apns_team_id)
    return ApnsSender(_pool(creds, port, **options), token)


@pytest.fixture(autouse=True)
def fresh_scripts(emulators: Emulators) -> None:
    emulators.fcm.script.reset()
    emulators.apns.script.reset()


async def test_fcm_delivers_each_token_once_and_classifies_the_dead(
    emulators: Emulators,
) -> None:
    good = [fcm_token(i) for i in range(300)]
    dead, mismatch = fcm_token(1000), fcm_token(1001)
    emulators.fcm.script.configure(
        {"dead_tokens": [dead], "token_errors": {mismatch: "SENDER_ID_MISMATCH"}}
    )
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port, max_connections=2)

    outcomes = await sender.send([dead, "not a token", mismatch, *good], render_fcm(_job()))
    await sender.close()

    assert [(o.kind, o.reason) for o in outcomes[:3]] == [
        (OutcomeKind.INVALID_TOKEN, "UNREGISTERED"),
        (OutcomeKind.INVALID_TOKEN, "INVALID_ARGUMENT_TOKEN"),
        (OutcomeKind.INVALID_TOKEN, "SENDER_ID_MISMATCH"),
    ]
    assert {o.kind for o in outcomes[3:]} == {OutcomeKind.DELIVERED}
    assert emulators.fcm.script.delivered == dict.fromkeys(good, 1)
    assert isinstance(sender.pool, H2RefPool)
    assert sender.pool.traffic.classes["2xx"] == len(good)
    assert sender.pool.traffic.classes["4xx"] == 3
    assert sender.pool.traffic.in_flight == 0


async def test_apns_delivers_each_token_once_and_classifies_the_dead(
    emulators: Emulators,
) -> None:
    good = [apns_token(i) for i in range(300)]
    dead, busy = apns_token(1000), apns_token(1001)
    emulators.apns.script.configure(
        {"dead_tokens": [dead], "token_errors": {busy: "TooManyRequests"}}
    )
    sender = _apns_sender(emulators.credentials, emulators.apns_server.port)

    outcomes = await sender.send(
        [dead, "zz-not-hex", busy, *good], render_apns(_job(), topic=TOPIC)
    )
    await sender.close()

    assert [(o.kind, o.reason) for o in outcomes[:3]] == [
        (OutcomeKind.INVALID_TOKEN, "Unregistered"),
        (OutcomeKind.INVALID_TOKEN, "BadDeviceToken"),
        (OutcomeKind.QUOTA, "TooManyRequests"),
    ]
    assert outcomes[0].invalid_since is not None
    assert {o.kind for o in outcomes[3:]} == {OutcomeKind.DELIVERED}
    assert emulators.apns.script.delivered == dict.fromkeys(good, 1)


async def test_429_carries_retry_after(emulators: Emulators) -> None:
    emulators.fcm.script.start_outage(5, "QUOTA_EXCEEDED", retry_after=7)
    emulators.apns.script.start_outage(5, "TooManyRequests", retry_after=3)
    fcm = _fcm_sender(emulators.credentials, emulators.fcm_server.port)
    apns = _apns_sender(emulators.credentials, emulators.apns_server.port)

    (fcm_outcome,) = await fcm.send([fcm_token(1)], render_fcm(_job()))
    (apns_outcome,) = await apns.send([apns_token(1)], render_apns(_job(), topic=TOPIC))
    await fcm.close()
    await apns.close()

    assert (fcm_outcome.kind, fcm_outcome.reason, fcm_outcome.retry_after) == (
        OutcomeKind.QUOTA,
        "QUOTA_EXCEEDED",
        7.0,
    )
    assert (apns_outcome.kind, apns_outcome.reason, apns_outcome.retry_after) == (
        OutcomeKind.QUOTA,
        "TooManyRequests",
        3.0,
    )
    assert isinstance(fcm.pool, H2RefPool)
    assert fcm.pool.traffic.classes["429"] == 1


StartServer = Callable[..., Coroutine[Any, Any, HttpServer]]


@pytest.fixture(params=["frames", "h2"])
async def apns_server(
    emulators: Emulators, request: pytest.FixtureRequest
) -> AsyncIterator[StartServer]:
    """APNs emulators on both server engines, with the HTTP/2 options a test asks for."""
    servers: list[HttpServer] = []

    async def start(**options: Any) -> HttpServer:
        emulator = ApnsEmulator(emulators.credentials, topics=(TOPIC,))
        server = HttpServer(
            emulator.handle,
            ssl_context=emulators.credentials.server_ssl_context(),
            options=ServerOptions(engine=request.param, **options),
        )
        server.emulator = emulator  # type: ignore[attr-defined]
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def test_goaway_mid_burst_loses_nothing_and_repeats_nothing(
    emulators: Emulators, apns_server: StartServer
) -> None:
    server = await apns_server(goaway_after=37)
    sender = _apns_sender(emulators.credentials, server.port, max_connections=2)
    tokens = [apns_token(i) for i in range(400)]

    outcomes = await sender.send(tokens, render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}
    assert server.emulator.script.delivered == dict.fromkeys(tokens, 1)  # type: ignore[attr-defined]
    assert isinstance(sender.pool, H2RefPool)
    assert sender.pool.connects > 5


async def test_one_stream_at_a_time_and_tiny_windows(
    emulators: Emulators, apns_server: StartServer
) -> None:
    server = await apns_server(max_concurrent_streams=1, initial_window_size=16)
    sender = _apns_sender(emulators.credentials, server.port, max_connections=1)
    tokens = [apns_token(i) for i in range(30)]

    outcomes = await sender.send(tokens, render_apns(_job(body="b" * 2000), topic=TOPIC))
    await sender.close()

    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}
    assert server.emulator.script.delivered == dict.fromkeys(tokens, 1)  # type: ignore[attr-defined]


async def test_a_slow_answer_times_out_as_retryable(emulators: Emulators) -> None:
    emulators.apns.script.configure({"latency_ms": 1500})
    sender = _apns_sender(emulators.credentials, emulators.apns_server.port, timeout_s=0.3)

    (outcome,) = await sender.send([apns_token(1)], render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert (outcome.kind, outcome.reason) == (OutcomeKind.RETRY, "TIMEOUT")


async def test_a_server_without_http2_is_a_setup_error(emulators: Emulators) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(emulators.credentials.cert_file, emulators.credentials.key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    server = HttpServer(emulators.apns.handle, ssl_context=ctx)
    await server.start()
    sender = _apns_sender(emulators.credentials, server.port)
    try:
        with pytest.raises(SetupError, match="ALPN h2"):
            await sender.send([apns_token(1)], render_apns(_job(), topic=TOPIC))
    finally:
        await sender.close()
        await server.stop()


async def test_the_factory_builds_h2_by_setting(
    emulators: Emulators, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHFAN_FCM__IMPLEMENTATION", "h2")
    monkeypatch.setenv("PUSHFAN_APNS__IMPLEMENTATION", "h2")
    settings = emulators.apply(load_settings())
    assert (settings.fcm.implementation, settings.apns.implementation) == ("h2", "h2")
    senders = build_senders(settings, ("android", "ios"))
    fcm, apns = senders["android"], senders["ios"]
    assert isinstance(fcm, FcmSender)
    assert isinstance(fcm.pool, H2RefPool)
    assert isinstance(apns, ApnsSender)
    assert isinstance(apns.pool, H2RefPool)

    fcm_outcomes = await fcm.send([fcm_token(7)], render_fcm(_job()))
    apns_outcomes = await apns.send([apns_token(7)], render_apns(_job(), topic=TOPIC))
    await fcm.close()
    await apns.close()

    assert [o.kind for o in [*fcm_outcomes, *apns_outcomes]] == [OutcomeKind.DELIVERED] * 2
    traffic = traffic_of(fcm)
    assert traffic is not None
    assert traffic.classes["2xx"] == 1
