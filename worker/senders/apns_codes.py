"""What APNs' answers mean for pushfan: the reason sets and one classifier.

Shared by the lean APNs sender and the aioapns reference sender. Reasons are Apple's
``{"reason": ...}`` strings.
"""

from __future__ import annotations

from datetime import UTC, datetime

from worker.senders.base import DELIVERED, Outcome, OutcomeKind, outcome_by_status

# The token is dead. BadDeviceToken and DeviceTokenNotForTopic are per token too, but on
# most of a batch they mean we talk to the wrong environment (sandbox tokens sent to
# production) or with the wrong topic: the breaker turns them into configuration errors.
DEAD_TOKEN_REASONS = frozenset({"Unregistered", "ExpiredToken"})
SUSPECT_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
RETRY_REASONS = frozenset({"InternalServerError", "ServiceUnavailable", "Shutdown", "IdleTimeout"})
# Too many pushes to one device: back off that device only.
QUOTA_REASONS = frozenset({"TooManyRequests"})
# Our key, team, topic or certificate is wrong, or we refresh our JWT too often.
CONFIG_REASONS = frozenset(
    {
        "ExpiredProviderToken",
        "InvalidProviderToken",
        "MissingProviderToken",
        "TooManyProviderTokenUpdates",
        "BadCertificate",
        "BadCertificateEnvironment",
        "Forbidden",
        "TopicDisallowed",
        "BadTopic",
        "MissingTopic",
    }
)
# The request as built will never be accepted: our payload or headers are wrong.
PERMANENT_REASONS = frozenset(
    {
        "BadCollapseId",
        "BadExpirationDate",
        "BadMessageId",
        "BadPriority",
        "DuplicateHeaders",
        "InvalidPushType",
        "PayloadEmpty",
        "PayloadTooLarge",
        "BadPath",
        "MethodNotAllowed",
        "MissingDeviceToken",
    }
)


def classify(
    status: int, reason: str, *, timestamp_ms: int | None = None, retry_after: float | None = None
) -> Outcome:
    """The outcome of one APNs answer."""
    if status == 200:
        return DELIVERED
    if reason in DEAD_TOKEN_REASONS or reason in SUSPECT_TOKEN_REASONS:
        since = None if timestamp_ms is None else datetime.fromtimestamp(timestamp_ms / 1000, UTC)
        return Outcome(OutcomeKind.INVALID_TOKEN, reason, invalid_since=since)
    if reason in QUOTA_REASONS:
        return Outcome(OutcomeKind.QUOTA, reason, retry_after)
    if reason in RETRY_REASONS:
        return Outcome(OutcomeKind.RETRY, reason, retry_after)
    if reason in CONFIG_REASONS:
        return Outcome(OutcomeKind.CONFIG_ERROR, reason)
    if reason in PERMANENT_REASONS:
        return Outcome(OutcomeKind.PERMANENT, reason)
    return outcome_by_status(status, reason, retry_after)
