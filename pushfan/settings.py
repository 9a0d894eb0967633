"""pushfan's configuration: one pydantic-settings tree, built once at start-up and passed down.

Every field is read from the environment as ``PUSHFAN_<SECTION>__<FIELD>`` (for example
``PUSHFAN_KAFKA__BOOTSTRAP_SERVERS``). Two conventional variables are honoured too, below
the prefixed ones: ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL``. Unknown ``PUSHFAN_``
variables are an error at start-up, so a typo never silently falls back to a default.
Nothing here is read at import time: call :func:`load_settings` once in ``main``.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from schemas.common import NotificationType

ENV_PREFIX = "PUSHFAN_"
ENV_NESTED_DELIMITER = "__"

# The placeholders the bridge's templates may use: the fields of an order-shipped event
# (producer.bridge.OrderShipped), checked here so a typo stops start-up, not each event.
BRIDGE_TEMPLATE_FIELDS = ("order_id", "user_id", "carrier", "tracking_url")


def _blank_is_unset(value: object) -> object:
    # `PUSHFAN_FCM__CA_FILE=` (or a Compose `${VAR:-}` with VAR unset) means no file:
    # as a Path, "" would become Path("."), the working directory, and fail far from here.
    return None if isinstance(value, str) and not value.strip() else value


# An optional file: unset, or a path; an empty or blank variable is unset.
OptionalFile = Annotated[Path | None, BeforeValidator(_blank_is_unset)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSettings(_Section):
    """Kafka topic names. Tests give each session its own names through these."""

    jobs: str = Field("pushfan.jobs", description="Notification jobs published by backends.")
    shards: str = Field("pushfan.shards", description="Internal: shards of big audiences.")
    retry: str = Field("pushfan.retry", description="Internal: sends delayed after retries.")
    dead_letter: str = Field("pushfan.dead-letter", description="Jobs that failed validation.")
    invalid_tokens: str = Field(
        "pushfan.invalid-tokens", description="Dead tokens reported by the platforms."
    )

    @classmethod
    def prefixed(cls, prefix: str) -> TopicSettings:
        """Every topic named ``<prefix><field, dashed>``: topics of their own for a test
        session, a test or a benchmark on a shared broker."""
        return cls(**{name: f"{prefix}{name.replace('_', '-')}" for name in cls.model_fields})


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        description="Comma-separated host:port list (also KAFKA_BOOTSTRAP_SERVERS).",
    )
    client_id: str = Field("pushfan", description="Client id sent to the broker.")
    enable_idempotence: bool = Field(
        True, description="Idempotent producer; turn off for brokers without InitProducerId."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, with a SASL_* protocol."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never printed).")
    topic_partitions: int = Field(
        12, ge=1, description="Partitions of topics pushfan creates (caps worker parallelism)."
    )
    topic_replication_factor: int = Field(
        3, ge=1, description="Replicas of topics pushfan creates; 1 only for a single broker."
    )
    fetch_max_wait_ms: int = Field(
        500,
        ge=1,
        le=60_000,
        description="Longest a consumer's fetch waits at the broker for new records (Kafka's"
        " fetch.max.wait.ms); Kafka answers as soon as records arrive, a broker that answers"
        " only at this bound adds up to it to every hop of a job.",
    )
    topics: TopicSettings = TopicSettings()

    @field_validator("sasl_mechanism", "sasl_username", "sasl_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _sasl_needs_a_sasl_protocol(self) -> KafkaSettings:
        if self.sasl_mechanism is not None and not self.security_protocol.startswith("SASL_"):
            raise ValueError("sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL")
        return self


class DatabaseSettings(_Section):
    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseSettings:
        if self.min_pool_size > self.max_pool_size:
            raise ValueError("min_pool_size must not exceed max_pool_size")
        return self

    url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/pushfan"),
        description="PostgreSQL DSN (also DATABASE_URL).",
    )
    min_pool_size: int = Field(1, ge=0, description="Connections kept open per process.")
    max_pool_size: int = Field(10, ge=1, description="Most connections per process.")
    statement_timeout_ms: int = Field(30_000, ge=0, description="Server-side statement timeout.")


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )


class FcmSettings(_Section):
    implementation: Literal["lean", "h2", "sdk"] = Field(
        "lean",
        description="lean: our HTTP/2 client; h2: the lean sender on the h2 library"
        " (a reference); sdk: firebase-admin (the reference).",
    )
    endpoint: str = Field("https://fcm.googleapis.com", description="FCM HTTP v1 origin.")
    project_id: str | None = Field(None, description="Firebase project (default: the account's).")
    credentials_file: OptionalFile = Field(
        None, description="Service-account JSON; unset: application default credentials."
    )
    access_token: SecretStr | None = Field(
        None, description="A fixed OAuth2 access token instead (the emulators')."
    )
    ca_file: OptionalFile = Field(None, description="Extra CA to trust (the emulators').")
    concurrency: int = Field(1000, ge=1, description="Requests in flight per worker.")
    max_connections: int = Field(4, ge=1, description="HTTP/2 connections per worker.")
    timeout_s: float = Field(10.0, gt=0, description="Deadline of one request.")


class ApnsSettings(_Section):
    implementation: Literal["lean", "h2", "sdk"] = Field(
        "lean",
        description="lean: our HTTP/2 client; h2: the lean sender on the h2 library"
        " (a reference); sdk: aioapns (the reference).",
    )
    endpoint: str = Field(
        "https://api.push.apple.com", description="APNs origin (sandbox: api.sandbox...)."
    )
    key_file: OptionalFile = Field(None, description="The .p8 provider key.")
    key_id: str | None = Field(None, description="The key's id (10 characters).")
    team_id: str | None = Field(None, description="The Apple developer team id.")
    topic: str | None = Field(None, description="The app's bundle id.")
    ca_file: OptionalFile = Field(None, description="Extra CA to trust (the emulators').")
    token_refresh_s: float = Field(
        2400, ge=1200, le=3000, description="Provider token re-signed every 20-50 minutes."
    )
    concurrency: int = Field(1000, ge=1, description="Requests in flight per worker.")
    max_connections: int = Field(4, ge=1, description="HTTP/2 connections per worker.")
    timeout_s: float = Field(10.0, gt=0, description="Deadline of one request.")


class RetrySettings(_Section):
    max_attempts: int = Field(5, ge=1, description="Sends of one message to one token, at most.")
    max_total_s: float = Field(60.0, gt=0, description="Time budget of those attempts.")
    base_delay_s: float = Field(0.2, gt=0, description="First backoff ceiling (doubles).")
    max_delay_s: float = Field(30.0, gt=0, description="Longest wait, Retry-After included.")


class WorkerSettings(_Section):
    """The fanout worker (``pushfan worker``)."""

    group_id: str = Field("pushfan-worker", description="Consumer group of the workers.")
    page_size: int = Field(
        1000, ge=1, le=50_000, description="user_ids resolved per page (one token query each)."
    )
    shard_pages: int = Field(
        5,
        ge=1,
        description="Pages per shard: an audience over one page is split into shards of"
        " this many pages, which every worker of the group takes a share of.",
    )
    send_chunk: int = Field(
        500, ge=1, le=10_000, description="Tokens of one platform handed to a sender at once."
    )
    fcm_per_minute: int = Field(
        600_000,
        ge=0,
        description="FCM messages per minute per worker process (0: no limit); the project's"
        " quota divided by the number of workers.",
    )
    apns_per_minute: int = Field(
        0, ge=0, description="APNs messages per minute per worker process (0: no limit)."
    )
    park_delay_s: float = Field(
        10.0,
        gt=0,
        description="First delay of tokens parked on the retry topic after the retry"
        " budget (doubles each time they are parked again).",
    )
    park_max_delay_s: float = Field(600.0, gt=0, description="Longest delay on the retry topic.")
    drain_timeout_s: float = Field(
        20.0, gt=0, description="On SIGTERM or a rebalance, time allowed for in-flight pages."
    )
    metrics_port: int = Field(
        9102,
        ge=0,
        le=65535,
        description="Port of the worker's /metrics, /healthz and /readyz (0: not served).",
    )
    release_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often the release scheduler looks for notifications whose"
        " user's quiet hours have ended.",
    )
    low_cap: int = Field(
        0,
        ge=0,
        description="Frequency cap: most low-priority notifications per user within"
        " LOW_CAP_WINDOW_S (0: no cap).",
    )
    low_cap_window_s: int = Field(
        86_400, ge=1, description="The frequency cap's rolling window, in seconds."
    )


class RegistrySettings(_Section):
    """The token registry API (``pushfan registry``) and who may call it."""

    host: str = Field("127.0.0.1", description="Address the registry API listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the registry API.")
    jwt_algorithm: Literal["HS256", "RS256"] = Field(
        "HS256", description="HS256 (shared secret) or RS256 (public key) bearer tokens."
    )
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret (never printed).")
    jwt_public_key_file: OptionalFile = Field(None, description="RS256: the issuer's public key.")
    jwt_issuer: str = Field("pushfan", description="Required `iss` of bearer tokens.")
    jwt_audience: str = Field("pushfan-registry", description="Required `aud` of bearer tokens.")
    service_scope: str = Field(
        "devices:admin",
        description="A token whose `scope` has this may act for any user (app backends).",
    )
    max_body_bytes: int = Field(16_384, ge=1024, description="Largest request body accepted.")

    @model_validator(mode="after")
    def _key_for_algorithm(self) -> RegistrySettings:
        if self.jwt_algorithm == "RS256" and self.jwt_secret is not None:
            raise ValueError("jwt_secret is for HS256; RS256 takes jwt_public_key_file")
        if self.jwt_algorithm == "HS256" and self.jwt_public_key_file is not None:
            raise ValueError("jwt_public_key_file is for RS256; HS256 takes jwt_secret")
        return self


class HygieneSettings(_Section):
    """Token hygiene (``pushfan hygiene``) and the cleanup consumer (``pushfan cleanup``)."""

    stale_after_days: float = Field(
        90, gt=0, description="Deactivate tokens not registered again for this long."
    )
    purge_after_days: float = Field(
        30, gt=0, description="Delete deactivated rows this long after deactivation."
    )
    batch_size: int = Field(10_000, ge=1, description="Rows per hygiene statement.")
    interval_s: float = Field(3600, gt=0, description="Time between passes with --loop.")
    cleanup_batch_size: int = Field(
        10_000, ge=1, description="Invalid-token events the cleanup consumer reads per batch."
    )
    cleanup_lanes: int = Field(
        4,
        ge=1,
        le=16,
        description="Statements that write one cleanup batch at once, each on its own"
        " connection from the pool, over a disjoint range of tokens.",
    )
    cleanup_metrics_port: int = Field(
        9103,
        ge=0,
        le=65535,
        description="Port of the cleanup consumer's /metrics, /healthz and /readyz (0: not"
        " served).",
    )


class BridgeSettings(_Section):
    """The fulfilment bridge (``pushfan bridge orders-shipped``): order-shipped events on
    a business topic become one-user notification jobs."""

    topic: str = Field(
        "orders.shipped",
        min_length=1,
        description="The fulfilment system's order-shipped topic the bridge reads (not"
        " created by pushfan).",
    )
    group_id: str = Field(
        "pushfan-bridge", min_length=1, description="Consumer group of the bridge."
    )
    notification_type: NotificationType = Field(
        "order_shipped", description="The jobs' notification type (users opt out per type)."
    )
    title: str = Field(
        "Your order {order_id} has shipped",
        description="Title template; placeholders {order_id}, {user_id}, {carrier},"
        " {tracking_url}. Empty: no title.",
    )
    body: str = Field(
        "{carrier} is on its way with it.",
        description="Body template, same placeholders. A template naming a field the"
        " event lacks is left out (the default body: no body without a carrier).",
    )
    ttl_s: int = Field(
        86_400,
        ge=0,
        description="Seconds from the bridge publishing a job to its expiry; an expired job"
        " is not sent (0: never expires).",
    )
    priority: Literal["urgent", "normal", "low"] = Field(
        "normal", description="The jobs' priority: urgent, normal or low."
    )
    batch_size: int = Field(500, ge=1, description="Events read, sent and committed per batch.")
    metrics_port: int = Field(
        9104,
        ge=0,
        le=65535,
        description="Port of the bridge's /metrics, /healthz and /readyz (0: not served).",
    )

    @field_validator("title", "body")
    @classmethod
    def _known_placeholders(cls, template: str, info: ValidationInfo) -> str:
        name = f"{ENV_PREFIX}BRIDGE{ENV_NESTED_DELIMITER}{(info.field_name or '').upper()}"
        allowed = ", ".join(f"{{{f}}}" for f in BRIDGE_TEMPLATE_FIELDS)
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            unknown = [f for f in fields if f not in BRIDGE_TEMPLATE_FIELDS]
            if not unknown:  # a format spec that str refuses ({order_id:d}) fails here
                template.format_map(dict.fromkeys(BRIDGE_TEMPLATE_FIELDS, "x"))
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"{name}: not a valid template ({exc}); use {allowed}") from None
        if unknown:
            # Positional ({}) and attribute or index access ({order_id.x}) are refused too.
            shown = ", ".join(f"{{{f}}}" for f in unknown)
            raise ValueError(f"{name}: unknown placeholder {shown}; use {allowed}")
        return template


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`, then pass it down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    kafka: KafkaSettings = KafkaSettings()
    database: DatabaseSettings = DatabaseSettings()
    logging: LoggingSettings = LoggingSettings()
    fcm: FcmSettings = FcmSettings()
    apns: ApnsSettings = ApnsSettings()
    retry: RetrySettings = RetrySettings()
    worker: WorkerSettings = WorkerSettings()
    registry: RegistrySettings = RegistrySettings()
    hygiene: HygieneSettings = HygieneSettings()
    bridge: BridgeSettings = BridgeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win; the conventional variables sit just above the defaults.
        return (
            init_settings,
            _StrictPrefixedEnv(settings_cls),
            _ConventionalEnv(settings_cls),
            file_secret_settings,
        )


class _StrictPrefixedEnv(EnvSettingsSource):
    """The ``PUSHFAN_*`` variables, refusing any that name no setting."""

    def __call__(self) -> dict[str, Any]:
        unknown = sorted(
            name
            for name in os.environ
            if name.upper().startswith(ENV_PREFIX) and name.upper() not in _known_env_names()
        )
        if unknown:
            raise ValueError(
                f"unknown setting(s) in the environment: {', '.join(unknown)}; "
                "run `pushfan settings` for the list"
            )
        return super().__call__()


class _ConventionalEnv(PydanticBaseSettingsSource):
    """``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL``, as most tooling sets them."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if servers := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            values["kafka"] = {"bootstrap_servers": servers}
        if url := os.environ.get("DATABASE_URL"):
            values["database"] = {"url": url}
        return values


