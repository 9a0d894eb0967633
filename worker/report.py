"""Report stage: a page's results leave the worker before its offset may be committed.

Invalid-token events go to the cleanup consumer's topic, parked tokens to the retry
topic, both awaited (acks=all) before the ledger moves; then metrics, aggregated per
page. Events are keyed by the token's fingerprint: reports about one token stay in one
partition, and the key (which brokers log and tools print) never holds the token. Retry
batches are keyed by batch, so the batches of a big broadcast spread over the group.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from pushfan.metrics import Metrics
from pushfan.settings import TopicSettings
from worker.dispatch import Sent


class Reporter:
    def __init__(self, producer: AIOKafkaProducer, topics: TopicSettings, metrics: Metrics):
        self.producer = producer
        self.topics = topics
        self.metrics = metrics

    async def publish(self, sent: Sent) -> None:
        """Produce the page's invalid-token events and retry batches; return once the
        broker has them all. Raises if the broker refuses one (the page is not reported,
        so it is sent again after a restart rather than lost)."""
        futures = []
        for event in sent.invalid:
            futures.append(
                await self.producer.send(
                    self.topics.invalid_tokens, event.to_bytes(), key=event.fingerprint.encode()
                )
            )
        for batch in sent.parked:
            futures.append(
                await self.producer.send(
                    self.topics.retry, batch.to_bytes(), key=batch.batch_id.encode()
                )
            )
        if futures:
            await asyncio.gather(*futures)

    def observe(self, sent: Sent) -> None:
        m = self.metrics
        for (platform, outcome, reason), n in sent.outcomes.items():
            m.child(m.sends, platform, outcome, reason).inc(n)
        for platform, n in sent.counts.targeted.items():
            m.child(m.targeted, platform).inc(n)
        for (platform, decision), n in sent.policy.items():
            m.child(m.policy, platform, decision).inc(n)
        for platform, n in sent.retried.items():
            m.child(m.retries, platform).inc(n)
        for batch in sent.parked:
            m.child(m.parked, batch.platform).inc(len(batch.tokens))
