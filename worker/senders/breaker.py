"""Never deactivate a batch's tokens because of our own configuration.

Two guards, shared by every sender:

- :func:`guard_batch`: a per-token reason that could also mean "our configuration is
  wrong" (APNs BadDeviceToken from the wrong environment, FCM SENDER_ID_MISMATCH from the
  wrong project) is believed for a few tokens, but on most of a batch it is turned into a
  configuration error: nothing is deactivated, and somebody is alerted.
- :class:`ConfigBreaker`: once a configuration error is seen, the sender stops sending
  for a cool-down instead of burning through the audience with requests that all fail
  the same way; the tokens come back as configuration errors, to be retried later.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from worker.senders.base import DELIVERED, Outcome, OutcomeKind

# Below this many tokens a batch proves nothing either way.
MIN_BATCH = 10
# Share of a batch with suspect reasons that makes it a configuration error.
SUSPECT_SHARE = 0.5


def guard_batch(
    outcomes: list[Outcome], suspect_reasons: frozenset[str]
) -> tuple[list[Outcome], str | None]:
    """``outcomes`` with mass suspect verdicts made configuration errors, and the reason
    of the batch's configuration error if there is one (for alerting)."""
    if outcomes.count(DELIVERED) == len(outcomes):
        return outcomes, None  # nearly every batch: nothing to look at per token
    config = next((o.reason for o in outcomes if o.kind is OutcomeKind.CONFIG_ERROR), None)
    if len(outcomes) < MIN_BATCH:
        return outcomes, config
    counts = Counter(
        o.reason
        for o in outcomes
        if o.kind is OutcomeKind.INVALID_TOKEN and o.reason in suspect_reasons
    )
    # All suspect reasons together: half wrong-environment and half wrong-topic answers
    # still mean the batch says nothing about its tokens.
    if not counts or sum(counts.values()) <= SUSPECT_SHARE * len(outcomes):
        return outcomes, config
    reason = counts.most_common(1)[0][0]
    suspects = set(counts)
    guarded = [
        Outcome(OutcomeKind.CONFIG_ERROR, o.reason)
        if o.kind is OutcomeKind.INVALID_TOKEN and o.reason in suspects
        else o
        for o in outcomes
    ]
    return guarded, reason


class ConfigBreaker:
    """Open for ``cooldown_s`` after a configuration error; closed otherwise."""

    def __init__(self, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.reason: str | None = None
        self._until = float("-inf")

    def trip(self, reason: str) -> None:
        self.reason = reason
        self._until = self.clock() + self.cooldown_s

    @property
    def is_open(self) -> bool:
        return self.clock() < self._until

    def refuse(self, n: int) -> list[Outcome]:
        """What an open breaker answers for ``n`` tokens, without sending."""
        return [Outcome(OutcomeKind.CONFIG_ERROR, self.reason or "CONFIG")] * n


async def send_batch(
    tokens: Sequence[str],
    many: Callable[[Sequence[str], str], Awaitable[list[Outcome]]],
    *,
    credential: Callable[[], Awaitable[str]],
    renew_on: str,
    renew: Callable[[], Awaitable[str]],
    suspects: frozenset[str],
    breaker: ConfigBreaker,
) -> tuple[list[Outcome], str | None]:
    """The batch step every sender shares.

    Send to every token with ``await credential()`` (``many(tokens, credential)``, one
    outcome per token), unless the breaker is open; tokens answered ``renew_on`` (our
    credential expired or was revoked early) are re-sent once with a renewed one; then
    :func:`guard_batch`, tripping ``breaker`` on a configuration error. Returns the
    outcomes and the configuration error's reason, if any.
    """
    if breaker.is_open:
        return breaker.refuse(len(tokens)), breaker.reason
    outcomes = await many(tokens, await credential())
    all_delivered = outcomes.count(DELIVERED) == len(outcomes)
    again = [] if all_delivered else [i for i, o in enumerate(outcomes) if o.reason == renew_on]
    if again:
        redo = await many([tokens[i] for i in again], await renew())
        for i, outcome in zip(again, redo, strict=True):
            outcomes[i] = outcome
    outcomes, config = guard_batch(outcomes, suspects)
    if config is not None:
        breaker.trip(config)
    return outcomes, config
