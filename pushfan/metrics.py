"""Every Prometheus metric pushfan exports: one prefix, low-cardinality labels only.

Labels are bounded sets (route templates, status codes, reasons, outcomes); never a
token, a user id or a job id. Each process builds one :class:`Metrics` at start-up on its
own registry and passes it down (tests build their own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from pushfan.errors import SetupError

PREFIX = "pushfan"
M = TypeVar("M", bound=MetricWrapperBase)

BRIDGE_OUTCOMES = ("published", "dead_lettered")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            f"{PREFIX}_registry_requests",
            "Registry API requests by route template and status code.",
            ["route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            f"{PREFIX}_registry_request_seconds",
            "Registry API request latency by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.registrations = Counter(
            f"{PREFIX}_registrations",
            "Token registrations by what they changed: created, refreshed, reactivated, moved.",
            ["change"],
            registry=r,
        )
        self.device_replacements = Counter(
            f"{PREFIX}_device_replacements",
            "Old tokens deactivated because their device registered a new one.",
            registry=r,
        )
        self.logouts = Counter(f"{PREFIX}_logouts", "Tokens logged out.", registry=r)
        self.deactivations = Counter(
            f"{PREFIX}_tokens_deactivated",
            "Tokens deactivated, by reason (platform code, stale, logout, replaced).",
            ["reason"],
            registry=r,
        )
        self.tokens_purged = Counter(
            f"{PREFIX}_tokens_purged", "Deactivated rows deleted after retention.", registry=r
        )
        self.cleanup_skipped = Counter(
            f"{PREFIX}_cleanup_skipped_events",
            "Invalid-token events the cleanup consumer could not parse.",
            registry=r,
        )
        self.cleanup_committed = Counter(
            f"{PREFIX}_cleanup_committed_events",
            "Invalid-token events the cleanup consumer wrote and committed.",
            registry=r,
        )
        self.hygiene_runs = Counter(
            f"{PREFIX}_hygiene_runs", "Token hygiene passes completed.", registry=r
        )
        # The fanout worker.
        self.jobs = Counter(
            f"{PREFIX}_worker_jobs",
            "Jobs consumed, by outcome: completed, split, duplicate, expired, dry_run,"
            " dead_lettered.",
            ["outcome"],
            registry=r,
        )
        self.sends = Counter(
            f"{PREFIX}_worker_sends",
            "Tokens sent to, by platform, outcome and the platform's reason code.",
            ["platform", "outcome", "reason"],
            registry=r,
        )
        self.targeted = Counter(
            f"{PREFIX}_worker_targeted_tokens",
            "Active tokens of resolved pages, by platform (before preferences).",
            ["platform"],
            registry=r,
        )
        self.policy = Counter(
            f"{PREFIX}_worker_policy_tokens",
            "Tokens the delivery policy held back or let go, by platform and decision:"
            " suppressed (type turned off), deferred (quiet hours), released (sent once"
            " quiet hours ended), capped (low-priority frequency cap), expired (deferred"
            " past the job's expiry, not sent; platform unknown).",
            ["platform", "decision"],
            registry=r,
        )
        self.parked = Counter(
            f"{PREFIX}_worker_parked_tokens",
            "Tokens put on the retry topic (retry budget spent or platform paused).",
            ["platform"],
            registry=r,
        )
        self.pages = Counter(f"{PREFIX}_worker_pages", "Audience pages reported.", registry=r)
        self.stage_seconds = Histogram(
            f"{PREFIX}_worker_stage_seconds",
            "Time in each stage: resolve, query, send, report (a page), commit (a record).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.audience_users = Counter(
            f"{PREFIX}_worker_audience_users",
            "Users in the audiences of split broadcasts; with users_done, their progress.",
            registry=r,
        )
        self.users_done = Counter(
            f"{PREFIX}_worker_users_done",
            "Users whose page was sent and reported.",
            registry=r,
        )
        self.shards_running = Gauge(
            f"{PREFIX}_worker_shards_running", "Shards this worker is sending now.", registry=r
        )
        self.platform_paused = Gauge(
            f"{PREFIX}_worker_platform_paused",
            "1 while a platform's sending is paused after an outage.",
            ["platform"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_worker_dead_letters",
            "Messages sent to the dead-letter topic, by kind: decode, validation.",
            ["kind"],
            registry=r,
        )
        # Provider traffic and consumer progress (every consuming service).
        self.send_seconds = Histogram(
            f"{PREFIX}_worker_send_seconds",
            "Provider request latency, from the request written to its response read, by platform.",
            ["platform"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_responses = Counter(
            f"{PREFIX}_worker_provider_responses",
            "Provider responses by platform and status class: 2xx, 4xx, 429, 5xx, and"
            " error (no response: timeout or connection lost).",
            ["platform", "status_class"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_worker_in_flight_requests",
            "Provider requests in flight now, by platform.",
            ["platform"],
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_worker_retries",
            "Tokens sent again after a transient or quota answer, by platform.",
            ["platform"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag",
            "Records between a consumer group's position and the end of each partition it"
            " holds, by group, topic and partition (refreshed every few seconds).",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 while the service is ready: connected to the broker and the database, not"
            " draining; 0 otherwise (what /readyz answers).",
            ["service"],
            registry=r,
        )
        # The fulfilment bridge.
        self.bridge_events = Counter(
            f"{PREFIX}_bridge_events",
            "Business events the bridge consumed, by outcome: published (a job on the jobs"
            " topic), dead_lettered (undecodable or invalid, on the dead-letter topic).",
            ["outcome"],
            registry=r,
        )
        for outcome in BRIDGE_OUTCOMES:  # both series exist from the start, at 0
            self.bridge_events.labels(outcome)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, looked up once: ``labels()`` validates the values
        and takes a lock on every call, and the registry API makes three such calls a
        request (about 7% of its instructions, by callgrind). Labels are bounded sets,
        so this stays small."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


@contextlib.contextmanager
def serving(metrics: Metrics, port: int, setting: str) -> Iterator[None]:
    """Serve ``metrics`` on ``http://0.0.0.0:port/metrics`` while the block runs; port 0:
    not served. A port that cannot be bound is a SetupError naming ``setting``, the
    variable that chose it."""
    if not port:
        yield
        return
    try:
        server, thread = start_http_server(port, registry=metrics.registry)
    except OSError as exc:
        raise SetupError(
            f"cannot serve metrics on port {port}: {exc} (set {setting} to a free port,"
            " or 0 for none)"
        ) from exc
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
