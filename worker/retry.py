"""The one retry policy: which outcomes are tried again, when, and for how long.

Everything that retries in pushfan asks this module; there are no other retry loops.
Backoff is exponential with full jitter (so a fleet of workers does not retry in step),
a platform's Retry-After is honoured as a floor, and both the number of attempts and
the total time are bounded. What is still failing when the budget is spent goes back
to the caller as it is (the worker then parks it on the retry topic; nothing is lost).

The SDK reference senders retry on their own (firebase-admin retries 500 and 503 up to
4 times); their attempts are counted in through :attr:`RetrySettings.sdk_attempts`
rather than multiplied.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from worker.senders.base import Outcome, OutcomeKind

RETRYABLE = frozenset({OutcomeKind.RETRY, OutcomeKind.QUOTA})


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of one send's retries (see ``pushfan.settings.RetrySettings``)."""

    max_attempts: int = 5
    max_total_s: float = 60.0
    base_delay_s: float = 0.2
    max_delay_s: float = 30.0
    sdk_attempts: int = 1  # attempts the client library makes by itself per call

    def backoff(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        delay = rng.uniform(0, ceiling)
        if retry_after is not None:
            # The platform knows better than our schedule, but within our own bound.
            delay = max(delay, min(retry_after, self.max_delay_s))
        return delay

    @property
    def own_attempts(self) -> int:
        """Our attempts, so that ours times the SDK's stays within ``max_attempts``."""
        return max(1, self.max_attempts // max(1, self.sdk_attempts))


SendFn = Callable[[Sequence[str]], Awaitable[list[Outcome]]]


async def send_with_retries(
    tokens: Sequence[str],
    send: SendFn,
    policy: RetryPolicy,
    *,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[Outcome]:
    """Send to ``tokens``, re-sending only the tokens whose outcome is retryable.

    Returns one outcome per token: the final one. Tokens that succeed or fail for good
    are never sent again; the wait before a round is the longest Retry-After among the
    tokens still pending (a quota answer slows the whole round down, as it should).

    The time budget counts the waits (as ``sleep`` takes them) and the time spent
    sending, and no round starts if its wait would cross ``max_total_s``.
    """
    rand = rng or random.Random()
    final: list[Outcome | None] = [None] * len(tokens)
    pending = list(range(len(tokens)))
    spent = 0.0  # seconds waited plus seconds spent in send()

    def still_failing(outcomes: list[Outcome]) -> bool:
        return any(o.kind in RETRYABLE for o in outcomes)

    def wait(state: RetryCallState) -> float:
        outcomes: list[Outcome] = state.outcome.result() if state.outcome else []
        hints = [o.retry_after for o in outcomes if o.retry_after is not None]
        return policy.backoff(state.attempt_number, max(hints) if hints else None, rand)

    def out_of_budget(state: RetryCallState) -> bool:
        if state.attempt_number >= policy.own_attempts:
            return True
        return spent + (state.upcoming_sleep or 0.0) > policy.max_total_s

    async def timed_sleep(seconds: float) -> None:
        nonlocal spent
        spent += seconds
        await sleep(seconds)

    async def attempt() -> list[Outcome]:
        nonlocal pending, spent
        started = time.monotonic()
        try:
            outcomes = await send([tokens[i] for i in pending])
        finally:
            spent += time.monotonic() - started
        again = []
        for i, outcome in zip(pending, outcomes, strict=True):
            final[i] = outcome
            if outcome.kind in RETRYABLE:
                again.append(i)
        pending = again
        return outcomes

    retrying = AsyncRetrying(
        stop=out_of_budget,
        wait=wait,
        retry=retry_if_result(still_failing),
        sleep=timed_sleep,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else [],
        reraise=True,
    )
    await retrying(attempt)
    assert all(o is not None for o in final)
    return [o for o in final if o is not None]
