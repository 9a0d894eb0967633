"""The SDK reference senders against the emulators, through the real libraries.

:class:`FcmSdkSender` drives firebase-admin's ``send_each_for_multicast_async`` and
:class:`ApnsSdkSender` drives aioapns. Each test checks one outcome per token, in order,
and the emulator's delivery log for exactly-once delivery.

The FCM emulator runs on its own loop in a thread: firebase-admin fetches service-account
OAuth tokens with blocking ``requests`` inside the event loop, so an emulator on the same
loop could never answer. Tests script it only while nothing is in flight. Only one test
waits out firebase-admin's own 503 retries (about 7 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import firebase_admin
import google.oauth2.credentials
import pytest
from aioapns import APNs, NotificationRequest
from aioapns.common import NotificationResult
from aioapns.connection import APNsProductionClientProtocol
from firebase_admin import credentials as fb_credentials
from firebase_admin import exceptions, messaging

from pushfan.emulators.apns import ApnsEmulator
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.emulators.fcm import STATIC_TOKEN, FcmEmulator
from pushfan.emulators.server import HttpServer, Request, Response
from schemas import NotificationJob
from tests.firebase_emulator import threaded_fcm
from worker.render import fcm_body, render_apns, render_fcm
from worker.retry import RetryPolicy
from worker.senders import apns_sdk, fcm_sdk
from worker.senders.apns_sdk import ApnsSdkSender
from worker.senders.base import DELIVERED, Message, Outcome, OutcomeKind
from worker.senders.fcm_codes import MALFORMED_TOKEN_REASON
from worker.senders.fcm_sdk import FcmSdkSender

PROJECT = "pushfan-demo"
TOPIC = "com.example.pushfan"
NOW = datetime.now(UTC)

K = OutcomeKind


def job(payload: dict[str, Any] | None = None, **fields: Any) -> NotificationJob:
    return NotificationJob.model_validate(
        {
            "job_id": "job-1",
            "type": "order_shipped",
            "audience": {"kind": "all"},
            "payload": {"title": "Shipped", "body": "On its way"} if payload is None else payload,
            "created_at": NOW,
            **fields,
        }
    )


def fcm_tokens(n: int, label: str = "tok") -> list[str]:
    return [f"{label}-{uuid.uuid4().hex}" for _ in range(n)]


def apns_tokens(n: int) -> list[str]:
    return [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(n)]


def kinds(outcomes: list[Outcome]) -> list[tuple[OutcomeKind, str]]:
    return [(o.kind, o.reason) for o in outcomes]


class Recorder:
    """Wraps an emulator's handler; keeps every request it answered."""

    def __init__(self) -> None:
        self.handle: Callable[[Request], Response] | None = None
        self.requests: list[Request] = []

    def __call__(self, request: Request) -> Response:
        assert self.handle is not None
        if not request.path.startswith("/_emulator/"):
            self.requests.append(request)
        return self.handle(request)


# == FCM =====================================================================================


@dataclass
class Fcm:
    creds: Credentials
    emulator: FcmEmulator
    server: HttpServer
    recorder: Recorder
    apps: list[Any] = field(default_factory=list)

    def app(self, *, service_account: bool = False, project: str = PROJECT) -> Any:
        if service_account:
            cred: Any = fb_credentials.Certificate(str(self.creds.fcm_service_account_file))
        else:
            make = google.oauth2.credentials.Credentials
            cred = make(token=STATIC_TOKEN)  # type: ignore[no-untyped-call]
        name = f"sdk-sender-{uuid.uuid4().hex[:8]}"
        app = firebase_admin.initialize_app(cred, {"projectId": project}, name=name)
        self.apps.append(app)
        return app

    @property
    def script(self) -> Any:
        return self.emulator.script


@pytest.fixture(scope="module")
async def fcm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fcm]:
    recorder = Recorder()

    def record(handle: Callable[[Request], Response]) -> Recorder:
        recorder.handle = handle
        return recorder

    async with threaded_fcm(tmp_path_factory.mktemp("fcm-sdk"), record) as fcm:
        yield Fcm(fcm.creds, fcm.emulator, fcm.server, recorder, fcm.apps)


