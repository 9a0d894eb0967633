"""`pushfan emulators` as an operator runs it: a real process serving TLS until SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
from pathlib import Path

import httpx

from pushfan.emulators.runner import emulators_command, read_announcement


def test_serves_both_emulators_until_sigterm(tmp_path: Path, service_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        emulators_command(tmp_path),
        env=service_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        _, fcm_url, apns_url = read_announcement(proc.stdout)
        urls = [fcm_url, apns_url]
        assert all(re.fullmatch(r"https://127\.0\.0\.1:\d+", url) for url in urls), urls
        ca = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        assert (tmp_path / "apns-key.p8").exists()
        account = json.loads((tmp_path / "fcm-service-account.json").read_text())
        assert account["token_uri"] == f"{urls[0]}/token"

        with httpx.Client(http2=True, verify=ca) as client:
            for url in urls:
                answer = client.get(f"{url}/_emulator/deliveries")
                assert answer.status_code == 200
                assert answer.http_version == "HTTP/2"
                assert answer.json()["total"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
