"""What FCM HTTP v1's answers mean for pushfan: the error-code sets and one classifier.

Shared by the lean FCM sender and the firebase-admin reference sender, so both read an
answer the same way. Codes are ``details[].errorCode`` of the FcmError detail first, then
the canonical ``error.status``, as firebase-admin reads them.
"""

from __future__ import annotations

from worker.senders.base import DELIVERED, Outcome, OutcomeKind, outcome_by_status

# The token is dead: the app was uninstalled, or the token expired or was revoked.
DEAD_TOKEN_CODES = frozenset({"UNREGISTERED"})
# May pass: send again later, honouring Retry-After.
RETRY_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"})
QUOTA_CODES = frozenset({"QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"})
# Our configuration is wrong (APNs/web-push credentials uploaded to Firebase, the project
# or service account): alert, blame no token.
CONFIG_CODES = frozenset(
    {"THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR", "UNAUTHENTICATED", "PERMISSION_DENIED"}
)

# INVALID_ARGUMENT is a dead token only when FCM says the token itself is malformed;
# for any other field it is our payload's fault and no token may be deactivated.
INVALID_TOKEN_TEXT = "not a valid FCM registration token"
TOKEN_FIELDS = frozenset({"message.token", "message.fid"})
MALFORMED_TOKEN_REASON = "INVALID_ARGUMENT_TOKEN"
# Dead for us one at a time (a token of another Firebase project, a malformed one), but on
# most of a batch they mean we send with the wrong project or the wrong token kind: the
# breaker then turns them into configuration errors.
SUSPECT_TOKEN_CODES = frozenset({"SENDER_ID_MISMATCH", MALFORMED_TOKEN_REASON})


def classify(
    code: str,
    *,
    status: int = 400,
    message: str = "",
    fields: frozenset[str] = frozenset(),
    retry_after: float | None = None,
) -> Outcome:
    """The outcome of one FCM error answer (``code`` as described in the module doc)."""
    if code in DEAD_TOKEN_CODES or code == "SENDER_ID_MISMATCH":
        return Outcome(OutcomeKind.INVALID_TOKEN, code)
    if code == "INVALID_ARGUMENT":
        if INVALID_TOKEN_TEXT in message or fields & TOKEN_FIELDS:
            return Outcome(OutcomeKind.INVALID_TOKEN, MALFORMED_TOKEN_REASON)
        return Outcome(OutcomeKind.PERMANENT, code)
    if code in QUOTA_CODES:
        return Outcome(OutcomeKind.QUOTA, code, retry_after)
    if code in RETRY_CODES:
        return Outcome(OutcomeKind.RETRY, code, retry_after)
    if code in CONFIG_CODES:
        return Outcome(OutcomeKind.CONFIG_ERROR, code)
    return outcome_by_status(status, code, retry_after)


def classify_response(status: int, body: object, retry_after: float | None) -> Outcome:
    """The outcome of one ``messages:send`` HTTP answer (``body`` already JSON-decoded)."""
    if status == 200:
        return DELIVERED
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        # Not FCM's JSON: a proxy or load balancer answered.
        return outcome_by_status(status, "", retry_after)
    code = str(error.get("status") or "")
    fields: set[str] = set()
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        if detail.get("errorCode"):
            code = str(detail["errorCode"])
        for violation in detail.get("fieldViolations") or ():
            if isinstance(violation, dict) and violation.get("field"):
                fields.add(str(violation["field"]))
    if status == 401 and code in ("", "UNAUTHENTICATED"):
        code = "UNAUTHENTICATED"
    return classify(
        code,
        status=status,
        message=str(error.get("message") or ""),
        fields=frozenset(fields),
        retry_after=retry_after,
    )
