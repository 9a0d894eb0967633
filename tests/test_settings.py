"""Settings: one tree from the environment, strict about what it accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from pushfan.settings import Settings, env_names, load_settings, subprocess_env

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PUSHFAN_") or name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
            monkeypatch.delenv(name)


def test_defaults_need_no_environment() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.kafka.enable_idempotence is True
    assert s.worker.page_size == 1000
    assert s.kafka.topics.jobs == "pushfan.jobs"


def test_nested_variables_set_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHFAN_KAFKA__TOPICS__JOBS", "acme.push.jobs")
    monkeypatch.setenv("PUSHFAN_WORKER__PAGE_SIZE", "250")
    monkeypatch.setenv("PUSHFAN_KAFKA__ENABLE_IDEMPOTENCE", "false")

    s = load_settings()

    assert s.kafka.topics.jobs == "acme.push.jobs"
    assert s.kafka.topics.retry == "pushfan.retry"
    assert s.worker.page_size == 250
    assert s.kafka.enable_idempotence is False


def test_conventional_variables_are_honoured_below_prefixed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db/push")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert s.database.url.get_secret_value() == "postgresql://app@db/push"

    monkeypatch.setenv("PUSHFAN_KAFKA__BOOTSTRAP_SERVERS", "override:9092")
    assert load_settings().kafka.bootstrap_servers == "override:9092"


def test_a_misspelt_variable_is_an_error_not_a_silent_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUSHFAN_WORKER__PAGESIZE", "10")
    with pytest.raises(ValueError, match="PUSHFAN_WORKER__PAGESIZE"):
        load_settings()


def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHFAN_WORKER__PAGE_SIZE", "0")
    with pytest.raises(ValidationError, match="page_size"):
        load_settings()


def test_unknown_fields_are_refused_in_code_too() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(kafka={"bootstrap": "x"})  # type: ignore[arg-type]


def test_settings_are_immutable_once_built() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.worker.page_size = 5  # type: ignore[misc]


def test_the_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"`(PUSHFAN_[A-Z0-9_]+)`", README.read_text()))
    names = {name for name, _ in env_names()}
    assert names - documented == set(), "add these to the README's configuration table"
    assert documented - names == set(), "the README names settings that do not exist"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PUSHFAN_DATABASE__MIN_POOL_SIZE": "20"}, "min_pool_size must not exceed"),
        ({"PUSHFAN_KAFKA__SASL_MECHANISM": "PLAIN"}, "needs security_protocol SASL_"),
    ],
)
def test_inconsistent_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        load_settings()


def test_an_empty_optional_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHFAN_KAFKA__SASL_MECHANISM", "")
    assert load_settings().kafka.sasl_mechanism is None


# Every setting that names a file: an optional Path.
FILE_SETTINGS = [name for name, field in env_names() if Path in get_args(field.annotation)]


def setting(settings: Settings, name: str) -> object:
    """The value of the setting whose variable is ``name``."""
    value: object = settings
    for part in name.removeprefix("PUSHFAN_").lower().split("__"):
        value = getattr(value, part)
    return value


def test_the_file_settings_are_found() -> None:
    assert len(FILE_SETTINGS) >= 5
    assert [name for name, _ in env_names() if name.endswith("_FILE")] == FILE_SETTINGS


@pytest.mark.parametrize("name", FILE_SETTINGS)
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_file_variable_means_no_file(
    monkeypatch: pytest.MonkeyPatch, name: str, empty: str
) -> None:
    """Not Path("."): an empty value (a Compose ``${VAR:-}``) is unset, as no variable."""
    monkeypatch.setenv(name, empty)
    assert setting(load_settings(), name) is None
    monkeypatch.setenv(name, "/etc/pushfan/x.pem")
    if name == "PUSHFAN_REGISTRY__JWT_PUBLIC_KEY_FILE":  # RS256's key: HS256 refuses it
        monkeypatch.setenv("PUSHFAN_REGISTRY__JWT_ALGORITHM", "RS256")
    assert setting(load_settings(), name) == Path("/etc/pushfan/x.pem")


def test_a_subprocess_environment_rebuilds_the_same_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changed = load_settings(
        worker={"page_size": 7},
        kafka={"enable_idempotence": False, "sasl_password": "s3cret"},
    )
    env = subprocess_env(changed)
    assert env["PUSHFAN_KAFKA__SASL_PASSWORD"] == "s3cret"
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings() == changed
