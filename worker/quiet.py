"""Quiet hours: is a user's local time inside their window, and when does it end.

A window is a start and an end wall-clock time in the user's IANA time zone; a start
after the end wraps midnight (22:00-07:00). Start equal to end is no window. The end is
the first instant at which the user's wall clock reads ``end`` or later, so

- on a night clocks go forward, a window ending at 07:00 ends at 07:00 summer time (an
  hour sooner in UTC than the evening's offset would say), and one ending inside the
  skipped hour (02:30 where 02:00 jumps to 03:00) ends when the jump happens;
- on a night clocks go back, a window ending at 01:30 ends at the first 01:30.

Pure functions of an explicit ``now``: the worker passes its clock, tests pass any night.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo | None:
    """The zone, or None for a name this machine's tz database does not know."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def inside(local: time, start: time, end: time) -> bool:
    """Whether wall time ``local`` falls in ``[start, end)`` (wrapping midnight)."""
    if start < end:
        return start <= local < end
    if start > end:
        return local >= start or local < end
    return False


def _first_at_or_after(day: date, wall: time, tz: ZoneInfo) -> datetime:
    """The first UTC instant of ``day`` whose wall clock in ``tz`` reads ``wall`` or later."""
    naive = datetime.combine(day, wall)
    early = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    late = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if early <= late:  # the wall time exists (once, or twice: fold 0 is the first)
        return early
    # In a gap: fold 1 maps it before the jump, fold 0 after. The jump is the answer;
    # find it to the second between the two (offsets change at whole seconds).
    lo, hi = late, early
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0)  # lo < jump <= hi, hi - lo <= 1 s: this is the jump


def quiet_until(now: datetime, time_zone: str, start: time, end: time) -> datetime | None:
    """When the quiet window around ``now`` ends (UTC), or None if ``now`` is outside it
    (or the zone is unknown: a zone the registry accepted but this host lacks must not
    hold notifications back forever)."""
    tz = zone(time_zone)
    if tz is None:
        return None
    local = now.astimezone(tz)
    wall = local.time().replace(tzinfo=None)
    if not inside(wall, start, end):
        return None
    day = local.date() if wall < end else local.date() + timedelta(days=1)
    return _first_at_or_after(day, end, tz)
