"""Build the senders the settings ask for: one per platform, chosen from a plain dict.

Missing or unreadable credentials are a :class:`~pushfan.errors.SetupError` here, at
start-up, never a failure on the first send.
"""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from pushfan.errors import SetupError
from pushfan.metrics import Traffic
from pushfan.settings import ApnsSettings, FcmSettings, Settings
from schemas import Platform
from worker.senders.apns import ApnsSender, ProviderToken
from worker.senders.base import Sender
from worker.senders.exchange import Exchange
from worker.senders.fcm import (
    AccessCredentials,
    FcmSender,
    TokenSource,
    service_account_credentials,
    static_credentials,
)
from worker.senders.h2client import H2Pool
from worker.senders.h2ref import H2RefPool


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise SetupError(f"endpoint {url!r} must be an https:// origin")
    return parts.hostname, parts.port or 443


def _tls(ca_file: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise SetupError(f"cannot load CA file {ca_file}: {exc}") from exc
    return ctx


def _pool(s: FcmSettings | ApnsSettings) -> H2Pool:
    host, port = _origin(s.endpoint)
    return H2Pool(
        host,
        port,
        ssl_context=_tls(s.ca_file),
        max_connections=s.max_connections,
        max_in_flight=s.concurrency,
        timeout_s=s.timeout_s,
    )


def _ref_pool(s: FcmSettings | ApnsSettings) -> H2RefPool:
    """The reference pool on the ``h2`` library, for ``implementation = "h2"``."""
    host, port = _origin(s.endpoint)
    return H2RefPool(
        host,
        port,
        ssl_context=_tls(s.ca_file),
        max_connections=s.max_connections,
        max_in_flight=s.concurrency,
        timeout_s=s.timeout_s,
    )


def _fcm_credentials(s: FcmSettings) -> tuple[AccessCredentials, str, bool]:
    """Credentials, project id, and whether they can refresh themselves."""
    if s.access_token is not None:
        if not s.project_id:
            raise SetupError("PUSHFAN_FCM__PROJECT_ID is required with an access token")
        return static_credentials(s.access_token.get_secret_value()), s.project_id, False
    try:
        if s.credentials_file is not None:
            creds = service_account_credentials(str(s.credentials_file))
            project = s.project_id or getattr(creds, "project_id", None)
        else:
            import google.auth

            from worker.senders.fcm import SCOPE

            creds, project = google.auth.default(scopes=[SCOPE])
            project = s.project_id or project
    except Exception as exc:  # google-auth raises several kinds; all mean the same here
        raise SetupError(f"FCM credentials: {exc}") from exc
    if not project:
        raise SetupError("FCM project id unknown: set PUSHFAN_FCM__PROJECT_ID")
    return creds, str(project), True


def lean_fcm(settings: Settings, pool_of: Callable[[FcmSettings], Exchange] = _pool) -> Sender:
    s = settings.fcm
    pool = pool_of(s)
    creds, project, refreshable = _fcm_credentials(s)
    source = TokenSource(creds, refreshable=refreshable, ca_file=s.ca_file)
    return FcmSender(pool, project, source)


def _apns_key(s: ApnsSettings) -> tuple[str, str, str, str]:
    missing = [n for n in ("key_file", "key_id", "team_id", "topic") if getattr(s, n) is None]
    if missing:
        names = ", ".join(f"PUSHFAN_APNS__{n.upper()}" for n in missing)
        raise SetupError(f"APNs needs {names}")
    assert s.key_file is not None
    assert s.key_id
    assert s.team_id
    assert s.topic
    try:
        key = s.key_file.read_text()
    except OSError as exc:
        raise SetupError(f"cannot read the APNs key {s.key_file}: {exc}") from exc
    return key, s.key_id, s.team_id, s.topic


def lean_apns(settings: Settings, pool_of: Callable[[ApnsSettings], Exchange] = _pool) -> Sender:
    s = settings.apns
    pool = pool_of(s)  # endpoint and CA first, as for FCM
    key, key_id, team_id, _topic = _apns_key(s)
    token = ProviderToken(key, key_id, team_id, refresh_s=s.token_refresh_s)
    try:
        token.current()  # a key that cannot sign is a setup error, found now
    except Exception as exc:
        raise SetupError(f"the APNs key cannot sign ES256 tokens: {exc}") from exc
    return ApnsSender(pool, token)


FCM_ORIGIN = ("fcm.googleapis.com", 443)
APPLE_ORIGINS = {
    ("api.push.apple.com", 443),
    ("api.sandbox.push.apple.com", 443),
    ("api.development.push.apple.com", 443),
}


def sdk_fcm(settings: Settings) -> Sender:
    """firebase-admin, the reference path. With a service account it fetches OAuth tokens
    with blocking calls inside the event loop; prefer the lean sender in production."""
    import firebase_admin
    from firebase_admin import messaging

    from worker.senders.fcm_sdk import FcmSdkSender

    s = settings.fcm
    host, port = _origin(s.endpoint)
    creds, project, _ = _fcm_credentials(s)
    if (host, port) != FCM_ORIGIN:
        # firebase-admin has no endpoint setting; the service reads this class attribute
        # when an app first sends.
        messaging._MessagingService.FCM_URL = f"{s.endpoint}/v1/projects/{{0}}/messages:send"
    if s.ca_file is not None:
        os.environ["SSL_CERT_FILE"] = str(s.ca_file)  # httpx, which firebase-admin uses
    app = firebase_admin.initialize_app(
        creds, {"projectId": project}, name=f"pushfan-{uuid.uuid4().hex[:8]}"
    )
    return FcmSdkSender(app, concurrency=min(500, s.concurrency))


def sdk_apns(settings: Settings) -> Sender:
    """aioapns, the reference path (build it inside the running event loop)."""
    from aioapns import APNs
    from aioapns.connection import APNsProductionClientProtocol

    from worker.senders.apns_sdk import ApnsSdkSender

    s = settings.apns
    host, port = _origin(s.endpoint)
    key, key_id, team_id, topic = _apns_key(s)
    client = APNs(
        key=key,
        key_id=key_id,
        team_id=team_id,
        topic=topic,
        use_sandbox="sandbox" in host or "development" in host,
        ssl_context=_tls(s.ca_file),
    )
    if (host, port) not in APPLE_ORIGINS:
        client.pool.protocol_class = type(
            "EndpointProtocol",
            (APNsProductionClientProtocol,),
            {"APNS_SERVER": host, "APNS_PORT": port},
        )
    return ApnsSdkSender(client, timeout_s=s.timeout_s, concurrency=s.concurrency)


SENDERS: dict[tuple[str, str], Callable[[Settings], Sender]] = {
    ("fcm", "lean"): lean_fcm,
    ("fcm", "h2"): lambda settings: lean_fcm(settings, _ref_pool),
    ("fcm", "sdk"): sdk_fcm,
    ("apns", "lean"): lean_apns,
    ("apns", "h2"): lambda settings: lean_apns(settings, _ref_pool),
    ("apns", "sdk"): sdk_apns,
}

# Which service carries each platform's tokens.
SERVICE: dict[Platform, str] = {"android": "fcm", "web": "fcm", "ios": "apns"}


def traffic_of(sender: Sender) -> Traffic | None:
    """The lean senders' connection-pool counts, on either pool (the SDKs keep none)."""
    pool = getattr(sender, "pool", None)
    return pool.traffic if isinstance(pool, H2Pool | H2RefPool) else None


def build_senders(settings: Settings, platforms: tuple[Platform, ...]) -> dict[Platform, Sender]:
    """One sender per platform (android and web share the FCM one)."""
    built: dict[str, Sender] = {}
    out: dict[Platform, Sender] = {}
    for platform in platforms:
        service = SERVICE[platform]
        if service not in built:
            implementation = getattr(settings, service).implementation
            built[service] = SENDERS[(service, implementation)](settings)
        out[platform] = built[service]
    return out