@pytest.fixture(scope="module")
def fcm_app(fcm: Fcm) -> Any:
    return fcm.app()


@pytest.fixture
def fcm_sender(fcm: Fcm, fcm_app: Any) -> Iterator[FcmSdkSender]:
    fcm.script.reset()
    fcm.recorder.requests.clear()
    yield FcmSdkSender(fcm_app)
    fcm.script.reset()


async def test_fcm_mixed_batch_one_outcome_per_token_in_order(
    fcm: Fcm, fcm_sender: FcmSdkSender
) -> None:
    good = fcm_tokens(3, "good")
    dead, bad_arg, quota, mismatch = fcm_tokens(4)
    fcm.script.dead_tokens = {dead}
    fcm.script.token_errors = {
        bad_arg: "INVALID_ARGUMENT",  # scripted: answered as a malformed token
        quota: "QUOTA_EXCEEDED",
        mismatch: "SENDER_ID_MISMATCH",
    }
    batch = [good[0], dead, "not-a-token", good[1], bad_arg, "", quota, mismatch, good[2]]
    outcomes = await fcm_sender.send(batch, render_fcm(job()))
    assert kinds(outcomes) == [
        (K.DELIVERED, ""),
        (K.INVALID_TOKEN, "UNREGISTERED"),
        (K.INVALID_TOKEN, MALFORMED_TOKEN_REASON),
        (K.DELIVERED, ""),
        (K.INVALID_TOKEN, MALFORMED_TOKEN_REASON),
        (K.INVALID_TOKEN, MALFORMED_TOKEN_REASON),  # empty: answered without sending
        (K.QUOTA, "QUOTA_EXCEEDED"),
        (K.INVALID_TOKEN, "SENDER_ID_MISMATCH"),  # one of a few: believed
        (K.DELIVERED, ""),
    ]
    assert outcomes[6].retry_after == 1.0  # from the 429's Retry-After header
    snap = fcm.script.snapshot()
    assert snap["per_token"] == dict.fromkeys(good, 1)
    assert snap["errors"] == {
        "UNREGISTERED": 1,
        "INVALID_ARGUMENT": 2,
        "QUOTA_EXCEEDED": 1,  # 429 is not retried by the SDK
        "SENDER_ID_MISMATCH": 1,
    }
    assert len(fcm.recorder.requests) == len(batch) - 1  # the empty token was not sent
    assert fcm_sender.last_config_error is None


async def test_fcm_sends_what_render_fcm_renders(fcm: Fcm, fcm_sender: FcmSdkSender) -> None:
    """The reference path and the lean path put the same message on the wire."""
    payload = {
        "title": "Hello",
        "body": "World",
        "image": "https://cdn.example.com/a.png",
        "data": {"order": "42", "nul": "a\x00b"},
        "android": {"channel_id": "orders", "collapse_key": "order-42"},
    }
    expires = datetime.now(UTC) + timedelta(hours=1)
    cases = [
        job(payload, priority="urgent", expires_at=expires),
        job({"data": {"k": "v"}, "android": {"ttl": 0, "priority": "normal"}}, priority="urgent"),
        job({"body": "only"}, priority="low"),
    ]
    for case in cases:
        fcm.recorder.requests.clear()
        token = fcm_tokens(1)[0]
        rendered = render_fcm(case)
        assert await fcm_sender.send([token], rendered) == [DELIVERED]
        (request,) = fcm.recorder.requests
        sent = json.loads(request.body)["message"]
        lean = json.loads(fcm_body(rendered, token))["message"]
        # firebase-admin writes the priority enum in lower case; FCM takes either.
        for message in (sent, lean):
            if "priority" in message.get("android", {}):
                message["android"]["priority"] = message["android"]["priority"].upper()
        if "ttl" in lean.get("android", {}) and case.payload.android is None:
            # ttl from expires_at is measured at render vs send time: a second apart at most
            assert abs(int(sent["android"]["ttl"][:-1]) - int(lean["android"]["ttl"][:-1])) <= 1
            sent["android"]["ttl"] = lean["android"]["ttl"]
        assert sent == lean
        assert request.http2


