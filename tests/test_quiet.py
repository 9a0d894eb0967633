"""Quiet hours on the wall clock of the user's zone, on ordinary nights and DST nights.

New York in 2026: clocks go forward at 02:00 EST on 8 March (07:00 UTC) and back at
02:00 EDT on 1 November (06:00 UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from worker.quiet import inside, quiet_until

NY = "America/New_York"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("local", "start", "end", "expected"),
    [
        (time(23), time(22), time(7), True),  # wraps midnight
        (time(3), time(22), time(7), True),
        (time(7), time(22), time(7), False),  # the end is outside
        (time(22), time(22), time(7), True),  # the start is inside
        (time(12), time(22), time(7), False),
        (time(13), time(12), time(14), True),  # within one day
        (time(14), time(12), time(14), False),
        (time(9), time(9), time(9), False),  # start == end: no window
    ],
)
def test_inside_a_window(local: time, start: time, end: time, expected: bool) -> None:
    assert inside(local, start, end) is expected


def test_a_user_in_tokyo_at_23_waits_until_7_their_time() -> None:
    # 14:00 UTC is 23:00 in Tokyo (UTC+9, no DST) and 09:00 in New York.
    now = utc("2026-11-23T14:00")
    assert quiet_until(now, "Asia/Tokyo", time(22), time(7)) == utc("2026-11-23T22:00")
    assert quiet_until(now, NY, time(22), time(7)) is None


def test_after_midnight_the_window_ends_the_same_day() -> None:
    # 03:00 in Tokyo on the 24th.
    assert quiet_until(utc("2026-11-23T18:00"), "Asia/Tokyo", time(22), time(7)) == utc(
        "2026-11-23T22:00"
    )


def test_the_night_clocks_go_forward_ends_at_7_summer_time() -> None:
    # 23:00 EST on the 7th; 07:00 on the 8th is EDT (UTC-4): 11:00 UTC, not 12:00.
    assert quiet_until(utc("2026-03-08T04:00"), NY, time(22), time(7)) == utc("2026-03-08T11:00")


def test_a_window_ending_in_the_skipped_hour_ends_at_the_jump() -> None:
    # 02:30 does not exist on 8 March: at 02:00 EST the clock reads 03:00 EDT.
    assert quiet_until(utc("2026-03-08T04:00"), NY, time(23), time(2, 30)) == utc(
        "2026-03-08T07:00"
    )


def test_the_night_clocks_go_back_ends_at_the_first_0130() -> None:
    # 00:00 EDT on 1 November; 01:30 happens at 05:30 UTC (EDT) and again at 06:30 (EST).
    assert quiet_until(utc("2026-11-01T04:00"), NY, time(22), time(1, 30)) == utc(
        "2026-11-01T05:30"
    )


def test_the_night_clocks_go_back_ends_at_7_winter_time() -> None:
    # 23:00 EDT on 31 October; 07:00 on 1 November is EST (UTC-5): 12:00 UTC.
    assert quiet_until(utc("2026-11-01T03:00"), NY, time(22), time(7)) == utc("2026-11-01T12:00")
    # In the repeated hour (01:30 EST, the second one), still inside, same end.
    assert quiet_until(utc("2026-11-01T06:30"), NY, time(22), time(7)) == utc("2026-11-01T12:00")


def test_an_unknown_zone_never_holds_a_notification_back() -> None:
    assert quiet_until(utc("2026-11-23T14:00"), "Mars/Olympus_Mons", time(0), time(23)) is None
