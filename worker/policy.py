"""Policy stage: which of a page's tokens may be sent now.

Urgent jobs bypass preferences. Quiet hours and frequency caps arrive with issue #6;
until then a user inside quiet hours is sent to at once (late is never lost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas import NotificationJob
from worker.tokens import PageToken


@dataclass(frozen=True, slots=True)
class Decision:
    send: list[PageToken]
    suppressed: int


def decide(job: NotificationJob, tokens: Sequence[PageToken]) -> Decision:
    """Split a page's tokens into those to send and those suppressed by preference."""
    if job.priority == "urgent":
        return Decision(list(tokens), 0)
    send = [t for t in tokens if t.push_enabled]
    return Decision(send, len(tokens) - len(send))
