"""The wire contracts in :mod:`schemas`: what is accepted, what is rejected and why.

Plain synchronous tests; no broker or database needed.
"""

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    MAX_PAYLOAD_BYTES,
    AllAudience,
    AndroidOptions,
    ApnsOptions,
    DeadLetter,
    InvalidTokenEvent,
    NotificationJob,
    Payload,
    SegmentAudience,
    UserAudience,
    UsersAudience,
    decode_job,
    format_validation_error,
    token_fingerprint,
)
from schemas.export import JSON_DIR, SCHEMAS, main, render

CREATED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
Job = dict[str, Any]


def job_dict() -> Job:
    """A minimal valid job as a non-Python producer would write it."""
    return {
        "job_id": "job-1",
        "type": "order_shipped",
        "audience": {"kind": "user", "user_id": "u-1"},
        "payload": {"title": "Shipped", "body": "Your order is on its way"},
        "created_at": "2025-03-01T12:00:00Z",
    }


def encode(job: Job) -> bytes:
    return json.dumps(job).encode()


def rejection(raw: bytes) -> str:
    """decode_job(raw) must fail; returns the one-line reason."""
    with pytest.raises(ValidationError) as info:
        decode_job(raw)
    return format_validation_error(info.value)


# --- valid jobs ------------------------------------------------------------


@pytest.mark.parametrize(
    "audience",
    [
        UserAudience(user_id="u-1"),
        UsersAudience(user_ids=["u-1", "u-2", "ユーザー3"]),
        SegmentAudience(segment="eu:beta-testers"),
        AllAudience(),
    ],
    ids=lambda a: a.kind,
)
def test_each_audience_kind_round_trips(
    audience: UserAudience | UsersAudience | SegmentAudience | AllAudience,
) -> None:
    job = NotificationJob(
        job_id="order-42:shipped",
        type="order_shipped",
        priority="urgent",
        audience=audience,
        platforms=("ios", "android"),
        payload=Payload(
            title="Shipped ✈",
            body="Your order is on its way",
            data={"order_id": "42", "deep_link": "app://orders/42"},
            image="https://cdn.example.com/parcel.png",
            apns=ApnsOptions(
                collapse_id="order-42",
                badge=3,
                expiration=CREATED + timedelta(hours=1),
                interruption_level="time-sensitive",
            ),
            android=AndroidOptions(channel_id="orders", ttl=3600, priority="high"),
        ),
        created_at=CREATED,
        expires_at=CREATED + timedelta(days=1),
        campaign_id="spring-sale",
        dry_run=True,
    )
    raw = job.to_bytes()
    compact = json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False)
    assert raw == compact.encode()
    assert b"null" not in raw
    decoded = decode_job(raw)
    assert decoded == job
    assert decoded.audience.kind == audience.kind


