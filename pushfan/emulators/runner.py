"""Start both emulators: used by the tests, ``pushfan emulators`` and ``pushfan up``."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pushfan.emulators.apns import ApnsEmulator
from pushfan.emulators.credentials import DEFAULT_STATE_DIR, Credentials, ensure_credentials
from pushfan.emulators.fcm import FcmEmulator
from pushfan.emulators.server import HttpServer, Request, Response, ServerOptions
from pushfan.settings import Settings

DEFAULT_APNS_TOPIC = "com.example.pushfan"


@dataclass
class Emulators:
    """Both emulators, running; ``stop()`` them when done."""

    credentials: Credentials
    fcm: FcmEmulator
    apns: ApnsEmulator
    fcm_server: HttpServer
    apns_server: HttpServer
    apns_topics: tuple[str, ...]

    @property
    def fcm_url(self) -> str:
        return self.fcm_server.url

    @property
    def apns_url(self) -> str:
        return self.apns_server.url

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with the FCM and APNs senders pointed at these emulators."""
        return point_at(
            settings, self.credentials, self.fcm_url, self.apns_url, self.apns_topics[0]
        )

    async def stop(self) -> None:
        await self.fcm_server.stop()
        await self.apns_server.stop()


def point_at(
    settings: Settings, credentials: Credentials, fcm_url: str, apns_url: str, apns_topic: str
) -> Settings:
    """``settings`` with the FCM and APNs senders pointed at emulators serving at these
    URLs with ``credentials`` (in this process or another)."""
    c = credentials
    fcm = settings.fcm.model_copy(
        update={
            "endpoint": fcm_url,
            "project_id": c.fcm_project_id,
            "credentials_file": c.fcm_service_account_file,
            "access_token": None,
            "ca_file": c.ca_file,
        }
    )
    apns = settings.apns.model_copy(
        update={
            "endpoint": apns_url,
            "key_file": c.apns_key_file,
            "key_id": c.apns_key_id,
            "team_id": c.apns_team_id,
            "topic": apns_topic,
            "ca_file": c.ca_file,
        }
    )
    return settings.model_copy(update={"fcm": fcm, "apns": apns})


async def start_emulators(
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    host: str = "127.0.0.1",
    fcm_port: int = 0,
    apns_port: int = 0,
    apns_topics: tuple[str, ...] = (DEFAULT_APNS_TOPIC,),
    options: ServerOptions | None = None,
) -> Emulators:
    """Start the FCM and APNs emulators (port 0: any free port) in the running loop.

    Key material is created under ``state_dir`` on first start and reused afterwards; the
    FCM service account's ``token_uri`` is pointed at this FCM emulator.
    """
    # The certificate does not depend on the port; the service account's token_uri does,
    # so the FCM socket is bound first and the account rewritten once its port is known.
    creds = ensure_credentials(state_dir, token_uri=f"https://{host}:{fcm_port}/token")
    holder: list[FcmEmulator] = []

    def fcm_handler(request: Request) -> Response:
        return holder[0].handle(request)

    fcm_server = HttpServer(
        fcm_handler,
        host=host,
        port=fcm_port,
        ssl_context=creds.server_ssl_context(),
        options=options,
    )
    await fcm_server.start()
    try:
        creds = ensure_credentials(state_dir, token_uri=f"{fcm_server.url}/token")
        holder.append(FcmEmulator(creds))
        apns = ApnsEmulator(creds, topics=apns_topics)
        apns_server = HttpServer(
            apns.handle,
            host=host,
            port=apns_port,
            ssl_context=creds.server_ssl_context(),
            options=options,
        )
        await apns_server.start()
    except BaseException:
        await fcm_server.stop()
        raise
    return Emulators(creds, holder[0], apns, fcm_server, apns_server, apns_topics)


def describe(emulators: Emulators) -> str:
    """What a person needs to point clients at the emulators."""
    c = emulators.credentials
    rows = [
        ("FCM v1 emulator", f"{emulators.fcm_url}/v1/projects/{c.fcm_project_id}/messages:send"),
        ("  OAuth2 token endpoint", f"{emulators.fcm_url}/token"),
        ("  service account", str(c.fcm_service_account_file)),
        ("APNs emulator", f"{emulators.apns_url}/3/device/<token>"),
        (
            "  provider key (.p8)",
            f"{c.apns_key_file} (key id {c.apns_key_id}, team {c.apns_team_id})",
        ),
        ("  topics", ", ".join(emulators.apns_topics)),
        ("CA certificate", str(c.ca_file)),
        (
            "control API",
            f"{emulators.fcm_url}/_emulator/deliveries, {emulators.apns_url}/_emulator/deliveries",
        ),
    ]
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"  {name + ':':<{width}} {value}" for name, value in rows)


SERVING = "Serving until Ctrl-C."
_CONTROL_URL = re.compile(r"(https://\S+?)/_emulator/deliveries")


def emulators_command(state_dir: Path) -> list[str]:
    """``pushfan emulators`` on free ports, as a separate process runs it."""
    return [
        sys.executable,
        "-m",
        "pushfan.cli",
        "emulators",
        "--fcm-port",
        "0",
        "--apns-port",
        "0",
        "--state-dir",
        str(state_dir),
    ]


def read_announcement(lines: Iterable[str]) -> tuple[str, str, str]:
    """Read what ``pushfan emulators`` prints up to :data:`SERVING`; return the text and
    the FCM and APNs base URLs (from the control-API line of :func:`describe`)."""
    text = ""
    for line in lines:
        text += line
        if SERVING in line:
            break
    urls = _CONTROL_URL.findall(text)
    if len(urls) != 2:
        raise RuntimeError(f"the emulators did not announce themselves: {text}")
    return text, urls[0], urls[1]