def env_names() -> list[tuple[str, FieldInfo]]:
    """Every leaf setting as ``(ENV_NAME, field)``, in declaration order."""
    out: list[tuple[str, FieldInfo]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name.upper()}{ENV_NESTED_DELIMITER}")
            else:
                out.append((f"{prefix}{name.upper()}", field))

    walk(Settings, ENV_PREFIX)
    return out


def _known_env_names() -> set[str]:
    leaves = {name for name, _ in env_names()}
    # A whole section may also be given as one JSON object, e.g. PUSHFAN_KAFKA__TOPICS='{...}'.
    sections = {name.rsplit(ENV_NESTED_DELIMITER, 1)[0] for name in leaves}
    return leaves | sections


def subprocess_env(settings: Settings) -> dict[str, str]:
    """An environment that makes a ``pushfan`` subprocess build exactly ``settings``:
    this process's environment without its pushfan variables, plus every setting as its
    ``PUSHFAN_`` variable (secrets included: pass it to a child process, never log it)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("DATABASE_URL", None)

    def walk(values: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            name = f"{prefix}{key.upper()}"
            if isinstance(value, dict):
                walk(value, f"{name}{ENV_NESTED_DELIMITER}")
            elif isinstance(value, SecretStr):
                env[name] = value.get_secret_value()
            elif isinstance(value, (list, tuple)):
                env[name] = json.dumps(list(value))
            elif value is not None:
                env[name] = str(value).lower() if isinstance(value, bool) else str(value)

    walk(settings.model_dump(), ENV_PREFIX)
    return env


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment; ``overrides`` win over it (used by tests)."""
    return Settings(**overrides)