def test_hand_written_producer_json_is_accepted() -> None:
    raw = json.dumps(
        {
            "schema_version": 1,
            "job_id": "7f3c2a10-0b4e-4c2e-9d1a-2f6c1e9b8a77",
            "type": "chat.message",
            "priority": "normal",
            "audience": {"kind": "users", "user_ids": ["alice", "bob"]},
            "platforms": ["ios", "web"],
            "payload": {
                "title": "New message",
                "body": "Alice: see you at 8?",
                "data": {"thread": "t-99", "unread": "4"},
                "apns": {"push_type": "alert", "thread_id": "t-99", "sound": "default"},
                "android": {"collapse_key": "t-99", "ttl": 86400},
            },
            "created_at": "2025-03-01T12:00:00.250+01:00",
            "expires_at": "2025-03-01T13:00:00+01:00",
        }
    ).encode()
    job = decode_job(raw)
    assert job.audience == UsersAudience(user_ids=["alice", "bob"])
    assert job.platforms == ("ios", "web")
    assert job.payload.data == {"thread": "t-99", "unread": "4"}
    assert job.created_at == datetime(2025, 3, 1, 11, 0, 0, 250_000, tzinfo=UTC)
    assert job.is_expired(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
    assert not job.is_expired(datetime(2025, 3, 1, 11, 59, tzinfo=UTC))


def test_silent_push_needs_no_visible_content() -> None:
    job = job_dict()
    job["payload"] = {"apns": {"push_type": "background", "content_available": True}}
    assert decode_job(encode(job)).payload.title is None
    job["payload"] = {}
    assert "payload needs a title, a body or data" in rejection(encode(job))


def test_limits_are_inclusive() -> None:
    job = job_dict()
    job["payload"]["apns"] = {"collapse_id": "é" * 32}  # exactly 64 bytes
    job["payload"]["android"] = {"ttl": 2_419_200}  # exactly 28 days
    decoded = decode_job(encode(job))
    assert decoded.payload.apns is not None
    assert decoded.payload.android is not None
    assert decoded.payload.android.ttl == 2_419_200

    base = Payload(title="t", data={"k": ""})
    filler = "x" * (MAX_PAYLOAD_BYTES - base.encoded_size())
    exact = Payload(title="t", data={"k": filler})
    assert exact.encoded_size() == MAX_PAYLOAD_BYTES
    with pytest.raises(ValidationError, match="4097 bytes"):
        Payload(title="t", data={"k": filler + "x"})


def test_is_expired_requires_an_aware_now() -> None:
    job = decode_job(encode(job_dict()))
    assert not job.is_expired(CREATED + timedelta(days=365))  # no expires_at: never
    with pytest.raises(ValueError, match="timezone-aware"):
        job.is_expired(datetime(2025, 3, 1, 12, 0))


def test_models_are_frozen() -> None:
    job = decode_job(encode(job_dict()))
    with pytest.raises(ValidationError, match="frozen"):
        job.job_id = "other"  # type: ignore[misc]


# --- invalid jobs ----------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Job], None]:
    def mutate(job: Job) -> None:
        *parents, last = path.split("/")
        target = job
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value

    return mutate


INVALID_JOBS = [
    pytest.param(
        _set("audience", {"kind": "group", "group": "g"}),
        "audience: Input tag 'group' found using 'kind' does not match any of the expected tags",
        id="bad-audience-kind",
    ),
    pytest.param(
        _set("audience", {"kind": "user"}),
        "audience.user.user_id: Field required",
        id="user-audience-without-user-id",
    ),
    pytest.param(
        _set("audience", {"kind": "users", "user_ids": []}),
        "audience.users.user_ids: List should have at least 1 item",
        id="empty-users-list",
    ),
    pytest.param(
        _set("audience", {"kind": "users", "user_ids": ["a", "b", "a", "c", "b"]}),
        "audience.users.user_ids: user_ids contains 2 duplicated id(s): 'a', 'b'",
        id="duplicate-user-ids",
    ),
    pytest.param(
        _set("audience", {"kind": "user", "user_id": "u 1"}),
        "audience.user.user_id: String should match pattern",
        id="whitespace-in-user-id",
    ),
    pytest.param(
        _set("titel", "typo"), "titel: Extra inputs are not permitted", id="unknown-field"
    ),
    pytest.param(
        _set("payload/subtitle", "x"),
        "payload.subtitle: Extra inputs are not permitted",
        id="unknown-payload-field",
    ),
    pytest.param(
        _set("payload/apns/collapse_id", "é" * 32 + "a"),  # 33 characters, 65 bytes
        "payload.apns.collapse_id: collapse_id is 65 bytes UTF-8 encoded, "
        "over the APNs limit of 64 bytes",
        id="collapse-id-65-bytes",
    ),
    pytest.param(
        _set("payload/android/ttl", 2_419_201),
        "payload.android.ttl: Input should be less than or equal to 2419200",
        id="ttl-over-28-days",
    ),
    pytest.param(
        _set("created_at", "2025-03-01T12:00:00"),
        "created_at: Input should have timezone info",
        id="naive-created-at",
    ),
    pytest.param(
        _set("expires_at", "2025-03-01T12:30:00+01:00"),
        "expires_at: expires_at 2025-03-01T12:30:00+01:00 is not after "
        "created_at 2025-03-01T12:00:00+00:00",
        id="expires-before-created",
    ),
    pytest.param(
        _set("expires_at", "2025-03-01T12:00:00Z"),
        "expires_at: expires_at 2025-03-01T12:00:00+00:00 is not after",
        id="expires-at-created",
    ),
    pytest.param(
        _set("platforms", ["ios", "ios"]),
        "platforms: platforms contains duplicates",
        id="dup-platform",
    ),
    pytest.param(
        _set("platforms", []), "platforms: Tuple should have at least 1 item", id="no-platform"
    ),
    pytest.param(
        _set("schema_version", 2), "schema_version: Input should be 1", id="future-version"
    ),
    pytest.param(
        _set("payload/image", "http://cdn.example.com/a.png"),
        "payload.image: must be an https:// URL",
        id="plain-http-image",
    ),
    pytest.param(
        _set("payload/apns/badge", "3"),
        "payload.apns.badge: Input should be a valid integer",
        id="string-badge-not-coerced",
    ),
    pytest.param(_set("dry_run", 1), "dry_run: Input should be a valid boolean", id="int-dry-run"),
    pytest.param(
        _set("created_at", 1740830400), "created_at: Input should be a valid datetime", id="epoch"
    ),
]


@pytest.mark.parametrize(("mutate", "reason"), INVALID_JOBS)
def test_invalid_job_is_rejected_with_a_clear_reason(
    mutate: Callable[[Job], None], reason: str
) -> None:
    job = job_dict()
    mutate(job)
    assert reason in rejection(encode(job))


@pytest.mark.parametrize("value", [1, 1.5, True, None, {"nested": "object"}, ["list"]])
def test_non_string_data_values_are_rejected(value: object) -> None:
    job = job_dict()
    job["payload"]["data"] = {"ok": "fine", "bad": value}
    assert rejection(encode(job)) == "payload.data.bad: Input should be a valid string"
    with pytest.raises(ValidationError, match="valid string"):
        Payload(title="t", data={"bad": value})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", ["from", "notification", "message_type", "google.c.a.e", "gcm.n.e"])
def test_reserved_data_keys_are_rejected(key: str) -> None:
    job = job_dict()
    job["payload"]["data"] = {key: "x"}
    assert f"data key '{key}' is reserved by FCM" in rejection(encode(job))


def test_oversized_payload_states_size_and_limit() -> None:
    job = job_dict()
    job["payload"]["data"] = {"blob": "é" * 2560}  # 2560 characters, 5120 bytes
    expected = Payload.model_construct(**job["payload"]).encoded_size()
    assert expected > 5120
    reason = rejection(encode(job))
    assert reason == f"payload: encoded payload is {expected} bytes, over the 4096-byte limit"


def test_bytes_that_are_not_utf8_are_rejected() -> None:
    raw = encode(job_dict()).replace(b"Shipped", b"Ship\xffped")
    assert rejection(raw).startswith("Invalid JSON: invalid unicode code point")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[]", "Input should be an object"),
        (json.dumps([job_dict()]).encode(), "Input should be an object"),
        (b'"job"', "Input should be an object"),
        (b"", "Invalid JSON: EOF while parsing a value"),
        (b'{"job_id": ', "Invalid JSON"),
    ],
    ids=["empty-list", "list-of-job", "string", "empty", "truncated"],
)
def test_non_object_json_is_rejected(raw: bytes, reason: str) -> None:
    assert rejection(raw).startswith(reason)


