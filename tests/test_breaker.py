"""The configuration-error guards (:mod:`worker.senders.breaker`): a batch's suspect
verdicts turned into configuration errors, and the cool-down breaker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.senders import apns_codes, fcm_codes
from worker.senders.base import DELIVERED, Outcome, OutcomeKind
from worker.senders.breaker import MIN_BATCH, SUSPECT_SHARE, ConfigBreaker, guard_batch

K = OutcomeKind
APNS_SUSPECTS = apns_codes.SUSPECT_TOKEN_REASONS
FCM_SUSPECTS = fcm_codes.SUSPECT_TOKEN_CODES

BAD = Outcome(K.INVALID_TOKEN, "BadDeviceToken")
NOT_FOR_TOPIC = Outcome(K.INVALID_TOKEN, "DeviceTokenNotForTopic")
GONE = Outcome(K.INVALID_TOKEN, "Unregistered")
RETRY = Outcome(K.RETRY, "ServiceUnavailable", 1.0)


def batch(*parts: tuple[int, Outcome], size: int = 20) -> list[Outcome]:
    """``parts`` (count, outcome) in order, padded with deliveries up to ``size``."""
    out = [o for n, o in parts for _ in range(n)]
    assert len(out) <= size
    return out + [DELIVERED] * (size - len(out))


def test_the_thresholds_are_the_documented_ones() -> None:
    # The tests below are written for these values; a change should be deliberate.
    assert MIN_BATCH == 10
    assert SUSPECT_SHARE == 0.5


def test_the_suspect_sets_hold_what_the_classifiers_blame_on_configuration() -> None:
    assert frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"}) == APNS_SUSPECTS
    assert "SENDER_ID_MISMATCH" in FCM_SUSPECTS
    assert fcm_codes.MALFORMED_TOKEN_REASON in FCM_SUSPECTS
    assert "Unregistered" not in APNS_SUSPECTS
    assert "UNREGISTERED" not in FCM_SUSPECTS


@pytest.mark.parametrize("size", [1, 5, MIN_BATCH - 1])
def test_below_min_batch_verdicts_are_left_alone(size: int) -> None:
    outcomes = [BAD] * size
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert guarded == [BAD] * size
    assert reason is None


def test_an_empty_batch_is_left_alone() -> None:
    assert guard_batch([], APNS_SUSPECTS) == ([], None)


def test_one_bad_device_token_in_twenty_stays_invalid() -> None:
    outcomes = batch((1, BAD))
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert guarded == outcomes
    assert guarded[0] == BAD
    assert reason is None


def test_most_of_a_batch_bad_device_token_is_a_configuration_error() -> None:
    outcomes = batch((11, BAD))
    before = list(outcomes)
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert reason == "BadDeviceToken"
    assert guarded == [Outcome(K.CONFIG_ERROR, "BadDeviceToken")] * 11 + [DELIVERED] * 9
    assert not any(o.kind is K.INVALID_TOKEN for o in guarded)
    assert outcomes == before  # the input list is not rewritten in place


def test_at_min_batch_a_majority_is_enough() -> None:
    guarded, reason = guard_batch(batch((6, BAD), size=MIN_BATCH), APNS_SUSPECTS)
    assert reason == "BadDeviceToken"
    assert [o.kind for o in guarded] == [K.CONFIG_ERROR] * 6 + [K.DELIVERED] * 4


@pytest.mark.parametrize("size", [MIN_BATCH, 20, 100])
def test_exactly_half_is_not_enough(size: int) -> None:
    outcomes = batch((size // 2, BAD), size=size)
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert guarded == outcomes
    assert reason is None


def test_one_more_than_half_is_enough() -> None:
    guarded, reason = guard_batch(batch((51, BAD), size=100), APNS_SUSPECTS)
    assert reason == "BadDeviceToken"
    assert sum(o.kind is K.CONFIG_ERROR for o in guarded) == 51


def test_fcm_sender_id_mismatch_across_a_batch_is_a_configuration_error() -> None:
    mismatch = Outcome(K.INVALID_TOKEN, "SENDER_ID_MISMATCH")
    gone = Outcome(K.INVALID_TOKEN, "UNREGISTERED")
    guarded, reason = guard_batch(batch((15, mismatch), (2, gone)), FCM_SUSPECTS)
    assert reason == "SENDER_ID_MISMATCH"
    assert guarded[:15] == [Outcome(K.CONFIG_ERROR, "SENDER_ID_MISMATCH")] * 15
    assert guarded[15:17] == [gone, gone]


def test_mixed_suspects_dominant_reason_converts_every_suspect() -> None:
    # Once the batch says "our configuration is wrong", no suspect verdict is believed.
    outcomes = batch((11, BAD), (4, NOT_FOR_TOPIC), (3, GONE), (1, RETRY))
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert reason == "BadDeviceToken"
    assert guarded[:11] == [Outcome(K.CONFIG_ERROR, "BadDeviceToken")] * 11
    assert guarded[11:15] == [Outcome(K.CONFIG_ERROR, "DeviceTokenNotForTopic")] * 4
    assert guarded[15:] == [GONE] * 3 + [RETRY] + [DELIVERED]


def test_mixed_suspects_reason_is_the_most_common_one() -> None:
    outcomes = batch((4, BAD), (12, NOT_FOR_TOPIC))
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert reason == "DeviceTokenNotForTopic"
    assert [o.kind for o in guarded[:16]] == [K.CONFIG_ERROR] * 16


def test_mixed_suspects_share_is_counted_across_reasons() -> None:
    # 12 of 20 suspect in all, though neither reason alone is a majority: the batch says
    # nothing about its tokens, so none of them is blamed.
    outcomes = batch((6, BAD), (6, NOT_FOR_TOPIC))
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert not any(o.kind is K.INVALID_TOKEN for o in guarded)
    assert reason in {BAD.reason, NOT_FOR_TOPIC.reason}


def test_unregistered_is_never_converted() -> None:
    all_gone = [GONE] * 20
    guarded, reason = guard_batch(all_gone, APNS_SUSPECTS)
    assert guarded == all_gone
    assert reason is None
    fcm_gone = [Outcome(K.INVALID_TOKEN, "UNREGISTERED")] * 20
    assert guard_batch(fcm_gone, FCM_SUSPECTS) == (fcm_gone, None)


def test_unregistered_is_not_converted_even_when_the_batch_trips() -> None:
    since = Outcome(K.INVALID_TOKEN, "Unregistered", invalid_since=datetime(2024, 5, 1, tzinfo=UTC))
    outcomes = batch((9, since), (11, BAD))
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert reason == "BadDeviceToken"
    assert guarded[:9] == [since] * 9
    assert all(o.kind is K.CONFIG_ERROR for o in guarded[9:])


def test_a_suspect_reason_of_another_kind_is_not_counted() -> None:
    # Only INVALID_TOKEN verdicts are suspects; a retry with the same label is not.
    odd = Outcome(K.RETRY, "BadDeviceToken")
    outcomes = batch((15, odd))
    assert guard_batch(outcomes, APNS_SUSPECTS) == (outcomes, None)


@pytest.mark.parametrize("size", [1, 3, 20])
@pytest.mark.parametrize("position", ["first", "last"])
def test_a_configuration_error_anywhere_is_reported(size: int, position: str) -> None:
    config = Outcome(K.CONFIG_ERROR, "ExpiredProviderToken")
    rest = [DELIVERED] * (size - 1)
    outcomes = [config, *rest] if position == "first" else [*rest, config]
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert reason == "ExpiredProviderToken"
    assert guarded == outcomes


def test_the_first_configuration_error_names_the_batch() -> None:
    outcomes = [
        DELIVERED,
        Outcome(K.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR"),
        Outcome(K.CONFIG_ERROR, "UNAUTHENTICATED"),
    ]
    assert guard_batch(outcomes, FCM_SUSPECTS)[1] == "THIRD_PARTY_AUTH_ERROR"


def test_a_configuration_error_and_mass_suspects_are_both_handled() -> None:
    outcomes = batch((1, Outcome(K.CONFIG_ERROR, "ExpiredProviderToken")), (12, BAD))
    guarded, reason = guard_batch(outcomes, APNS_SUSPECTS)
    assert reason is not None
    assert not any(o.kind is K.INVALID_TOKEN for o in guarded)


# -- ConfigBreaker ---------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_breaker_starts_closed() -> None:
    breaker = ConfigBreaker(cooldown_s=30.0, clock=Clock())
    assert not breaker.is_open
    assert breaker.reason is None


def open_at(breaker: ConfigBreaker, clock: Clock, now: float) -> bool:
    clock.now = now
    return breaker.is_open


def test_breaker_opens_for_the_cooldown_then_closes() -> None:
    clock = Clock(100.0)
    breaker = ConfigBreaker(cooldown_s=30.0, clock=clock)
    breaker.trip("THIRD_PARTY_AUTH_ERROR")
    assert breaker.reason == "THIRD_PARTY_AUTH_ERROR"
    assert open_at(breaker, clock, 100.0)
    assert open_at(breaker, clock, 129.999)
    assert not open_at(breaker, clock, 130.0)
    assert not open_at(breaker, clock, 1e6)


def test_tripping_again_restarts_the_cooldown_with_the_new_reason() -> None:
    clock = Clock(0.5)
    breaker = ConfigBreaker(cooldown_s=10.0, clock=clock)
    breaker.trip("BadDeviceToken")
    clock.now = 8.0
    breaker.trip("ExpiredProviderToken")
    assert breaker.reason == "ExpiredProviderToken"
    assert open_at(breaker, clock, 15.0)  # 10 s from the second trip, not the first
    assert not open_at(breaker, clock, 18.0)


def test_an_untripped_breaker_is_closed_whatever_the_clock_reads() -> None:
    assert not ConfigBreaker(cooldown_s=30.0, clock=Clock(-5.0)).is_open


def test_refuse_answers_configuration_errors_without_sending() -> None:
    breaker = ConfigBreaker(cooldown_s=30.0, clock=Clock())
    breaker.trip("SENDER_ID_MISMATCH")
    refused = breaker.refuse(3)
    assert refused == [Outcome(K.CONFIG_ERROR, "SENDER_ID_MISMATCH")] * 3
    assert breaker.refuse(0) == []


def test_refuse_before_any_trip_still_gives_a_reason() -> None:
    refused = ConfigBreaker(clock=Clock()).refuse(2)
    assert [o.kind for o in refused] == [K.CONFIG_ERROR] * 2
    assert all(o.reason for o in refused)


def test_the_default_clock_is_monotonic_and_the_breaker_closes_after_a_zero_cooldown() -> None:
    breaker = ConfigBreaker(cooldown_s=0.0)
    breaker.trip("X")
    assert not breaker.is_open
    long = ConfigBreaker(cooldown_s=3600.0)
    long.trip("X")
    assert long.is_open
