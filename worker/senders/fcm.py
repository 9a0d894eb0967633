"""FCM HTTP v1 sender: one POST per token over a pooled HTTP/2 connection.

firebase-admin's async path costs ~2 ms a message here (httpx), so this sender speaks
HTTP/2 itself (an :class:`~worker.senders.exchange.Exchange`, the lean
:mod:`worker.senders.h2client` by default) and keeps google-auth only for the OAuth2
access token. The body is rendered once per job; each request splices its token in.

Access tokens: cached, and refreshed in a worker thread (google-auth's refresh blocks on
``requests``) a few minutes before they expire, once for all concurrent sends. A 401
answer refreshes once and re-sends; a second 401 is a configuration error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from schemas import Platform
from worker.render import fcm_bodies
from worker.senders.base import Message, Outcome, outcomes_of, retry_after_seconds
from worker.senders.breaker import ConfigBreaker, send_batch
from worker.senders.exchange import Exchange, H2Response
from worker.senders.fcm_codes import SUSPECT_TOKEN_CODES, classify_response

REFRESH_MARGIN = dt.timedelta(minutes=5)


class AccessCredentials(Protocol):
    """What google-auth credentials offer (service account, ADC, or a static token)."""

    token: str | None
    expiry: dt.datetime | None

    def refresh(self, request: Any) -> None: ...


SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def static_credentials(token: str) -> AccessCredentials:
    """Credentials holding one fixed access token (the emulators' static token)."""
    from google.oauth2.credentials import Credentials

    creds: AccessCredentials = Credentials(token)  # type: ignore[no-untyped-call]
    return creds


def service_account_credentials(path: str) -> AccessCredentials:
    """A service account's credentials from its JSON key file."""
    from google.oauth2 import service_account

    creds: AccessCredentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
        path, scopes=[SCOPE]
    )
    return creds


class TokenSource:
    """The current OAuth2 access token, refreshed off the event loop before it expires."""

    def __init__(
        self,
        credentials: AccessCredentials,
        *,
        refreshable: bool = True,
        ca_file: Path | None = None,
    ) -> None:
        self.credentials = credentials
        self.refreshable = refreshable
        self.ca_file = ca_file  # the token endpoint is trusted like the FCM endpoint
        self.refreshes = 0
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        token, expiry = self.credentials.token, self.credentials.expiry
        if not token:
            return False
        if expiry is None:
            return True
        # google-auth keeps expiry as a naive UTC datetime.
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return expiry - REFRESH_MARGIN > now

    async def token(self, *, force: bool = False) -> str:
        if not force and self._fresh():
            return self.credentials.token or ""
        async with self._lock:
            if (force or not self._fresh()) and self.refreshable:
                await asyncio.to_thread(self._refresh)
                self.refreshes += 1
        return self.credentials.token or ""

    def _refresh(self) -> None:
        from google.auth.transport.requests import Request

        ca_file = self.ca_file

        class _Trusting(Request):
            # Per request: requests lets REQUESTS_CA_BUNDLE override a session's verify.
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                if ca_file is not None:
                    kwargs.setdefault("verify", str(ca_file))
                return super().__call__(*args, **kwargs)  # type: ignore[no-untyped-call]

        self.credentials.refresh(_Trusting())


class FcmSender:
    """The lean FCM sender (platform ``android``; web tokens go through FCM too).

    A batch goes to the pool as one :meth:`~worker.senders.exchange.Exchange.send_many`
    call: no task or future per token; the pool bounds the requests in flight."""

    platform: Platform = "android"

    def __init__(
        self,
        pool: Exchange,
        project_id: str,
        tokens: TokenSource,
        *,
        breaker: ConfigBreaker | None = None,
    ) -> None:
        self.pool = pool
        self.path = f"/v1/projects/{project_id}/messages:send"
        self.tokens = tokens
        self.breaker = breaker or ConfigBreaker()
        self.last_config_error: str | None = None

    async def send(self, tokens: Sequence[str], message: Message) -> list[Outcome]:
        async def renew() -> str:
            # The token may have been revoked before its expiry: refresh once.
            return await self.tokens.token(force=True)

        async def many(batch: Sequence[str], bearer: str) -> list[Outcome]:
            headers = (("authorization", f"Bearer {bearer}"), *message.headers)
            bodies = fcm_bodies(message, batch)
            replies = await self.pool.send_many("POST", self.path, headers, bodies)
            return outcomes_of(replies, _answered)

        outcomes, config = await send_batch(
            tokens,
            many,
            credential=self.tokens.token,
            renew_on="UNAUTHENTICATED",
            renew=renew,
            suspects=SUSPECT_TOKEN_CODES,
            breaker=self.breaker,
        )
        self.last_config_error = config or self.last_config_error
        return outcomes

    async def close(self) -> None:
        await self.pool.close()


def _answered(response: H2Response) -> Outcome:
    try:
        body: object = json.loads(response.body)
    except ValueError:
        body = None
    return classify_response(response.status, body, retry_after_seconds(response.headers))