def test_error_line_is_capped() -> None:
    job = job_dict()
    job["audience"] = {"kind": "users", "user_ids": [f"bad id {i}" for i in range(500)]}
    reason = rejection(encode(job))
    assert len(reason) <= 1000
    assert reason.endswith("…")
    assert reason.startswith("audience.users.user_ids[0]: String should match pattern")
    assert "\n" not in reason


# --- property --------------------------------------------------------------

_printable = st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Zs"))
_keys = st.text(_printable, min_size=1, max_size=128).filter(
    lambda k: (
        k not in {"from", "notification", "message_type"} and not k.startswith(("google.", "gcm."))
    )
)


@settings(database=None, deadline=None, max_examples=150)
@given(data=st.dictionaries(_keys, st.text(_printable, max_size=300), max_size=24))
def test_any_data_under_the_limit_round_trips(data: dict[str, str]) -> None:
    assume(Payload.model_construct(title="t", data=data).encoded_size() <= MAX_PAYLOAD_BYTES)
    job = NotificationJob(
        job_id="prop-1",
        type="prop",
        audience=AllAudience(),
        payload=Payload(title="t", data=data),
        created_at=CREATED,
    )
    decoded = decode_job(job.to_bytes())
    assert decoded == job
    assert decoded.payload.data == data


# --- JSON Schema files -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_matches_model(name: str) -> None:
    on_disk = (JSON_DIR / name).read_text(encoding="utf-8")
    assert on_disk == render(SCHEMAS[name]), "run `python -m schemas.export`"
    schema = json.loads(on_disk)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False


