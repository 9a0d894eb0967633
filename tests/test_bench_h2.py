"""The h2 bench's server: nghttpd answering every sender with a canned 200 (bench/nghttpd.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr

from bench.h2 import connection_paths, fit_aioapns_to_nghttpd, rendered
from bench.nghttpd import canned_docroot, start_nghttpd
from bench.senders import STATIC_TOKEN, TOPIC, apns_tokens, fcm_tokens
from pushfan.emulators.credentials import ensure_credentials
from pushfan.settings import Settings, load_settings
from worker.senders.base import OutcomeKind
from worker.senders.factory import build_senders

pytestmark = pytest.mark.skipif(
    shutil.which("nghttpd", path="/usr/sbin:/usr/bin:/sbin:/bin") is None,
    reason="nghttpd is not installed (Debian: nghttp2-server)",
)


def _pointed(settings: Settings, url: str, directory: Path, implementation: str) -> Settings:
    creds = ensure_credentials(directory, token_uri="https://127.0.0.1:9/token")
    fcm = settings.fcm.model_copy(
        update={
            "implementation": implementation,
            "endpoint": url,
            "project_id": creds.fcm_project_id,
            "access_token": SecretStr(STATIC_TOKEN),
            "credentials_file": None,
            "ca_file": creds.ca_file,
        }
    )
    apns = settings.apns.model_copy(
        update={
            "implementation": implementation,
            "endpoint": url,
            "key_file": creds.apns_key_file,
            "key_id": creds.apns_key_id,
            "team_id": creds.apns_team_id,
            "topic": TOPIC,
            "ca_file": creds.ca_file,
        }
    )
    return settings.model_copy(update={"fcm": fcm, "apns": apns})


@pytest.mark.parametrize("implementation", ["lean", "h2", "sdk"])
async def test_every_sender_gets_200_from_nghttpd(
    tmp_path: Path, implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = os.environ.get("SSL_CERT_FILE")  # sdk_fcm sets it for the whole process
    monkeypatch.setenv("SSL_CERT_FILE", original or "unset")
    if original is None:
        monkeypatch.delenv("SSL_CERT_FILE")
    creds = ensure_credentials(tmp_path / "creds", token_uri="https://127.0.0.1:9/token")
    docroot = canned_docroot(
        tmp_path / "root", fcm_project=creds.fcm_project_id, apns_tokens=apns_tokens(120)
    )
    with start_nghttpd(creds, docroot) as server:
        settings = _pointed(load_settings(), server.url, tmp_path / "creds", implementation)
        senders = build_senders(settings, ("android", "ios"))
        if implementation == "sdk":
            fit_aioapns_to_nghttpd(senders["ios"])
        fcm = await senders["android"].send(fcm_tokens(120), rendered("android"))
        apns = await senders["ios"].send(apns_tokens(120), rendered("ios"))
        # No file for that token: nghttpd answers 404 (aioapns would parse its HTML).
        unknown = (
            []
            if implementation == "sdk"
            else await senders["ios"].send(["ab" * 32], rendered("ios"))
        )
        for sender in senders.values():
            await sender.close()

    assert {o.kind for o in [*fcm, *apns]} == {OutcomeKind.DELIVERED}
    assert len(fcm) == len(apns) == 120
    assert OutcomeKind.DELIVERED not in {o.kind for o in unknown}


@pytest.mark.parametrize("n", [2, 4, 203])
def test_h2load_gives_each_connection_paths_of_its_own(n: int) -> None:
    paths = [f"/3/device/{t}" for t in apns_tokens(n)]
    split = connection_paths(paths, n, 4)
    assert sum(count for count, _ in split) == n
    assert all(count == len(mine) for count, mine in split)
    assert sorted(p for _, mine in split for p in mine) == sorted(paths)
    shared = connection_paths(["/v1/projects/p/messages:send"], n, 4)
    assert [count for count, _ in shared] == [count for count, _ in split]
    assert {tuple(mine) for _, mine in shared} == {("/v1/projects/p/messages:send",)}
    with pytest.raises(ValueError, match="paths for"):
        connection_paths([*paths, "/extra"], n, 4)