async def test_fcm_payload_invalid_argument_is_permanent_and_blames_no_token(
    fcm: Fcm, fcm_sender: FcmSdkSender
) -> None:
    # Over FCM's 4096-byte payload limit (built past the schema, which would refuse it):
    # firebase-admin does not check sizes; the emulator refuses.
    small = render_fcm(job({"data": {"blob": "x" * 4000}}))
    rendered = dataclasses.replace(
        small,
        source=small.source.model_copy(update={"data": {"blob": "x" * 4200}}),
        body=small.body.replace(b"x" * 4000, b"x" * 4200),
    )
    tokens = fcm_tokens(12)
    outcomes = await fcm_sender.send(tokens, rendered)
    assert kinds(outcomes) == [(K.PERMANENT, "INVALID_ARGUMENT")] * 12
    assert fcm.script.snapshot()["total"] == 0
    assert fcm.script.errors == {"INVALID_ARGUMENT": 12}  # one attempt each: not retried
    assert fcm_sender.last_config_error is None


@pytest.mark.parametrize(("mismatched", "expected"), [(15, K.CONFIG_ERROR), (1, K.INVALID_TOKEN)])
async def test_fcm_sender_id_mismatch_on_most_of_a_batch_is_a_config_error(
    fcm: Fcm, fcm_sender: FcmSdkSender, mismatched: int, expected: OutcomeKind
) -> None:
    tokens = fcm_tokens(20)
    fcm.script.token_errors = dict.fromkeys(tokens[:mismatched], "SENDER_ID_MISMATCH")
    outcomes = await fcm_sender.send(tokens, render_fcm(job()))
    assert kinds(outcomes) == [(expected, "SENDER_ID_MISMATCH")] * mismatched + [
        (K.DELIVERED, "")
    ] * (20 - mismatched)
    assert fcm.script.delivered == dict.fromkeys(tokens[mismatched:], 1)
    config = "SENDER_ID_MISMATCH" if expected is K.CONFIG_ERROR else None
    assert fcm_sender.last_config_error == config


async def test_fcm_malformed_tokens_on_most_of_a_batch_are_a_config_error(
    fcm: Fcm, fcm_sender: FcmSdkSender
) -> None:
    good = fcm_tokens(4)
    batch = [f"bad token {n}" for n in range(8)] + good  # wrong token kind, say
    outcomes = await fcm_sender.send(batch, render_fcm(job()))
    assert (
        kinds(outcomes) == [(K.CONFIG_ERROR, MALFORMED_TOKEN_REASON)] * 8 + [(K.DELIVERED, "")] * 4
    )


async def test_fcm_quota_outage_reads_retry_after(fcm: Fcm, fcm_sender: FcmSdkSender) -> None:
    fcm.script.start_outage(30, "QUOTA_EXCEEDED", retry_after=17)
    tokens = fcm_tokens(3)
    outcomes = await fcm_sender.send(tokens, render_fcm(job()))
    assert outcomes == [Outcome(K.QUOTA, "QUOTA_EXCEEDED", 17.0)] * 3
    assert fcm.script.errors == {"QUOTA_EXCEEDED": 3}


async def test_fcm_unavailable_outage_is_retry_after_the_sdks_own_retries(
    fcm: Fcm, fcm_sender: FcmSdkSender
) -> None:
    # The one slow test: firebase-admin retries a 503 four times (0 + 1 + 2 + 4 s).
    fcm.script.start_outage(60, "UNAVAILABLE", retry_after=3)
    tokens = fcm_tokens(2)
    outcomes = await fcm_sender.send(tokens, render_fcm(job()))
    assert outcomes == [Outcome(K.RETRY, "UNAVAILABLE", 3.0)] * 2
    # Each token was tried SDK_ATTEMPTS times by the SDK alone: the policy counts them in.
    assert fcm.script.errors == {"UNAVAILABLE": 2 * FcmSdkSender.SDK_ATTEMPTS}
    assert RetryPolicy(max_attempts=5, sdk_attempts=FcmSdkSender.SDK_ATTEMPTS).own_attempts == 1
    assert fcm.script.snapshot()["total"] == 0


