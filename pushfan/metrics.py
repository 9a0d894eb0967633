"""Every Prometheus metric pushfan exports: one prefix, low-cardinality labels only.

Labels are bounded sets (route templates, status codes, reasons, outcomes); never a
token, a user id or a job id. Each process builds one :class:`Metrics` at start-up on its
own registry and passes it down (tests build their own).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX = "pushfan"
M = TypeVar("M", bound=MetricWrapperBase)

BRIDGE_OUTCOMES = ("published", "dead_lettered")
USERS_DONE_MODES = ("split", "inline")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            f"{PREFIX}_registry_requests",
            "Registry API requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            f"{PREFIX}_registry_request_seconds",
            "Registry API request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
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
            "Users in the audiences of split broadcasts, counted when a job is split; with"
            ' users_done{mode="split"}, their progress.',
            registry=r,
        )
        self.users_done = Counter(
            f"{PREFIX}_worker_users_done",
            "Users whose page was sent and recorded in the ledger, by mode: split (a shard"
            " of a split broadcast; the users audience_users counted) or inline (a job of"
            " one page, sent without shards).",
            ["mode"],
            registry=r,
        )
        self.shards_running = Gauge(
            f"{PREFIX}_worker_shards_running", "Shards this worker is sending now.", registry=r
        )
        self.platform_paused = Gauge(
            f"{PREFIX}_worker_platform_paused",
            "1 while a service's sending (fcm, apns) is paused after an outage.",
            ["service"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_worker_dead_letters",
            "Messages sent to the dead-letter topic, by kind: decode, validation.",
            ["kind"],
            registry=r,
        )
        # Provider traffic and consumer progress.
        # Provider latency, responses and requests in flight: kept by each HTTP/2 pool
        # (Traffic) and read at scrape time, so a request costs no metric call.
        self.traffic = _TrafficCollector()
        r.register(self.traffic)
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
        # Series that exist from the start, at 0: rate() and increase() see their first
        # increment (a first dead letter) only if the series was there before it.
        for outcome in BRIDGE_OUTCOMES:
            self.bridge_events.labels(outcome)
        for kind in ("decode", "validation"):
            self.dead_letters.labels(kind)
        for outcome in ("completed", "split", "duplicate", "expired", "dry_run", "dead_lettered"):
            self.jobs.labels(outcome)
        for mode in USERS_DONE_MODES:
            self.users_done.labels(mode)
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


STATUS_CLASSES = ("2xx", "4xx", "429", "5xx", "error")
_bucket = bisect.bisect_left


class Traffic:
    """One provider connection pool's requests: a latency histogram (responses only),
    responses by status class, requests in flight. Plain counters the pool bumps on the
    event loop; the collector reads them when Prometheus scrapes."""

    __slots__ = ("classes", "counts", "in_flight", "seconds")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.seconds = 0.0
        self.classes = dict.fromkeys(STATUS_CLASSES, 0)
        self.in_flight = 0

    def answered(self, seconds: float, status: int) -> None:
        self.counts[_bucket(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        classes = self.classes
        if 200 <= status < 300:  # nearly every answer: no string built
            classes["2xx"] += 1
        else:
            key = "429" if status == 429 else f"{status // 100}xx"
            classes[key] = classes.get(key, 0) + 1

    def failed(self) -> None:
        """No response: the deadline passed or the connection was lost."""
        self.classes["error"] += 1


class _TrafficCollector(Collector):
    def __init__(self) -> None:
        self.sources: dict[str, Traffic] = {}

    def watch(self, service: str, traffic: Traffic) -> None:
        """Export ``traffic`` under ``service`` (``fcm``, ``apns``)."""
        self.sources[service] = traffic

    def collect(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            f"{PREFIX}_worker_send_seconds",
            "Provider request latency, from the send (a wait for a free stream included) to"
            " its response, by service (fcm, apns).",
            labels=["service"],
        )
        responses = CounterMetricFamily(
            f"{PREFIX}_worker_provider_responses",
            "Provider responses by service and status class: 2xx, 4xx, 429, 5xx, and error"
            " (no response: the deadline passed or the connection was lost).",
            labels=["service", "status_class"],
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_worker_in_flight_requests",
            "Provider requests in flight now, by service.",
            labels=["service"],
        )
        for service, t in sorted(self.sources.items()):
            counts = list(t.counts)
            cumulative = list(itertools.accumulate(counts))
            bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
            latency.add_metric([service], list(zip(bounds, cumulative, strict=True)), t.seconds)
            for status_class, n in sorted(t.classes.items()):
                responses.add_metric([service, status_class], n)
            in_flight.add_metric([service], t.in_flight)
        yield latency
        yield responses
        yield in_flight
