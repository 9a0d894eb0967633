"""Raw device tokens never reach a log line, whichever path the line takes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from pushfan.logs import configure_logging, get_logger, mask, redact_text
from pushfan.settings import LoggingSettings
from schemas import InvalidTokenEvent

APNS = "9f2c1e0b7a6d5c4b3a29181706f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e3d"
FCM = "dQw4w9WgXcQ:APA91bH" + "x7Kp2_Lm9-Qr4StUv8WyZa1Bc3De5Fg7Hi9Jk" * 4
WEB = "e" * 40 + "_" + "F1-" * 30


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging(LoggingSettings(level="DEBUG", format="json"), buf)
    yield buf
    configure_logging(LoggingSettings(level="INFO", format="json"))


def _records(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.mark.parametrize("token", [APNS, APNS.upper(), FCM, WEB])
def test_tokens_in_messages_and_fields_are_masked(lines: io.StringIO, token: str) -> None:
    get_logger("t").info(f"sending to {token} now", target=f"dev {token}", nested={"a": [token]})

    text = lines.getvalue()
    assert token not in text
    (record,) = _records(lines)
    assert record["event"] == f"sending to {mask(token)} now"
    assert record["target"] == f"dev {mask(token)}"
    assert record["nested"] == {"a": [mask(token)]}


def test_token_named_fields_are_masked_whatever_their_shape(lines: io.StringIO) -> None:
    get_logger("t").warning("x", token="short", tokens=["a1", "b2"], device_token="tiny")

    (record,) = _records(lines)
    assert record["token"] == mask("short")
    assert record["tokens"] == [mask("a1"), mask("b2")]
    assert record["device_token"] == mask("tiny")


def test_standard_library_loggers_are_redacted_too(lines: io.StringIO) -> None:
    # aioapns, aiokafka and asyncpg log through the standard library.
    logging.getLogger("aioapns").error("Status of notification %s is 410", APNS)

    assert APNS not in lines.getvalue()
    (record,) = _records(lines)
    assert record["event"] == f"Status of notification {mask(APNS)} is 410"
    assert record["logger"] == "aioapns"


def test_tokens_in_tracebacks_are_masked(lines: io.StringIO) -> None:
    try:
        raise ValueError(f"rejected {FCM}")
    except ValueError:
        get_logger("t").exception("send failed")

    assert FCM not in lines.getvalue()
    (record,) = _records(lines)
    assert f"ValueError: rejected {mask(FCM)}" in str(record["exception"])


def test_ordinary_text_is_left_alone(lines: io.StringIO) -> None:
    get_logger("t").info("order 123 shipped", job_id="job-2f9a", count=3, ok=True)

    (record,) = _records(lines)
    assert record["event"] == "order 123 shipped"
    assert (record["job_id"], record["count"], record["ok"]) == ("job-2f9a", 3, True)


def test_the_mask_correlates_without_revealing() -> None:
    assert mask(APNS) == mask(APNS)
    assert mask(APNS) != mask(APNS[:-1] + "0")
    assert APNS[:12] not in mask(APNS)
    assert redact_text(f"a {APNS} b {APNS}") == f"a {mask(APNS)} b {mask(APNS)}"


def test_logs_and_event_reprs_share_one_fingerprint() -> None:
    event = InvalidTokenEvent.model_validate(
        {
            "token": APNS,
            "platform": "ios",
            "reason": "Unregistered",
            "observed_at": "2026-11-22T10:00:00Z",
        }
    )
    fingerprint = mask(APNS).removeprefix("<token ").removesuffix(">")
    assert fingerprint.startswith("sha256:")
    assert fingerprint in repr(event)


def test_console_format_is_redacted_too() -> None:
    buf = io.StringIO()
    configure_logging(LoggingSettings(format="console"), buf)
    try:
        get_logger("t").info("hello", token=APNS)
    finally:
        configure_logging(LoggingSettings(format="json"))

    assert "hello" in buf.getvalue()
    assert APNS not in buf.getvalue()
    assert mask(APNS) in buf.getvalue()


def test_keys_and_underscored_fields_are_redacted(lines: io.StringIO) -> None:
    get_logger("t").info("x", by_token={APNS: "user-1"}, _private=FCM)

    assert APNS not in lines.getvalue()
    assert FCM not in lines.getvalue()


def test_a_record_that_cannot_be_formatted_prints_no_arguments(lines: io.StringIO) -> None:
    root = logging.getLogger()
    # pytest's capture handler re-raises formatting errors; leave only ours attached.
    others = [h for h in root.handlers if not getattr(h, "_pushfan", False)]
    for h in others:
        root.removeHandler(h)
    try:
        logging.getLogger("aioapns").info("send %s to %s", APNS)  # one argument short
    finally:
        for h in others:
            root.addHandler(h)

    assert APNS not in lines.getvalue()
    assert "could not be formatted" in lines.getvalue()


def test_stdlib_exc_info_is_redacted(lines: io.StringIO) -> None:
    try:
        raise RuntimeError(f"token {APNS} refused")
    except RuntimeError:
        logging.getLogger("aiokafka").exception("failed")

    assert APNS not in lines.getvalue()
    assert mask(APNS) in lines.getvalue()


def test_cyclic_and_unprintable_values_do_not_break_logging(lines: io.StringIO) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    cycle: list[object] = []
    cycle.append(cycle)
    get_logger("t").info("x", c=cycle, o=Unprintable(), token=APNS)

    (record,) = _records(lines)
    assert record["o"] == "<unprintable Unprintable>"
    assert APNS not in lines.getvalue()
