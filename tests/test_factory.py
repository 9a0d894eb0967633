"""Senders built from settings, as a worker builds them at start-up."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from pushfan.emulators.runner import Emulators
from pushfan.errors import SetupError
from pushfan.settings import Settings, load_settings
from schemas import NotificationJob
from worker.render import render_apns, render_fcm
from worker.senders.apns import ApnsSender
from worker.senders.apns_sdk import ApnsSdkSender
from worker.senders.base import OutcomeKind
from worker.senders.factory import build_senders
from worker.senders.fcm import FcmSender
from worker.senders.fcm_sdk import FcmSdkSender


@pytest.fixture(autouse=True)
def _keep_ssl_cert_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdk_fcm points httpx at the emulators' CA through SSL_CERT_FILE, for the whole
    process; later tests must not inherit it."""
    original = os.environ.get("SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_FILE", original or "unset")
    if original is None:
        monkeypatch.delenv("SSL_CERT_FILE")


def _job() -> NotificationJob:
    now = datetime.now(UTC)
    return NotificationJob.model_validate(
        {
            "job_id": "factory",
            "type": "news",
            "audience": {"kind": "all"},
            "payload": {"title": "t", "body": "b"},
            "created_at": now,
            "expires_at": now + timedelta(minutes=5),
        }
    )


def _with(settings: Settings, section: str, **values: object) -> Settings:
    part = getattr(settings, section).model_copy(update=values)
    return settings.model_copy(update={section: part})


async def test_lean_senders_from_settings_deliver(emulators: Emulators) -> None:
    settings = emulators.apply(load_settings())
    senders = build_senders(settings, ("android", "web", "ios"))
    assert isinstance(senders["android"], FcmSender)
    assert senders["web"] is senders["android"]
    assert isinstance(senders["ios"], ApnsSender)

    fcm = await senders["android"].send(["f" * 20 + ":APA91b" + "z" * 40], render_fcm(_job()))
    apns = await senders["ios"].send(["ab" * 32], render_apns(_job(), topic="com.example.pushfan"))
    for sender in {id(s): s for s in senders.values()}.values():
        await sender.close()

    assert [o.kind for o in [*fcm, *apns]] == [OutcomeKind.DELIVERED] * 2


async def test_sdk_senders_are_selectable_by_setting(emulators: Emulators) -> None:
    settings = emulators.apply(load_settings())
    # A static token: a service account would make firebase-admin block this event loop,
    # which also serves the emulator.
    settings = _with(
        settings,
        "fcm",
        implementation="sdk",
        credentials_file=None,
        access_token=SecretStr("pushfan-emulator-token"),
    )
    settings = _with(settings, "apns", implementation="sdk")
    senders = build_senders(settings, ("android", "ios"))
    assert isinstance(senders["android"], FcmSdkSender)
    assert isinstance(senders["ios"], ApnsSdkSender)

    fcm = await senders["android"].send(["g" * 20 + ":APA91b" + "z" * 40], render_fcm(_job()))
    apns = await senders["ios"].send(["cd" * 32], render_apns(_job(), topic="com.example.pushfan"))
    await senders["android"].close()
    await senders["ios"].close()

    assert [o.kind for o in [*fcm, *apns]] == [OutcomeKind.DELIVERED] * 2


def test_the_implementation_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHFAN_FCM__IMPLEMENTATION", "sdk")
    assert load_settings().fcm.implementation == "sdk"


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("apns", {"key_id": None, "topic": None}, "PUSHFAN_APNS__KEY_ID, PUSHFAN_APNS__TOPIC"),
        ("apns", {"key_file": Path("/nonexistent.p8")}, "cannot read the APNs key"),
        ("apns", {"endpoint": "http://127.0.0.1:1"}, "must be an https:// origin"),
        ("apns", {"ca_file": Path("/nonexistent-ca.pem")}, "cannot load CA file"),
        ("fcm", {"credentials_file": Path("/nonexistent.json")}, "FCM credentials"),
        (
            "fcm",
            {"credentials_file": None, "access_token": SecretStr("x"), "project_id": None},
            "PROJECT_ID is required",
        ),
    ],
)
async def test_bad_configuration_stops_start_up(
    emulators: Emulators, section: str, values: dict[str, object], message: str
) -> None:
    settings = _with(emulators.apply(load_settings()), section, **values)
    with pytest.raises(SetupError, match=message):
        build_senders(settings, ("android", "ios"))


async def test_a_key_that_cannot_sign_stops_start_up(emulators: Emulators, tmp_path: Path) -> None:
    bad = tmp_path / "bad.p8"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    settings = _with(emulators.apply(load_settings()), "apns", key_file=bad)
    with pytest.raises(SetupError, match="cannot sign ES256"):
        build_senders(settings, ("ios",))
