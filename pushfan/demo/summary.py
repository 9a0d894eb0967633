"""The demo's per-platform account of a broadcast, and its check against what was seeded.

Each figure comes from the part of the system that owns it, not from the seeding: the
ledger (targeted), the worker's own Prometheus counters (delivered, invalid, deferred,
suppressed: what a dashboard shows), the database (tokens the cleanup consumer
deactivated) and the emulators' delivery logs (what the platforms received). The
demo then checks them against each other and against the population it seeded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from pushfan.demo.seed import Population
from pushfan.emulators.runner import Emulators

PLATFORMS = ("android", "ios")
_SENDS = "pushfan_worker_sends_total"
_POLICY = "pushfan_worker_policy_tokens_total"


@dataclass
class Counters:
    """Cumulative counts at one moment; two of them subtract to what happened between."""

    delivered: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)  # by the emulators

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))


def read(registry: CollectorRegistry, emulators: Emulators) -> Counters:
    """The worker's counters (its metrics registry) and the emulators' logs, now."""
    c = Counters()
    for metric in registry.collect():
        for s in metric.samples:
            platform = s.labels.get("platform", "")
            if s.name == _SENDS and s.labels["outcome"] == "delivered":
                c.delivered[platform] += int(s.value)
            elif s.name == _SENDS and s.labels["outcome"] == "invalid_token":
                c.invalid[platform] += int(s.value)
            elif s.name == _POLICY and s.labels["decision"] in ("deferred", "suppressed"):
                getattr(c, s.labels["decision"])[platform] += int(s.value)
    c.received["android"] = emulators.fcm.script.snapshot()["total"]
    c.received["ios"] = emulators.apns.script.snapshot()["total"]
    return c


@dataclass
class Summary:
    targeted: Counter[str]  # from the ledger
    counted: Counters  # the worker's counters and the emulators' logs, for this job
    cleaned: Counter[str]  # dead tokens now deactivated, from the database

    def rows(self) -> list[tuple[str, Counter[str]]]:
        c = self.counted
        return [
            ("targeted", self.targeted),
            ("delivered", c.delivered),
            ("invalid (reported dead)", c.invalid),
            ("  cleaned up", self.cleaned),
            ("deferred (quiet hours)", c.deferred),
            ("suppressed (opted out)", c.suppressed),
            ("emulators received", c.received),
        ]

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows()) + 2
        head = f"    {'':<{width}}" + "".join(f"{p:>10}" for p in (*PLATFORMS, "total"))
        lines = [head]
        for name, values in self.rows():
            cells = [values[p] for p in PLATFORMS]
            lines.append(
                f"    {name:<{width}}" + "".join(f"{n:>10,}" for n in (*cells, sum(cells)))
            )
        return "\n".join(lines)

    def mismatches(self, pop: Population) -> list[str]:
        """Where the figures disagree with each other or with the seeded population."""
        c = self.counted
        wrong = []
        for p in PLATFORMS:
            dead = len(pop.dead.get(p, ()))
            checks = [
                ("targeted", self.targeted[p], pop.tokens[p]),
                ("delivered", c.delivered[p], pop.expected_delivered(p)),
                ("emulators received", c.received[p], c.delivered[p]),
                ("invalid", c.invalid[p], dead),
                ("cleaned up", self.cleaned[p], c.invalid[p]),
                ("deferred", c.deferred[p], pop.quiet[p]),
                ("suppressed", c.suppressed[p], pop.opted_out[p]),
            ]
            wrong += [
                f"{p} {name}: {got:,}, expected {want:,}"
                for name, got, want in checks
                if got != want
            ]
        return wrong
