"""The render stage (:mod:`worker.render`): what a job becomes on the wire, per platform.

Pure tests, plus proof that the rendered requests pass the emulators' validation (their
handlers called directly with a request built here): what we render is what the platforms
accept. No broker, database or network.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushfan.emulators.apns import ApnsEmulator
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.emulators.fcm import STATIC_TOKEN, FcmEmulator
from pushfan.emulators.server import Request
from schemas import NotificationJob
from worker.render import fcm_body, render_apns, render_fcm
from worker.senders.base import TOKEN_SLOT, Message

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TOPIC = "com.example.pushfan"
FCM_TOKEN = "dGVzdC10b2tlbg:APA91bH" + "x" * 140  # shaped like a real registration token
APNS_TOKEN = "ab" * 32
TARGETS = ("token", "fid", "topic", "condition")
# The placeholder render_fcm encodes before swapping in TOKEN_SLOT.
PLACEHOLDER = "\x00PUSHFAN_TOKEN\x00"


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


def fcm_message(rendered: Message, token: str = FCM_TOKEN) -> dict[str, Any]:
    body = json.loads(fcm_body(rendered, token))
    assert set(body) == {"message"}
    message: dict[str, Any] = body["message"]
    return message


def apns_headers(rendered: Message) -> dict[str, str]:
    headers = dict(rendered.headers)
    assert len(headers) == len(rendered.headers), "a header repeated"
    return headers


# -- FCM: the body and its token slot --------------------------------------------------------


def test_fcm_body_has_one_slot_and_one_target_once_spliced() -> None:
    rendered = render_fcm(job({"title": "t", "data": {"k": "v"}}), now=NOW)
    assert rendered.body.count(TOKEN_SLOT) == 1
    spliced = fcm_body(rendered, FCM_TOKEN)
    assert TOKEN_SLOT not in spliced
    message = fcm_message(rendered)
    assert [t for t in TARGETS if t in message] == ["token"]
    assert message["token"] == FCM_TOKEN
    # The token lands exactly where the slot was; the rest is byte for byte the same.
    at = rendered.body.index(TOKEN_SLOT)
    assert spliced[at : at + len(FCM_TOKEN)] == FCM_TOKEN.encode()
    assert spliced[:at] == rendered.body[:at]
    assert spliced[at + len(FCM_TOKEN) :] == rendered.body[at + len(TOKEN_SLOT) :]
    assert dict(rendered.headers) == {"content-type": "application/json; charset=UTF-8"}


def test_fcm_one_render_serves_many_tokens() -> None:
    rendered = render_fcm(job(), now=NOW)
    tokens = [f"tok-{n:030d}" for n in range(3)]
    messages = [fcm_message(rendered, t) for t in tokens]
    assert [m["token"] for m in messages] == tokens
    rest = {"notification": {"title": "Shipped", "body": "On its way"}}
    assert all({k: v for k, v in m.items() if k != "token"} == rest for m in messages)


def test_fcm_data_values_stay_strings() -> None:
    data = {"n": "1", "flag": "true", "empty": "", "json": '{"a": [1]}', "null": "null"}
    message = fcm_message(render_fcm(job({"data": data}), now=NOW))
    assert message["data"] == data
    assert all(type(v) is str for v in message["data"].values())
    assert "notification" not in message  # data-only: no notification block


@pytest.mark.parametrize(
    "text",
    [
        "\x00TOKEN\x00",  # the raw slot bytes, as text
        "a\x00b",
        "\x00",
        '"\x00TOKEN\x00"',
        "\\u0000TOKEN\\u0000",
        "\x00PUSHFAN_TOKEN",  # the placeholder's parts, but not all of it
        "PUSHFAN_TOKEN\x00",
    ],
)
def test_fcm_user_text_with_nul_cannot_collide_with_the_slot(text: str) -> None:
    rendered = render_fcm(job({"title": text, "data": {text: text, "k": text}}), now=NOW)
    assert rendered.body.count(TOKEN_SLOT) == 1
    message = fcm_message(rendered)
    assert message["token"] == FCM_TOKEN
    assert message["notification"] == {"title": text}
    assert message["data"] == {text: text, "k": text}


@pytest.mark.parametrize("where", ["value", "key"])
def test_fcm_user_text_equal_to_the_placeholder_cannot_collide(where: str) -> None:
    data = {"k": PLACEHOLDER} if where == "value" else {PLACEHOLDER: "v"}
    rendered = render_fcm(job({"data": data}), now=NOW)
    assert rendered.body.count(TOKEN_SLOT) == 1
    assert fcm_message(rendered)["data"] == data


_text = st.text(max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    title=_text,
    data=st.dictionaries(st.text(min_size=1, max_size=20), _text, max_size=5),
    token=st.from_regex(r"[A-Za-z0-9_:\-]{20,200}", fullmatch=True),
)
def test_fcm_any_text_round_trips_and_the_token_lands_in_its_slot(
    title: str, data: dict[str, str], token: str
) -> None:
    data = {k: v for k, v in data.items() if k not in ("from", "notification", "message_type")}
    data = {k: v for k, v in data.items() if not k.startswith(("google.", "gcm."))}
    rendered = render_fcm(job({"title": title or "t", "data": data}), now=NOW)
    assert rendered.body.count(TOKEN_SLOT) == 1
    message = fcm_message(rendered, token)
    assert message["token"] == token
    assert message["notification"]["title"] == (title or "t")
    assert message.get("data", {}) == data


# -- FCM: android options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "android", "expected"),
    [
        ("urgent", None, "HIGH"),
        ("normal", None, None),
        ("low", None, None),
        ("urgent", {"priority": "normal"}, "NORMAL"),  # explicit wins
        ("normal", {"priority": "high"}, "HIGH"),
    ],
)
def test_fcm_android_priority(
    priority: str, android: dict[str, Any] | None, expected: str | None
) -> None:
    payload: dict[str, Any] = {"title": "t"}
    if android is not None:
        payload["android"] = android
    rendered = render_fcm(job(payload, priority=priority), now=NOW)
    assert rendered.priority == priority
    assert fcm_message(rendered).get("android", {}).get("priority") == expected


@pytest.mark.parametrize(
    ("expires_in", "ttl", "expected"),
    [
        (None, None, None),
        (timedelta(seconds=90), None, "90s"),
        (timedelta(seconds=90, milliseconds=900), None, "90s"),  # whole seconds, down
        (timedelta(days=2), 30, "30s"),  # explicit ttl wins over expires_at
        (None, 0, "0s"),  # 0: deliver now or never
        (None, 2_419_200, "2419200s"),
    ],
)
def test_fcm_ttl_from_expires_at_or_explicit(
    expires_in: timedelta | None, ttl: int | None, expected: str | None
) -> None:
    payload: dict[str, Any] = {"title": "t"}
    if ttl is not None:
        payload["android"] = {"ttl": ttl}
    fields = {} if expires_in is None else {"expires_at": NOW + expires_in}
    rendered = render_fcm(job(payload, **fields), now=NOW)
    assert fcm_message(rendered).get("android", {}).get("ttl") == expected
    assert rendered.expires_at == (None if expires_in is None else NOW + expires_in)


def test_fcm_ttl_is_measured_from_now_and_never_negative() -> None:
    expiring = job(created_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1))
    assert fcm_message(render_fcm(expiring, now=NOW))["android"]["ttl"] == "0s"
    later = job(expires_at=NOW + timedelta(minutes=10))
    ttl = fcm_message(render_fcm(later, now=NOW + timedelta(minutes=4)))["android"]["ttl"]
    assert ttl == "360s"


def test_fcm_full_mapping() -> None:
    payload = {
        "title": "Hello",
        "body": "World",
        "image": "https://cdn.example.com/a.png",
        "data": {"order": "42"},
        "android": {"channel_id": "orders", "collapse_key": "order-42", "ttl": 60},
        "apns": {"sound": "default"},  # not FCM's business
    }
    assert fcm_message(render_fcm(job(payload, priority="urgent"), now=NOW)) == {
        "token": FCM_TOKEN,
        "notification": {
            "title": "Hello",
            "body": "World",
            "image": "https://cdn.example.com/a.png",
        },
        "data": {"order": "42"},
        "android": {
            "priority": "HIGH",
            "collapse_key": "order-42",
            "ttl": "60s",
            "notification": {"channel_id": "orders"},
        },
    }


# -- APNs -------------------------------------------------------------------------------------


def test_apns_alert() -> None:
    rendered = render_apns(job({"title": "Hi", "body": "There"}), topic=TOPIC)
    assert json.loads(rendered.body) == {"aps": {"alert": {"title": "Hi", "body": "There"}}}
    assert apns_headers(rendered) == {
        "apns-topic": TOPIC,
        "apns-push-type": "alert",
        "apns-priority": "10",
    }
    assert TOKEN_SLOT not in rendered.body  # the token goes in the path


def test_apns_background_has_content_available_priority_5_and_no_alert() -> None:
    payload = {"title": "ignored", "body": "ignored", "apns": {"push_type": "background"}}
    rendered = render_apns(job(payload, priority="urgent"), topic=TOPIC)
    assert json.loads(rendered.body) == {"aps": {"content-available": 1}}
    headers = apns_headers(rendered)
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"  # Apple requires 5 for background pushes


def test_apns_silent_push_may_be_empty() -> None:
    rendered = render_apns(job({"apns": {"push_type": "background"}}), topic=TOPIC)
    assert json.loads(rendered.body) == {"aps": {"content-available": 1}}


def test_apns_content_available_on_an_alert() -> None:
    rendered = render_apns(job({"title": "t", "apns": {"content_available": True}}), topic=TOPIC)
    assert json.loads(rendered.body)["aps"] == {"alert": {"title": "t"}, "content-available": 1}
    assert apns_headers(rendered)["apns-push-type"] == "alert"


@pytest.mark.parametrize(
    ("payload", "mutable"),
    [
        ({"title": "t", "image": "https://cdn.example.com/a.png"}, True),
        ({"title": "t", "apns": {"mutable_content": True}}, True),
        ({"title": "t"}, False),
    ],
)
def test_apns_mutable_content_with_an_image(payload: dict[str, Any], mutable: bool) -> None:
    body = json.loads(render_apns(job(payload), topic=TOPIC).body)
    assert ("mutable-content" in body["aps"]) is mutable
    if mutable:
        assert body["aps"]["mutable-content"] == 1
    assert body.get("image") == payload.get("image")


def test_apns_custom_data_sits_next_to_aps() -> None:
    rendered = render_apns(job({"title": "t", "data": {"order": "42", "x": ""}}), topic=TOPIC)
    assert json.loads(rendered.body) == {"aps": {"alert": {"title": "t"}}, "order": "42", "x": ""}


def test_apns_data_key_aps_cannot_replace_the_aps_dictionary() -> None:
    body = json.loads(render_apns(job({"title": "t", "data": {"aps": "x"}}), topic=TOPIC).body)
    assert body["aps"] == {"alert": {"title": "t"}}


def test_apns_aps_options() -> None:
    payload = {
        "title": "t",
        "apns": {
            "sound": "ping.caf",
            "badge": 0,  # 0 clears the badge: kept, not dropped as falsy
            "thread_id": "orders",
            "category": "ORDER",
            "interruption_level": "time-sensitive",
        },
    }
    assert json.loads(render_apns(job(payload), topic=TOPIC).body)["aps"] == {
        "alert": {"title": "t"},
        "sound": "ping.caf",
        "badge": 0,
        "thread-id": "orders",
        "category": "ORDER",
        "interruption-level": "time-sensitive",
    }


@pytest.mark.parametrize(("priority", "header"), [("low", "5"), ("normal", "10"), ("urgent", "10")])
def test_apns_priority_header(priority: str, header: str) -> None:
    rendered = render_apns(job(priority=priority), topic=TOPIC)
    assert apns_headers(rendered)["apns-priority"] == header
    assert rendered.priority == priority


def test_apns_collapse_id_and_expiration_headers() -> None:
    expires = NOW + timedelta(hours=1)
    explicit = NOW + timedelta(minutes=5)
    plain = apns_headers(render_apns(job(), topic=TOPIC))
    assert "apns-collapse-id" not in plain
    assert "apns-expiration" not in plain
    from_job = apns_headers(render_apns(job(expires_at=expires), topic=TOPIC))
    assert from_job["apns-expiration"] == str(int(expires.timestamp()))
    payload = {"title": "t", "apns": {"collapse_id": "score-1", "expiration": explicit}}
    headers = apns_headers(render_apns(job(payload, expires_at=expires), topic=TOPIC))
    assert headers["apns-expiration"] == str(int(explicit.timestamp()))  # explicit wins
    assert headers["apns-collapse-id"] == "score-1"


# -- the emulators accept what we render -----------------------------------------------------


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory: Path = tmp_path_factory.mktemp("render-credentials")
    return ensure_credentials(directory, token_uri="https://127.0.0.1:1/token")


@pytest.fixture(scope="module")
def provider_jwt(creds: Credentials) -> str:
    return jwt.encode(
        {"iss": creds.apns_team_id, "iat": int(time.time())},
        creds.apns_key_file.read_text(),
        algorithm="ES256",
        headers={"kid": creds.apns_key_id},
    )


FULL = {
    "title": "Hello",
    "body": "World",
    "image": "https://cdn.example.com/a.png",
    "data": {"order": "42", "nul": "a\x00b", "quote": '"\\'},
    "android": {"channel_id": "orders", "collapse_key": "order-42", "ttl": 60},
    "apns": {
        "collapse_id": "order-42",
        "sound": "default",
        "badge": 3,
        "thread_id": "orders",
        "category": "ORDER",
        "interruption_level": "active",
    },
}
JOBS = {
    "full": lambda: job(FULL, priority="urgent", expires_at=NOW + timedelta(days=1)),
    "data only": lambda: job({"data": {"k": "v"}}, priority="low"),
    "background": lambda: job({"apns": {"push_type": "background"}, "data": {"sync": "1"}}),
    "expired": lambda: job(
        created_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1)
    ),
    "unicode": lambda: job({"title": "Déjà vu ✓", "body": "日本語", "data": {"é": "ü"}}),
}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_fcm_emulator_accepts_the_rendered_body(creds: Credentials, name: str) -> None:
    emulator = FcmEmulator(creds)
    rendered = render_fcm(JOBS[name](), now=NOW)
    response = emulator.handle(
        Request(
            method="POST",
            path=f"/v1/projects/{creds.fcm_project_id}/messages:send",
            headers={"authorization": f"Bearer {STATIC_TOKEN}", **dict(rendered.headers)},
            body=fcm_body(rendered, FCM_TOKEN),
            http2=True,
            connection_id=1,
        )
    )
    assert response.status == 200, response.body
    assert json.loads(response.body)["name"].startswith(f"projects/{creds.fcm_project_id}/")
    assert emulator.script.delivered == {FCM_TOKEN: 1}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_apns_emulator_accepts_the_rendered_request(
    creds: Credentials, provider_jwt: str, name: str
) -> None:
    emulator = ApnsEmulator(creds, topics=(TOPIC,))
    rendered = render_apns(JOBS[name](), topic=TOPIC)
    response = emulator.handle(
        Request(
            method="POST",
            path=f"/3/device/{APNS_TOKEN}",
            headers={"authorization": f"bearer {provider_jwt}", **dict(rendered.headers)},
            body=rendered.body,
            http2=True,
            connection_id=1,
        )
    )
    assert response.status == 200, response.body
    assert emulator.script.delivered == {APNS_TOKEN: 1}
    assert emulator.script.per_target == {TOPIC: 1}