async def test_fcm_unreachable_server_is_retry(fcm: Fcm, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"https://127.0.0.1:{port}/v1/projects/{{0}}/messages:send"
    monkeypatch.setattr(messaging._MessagingService, "FCM_URL", url)
    sender = FcmSdkSender(fcm.app())  # its messaging service is built now, with that URL
    outcomes = await sender.send(fcm_tokens(3), render_fcm(job()))
    assert kinds(outcomes) == [(K.RETRY, "UNAVAILABLE")] * 3  # ConnectError: not retried


async def test_fcm_chunks_of_at_most_concurrency_tokens(
    fcm: Fcm, fcm_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fcm.script.reset()
    calls: list[int] = []
    real = messaging.send_each_for_multicast_async

    async def counting(multicast: Any, **kw: Any) -> Any:
        calls.append(len(multicast.tokens))
        return await real(multicast, **kw)

    monkeypatch.setattr(messaging, "send_each_for_multicast_async", counting)
    tokens = fcm_tokens(8)
    dead = tokens[4]
    fcm.script.dead_tokens = {dead}
    outcomes = await FcmSdkSender(fcm_app, concurrency=3).send(tokens, render_fcm(job()))
    assert calls == [3, 3, 2]
    expected = [K.INVALID_TOKEN if t == dead else K.DELIVERED for t in tokens]
    assert [o.kind for o in outcomes] == expected
    assert fcm.script.delivered == {t: 1 for t in tokens if t != dead}
    assert FcmSdkSender(fcm_app, concurrency=10_000).chunk_size == fcm_sdk.MAX_MULTICAST
    with pytest.raises(ValueError, match="concurrency"):
        FcmSdkSender(fcm_app, concurrency=0)


async def test_fcm_whole_call_failure_is_retry_for_that_chunk_only(fcm: Fcm, fcm_app: Any) -> None:
    # A 401 with a credential that cannot refresh (a static token) makes firebase-admin
    # raise out of the whole multicast call instead of failing one response.
    fcm.script.reset()
    tokens = fcm_tokens(6)
    bad = tokens[2]
    fcm.script.token_errors = {bad: "THIRD_PARTY_AUTH_ERROR"}
    sender = FcmSdkSender(fcm_app, concurrency=2)
    outcomes = await sender.send(tokens, render_fcm(job()))
    assert kinds(outcomes) == [
        (K.DELIVERED, ""),
        (K.DELIVERED, ""),
        (K.RETRY, "SDK_UnknownError"),
        (K.RETRY, "SDK_UnknownError"),
        (K.DELIVERED, ""),
        (K.DELIVERED, ""),
    ]
    await asyncio.sleep(0.2)  # gather left the chunk's other request running
    # Measured: the failed chunk's good token was delivered anyway, so a retry of the
    # RETRY outcome delivers it twice. Only this path can: a whole-call failure.
    assert fcm.script.delivered == {t: 1 for t in tokens if t != bad}
    fcm.script.reset()


async def test_fcm_third_party_auth_error_is_a_config_error(fcm: Fcm) -> None:
    fcm.script.reset()
    sender = FcmSdkSender(fcm.app(service_account=True))
    warm = fcm_tokens(1)
    assert await sender.send(warm, render_fcm(job())) == [DELIVERED]  # holds a token now
    tokens = fcm_tokens(3)
    fcm.script.token_errors = {tokens[1]: "THIRD_PARTY_AUTH_ERROR"}
    outcomes = await sender.send(tokens, render_fcm(job()))
    assert kinds(outcomes) == [
        (K.DELIVERED, ""),
        (K.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR"),
        (K.DELIVERED, ""),
    ]
    assert sender.last_config_error == "THIRD_PARTY_AUTH_ERROR"
    fcm.script.reset()


async def test_fcm_foreign_project_is_a_config_error(fcm: Fcm) -> None:
    fcm.script.reset()
    sender = FcmSdkSender(fcm.app(project="someone-else"))
    outcomes = await sender.send(fcm_tokens(12), render_fcm(job()))
    # 403 PERMISSION_DENIED without an FcmError detail: our project, not the tokens.
    assert kinds(outcomes) == [(K.CONFIG_ERROR, "PERMISSION_DENIED")] * 12
    assert sender.last_config_error == "PERMISSION_DENIED"
    assert fcm.script.snapshot()["total"] == 0


async def test_fcm_close_waits_for_batches_in_flight(fcm: Fcm) -> None:
    fcm.script.reset()
    sender = FcmSdkSender(fcm.app())
    fcm.script.configure({"latency_ms": 300})
    try:
        sending = asyncio.create_task(sender.send(fcm_tokens(3), render_fcm(job())))
        await asyncio.sleep(0.05)
        await sender.close()
        assert sending.done()
        assert sending.result() == [DELIVERED] * 3
    finally:
        fcm.script.reset()
    # Closed: the app's messaging client refuses to send (a whole-call failure).
    assert kinds(await sender.send(fcm_tokens(1), render_fcm(job()))) == [
        (K.RETRY, "SDK_UnknownError")
    ]


def test_fcm_classify_exception_without_an_http_answer() -> None:
    cases = [
        (exceptions.UnknownError("GOAWAY"), (K.RETRY, "UNKNOWN")),
        (exceptions.DeadlineExceededError("timed out"), (K.RETRY, "DEADLINE_EXCEEDED")),
        (exceptions.UnavailableError("refused"), (K.RETRY, "UNAVAILABLE")),
        (exceptions.InternalError("boom"), (K.RETRY, "INTERNAL")),
        (messaging.UnregisteredError("gone"), (K.INVALID_TOKEN, "UNREGISTERED")),
        (messaging.SenderIdMismatchError("x"), (K.INVALID_TOKEN, "SENDER_ID_MISMATCH")),
        (messaging.QuotaExceededError("x"), (K.QUOTA, "QUOTA_EXCEEDED")),
        (messaging.ThirdPartyAuthError("x"), (K.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR")),
        (exceptions.InvalidArgumentError("Too big"), (K.PERMANENT, "INVALID_ARGUMENT")),
        (
            exceptions.InvalidArgumentError(
                "The registration token is not a valid FCM registration token"
            ),
            (K.INVALID_TOKEN, MALFORMED_TOKEN_REASON),
        ),
        (exceptions.UnauthenticatedError("x"), (K.CONFIG_ERROR, "UNAUTHENTICATED")),
        (exceptions.NotFoundError("x"), (K.PERMANENT, "NOT_FOUND")),
    ]
    for exc, expected in cases:
        outcome = fcm_sdk.classify_exception(exc)
        assert (outcome.kind, outcome.reason) == expected, exc


# == APNs ====================================================================================


@dataclass
class Apns:
    creds: Credentials
    emulator: ApnsEmulator
    server: HttpServer
    recorder: Recorder

    @property
    def script(self) -> Any:
        return self.emulator.script


@pytest.fixture(scope="module")
async def apns(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Apns]:
    directory: Path = tmp_path_factory.mktemp("apns-sdk")
    creds = ensure_credentials(directory, token_uri="https://127.0.0.1:1/token")
    emulator = ApnsEmulator(creds, topics=(TOPIC,))
    recorder = Recorder()
    recorder.handle = emulator.handle
    server = HttpServer(recorder, ssl_context=creds.server_ssl_context())
    await server.start()
    yield Apns(creds, emulator, server, recorder)
    await server.stop()


def apns_client(env: Apns) -> APNs:
    async def err_func(request: NotificationRequest, result: NotificationResult) -> None:
        pass  # without it aioapns logs every non-200 at ERROR

    # Built inside the running loop: the pool binds to get_event_loop() at construction.
    client = APNs(
        key=env.creds.apns_key_file.read_text(),
        key_id=env.creds.apns_key_id,
        team_id=env.creds.apns_team_id,
        topic=TOPIC,
        use_sandbox=False,
        ssl_context=env.creds.client_ssl_context(),
        err_func=err_func,
    )
    client.pool.protocol_class = type(
        "EmulatorProtocol",
        (APNsProductionClientProtocol,),
        {"APNS_SERVER": "127.0.0.1", "APNS_PORT": env.server.port},
    )
    return client


@pytest.fixture
async def apns_sender(apns: Apns) -> AsyncIterator[ApnsSdkSender]:
    apns.script.reset()
    apns.recorder.requests.clear()
    sender = ApnsSdkSender(apns_client(apns), timeout_s=5.0)
    yield sender
    await sender.close()
    apns.script.reset()


async def test_apns_mixed_batch_one_outcome_per_token_in_order(
    apns: Apns, apns_sender: ApnsSdkSender
) -> None:
    good = apns_tokens(3)
    dead, gone, busy, other_topic, broken = apns_tokens(5)
    apns.script.configure(
        {
            "dead_tokens": [dead],
            "token_errors": {
                gone: "ExpiredToken",
                busy: "TooManyRequests",
                other_topic: "DeviceTokenNotForTopic",
                broken: "InternalServerError",
            },
        }
    )
    batch = [good[0], dead, "not-a-token", busy, good[1], gone, other_topic, broken, good[2]]
    before = datetime.now(UTC) - timedelta(seconds=1)
    outcomes = await apns_sender.send(batch, render_apns(job(), topic=TOPIC))
    assert kinds(outcomes) == [
        (K.DELIVERED, ""),
        (K.INVALID_TOKEN, "Unregistered"),
        (K.INVALID_TOKEN, "BadDeviceToken"),
        (K.QUOTA, "TooManyRequests"),
        (K.DELIVERED, ""),
        (K.INVALID_TOKEN, "ExpiredToken"),
        (K.INVALID_TOKEN, "DeviceTokenNotForTopic"),
        (K.RETRY, "InternalServerError"),
        (K.DELIVERED, ""),
    ]
    since = outcomes[1].invalid_since
    assert since is not None
    assert before <= since <= datetime.now(UTC)  # the 410's timestamp, when it was scripted
    assert outcomes[5].invalid_since is not None
    assert all(o.retry_after is None for o in outcomes)  # aioapns gives no headers
    log = apns.script.snapshot()
    assert log["per_token"] == dict.fromkeys(good, 1)
    assert log["per_target"] == {TOPIC: 3}
    assert apns_sender.last_config_error is None


async def test_apns_sends_what_render_apns_renders(apns: Apns, apns_sender: ApnsSdkSender) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    cases = [
        job(
            {
                "title": "t",
                "image": "https://cdn.example.com/a.png",
                "data": {"order": "42"},
                "apns": {"collapse_id": "order-42", "sound": "default", "badge": 0},
            },
            expires_at=expires,
        ),
        job({"apns": {"push_type": "background"}, "data": {"sync": "1"}}, priority="urgent"),
        job({"title": "t", "apns": {"push_type": "location"}}, priority="low"),  # not in aioapns
    ]
    for case in cases:
        apns.recorder.requests.clear()
        token = apns_tokens(1)[0]
        rendered = render_apns(case, topic=TOPIC)
        assert await apns_sender.send([token], rendered) == [DELIVERED]
        (request,) = apns.recorder.requests
        assert request.path == f"/3/device/{token}"
        assert json.loads(request.body) == json.loads(rendered.body)
        sent = {k: v for k, v in request.headers.items() if k.startswith("apns-")}
        assert sent.pop("apns-id")  # aioapns' own, echoed
        expected = dict(rendered.headers)
        if "apns-expiration" in expected:  # relative in aioapns: a second apart at most
            assert abs(int(sent["apns-expiration"]) - int(expected["apns-expiration"])) <= 1
            sent["apns-expiration"] = expected["apns-expiration"]
        assert sent == expected


@pytest.mark.parametrize(("broken", "expected"), [(12, K.CONFIG_ERROR), (1, K.INVALID_TOKEN)])
async def test_apns_bad_device_token_on_most_of_a_batch_is_a_config_error(
    apns: Apns, apns_sender: ApnsSdkSender, broken: int, expected: OutcomeKind
) -> None:
    # Sandbox tokens sent to production answer BadDeviceToken: scripted here.
    tokens = apns_tokens(20)
    apns.script.configure({"token_errors": dict.fromkeys(tokens[:broken], "BadDeviceToken")})
    outcomes = await apns_sender.send(tokens, render_apns(job(), topic=TOPIC))
    assert kinds(outcomes) == [(expected, "BadDeviceToken")] * broken + [(K.DELIVERED, "")] * (
        20 - broken
    )
    assert apns.script.delivered == dict.fromkeys(tokens[broken:], 1)
    config = "BadDeviceToken" if expected is K.CONFIG_ERROR else None
    assert apns_sender.last_config_error == config


async def test_apns_outage_is_retry_without_retry_after(
    apns: Apns, apns_sender: ApnsSdkSender
) -> None:
    apns.script.start_outage(30, "ServiceUnavailable", retry_after=7)
    outcomes = await apns_sender.send(apns_tokens(3), render_apns(job(), topic=TOPIC))
    # The emulator sent retry-after: 7, but aioapns does not pass headers on.
    assert outcomes == [Outcome(K.RETRY, "ServiceUnavailable")] * 3
    assert apns.script.errors == {"ServiceUnavailable": 3}  # aioapns does not retry


async def test_apns_expired_provider_token_is_a_config_error(
    apns: Apns, apns_sender: ApnsSdkSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apns.emulator, "jwt_max_age_s", -120)  # every JWT is too old
    outcomes = await apns_sender.send(apns_tokens(2), render_apns(job(), topic=TOPIC))
    assert outcomes == [Outcome(K.CONFIG_ERROR, "ExpiredProviderToken")] * 2
    assert apns_sender.last_config_error == "ExpiredProviderToken"


async def test_apns_timeout_is_retry_and_late_answers_do_not_break_the_connection(
    apns: Apns,
) -> None:
    # Two batches share one aioapns connection; the first times out. Without the sender
    # removing its cancelled requests, their late answers raise InvalidStateError inside
    # aioapns' protocol, the connection dies, and the second batch's requests (answered
    # in time) hang until their own timeout (measured: all TIMEOUT after 2 s).
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    client = apns_client(apns)
    impatient = ApnsSdkSender(client, timeout_s=0.1)
    patient = ApnsSdkSender(client, timeout_s=2.0)
    try:
        apns.script.reset()
        apns.script.configure({"latency_ms": 400})
        slow, steady = apns_tokens(3), apns_tokens(3)
        rendered = render_apns(job(), topic=TOPIC)
        started = time.monotonic()
        timed_out, answered = await asyncio.gather(
            impatient.send(slow, rendered), patient.send(steady, rendered)
        )
        assert timed_out == [apns_sdk.TIMEOUT] * 3
        assert answered == [DELIVERED] * 3
        assert time.monotonic() - started < 1.5
        assert len(client.pool.connections) == 1  # the connection survived
        # A timeout is no failure at the platform: the slow ones were delivered too,
        # which is why a retried TIMEOUT may deliver twice.
        assert apns.script.delivered == dict.fromkeys(slow + steady, 1)
        assert errors == []
    finally:
        loop.set_exception_handler(previous)
        await impatient.close()
        apns.script.reset()


async def test_apns_unreachable_server_is_retry(apns: Apns) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = apns_client(apns)
    client.pool.protocol_class = type(
        "Nowhere", (APNsProductionClientProtocol,), {"APNS_SERVER": "127.0.0.1", "APNS_PORT": port}
    )
    client.pool.max_connection_attempts = 1
    sender = ApnsSdkSender(client, timeout_s=5.0)
    outcomes = await sender.send(apns_tokens(2), render_apns(job(), topic=TOPIC))
    assert kinds(outcomes) == [(K.RETRY, "SDK_MaxAttemptsExceeded")] * 2
    await sender.close()


async def test_apns_concurrency_is_bounded(apns: Apns, monkeypatch: pytest.MonkeyPatch) -> None:
    client = apns_client(apns)
    sender = ApnsSdkSender(client, concurrency=4)
    in_flight = peak = 0
    real: Callable[[NotificationRequest], Awaitable[NotificationResult]] = client.send_notification

    async def counting(request: NotificationRequest) -> NotificationResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real(request)
        finally:
            in_flight -= 1

    monkeypatch.setattr(client, "send_notification", counting)
    apns.script.reset()
    tokens = apns_tokens(30)
    assert await sender.send(tokens, render_apns(job(), topic=TOPIC)) == [DELIVERED] * 30
    assert peak == 4
    assert apns.script.delivered == dict.fromkeys(tokens, 1)
    await sender.close()
    with pytest.raises(ValueError, match="concurrency"):
        ApnsSdkSender(client, concurrency=0)


async def test_apns_close_waits_for_batches_in_flight(apns: Apns) -> None:
    apns.script.reset()
    sender = ApnsSdkSender(apns_client(apns), timeout_s=2.0)
    apns.script.configure({"latency_ms": 300})
    try:
        tokens = apns_tokens(3)
        sending = asyncio.create_task(sender.send(tokens, render_apns(job(), topic=TOPIC)))
        await asyncio.sleep(0.05)
        await sender.close()
        assert sending.done()
        assert sending.result() == [DELIVERED] * 3
        assert apns.script.delivered == dict.fromkeys(tokens, 1)
    finally:
        apns.script.reset()


def test_apns_notification_request_maps_the_rendered_headers() -> None:
    expires = datetime.now(UTC) + timedelta(minutes=10)
    payload = {"title": "t", "apns": {"push_type": "pushtotalk", "collapse_id": "c"}}
    rendered = render_apns(job(payload, priority="low", expires_at=expires), topic=TOPIC)
    body = json.loads(rendered.body)
    request = apns_sdk.notification_request("ab" * 32, rendered, body)
    assert request.device_token == "ab" * 32
    assert request.message == body
    assert request.push_type is not None
    assert request.push_type.value == "pushtotalk"  # a stand-in: aioapns lacks it
    assert request.priority == 5
    assert request.collapse_key == "c"
    assert request.apns_topic == TOPIC
    assert request.time_to_live is not None
    assert abs(int(time.time()) + request.time_to_live - int(expires.timestamp())) <= 1
    plain = apns_sdk.notification_request("ab" * 32, render_apns(job(), topic=TOPIC), body)
    assert (plain.time_to_live, plain.collapse_key) == (None, None)


def test_sender_protocol_attributes() -> None:
    assert FcmSdkSender.platform == "android"
    assert ApnsSdkSender.platform == "ios"
    assert FcmSdkSender.SDK_ATTEMPTS == 5


def test_multicast_message_maps_the_payload() -> None:
    payload = {
        "title": "",
        "body": "b",
        "data": {"k": "v"},
        "android": {"channel_id": "ch", "collapse_key": "ck"},
    }
    expires = NOW + timedelta(seconds=120)
    message: Message = render_fcm(job(payload, priority="urgent", expires_at=expires))
    multicast = fcm_sdk.multicast_message(["t1", "t2"], message, now=NOW)
    assert multicast.tokens == ["t1", "t2"]
    assert multicast.data == {"k": "v"}
    assert (multicast.notification.title, multicast.notification.body) == (None, "b")
    android = multicast.android
    assert (android.priority, android.collapse_key, android.ttl) == ("high", "ck", 120)
    assert android.notification.channel_id == "ch"
    bare = fcm_sdk.multicast_message(["t"], render_fcm(job({"data": {"k": "v"}})))
    assert (bare.notification, bare.android) == (None, None)
