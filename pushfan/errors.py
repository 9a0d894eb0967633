"""pushfan's error taxonomy, decided once.

Every failure is one of these kinds, and each kind has one handling:

- :class:`SetupError`: our configuration or environment is wrong (bad settings, a broker
  or database that cannot be reached at start-up, rejected credentials). Crash at
  start-up with a clear message; at run time, alert and stop the affected sender
  rather than blame the tokens.
- :class:`InvalidJobError`: a job that cannot be decoded or fails validation. It goes to
  the dead-letter topic with its reason, then its offset is committed.
- :class:`TransientError`: the platform or a dependency failed in a way that may pass
  (5xx, timeouts, dropped connections). Retried by the one retry policy, honouring
  ``retry_after``.
- :class:`QuotaError`: the platform asked us to slow down (429). Retried after
  ``retry_after``, and the sender's rate is lowered.
- :class:`PermanentError`: a request that will never succeed as sent (a payload the
  platform rejects). Counted as failed, never retried, never blames the token.

Dead tokens are not errors at all: senders return them as per-token outcomes.
"""

from __future__ import annotations


class PushfanError(Exception):
    """Base of every error pushfan raises on purpose."""


class SetupError(PushfanError):
    """Configuration or environment is wrong; the process should stop with this message."""


class InvalidJobError(PushfanError):
    """A job that cannot be processed as sent; ``kind`` says why (decode or validation)."""

    def __init__(self, reason: str, *, kind: str = "validation") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class TransientError(PushfanError):
    """A failure that may pass; retry after ``retry_after`` seconds when given."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class QuotaError(TransientError):
    """The platform's rate limit was hit."""


class PermanentError(PushfanError):
    """A request that will never succeed as sent."""
