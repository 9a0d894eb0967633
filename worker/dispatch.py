"""Send stage: one page's tokens to their platforms, every token accounted for.

Tokens are grouped by platform and handed to the senders ``send_chunk`` at a time, all
chunks of a page at once (each sender bounds its own requests in flight), after the
platform's rate limiter. Transient failures are retried by the one retry policy; what
still fails when its budget is spent, and tokens met with a configuration error, are
**parked**: returned as :class:`RetryBatch` messages for the retry topic, to be sent
again later, never dropped. A chunk that fails as a whole pauses its platform
(:class:`PlatformGate`): further chunks of that platform are parked without a send until
the pause ends, while the other platform goes on.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pushfan.logs import get_logger
from pushfan.settings import WorkerSettings
from schemas import InvalidTokenEvent, NotificationJob, Platform
from schemas.work import ParkedToken, RetryBatch
from worker.ledger import Counts
from worker.pacing import PlatformGate, RateLimiter
from worker.render import render_apns, render_fcm
from worker.retry import RetryPolicy, send_with_retries
from worker.senders.base import DELIVERED, Message, Outcome, OutcomeKind, Sender
from worker.senders.factory import SERVICE

# Parked, not failed: they may pass later (CONFIG_ERROR once someone fixes the credentials).
PARK_KINDS = frozenset({OutcomeKind.RETRY, OutcomeKind.QUOTA, OutcomeKind.CONFIG_ERROR})

log = get_logger("pushfan.worker")

Target = tuple[int, str]  # (device_tokens.id, token)


@dataclass(slots=True)
class Sent:
    """What a page's (or a retry batch's) sends came to, ready to report."""

    counts: Counts = field(default_factory=Counts)
    delivered_ids: list[int] = field(default_factory=list)
    invalid: list[InvalidTokenEvent] = field(default_factory=list)
    parked: list[RetryBatch] = field(default_factory=list)
    # (platform, outcome, reason) -> tokens; aggregated so metrics cost a call per key
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # (platform, decision) -> tokens the delivery policy held back or released
    policy: Counter[tuple[str, str]] = field(default_factory=Counter)
    # platform -> tokens sent again by the retry policy (every round after the first)
    retried: Counter[str] = field(default_factory=Counter)


class Dispatcher:
    """Sends for one worker process: its senders, limiters, gates and retry policy."""

    def __init__(
        self,
        senders: Mapping[Platform, Sender],
        settings: WorkerSettings,
        policy: RetryPolicy,
        *,
        apns_topic: str = "",
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``in_flight``: requests each service's sender keeps in flight (its
        ``concurrency`` setting), per service name (``fcm``, ``apns``)."""
        self.senders = senders
        self.settings = settings
        self.policy = policy
        self.apns_topic = apns_topic
        self.rng = rng or random.Random()
        self.limiters = {
            "fcm": RateLimiter(settings.fcm_per_minute),
            "apns": RateLimiter(settings.apns_per_minute),
        }
        self.gates = {"fcm": PlatformGate(), "apns": PlatformGate()}
        # Chunks in flight per service: enough to keep the sender's requests in flight
        # busy, no more. Every lane's pages wait here as one coroutine per chunk; handed
        # to the sender at once, they became a coroutine per token queued on its
        # semaphore, and that queueing grew with the lanes (measured before this cap: 135
        # µs of worker CPU a token with 12 partitions, 96 with 2).
        self.slots = {
            service: asyncio.Semaphore(-(-concurrency // settings.send_chunk) + 1)
            for service, concurrency in (in_flight or {"fcm": 1000, "apns": 1000}).items()
        }
        self._rendered: dict[tuple[str, str], Message] = {}

    def message(self, job: NotificationJob, platform: Platform) -> Message:
        """``job`` rendered for ``platform``, once per job (a few jobs are cached)."""
        service = SERVICE[platform]
        key = (job.job_id, service)
        found = self._rendered.get(key)
        if found is None:
            if len(self._rendered) > 256:
                self._rendered.clear()
            found = self._rendered[key] = (
                render_apns(job, topic=self.apns_topic) if service == "apns" else render_fcm(job)
            )
        return found

    async def send(
        self,
        job: NotificationJob,
        by_platform: Mapping[Platform, Sequence[Target]],
        *,
        shard_no: int | None,
        attempt: int = 0,
    ) -> Sent:
        """Send ``job`` to every target; ``attempt`` is how often they were parked before."""
        sent = Sent()
        chunk = self.settings.send_chunk
        work = [
            self._chunk(job, platform, targets[i : i + chunk], shard_no, attempt, sent)
            for platform, targets in by_platform.items()
            for i in range(0, len(targets), chunk)
        ]
        await asyncio.gather(*work)
        return sent

    async def _chunk(
        self,
        job: NotificationJob,
        platform: Platform,
        targets: Sequence[Target],
        shard_no: int | None,
        attempt: int,
        sent: Sent,
    ) -> None:
        service = SERVICE[platform]

        def paused() -> bool:
            """Park the chunk unsent if its platform is paused."""
            gate = self.gates[service]
            if gate.remaining <= 0:
                return False
            self._park(job, platform, targets, shard_no, attempt, gate.reason, sent)
            sent.outcomes[(platform, "parked", gate.reason)] += len(targets)
            return True

        if paused():
            return
        async with self.slots[service]:
            if paused():  # the platform failed while this chunk waited for a slot
                return
            await self.limiters[service].acquire(len(targets))
            await self._send_chunk(job, platform, targets, shard_no, attempt, sent)

    async def _send_chunk(
        self,
        job: NotificationJob,
        platform: Platform,
        targets: Sequence[Target],
        shard_no: int | None,
        attempt: int,
        sent: Sent,
    ) -> None:
        gate = self.gates[SERVICE[platform]]
        sender = self.senders[platform]
        message = self.message(job, platform)
        started = datetime.now(UTC)

        rounds = 0

        async def once(tokens: Sequence[str]) -> list[Outcome]:
            nonlocal rounds
            rounds += 1
            if rounds > 1:
                sent.retried[platform] += len(tokens)
            return await sender.send(tokens, message)

        outcomes = await send_with_retries([t for _, t in targets], once, self.policy)
        if outcomes.count(DELIVERED) == len(outcomes):
            # Nearly every chunk: counted as a whole rather than token by token.
            sent.outcomes[(platform, OutcomeKind.DELIVERED.value, "")] += len(targets)
            sent.counts.sent += len(targets)
            sent.delivered_ids.extend([i for i, _ in targets])
            return
        again: list[Target] = []
        reason = ""
        for target, outcome in zip(targets, outcomes, strict=True):
            kind = outcome.kind
            sent.outcomes[(platform, kind.value, outcome.reason)] += 1
            if kind is OutcomeKind.DELIVERED:
                sent.counts.sent += 1
                sent.delivered_ids.append(target[0])
            elif kind is OutcomeKind.INVALID_TOKEN:
                sent.counts.invalid += 1
                sent.invalid.append(
                    InvalidTokenEvent(
                        token=target[1],
                        platform=platform,
                        reason=outcome.reason or kind.value,
                        observed_at=outcome.invalid_since or started,
                        job_id=job.job_id,
                    )
                )
            elif kind in PARK_KINDS:
                again.append(target)
                reason = outcome.reason or kind.value
            else:
                sent.counts.failed += 1
        if again:
            log.warning(
                "tokens parked for a later send",
                platform=platform,
                tokens=len(again),
                of=len(targets),
                reason=reason,
                job_id=job.job_id,
            )
            if len(again) == len(targets):
                # Nothing got through: the platform is down or refuses us. Pause it.
                gate.close_for(self.park_delay(attempt + 1), reason)
            self._park(job, platform, again, shard_no, attempt, reason, sent)

    def park_delay(self, attempt: int) -> float:
        """Seconds before the ``attempt``-th parked send (from 1), with 10% jitter."""
        s = self.settings
        base: float = min(s.park_max_delay_s, s.park_delay_s * 2.0 ** (attempt - 1))
        return base * self.rng.uniform(0.9, 1.1)

    def _park(
        self,
        job: NotificationJob,
        platform: Platform,
        targets: Sequence[Target],
        shard_no: int | None,
        attempt: int,
        reason: str,
        sent: Sent,
    ) -> None:
        delay = max(self.park_delay(attempt + 1), self.gates[SERVICE[platform]].remaining)
        sent.counts.parked += len(targets)
        sent.parked.append(
            RetryBatch(
                batch_id=uuid.uuid4().hex,
                job=job,
                shard_no=shard_no,
                platform=platform,
                tokens=tuple(ParkedToken(id=i, token=t) for i, t in targets),
                attempt=attempt + 1,
                not_before=datetime.now(UTC) + timedelta(seconds=delay),
                reason=(reason or "RETRY")[:64],
            )
        )

    async def close(self) -> None:
        for sender in {id(s): s for s in self.senders.values()}.values():
            await sender.close()
