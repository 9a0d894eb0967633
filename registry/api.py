"""The token registry's HTTP API: a plain ASGI application (no framework).

Measured on one core against PostgreSQL, FastAPI served ~1,300 registrations/s and a
bare ASGI callable about twice that, so routing is a dict here and validation is
pydantic's, nothing else (``make bench`` prints this API's own rate and p99).
Routes (``openapi.py`` documents them):

- ``POST /v1/devices`` register or refresh; ``GET /v1/devices`` list (tokens masked);
  ``DELETE /v1/devices/{device_id}`` and ``POST /v1/devices/unregister`` log out;
- ``GET``/``PUT /v1/preferences``;
- ``GET /healthz`` (the process answers), ``GET /readyz`` (the database answers),
  ``GET /metrics``, ``GET /openapi.json`` and ``GET /docs`` (the same as an HTML page for
  people, ``docs.py``), all five without authentication.

Every bad request is a 4xx with ``{"error": {"code", "message", "details"?}}``; bodies over
``max_body_bytes`` are refused before they are read; path and query parameters are checked
by the same models as bodies. A service caller names the user with ``?user_id=``. Tokens
appear in no URL, log line or response (only fingerprints).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote_to_bytes

import asyncpg
import pydantic
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pushfan.logs import get_logger
from pushfan.metrics import Metrics
from pushfan.settings import RegistrySettings
from registry import docs, preferences, store
from registry.auth import Authenticator, AuthError, Caller
from registry.connections import KeptConnections
from registry.models import (
    DeviceIn,
    DeviceList,
    DeviceOut,
    DeviceRef,
    PreferencesBody,
    QuietHours,
    RegisteredOut,
    TokenIn,
    UserRef,
)
from registry.openapi import openapi_document
from schemas import token_fingerprint
from schemas.common import format_validation_error

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
log = get_logger("pushfan.registry")
M = TypeVar("M", bound=pydantic.BaseModel)


# The database cannot serve now (unreachable, restarting, out of connections, a
# statement past its timeout): a 503 the caller retries, since every call is safe to
# repeat, instead of a 500 that reads as our bug.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
_UNAVAILABLE_BODY = json.dumps(
    {"error": {"code": "unavailable", "message": "the database does not answer; retry"}}
).encode()


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or []


class Request:
    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self.scope, self.receive, self.limit = scope, receive, limit
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # Blank values kept: ``?user_id=`` is a bad user id (422), not "no user id".
        query = scope.get("query_string", b"").decode("latin-1")
        self.query = parse_qs(query, keep_blank_values=True)

    async def body(self) -> bytes:
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise HttpError(413, "too_large", f"request body over {self.limit} bytes")
        chunks, size = [], 0
        while True:
            message = await self.receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise HttpError(413, "too_large", f"request body over {self.limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def parse(self, model: type[M]) -> M:
        raw = await self.body()
        return _validated(lambda: model.model_validate_json(raw or b"null"))

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


def _validated(build: Callable[[], M]) -> M:
    """``build()``, with a validation error answered as 422 naming each field."""
    try:
        return build()
    except pydantic.ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "reason": e["msg"]}
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise HttpError(422, "invalid_request", format_validation_error(exc), details) from None


Handler = Callable[["RegistryApp", Request, Caller, str], Awaitable[tuple[int, Any]]]


class RegistryApp:
    """The ASGI callable. ``pool`` is the registry's database pool; :meth:`close` gives
    back the connections registrations keep, before the pool closes."""

    def __init__(self, settings: RegistrySettings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.auth = Authenticator(settings)
        document = openapi_document()
        self.openapi = json.dumps(document).encode()
        self.docs_page = docs.render(document)
        # all but one: the other routes always have a connection
        self.kept = KeptConnections(pool, pool.get_max_size() - 1)

    async def close(self) -> None:
        await self.kept.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        route, status = "unmatched", 500
        headers: list[tuple[bytes, bytes]] = []
        try:
            route, handler, arg = _route(method, path, scope.get("raw_path"))
            status, body, content_type = await self._dispatch(scope, receive, handler, arg)
        except HttpError as exc:
            status, headers = exc.status, exc.headers
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.details is not None:
                error["details"] = exc.details
            body, content_type = json.dumps({"error": error}).encode(), "application/json"
        except UNAVAILABLE as exc:
            log.warning("registry request: database unavailable", route=route, error=repr(exc))
            status, headers = 503, [(b"retry-after", b"1")]
            body, content_type = _UNAVAILABLE_BODY, "application/json"
        except Exception:
            log.exception("registry request failed", route=route, method=method)
            body = b'{"error": {"code": "internal", "message": "internal error"}}'
            content_type = "application/json"
        if body:  # a 204 has no content, so no content type either
            headers.append((b"content-type", content_type.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics = self.metrics
        verb = method if method in _METHODS else "other"
        metrics.child(metrics.http_requests, route, verb, str(status)).inc()
        metrics.child(metrics.http_latency, route, verb).observe(time.perf_counter() - started)

    async def _dispatch(
        self, scope: Scope, receive: Receive, handler: Handler | str, arg: str
    ) -> tuple[int, bytes, str]:
        if handler == "healthz":
            return 200, b'{"status": "ok"}', "application/json"
        if handler == "readyz":
            ready = self.metrics.child(self.metrics.ready, "registry")
            try:
                await self.pool.fetchval("SELECT 1", timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                ready.set(0)
                raise HttpError(503, "not_ready", f"database: {type(exc).__name__}") from None
            ready.set(1)
            return 200, b'{"status": "ready"}', "application/json"
        if handler == "metrics":
            return 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST
        if handler == "openapi":
            return 200, self.openapi, "application/json"
        if handler == "docs":
            return 200, self.docs_page, "text/html; charset=utf-8"
        assert not isinstance(handler, str)
        request = Request(scope, receive, self.settings.max_body_bytes)
        try:
            caller = self.auth.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            if exc.status == 401:  # RFC 9110: a 401 names the scheme that would be accepted
                challenge = [(b"www-authenticate", b"Bearer")]
                raise HttpError(401, "unauthenticated", exc.message, headers=challenge) from None
            raise HttpError(exc.status, "forbidden", exc.message) from None
        status, payload = await handler(self, request, caller, arg)
        body = b"" if payload is None else json.dumps(payload).encode()
        return status, body, "application/json"

    # -- handlers -------------------------------------------------------------------------

    async def register(self, request: Request, caller: Caller, _: str) -> tuple[int, Any]:
        user = _acting_for(caller, request)
        device = await request.parse(DeviceIn)
        registration = store.Registration(**device.model_dump())
        result = await self.kept.run(store.register, user, registration)
        self.metrics.child(self.metrics.registrations, result.change.value).inc()
        if result.replaced:
            self.metrics.device_replacements.inc(result.replaced)
            self.metrics.deactivations.labels("replaced").inc(result.replaced)
        out = RegisteredOut(
            id=result.id,
            change=result.change.value,
            replaced=result.replaced,
            token=token_fingerprint(device.token),
        )
        return (201 if result.change is store.Change.CREATED else 200), out.model_dump()

    async def list_devices(self, request: Request, caller: Caller, _: str) -> tuple[int, Any]:
        user = _acting_for(caller, request)
        found = await store.devices(self.pool, user)
        return 200, DeviceList(devices=[_device_out(d) for d in found]).model_dump()

    async def logout_device(self, request: Request, caller: Caller, device: str) -> tuple[int, Any]:
        user = _acting_for(caller, request)
        ref = _validated(lambda: DeviceRef(device_id=device, app_id=request.param("app_id")))
        count = await store.logout_device(self.pool, user, ref.device_id, ref.app_id)
        return self._logged_out(count, "no active device with that id")

    async def unregister(self, request: Request, caller: Caller, _: str) -> tuple[int, Any]:
        user = _acting_for(caller, request)
        body = await request.parse(TokenIn)
        count = await store.logout_token(self.pool, user, body.token)
        return self._logged_out(count, "no active token like that")

    def _logged_out(self, count: int, missing: str) -> tuple[int, Any]:
        if not count:
            raise HttpError(404, "not_found", missing)
        self.metrics.logouts.inc(count)
        self.metrics.deactivations.labels("logout").inc(count)
        return 204, None

    async def get_preferences(self, request: Request, caller: Caller, _: str) -> tuple[int, Any]:
        user = _acting_for(caller, request)
        zone, quiet, types = await preferences.get(self.pool, user)
        # Read back unvalidated: rows stored before start == end was refused must still read.
        hours = None if quiet is None else QuietHours.model_construct(start=quiet[0], end=quiet[1])
        body = PreferencesBody.model_construct(time_zone=zone, quiet_hours=hours, types=types)
        return 200, body.model_dump(mode="json")

    async def put_preferences(self, request: Request, caller: Caller, _: str) -> tuple[int, Any]:
        user = _acting_for(caller, request)
        body = await request.parse(PreferencesBody)
        hours = body.quiet_hours
        quiet = None if hours is None else (hours.start, hours.end)
        await preferences.put(self.pool, user, body.time_zone, quiet, dict(body.types))
        return 200, body.model_dump(mode="json")


def _acting_for(caller: Caller, request: Request) -> str:
    named = request.param("user_id")
    # Checked before the caller may act for it: a malformed id is a 422 for anyone, and
    # the caller's own ``sub`` must pass the same rule to be stored as a user id.
    _validated(lambda: UserRef(user_id=caller.subject if named is None else named))
    try:
        return caller.acting_for(named)
    except AuthError as exc:
        raise HttpError(exc.status, "forbidden", exc.message) from None


def _device_out(d: store.Device) -> DeviceOut:
    return DeviceOut(
        id=d.id,
        token=token_fingerprint(d.token),
        platform=d.platform,  # type: ignore[arg-type]
        device_id=d.device_id,
        app_id=d.app_id,
        app_version=d.app_version,
        locale=d.locale,
        time_zone=d.time_zone,
        created_at=d.created_at.isoformat(),
        last_seen_at=d.last_seen_at.isoformat(),
    )


_ROUTES: dict[tuple[str, str], tuple[str, Handler | str]] = {
    ("POST", "/v1/devices"): ("/v1/devices", RegistryApp.register),
    ("GET", "/v1/devices"): ("/v1/devices", RegistryApp.list_devices),
    ("POST", "/v1/devices/unregister"): ("/v1/devices/unregister", RegistryApp.unregister),
    ("GET", "/v1/preferences"): ("/v1/preferences", RegistryApp.get_preferences),
    ("PUT", "/v1/preferences"): ("/v1/preferences", RegistryApp.put_preferences),
    ("GET", "/healthz"): ("/healthz", "healthz"),
    ("GET", "/readyz"): ("/readyz", "readyz"),
    ("GET", "/metrics"): ("/metrics", "metrics"),
    ("GET", "/openapi.json"): ("/openapi.json", "openapi"),
    ("GET", "/docs"): ("/docs", "docs"),
}
_DEVICE_PREFIX = b"/v1/devices/"
# The metrics' method label: a client may send any token as a method, and each would be a
# series of its own; the ones HTTP defines keep their name, the rest are "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


def _route(method: str, path: str, raw_path: bytes | None) -> tuple[str, Handler | str, str]:
    """(route template, handler, path argument); raises 404 or 405."""
    found = _ROUTES.get((method, path))
    if found is not None:
        return found[0], found[1], ""
    allowed = sorted(m for m, p in _ROUTES if p == path)
    if not allowed:
        # The device id comes from the raw path, decoded once: ``path`` is decoded already,
        # so a second unquote would turn ``%2500`` into a NUL byte, and ``%2F`` (a device
        # id may hold "/") would look like another path segment.
        raw = path.encode() if raw_path is None else raw_path
        rest = raw[len(_DEVICE_PREFIX) :] if raw.startswith(_DEVICE_PREFIX) else b""
        if not rest or b"/" in rest:
            raise HttpError(404, "not_found", f"no route {path}")
        if method == "DELETE":
            device = rest if raw_path is None else unquote_to_bytes(rest)
            return (
                "/v1/devices/{device_id}",
                RegistryApp.logout_device,
                device.decode(errors="replace"),
            )
        allowed = ["DELETE"]
    raise HttpError(
        405,
        "method_not_allowed",
        f"{method} is not allowed on {path}",
        headers=[(b"allow", ", ".join(allowed).encode())],
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