def test_export_check_passes_on_the_committed_files() -> None:
    assert main(["--check"]) == 0


def test_export_check_names_drifted_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "dead-letter.v1.schema.json").write_text("{}\n")
    (tmp_path / "old.v0.schema.json").write_text("{}\n")
    capsys.readouterr()
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dead-letter.v1.schema.json" in err
    assert "old.v0.schema.json" in err
    assert "notification-job" not in err
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0


def test_schema_expresses_the_limits_it_can() -> None:
    schema = json.loads(render(NotificationJob))
    payload = schema["$defs"]["Payload"]
    assert "4096 bytes" in payload["description"]
    assert payload["properties"]["data"]["additionalProperties"] == {"type": "string"}
    assert payload["properties"]["data"]["propertyNames"]["maxLength"] == 128
    assert schema["$defs"]["AndroidOptions"]["properties"]["ttl"]["anyOf"][0]["maximum"] == 2419200
    assert schema["$defs"]["UsersAudience"]["properties"]["user_ids"]["maxItems"] == 10_000
    assert schema["properties"]["job_id"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._:-]*$"
    assert all(d["additionalProperties"] is False for d in schema["$defs"].values())


# --- events ----------------------------------------------------------------

# Shaped like an APNs token; any 12-character slice of it showing up is a leak.
TOKEN = "4f3a9c1e7b2d6a08" * 4


def test_invalid_token_event_never_shows_the_token() -> None:
    event = InvalidTokenEvent(
        token=TOKEN, platform="ios", reason="Unregistered", observed_at=CREATED, job_id="job-1"
    )
    fingerprint = token_fingerprint(TOKEN)
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", fingerprint)
    for text in (repr(event), str(event), f"{event}", repr([event])):
        assert TOKEN[:12] not in text
        assert fingerprint in text
    assert event.fingerprint == fingerprint
    assert InvalidTokenEvent.from_bytes(event.to_bytes()) == event
    assert event.token == TOKEN  # the wire form keeps it: cleanup needs it


def test_invalid_token_event_errors_never_show_the_token() -> None:
    raw = json.dumps({"token": TOKEN, "platform": "blackberry", "reason": "x"}).encode()
    with pytest.raises(ValidationError) as info:
        InvalidTokenEvent.from_bytes(raw)
    reason = format_validation_error(info.value)
    for text in (str(info.value), repr(info.value), reason):
        assert TOKEN[:12] not in text
    assert "platform: Input should be 'ios', 'android' or 'web'" in reason
    assert "observed_at: Field required" in reason


def test_dead_letter_round_trips_non_utf8_bytes() -> None:
    original = b"\xff\xfe\x00{not json\x80"
    letter = DeadLetter(
        original=original,
        key=b"\x00\xc3",
        topic="pushfan.jobs",
        partition=3,
        offset=1_234_567,
        error="Invalid JSON: invalid unicode code point at line 1 column 1",
        error_kind="decode",
        failed_at=CREATED,
        headers={"traceparent": "00-abc-def-01"},
    )
    raw = letter.to_bytes()
    json.loads(raw.decode("utf-8"))  # the envelope itself is plain UTF-8 JSON
    back = DeadLetter.from_bytes(raw)
    assert back == letter
    assert back.original == original
    assert back.key == b"\x00\xc3"
    keyless = DeadLetter.from_bytes(letter.model_copy(update={"key": None}).to_bytes())
    assert keyless.key is None
    assert keyless.original == original


def test_dead_letter_rejects_bad_envelopes() -> None:
    raw = json.loads(
        DeadLetter(
            original=b"x",
            topic="t",
            partition=0,
            offset=0,
            error="e",
            error_kind="processing",
            failed_at=CREATED,
        ).to_bytes()
    )
    for field, value, reason in [
        ("offset", -1, "offset: Input should be greater than or equal to 0"),
        ("error_kind", "timeout", "error_kind: Input should be 'decode', 'validation'"),
        ("original", "!!", "original: Data should be valid base64"),
        ("failed_at", "2025-03-01T12:00:00", "failed_at: Input should have timezone info"),
    ]:
        bad = copy.deepcopy(raw) | {field: value}
        with pytest.raises(ValidationError) as info:
            DeadLetter.from_bytes(json.dumps(bad).encode())
        assert reason in format_validation_error(info.value)
