"""APNs sender: one POST /3/device/{token} per token over pooled HTTP/2 connections.

The provider token (an ES256 JWT) is shared by every connection and re-signed on a fixed
schedule between 20 and 50 minutes: APNs refuses tokens older than an hour and answers
TooManyProviderTokenUpdates when a connection changes tokens more often than every 20
minutes. An ExpiredProviderToken answer (clock skew) re-signs once and re-sends; a second
one is a configuration error. TooManyRequests backs off only the device concerned: it is
a per-token QUOTA outcome, and only that token is retried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import jwt

from schemas import Platform
from worker.senders.apns_codes import SUSPECT_TOKEN_REASONS, classify
from worker.senders.base import Message, Outcome, outcomes_of, retry_after_seconds
from worker.senders.breaker import ConfigBreaker, send_batch
from worker.senders.exchange import Exchange, H2Response

MIN_REFRESH_S = 20 * 60
MAX_REFRESH_S = 50 * 60
APNS_PATH = "/3/device/"  # a token's request path is this and the token


class ProviderToken:
    """The current APNs provider token, re-signed every ``refresh_s`` seconds."""

    def __init__(
        self,
        key_pem: str,
        key_id: str,
        team_id: str,
        *,
        refresh_s: float = 40 * 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not MIN_REFRESH_S <= refresh_s <= MAX_REFRESH_S:
            raise ValueError("APNs provider tokens must be refreshed every 20 to 50 minutes")
        self.key_pem = key_pem
        self.key_id = key_id
        self.team_id = team_id
        self.refresh_s = refresh_s
        self.clock = clock
        self.signed = 0  # how many tokens were signed (tests check the schedule)
        self._token = ""
        self._issued_at = 0.0

    def current(self) -> str:
        now = self.clock()
        if not self._token or now - self._issued_at >= self.refresh_s:
            self._sign(now)
        return self._token

    def renew(self) -> str:
        """Sign a new token now (after ExpiredProviderToken)."""
        self._sign(self.clock())
        return self._token

    def _sign(self, now: float) -> None:
        self._token = jwt.encode(
            {"iss": self.team_id, "iat": int(now)},
            self.key_pem,
            algorithm="ES256",
            headers={"kid": self.key_id},
        )
        self._issued_at = now
        self.signed += 1


class ApnsSender:
    """The lean APNs sender (platform ``ios``): a batch is one ``send_many`` call."""

    platform: Platform = "ios"

    def __init__(
        self,
        pool: Exchange,
        provider_token: ProviderToken,
        *,
        breaker: ConfigBreaker | None = None,
    ) -> None:
        self.pool = pool
        self.provider_token = provider_token
        self.breaker = breaker or ConfigBreaker()
        self.last_config_error: str | None = None

    async def send(self, tokens: Sequence[str], message: Message) -> list[Outcome]:
        async def current() -> str:
            return self.provider_token.current()

        async def renew() -> str:
            return self.provider_token.renew()

        async def many(batch: Sequence[str], bearer: str) -> list[Outcome]:
            headers = (("authorization", f"bearer {bearer}"), *message.headers)
            paths = [APNS_PATH + t for t in batch]
            replies = await self.pool.send_many("POST", paths, headers, message.body)
            return outcomes_of(replies, _answered)

        outcomes, config = await send_batch(
            tokens,
            many,
            credential=current,
            renew_on="ExpiredProviderToken",
            renew=renew,
            suspects=SUSPECT_TOKEN_REASONS,
            breaker=self.breaker,
        )
        self.last_config_error = config or self.last_config_error
        return outcomes

    async def close(self) -> None:
        await self.pool.close()


def _answered(response: H2Response) -> Outcome:
    reason, timestamp = "", None
    try:
        body = json.loads(response.body)
        reason = str(body.get("reason", ""))
        timestamp = int(body["timestamp"]) if "timestamp" in body else None
    except (ValueError, TypeError, AttributeError):
        pass
    return classify(
        response.status,
        reason,
        timestamp_ms=timestamp,
        retry_after=retry_after_seconds(response.headers),
    )
