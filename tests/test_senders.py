"""The lean FCM and APNs senders against the emulators, over real HTTP/2 and TLS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from pushfan.emulators.apns import ApnsEmulator
from pushfan.emulators.credentials import Credentials
from pushfan.emulators.runner import Emulators
from pushfan.emulators.server import HttpServer, ServerOptions
from schemas import NotificationJob
from worker.render import render_apns, render_fcm
from worker.retry import RetryPolicy, send_with_retries
from worker.senders.apns import ApnsSender, ProviderToken
from worker.senders.base import Message, OutcomeKind
from worker.senders.fcm import (
    FcmSender,
    TokenSource,
    service_account_credentials,
    static_credentials,
)
from worker.senders.h2client import H2Pool

STATIC = "pushfan-emulator-token"
TOPIC = "com.example.pushfan"


def _job(**payload: object) -> NotificationJob:
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": "j-senders",
            "type": "news",
            "audience": {"kind": "all"},
            "payload": {"title": "Hello", "body": "World", **payload},
            "created_at": now,
            "expires_at": now + timedelta(hours=1),
        }
    )


def fcm_token(i: int) -> str:
    return f"t{i:011d}:APA91b{'k' * 100}"


def apns_token(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture(autouse=True)
def fresh_scripts(emulators: Emulators) -> None:
    emulators.fcm.script.reset()
    emulators.apns.script.reset()


def _fcm_sender(creds: Credentials, port: int, **pool: float) -> FcmSender:
    return FcmSender(
        H2Pool("127.0.0.1", port, ssl_context=creds.client_ssl_context(), **pool),  # type: ignore[arg-type]
        creds.fcm_project_id,
        TokenSource(static_credentials(STATIC), refreshable=False),
    )


def _apns_sender(
    creds: Credentials, port: int, clock: Callable[[], float] = time.time, **pool: float
) -> ApnsSender:
    token = ProviderToken(
        creds.apns_key_file.read_text(), creds.apns_key_id, creds.apns_team_id, clock=clock
    )
    return ApnsSender(
        H2Pool("127.0.0.1", port, ssl_context=creds.client_ssl_context(), **pool),  # type: ignore[arg-type]
        token,
    )


# --- FCM -------------------------------------------------------------------------------


async def test_fcm_one_outcome_per_token_in_order(emulators: Emulators) -> None:
    good = [fcm_token(i) for i in range(5)]
    dead, mismatch = fcm_token(100), fcm_token(101)
    emulators.fcm.script.configure(
        {"dead_tokens": [dead], "token_errors": {mismatch: "SENDER_ID_MISMATCH"}}
    )
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port)
    tokens = [good[0], dead, good[1], "not a token", mismatch, *good[2:]]

    outcomes = await sender.send(tokens, render_fcm(_job()))
    await sender.close()

    assert [(o.kind, o.reason) for o in outcomes] == [
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.INVALID_TOKEN, "UNREGISTERED"),
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.INVALID_TOKEN, "INVALID_ARGUMENT_TOKEN"),
        (OutcomeKind.INVALID_TOKEN, "SENDER_ID_MISMATCH"),
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.DELIVERED, ""),
    ]
    assert emulators.fcm.script.delivered == dict.fromkeys(good, 1)


async def test_fcm_a_payload_error_blames_no_token(emulators: Emulators) -> None:
    message = render_fcm(_job())
    big = json.loads(message.body.replace(b"\x00TOKEN\x00", b"SLOT"))
    big["message"]["data"] = {"blob": "x" * 5000}
    oversized = Message(
        source=message.source,
        body=json.dumps(big).encode().replace(b"SLOT", b"\x00TOKEN\x00"),
        headers=message.headers,
    )
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port)

    outcomes = await sender.send([fcm_token(i) for i in range(12)], oversized)
    await sender.close()

    assert {(o.kind, o.reason) for o in outcomes} == {(OutcomeKind.PERMANENT, "INVALID_ARGUMENT")}
    assert not emulators.fcm.script.delivered


async def test_fcm_quota_carries_retry_after(emulators: Emulators) -> None:
    emulators.fcm.script.start_outage(5, "QUOTA_EXCEEDED", retry_after=7)
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port)

    (outcome,) = await sender.send([fcm_token(1)], render_fcm(_job()))
    await sender.close()

    assert (outcome.kind, outcome.reason, outcome.retry_after) == (
        OutcomeKind.QUOTA,
        "QUOTA_EXCEEDED",
        7.0,
    )


async def test_fcm_service_account_token_is_cached_and_refreshed_after_401(
    emulators: Emulators,
) -> None:
    creds = emulators.credentials
    account = service_account_credentials(str(creds.fcm_service_account_file))
    source = TokenSource(account, ca_file=creds.ca_file)
    sender = FcmSender(
        H2Pool("127.0.0.1", emulators.fcm_server.port, ssl_context=creds.client_ssl_context()),
        creds.fcm_project_id,
        source,
    )
    issued = emulators.fcm.tokens_issued
    first = await sender.send([fcm_token(1), fcm_token(2)], render_fcm(_job()))
    second = await sender.send([fcm_token(3)], render_fcm(_job()))
    assert emulators.fcm.tokens_issued - issued == 1  # cached across sends

    emulators.fcm.expire_tokens()  # revoked early: the next send gets 401
    third = await sender.send([fcm_token(4)], render_fcm(_job()))
    await sender.close()

    assert all(o.kind is OutcomeKind.DELIVERED for o in [*first, *second, *third])
    assert emulators.fcm.tokens_issued - issued == 2
    assert source.refreshes == 2


async def test_fcm_credential_error_trips_the_breaker(emulators: Emulators) -> None:
    tokens = [fcm_token(i) for i in range(20)]
    emulators.fcm.script.configure(
        {"token_errors": dict.fromkeys(tokens, "THIRD_PARTY_AUTH_ERROR")}
    )
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port)

    outcomes = await sender.send(tokens, render_fcm(_job()))
    errors_after_first = sum(emulators.fcm.script.errors.values())
    refused = await sender.send(tokens, render_fcm(_job()))
    await sender.close()

    assert {o.kind for o in outcomes} == {OutcomeKind.CONFIG_ERROR}
    assert sender.last_config_error == "THIRD_PARTY_AUTH_ERROR"
    assert {o.kind for o in refused} == {OutcomeKind.CONFIG_ERROR}
    assert sum(emulators.fcm.script.errors.values()) == errors_after_first  # nothing sent


async def test_fcm_sender_id_mismatch_on_most_of_a_batch_deletes_nothing(
    emulators: Emulators,
) -> None:
    tokens = [fcm_token(i) for i in range(20)]
    emulators.fcm.script.configure(
        {"token_errors": dict.fromkeys(tokens[:15], "SENDER_ID_MISMATCH")}
    )
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port)

    outcomes = await sender.send(tokens, render_fcm(_job()))
    await sender.close()

    assert not any(o.kind is OutcomeKind.INVALID_TOKEN for o in outcomes)
    assert [o.kind for o in outcomes[:15]] == [OutcomeKind.CONFIG_ERROR] * 15


# --- APNs ------------------------------------------------------------------------------


async def test_apns_one_outcome_per_token_in_order(emulators: Emulators) -> None:
    good = [apns_token(i) for i in range(4)]
    dead, busy = apns_token(100), apns_token(101)
    emulators.apns.script.configure(
        {"dead_tokens": [dead], "token_errors": {busy: "TooManyRequests"}}
    )
    sender = _apns_sender(emulators.credentials, emulators.apns_server.port)
    tokens = [good[0], dead, "zz-not-hex", busy, *good[1:]]

    outcomes = await sender.send(tokens, render_apns(_job(), topic=TOPIC))
    await sender.close()

    kinds = [(o.kind, o.reason) for o in outcomes]
    assert kinds == [
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.INVALID_TOKEN, "Unregistered"),
        (OutcomeKind.INVALID_TOKEN, "BadDeviceToken"),
        (OutcomeKind.QUOTA, "TooManyRequests"),  # that device only
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.DELIVERED, ""),
        (OutcomeKind.DELIVERED, ""),
    ]
    since = outcomes[1].invalid_since
    assert since is not None
    assert abs((datetime.now(UTC) - since).total_seconds()) < 60
    assert emulators.apns.script.delivered == dict.fromkeys(good, 1)


async def test_apns_bad_device_token_on_most_of_a_batch_is_a_config_error(
    emulators: Emulators,
) -> None:
    tokens = [apns_token(i) for i in range(20)]
    emulators.apns.script.configure({"token_errors": dict.fromkeys(tokens[:14], "BadDeviceToken")})
    sender = _apns_sender(emulators.credentials, emulators.apns_server.port)

    outcomes = await sender.send(tokens, render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert not any(o.kind is OutcomeKind.INVALID_TOKEN for o in outcomes)
    assert sender.last_config_error == "BadDeviceToken"


async def test_apns_provider_token_is_reused_then_refreshed_on_schedule(
    emulators: Emulators,
) -> None:
    offset = [-45 * 60.0]  # a token signed 45 minutes ago: still valid, due for refresh

    def clock() -> float:
        return time.time() + offset[0]

    sender = _apns_sender(emulators.credentials, emulators.apns_server.port, clock=clock)
    message = render_apns(_job(), topic=TOPIC)

    first = await sender.send([apns_token(1), apns_token(2)], message)
    again = await sender.send([apns_token(3)], message)
    signed_before = sender.provider_token.signed
    offset[0] = 0.0  # 45 minutes later: the schedule (40 min) re-signs, on the same connection
    later = await sender.send([apns_token(4)], message)
    await sender.close()

    assert signed_before == 1
    assert sender.provider_token.signed == 2
    assert all(o.kind is OutcomeKind.DELIVERED for o in [*first, *again, *later])
    assert "TooManyProviderTokenUpdates" not in emulators.apns.script.errors


def test_apns_refresh_faster_than_20_minutes_is_refused() -> None:
    with pytest.raises(ValueError, match="20 to 50 minutes"):
        ProviderToken("key", "kid", "team", refresh_s=10 * 60)


async def test_apns_expired_provider_token_is_renewed_once(emulators: Emulators) -> None:
    times = iter([time.time() - 2 * 3600])  # the first token is signed two hours ago

    def clock() -> float:
        return next(times, time.time())

    sender = _apns_sender(emulators.credentials, emulators.apns_server.port, clock=clock)

    (outcome,) = await sender.send([apns_token(7)], render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert outcome.kind is OutcomeKind.DELIVERED
    assert emulators.apns.script.errors["ExpiredProviderToken"] == 1
    assert sender.provider_token.signed == 2


# --- the HTTP/2 client under trouble -----------------------------------------------------


@pytest.fixture(params=["frames", "h2"])
async def apns_server(
    emulators: Emulators, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., HttpServer]]:
    """Servers on both engines: ``h2`` is an HTTP/2 implementation not written here, so
    the client is judged by an independent peer as well as by our own server."""
    servers: list[HttpServer] = []

    async def start(**options: int) -> HttpServer:
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

    yield start  # type: ignore[misc]
    for server in servers:
        await server.stop()


async def test_goaway_mid_burst_loses_nothing_and_repeats_nothing(
    emulators: Emulators, apns_server: Callable[..., asyncio.Future[HttpServer]]
) -> None:
    server = await apns_server(goaway_after=37)
    sender = _apns_sender(emulators.credentials, server.port, max_connections=2)
    tokens = [apns_token(i) for i in range(400)]

    outcomes = await sender.send(tokens, render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)
    assert server.emulator.script.delivered == dict.fromkeys(tokens, 1)  # type: ignore[attr-defined]
    assert isinstance(sender.pool, H2Pool)
    assert sender.pool.connects > 5


async def test_one_stream_at_a_time_is_honoured(
    emulators: Emulators, apns_server: Callable[..., asyncio.Future[HttpServer]]
) -> None:
    server = await apns_server(max_concurrent_streams=1)
    sender = _apns_sender(emulators.credentials, server.port, max_connections=1)
    tokens = [apns_token(i) for i in range(50)]

    outcomes = await sender.send(tokens, render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)
    assert server.emulator.script.delivered == dict.fromkeys(tokens, 1)  # type: ignore[attr-defined]


async def test_tiny_flow_control_windows(
    emulators: Emulators, apns_server: Callable[..., asyncio.Future[HttpServer]]
) -> None:
    server = await apns_server(initial_window_size=16, max_frame_size=16384)
    sender = _apns_sender(emulators.credentials, server.port)
    tokens = [apns_token(i) for i in range(20)]

    outcomes = await sender.send(tokens, render_apns(_job(body="b" * 2000), topic=TOPIC))
    await sender.close()

    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)


async def test_a_slow_answer_times_out_as_retryable(emulators: Emulators) -> None:
    emulators.apns.script.configure({"latency_ms": 1500})
    sender = _apns_sender(emulators.credentials, emulators.apns_server.port, timeout_s=0.3)

    (outcome,) = await sender.send([apns_token(1)], render_apns(_job(), topic=TOPIC))
    await sender.close()

    assert (outcome.kind, outcome.reason) == (OutcomeKind.RETRY, "TIMEOUT")


async def test_dropped_connections_lose_nothing_with_the_retry_policy(
    emulators: Emulators,
) -> None:
    emulators.apns.script.configure({"latency_ms": 50})
    sender = _apns_sender(emulators.credentials, emulators.apns_server.port)
    tokens = [apns_token(i) for i in range(300)]
    message = render_apns(_job(), topic=TOPIC)

    async def drop_soon() -> None:
        await asyncio.sleep(0.02)
        emulators.apns_server.drop_connections()

    dropper = asyncio.create_task(drop_soon())
    outcomes = await send_with_retries(
        tokens,
        lambda batch: sender.send(batch, message),
        RetryPolicy(max_attempts=5, base_delay_s=0.05, max_delay_s=0.2),
    )
    await dropper
    await sender.close()

    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)
    delivered = emulators.apns.script.delivered
    assert set(delivered) == set(tokens)  # nothing lost; a dropped in-flight one may repeat


@pytest.mark.slow
async def test_a_30_second_outage_then_every_message_exactly_once(emulators: Emulators) -> None:
    tokens = [fcm_token(i) for i in range(200)]
    emulators.fcm.script.start_outage(30, "UNAVAILABLE", retry_after=5)
    sender = _fcm_sender(emulators.credentials, emulators.fcm_server.port)
    message = render_fcm(_job())
    started = time.monotonic()

    outcomes = await send_with_retries(
        tokens,
        lambda batch: sender.send(batch, message),
        RetryPolicy(max_attempts=30, max_total_s=90, base_delay_s=0.5, max_delay_s=8),
    )
    await sender.close()

    assert time.monotonic() - started >= 29  # it really waited the outage out
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)
    assert emulators.fcm.script.delivered == dict.fromkeys(tokens, 1)
    assert emulators.fcm.script.errors["UNAVAILABLE"] >= len(tokens)
