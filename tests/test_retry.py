"""The retry policy (:mod:`worker.retry`): who is re-sent, when, and for how long.

No real time passes: ``sleep`` is a fake that advances a :class:`FakeClock`. The time
budget counts the waits as ``sleep`` takes them (plus time spent sending), so it holds
with an injected ``sleep`` alone; one test checks exactly that.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from worker.retry import RETRYABLE, RetryPolicy, send_with_retries
from worker.senders.base import DELIVERED, Outcome, OutcomeKind

K = OutcomeKind
START = 1000.0


class FakeClock:
    """A monotonic clock that moves only when :meth:`sleep` is awaited."""

    def __init__(self) -> None:
        self.now = START
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeSend:
    """A sender that answers from a script: token -> outcomes of its successive sends
    (the last one repeats). Records every call and the fake time it was made at."""

    def __init__(self, script: dict[str, list[Outcome]], clock: FakeClock) -> None:
        self.script = {token: list(outcomes) for token, outcomes in script.items()}
        self.clock = clock
        self.calls: list[list[str]] = []
        self.times: list[float] = []

    async def __call__(self, tokens: Sequence[str]) -> list[Outcome]:
        self.calls.append(list(tokens))
        self.times.append(self.clock.now)
        out = []
        for token in tokens:
            queue = self.script[token]
            out.append(queue.pop(0) if len(queue) > 1 else queue[0])
        return out

    def sends_of(self, token: str) -> int:
        return sum(call.count(token) for call in self.calls)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


RETRY = Outcome(K.RETRY, "UNAVAILABLE")
QUOTA = Outcome(K.QUOTA, "QUOTA_EXCEEDED")


# -- who is re-sent ------------------------------------------------------------------------


async def test_only_retryable_tokens_are_resent_and_results_keep_input_order(
    clock: FakeClock,
) -> None:
    gone = Outcome(K.INVALID_TOKEN, "UNREGISTERED")
    send = FakeSend(
        {
            "a": [DELIVERED],
            "b": [RETRY, DELIVERED],
            "c": [gone],
            "d": [QUOTA, RETRY, DELIVERED],
            "e": [RETRY, RETRY, gone],
        },
        clock,
    )
    result = await send_with_retries(
        ["a", "b", "c", "d", "e"], send, RetryPolicy(), rng=random.Random(1), sleep=clock.sleep
    )
    assert send.calls == [["a", "b", "c", "d", "e"], ["b", "d", "e"], ["d", "e"]]
    assert result == [DELIVERED, DELIVERED, gone, DELIVERED, gone]
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize(
    "final",
    [
        Outcome(K.PERMANENT, "INVALID_ARGUMENT"),
        Outcome(K.INVALID_TOKEN, "BadDeviceToken"),
        Outcome(K.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR"),
        DELIVERED,
    ],
    ids=lambda o: o.kind.value,
)
async def test_a_final_outcome_is_never_resent(clock: FakeClock, final: Outcome) -> None:
    # "x" keeps the rounds going, so "y" would be re-sent if it were retried.
    send = FakeSend({"x": [RETRY], "y": [final]}, clock)
    policy = RetryPolicy(max_attempts=4)
    result = await send_with_retries(
        ["x", "y"], send, policy, rng=random.Random(2), sleep=clock.sleep
    )
    assert send.sends_of("y") == 1
    assert send.sends_of("x") == 4
    assert result == [RETRY, final]


def test_retryable_kinds_are_exactly_retry_and_quota() -> None:
    assert frozenset({K.RETRY, K.QUOTA}) == RETRYABLE


async def test_quota_is_retried_like_retry(clock: FakeClock) -> None:
    send = FakeSend({"q": [QUOTA, QUOTA, DELIVERED], "r": [RETRY, RETRY, DELIVERED]}, clock)
    result = await send_with_retries(
        ["q", "r"], send, RetryPolicy(), rng=random.Random(3), sleep=clock.sleep
    )
    assert send.calls == [["q", "r"], ["q", "r"], ["q", "r"]]
    assert result == [DELIVERED, DELIVERED]


async def test_empty_token_list_returns_nothing_and_never_retries(clock: FakeClock) -> None:
    send = FakeSend({}, clock)
    result = await send_with_retries([], send, RetryPolicy(), sleep=clock.sleep)
    assert result == []
    assert all(call == [] for call in send.calls)
    assert len(send.calls) <= 1
    assert clock.sleeps == []


async def test_a_send_that_raises_propagates_at_once(clock: FakeClock) -> None:
    calls = 0

    async def broken(tokens: Sequence[str]) -> list[Outcome]:
        nonlocal calls
        calls += 1
        raise ConnectionResetError("boom")

    with pytest.raises(ConnectionResetError, match="boom"):
        await send_with_retries(["a"], broken, RetryPolicy(), sleep=clock.sleep)
    assert calls == 1
    assert clock.sleeps == []


async def test_a_send_that_raises_on_a_retry_propagates_and_is_not_retried(
    clock: FakeClock,
) -> None:
    calls: list[list[str]] = []

    async def flaky(tokens: Sequence[str]) -> list[Outcome]:
        calls.append(list(tokens))
        if len(calls) == 2:
            raise TimeoutError("second round")
        return [RETRY for _ in tokens]

    with pytest.raises(TimeoutError, match="second round"):
        await send_with_retries(["a", "b"], flaky, RetryPolicy(max_attempts=5), sleep=clock.sleep)
    assert len(calls) == 2


async def test_a_send_returning_the_wrong_number_of_outcomes_is_an_error(
    clock: FakeClock,
) -> None:
    async def short(tokens: Sequence[str]) -> list[Outcome]:
        return [DELIVERED]

    with pytest.raises(ValueError, match="zip"):
        await send_with_retries(["a", "b"], short, RetryPolicy(), sleep=clock.sleep)


# -- how many times ------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
async def test_attempts_are_bounded_by_max_attempts(clock: FakeClock, max_attempts: int) -> None:
    send = FakeSend({"a": [RETRY], "b": [Outcome(K.QUOTA, "QUOTA_EXCEEDED", 0.5)]}, clock)
    policy = RetryPolicy(max_attempts=max_attempts, max_total_s=1e9)
    result = await send_with_retries(
        ["a", "b"], send, policy, rng=random.Random(4), sleep=clock.sleep
    )
    assert len(send.calls) == max_attempts
    assert len(clock.sleeps) == max_attempts - 1
    # Still failing when the budget is spent: handed back as it is, not raised.
    assert result == [RETRY, Outcome(K.QUOTA, "QUOTA_EXCEEDED", 0.5)]


@pytest.mark.parametrize(
    ("max_attempts", "sdk_attempts", "own"),
    [(5, 1, 5), (5, 5, 1), (5, 2, 2), (6, 3, 2), (4, 5, 1), (5, 0, 5), (1, 1, 1)],
)
def test_own_attempts_count_in_the_sdk_attempts(
    max_attempts: int, sdk_attempts: int, own: int
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, sdk_attempts=sdk_attempts)
    assert policy.own_attempts == own
    if sdk_attempts:
        assert policy.own_attempts * sdk_attempts <= max(max_attempts, sdk_attempts)


async def test_an_sdk_that_retries_five_times_gets_one_attempt_of_ours(clock: FakeClock) -> None:
    send = FakeSend({"a": [RETRY, DELIVERED]}, clock)
    policy = RetryPolicy(max_attempts=5, sdk_attempts=5)
    result = await send_with_retries(["a"], send, policy, sleep=clock.sleep)
    assert send.calls == [["a"]]
    assert clock.sleeps == []
    assert result == [RETRY]


async def test_attempts_are_bounded_by_max_total_s(clock: FakeClock) -> None:
    # Retry-After 4 s on every answer: each wait is exactly 4 s (see the floor tests).
    slow = Outcome(K.RETRY, "UNAVAILABLE", 4.0)
    send = FakeSend({"a": [slow]}, clock)
    policy = RetryPolicy(max_attempts=50, max_total_s=10.0, base_delay_s=0.1, max_delay_s=5.0)
    result = await send_with_retries(["a"], send, policy, rng=random.Random(5), sleep=clock.sleep)
    assert len(send.calls) < policy.max_attempts
    assert clock.now - START <= policy.max_total_s + policy.max_delay_s
    assert result == [slow]


async def test_no_attempt_starts_after_max_total_s(clock: FakeClock) -> None:
    slow = Outcome(K.RETRY, "UNAVAILABLE", 4.0)
    send = FakeSend({"a": [slow]}, clock)
    policy = RetryPolicy(max_attempts=50, max_total_s=10.0, base_delay_s=0.1, max_delay_s=5.0)
    await send_with_retries(["a"], send, policy, rng=random.Random(5), sleep=clock.sleep)
    assert [t - START for t in send.times] == [0.0, 4.0, 8.0]


async def test_max_total_s_is_honoured_with_only_an_injected_sleep() -> None:
    fake = FakeClock()  # deliberately not patched into tenacity: only `sleep` is injected
    slow = Outcome(K.RETRY, "UNAVAILABLE", 4.0)
    send = FakeSend({"a": [slow]}, fake)
    policy = RetryPolicy(max_attempts=50, max_total_s=10.0, base_delay_s=0.1, max_delay_s=5.0)
    await send_with_retries(["a"], send, policy, rng=random.Random(5), sleep=fake.sleep)
    # Even the lenient reading (stop once max_total_s has passed) allows 4 attempts.
    assert len(send.calls) <= 4


# -- how long between ----------------------------------------------------------------------


async def test_retry_after_is_a_floor(clock: FakeClock) -> None:
    send = FakeSend({"a": [Outcome(K.QUOTA, "QUOTA_EXCEEDED", 3.0), DELIVERED]}, clock)
    policy = RetryPolicy(base_delay_s=0.01, max_delay_s=30.0)
    await send_with_retries(["a"], send, policy, rng=random.Random(6), sleep=clock.sleep)
    # The jitter alone is at most 0.01 s: the wait is Retry-After itself.
    assert clock.sleeps == [3.0]


async def test_retry_after_is_capped_by_max_delay(clock: FakeClock) -> None:
    send = FakeSend({"a": [Outcome(K.RETRY, "UNAVAILABLE", 3600.0), DELIVERED]}, clock)
    policy = RetryPolicy(base_delay_s=0.01, max_delay_s=5.0)
    await send_with_retries(["a"], send, policy, rng=random.Random(7), sleep=clock.sleep)
    assert clock.sleeps == [5.0]


async def test_the_round_waits_for_the_longest_retry_after(clock: FakeClock) -> None:
    send = FakeSend(
        {
            "a": [Outcome(K.RETRY, "UNAVAILABLE", 1.0), DELIVERED],
            "b": [Outcome(K.QUOTA, "QUOTA_EXCEEDED", 4.0), DELIVERED],
            "c": [RETRY, DELIVERED],
        },
        clock,
    )
    policy = RetryPolicy(base_delay_s=0.01)
    await send_with_retries(["a", "b", "c"], send, policy, rng=random.Random(8), sleep=clock.sleep)
    assert clock.sleeps == [4.0]


def test_retry_after_below_the_jitter_does_not_shorten_it() -> None:
    policy = RetryPolicy(base_delay_s=10.0, max_delay_s=30.0)
    seed = 9
    jitter = random.Random(seed).uniform(0, 10.0)
    assert jitter > 0.001  # the seed gives a jitter above the Retry-After below
    assert policy.backoff(1, 0.001, random.Random(seed)) == jitter


def test_full_jitter_stays_within_zero_and_the_ceiling() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=6.0)
    rng = random.Random(10)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 6.0), (9, 6.0)]:
        delays = [policy.backoff(attempt, None, rng) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(delays) < 0.05 * ceiling
        assert max(delays) > 0.95 * ceiling


async def test_waits_follow_the_seeded_full_jitter_schedule(clock: FakeClock) -> None:
    send = FakeSend({"a": [RETRY]}, clock)
    policy = RetryPolicy(max_attempts=6, max_total_s=1e9, base_delay_s=0.5, max_delay_s=3.0)
    await send_with_retries(["a"], send, policy, rng=random.Random(11), sleep=clock.sleep)
    expected_rng = random.Random(11)
    expected = [expected_rng.uniform(0, c) for c in (0.5, 1.0, 2.0, 3.0, 3.0)]
    assert clock.sleeps == expected
    # Same seed, same schedule: workers are reproducible in tests, spread in production.
    again = FakeClock()
    await send_with_retries(
        ["a"],
        FakeSend({"a": [RETRY]}, again),
        policy,
        rng=random.Random(11),
        sleep=again.sleep,
    )
    assert again.sleeps == clock.sleeps
