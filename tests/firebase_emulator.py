"""The FCM emulator in its own thread, with firebase-admin pointed at it (test helper).

firebase-admin's async path fetches OAuth tokens with blocking ``requests`` inside the
event loop, so an emulator on the test's own loop could never answer a service-account
app (the send hangs until the 120 s read timeout). Tests touch the emulator's script only
while no request is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import firebase_admin
import pytest
from firebase_admin import messaging

from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.emulators.fcm import FcmEmulator
from pushfan.emulators.server import Handler, HttpServer, Request, Response


class ThreadedServer:
    """An :class:`HttpServer` on its own event loop in a thread."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def close_firebase_app(app: Any) -> None:
    service = messaging._get_messaging_service(app)
    await service._async_client.aclose()  # in the loop its connections belong to
    # delete_app() runs asyncio.run(aclose()) (a no-op now): not allowed inside a loop.
    await asyncio.to_thread(firebase_admin.delete_app, app)


@dataclass
class ThreadedFcm:
    creds: Credentials
    emulator: FcmEmulator
    server: HttpServer
    apps: list[Any] = field(default_factory=list)  # closed when the context ends


@contextlib.asynccontextmanager
async def threaded_fcm(
    directory: Path, wrap: Callable[[Handler], Handler] = lambda handle: handle
) -> AsyncIterator[ThreadedFcm]:
    """Serve an FCM emulator from ``directory`` in a thread (``wrap`` may wrap its
    handler) and point firebase-admin at it for the duration."""
    # TLS material is needed before the port is known; the token_uri is fixed up after.
    creds = ensure_credentials(directory, token_uri="https://127.0.0.1:1/token")
    emulators: list[FcmEmulator] = []

    def forward(request: Request) -> Response:
        return emulators[0].handle(request)

    server = HttpServer(wrap(forward), ssl_context=creds.server_ssl_context())
    threaded = ThreadedServer(server)
    threaded.start()
    try:
        creds = ensure_credentials(directory, token_uri=f"{server.url}/token")
        emulators.append(FcmEmulator(creds))
        state = ThreadedFcm(creds, emulators[0], server)
        with pytest.MonkeyPatch.context() as mp:
            url = f"{server.url}/v1/projects/{{0}}/messages:send"
            mp.setattr(messaging._MessagingService, "FCM_URL", url)
            mp.setenv("SSL_CERT_FILE", str(creds.ca_file))
            mp.setenv("REQUESTS_CA_BUNDLE", str(creds.ca_file))
            try:
                yield state
            finally:
                for app in state.apps:
                    await close_firebase_app(app)
    finally:
        threaded.stop()
