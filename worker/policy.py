"""Policy stage: which of a page's tokens go now, which wait, which do not go.

In this order, for every job but an ``urgent`` one (urgent bypasses all of it):

1. **suppressed**: the user turned this notification type off;
2. **deferred**: the user is inside quiet hours in their time zone; their tokens wait
   until the window ends (:mod:`worker.quiet`), stored by the report stage and sent by
   the release scheduler (:mod:`worker.release`). Never dropped silently: sent then, or
   counted expired if the job expires first;
3. **capped**: a ``low`` job to a user who already got ``cap`` low-priority
   notifications within the cap's window (other jobs only: a page sent again after a
   crash does not cap itself).

Everything the decision needs rode along on the page's token rows; this is arithmetic on
them, with one quiet-hours computation per distinct (zone, window) of the page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, time

from schemas import NotificationJob
from worker.quiet import quiet_until
from worker.tokens import PageToken


@dataclass(slots=True)
class Decision:
    send: list[PageToken] = field(default_factory=list)
    suppressed: int = 0
    capped: int = 0
    # user_id -> (when quiet hours end, tokens held back)
    deferred: dict[str, tuple[datetime, int]] = field(default_factory=dict)
    # (platform, decision) -> tokens held back, for the per-platform metric
    held: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def deferred_tokens(self) -> int:
        return sum(n for _, n in self.deferred.values())


def decide(
    job: NotificationJob,
    tokens: Sequence[PageToken],
    now: datetime,
    *,
    cap: int = 0,
    quiet: bool = True,
) -> Decision:
    """Split a page's tokens. ``cap`` 0: no frequency cap; ``quiet`` False: quiet hours
    are not looked at (a release: the user's window has ended)."""
    if job.priority == "urgent":
        return Decision(send=list(tokens))
    capping = cap > 0 and job.priority == "low"
    decision = Decision()
    windows: dict[tuple[str, time, time], datetime | None] = {}
    for t in tokens:
        if not t.push_enabled:
            decision.suppressed += 1
            decision.held[t.platform, "suppressed"] += 1
            continue
        if quiet and t.quiet_start is not None and t.quiet_end is not None:
            key = (t.time_zone or "UTC", t.quiet_start, t.quiet_end)
            if key not in windows:
                windows[key] = quiet_until(now, *key)
            until = windows[key]
            if until is not None:
                _, held = decision.deferred.get(t.user_id, (until, 0))
                decision.deferred[t.user_id] = (until, held + 1)
                decision.held[t.platform, "deferred"] += 1
                continue
        if capping and t.recent_low >= cap:
            decision.capped += 1
            decision.held[t.platform, "capped"] += 1
            continue
        decision.send.append(t)
    return decision
