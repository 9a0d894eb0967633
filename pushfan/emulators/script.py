"""What an emulator should answer, and what it delivered: scripting and the delivery log.

Both emulators share this. Tests and benchmarks script them in-process (the
:class:`Script` object) or over HTTP through the control API that every emulator serves
under ``/_emulator/`` (see :func:`control`):

- ``GET  /_emulator/deliveries``  the delivery log: total, per token, per target
  (FCM project or APNs topic), errors per code;
- ``PUT  /_emulator/script``      JSON with any of ``dead_tokens``, ``token_errors``
  (token -> the platform's error code), ``failure_rate`` and ``failure_code``,
  ``latency_ms``;
- ``POST /_emulator/outage``      ``{"seconds", "code", "retry_after"}``: every request
  fails with ``code`` until the time is up;
- ``POST /_emulator/reset``       forget scripting and the log.

Error codes are the platform's own strings (``UNREGISTERED``, ``QUOTA_EXCEEDED`` for FCM;
``Unregistered``, ``TooManyRequests`` for APNs); each emulator maps them to its status
codes and bodies.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pushfan.emulators.server import Request, Response

CONTROL_PREFIX = "/_emulator/"


@dataclass(frozen=True, slots=True)
class Outage:
    until: float  # time.monotonic()
    code: str
    retry_after: int | None


class Script:
    """Scripted behaviour of one emulator and its delivery log. Not thread-safe: the
    emulator runs on one event loop."""

    def __init__(self, *, dead_code: str, known_codes: frozenset[str], seed: int = 0) -> None:
        self.dead_code = dead_code
        self.known_codes = known_codes
        self._rng = random.Random(seed)
        self.reset()

    def reset(self) -> None:
        self.dead_tokens: set[str] = set()
        self.token_errors: dict[str, str] = {}
        self.failure_rate = 0.0
        self.failure_code = ""
        self.latency = 0.0
        self.outage: Outage | None = None
        self.delivered: Counter[str] = Counter()
        self.per_target: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    # -- scripting ----------------------------------------------------------------------

    def configure(self, spec: dict[str, Any]) -> None:
        """Apply a script (the control API's JSON); unknown keys or codes raise ValueError."""
        unknown = set(spec) - {
            "dead_tokens",
            "token_errors",
            "failure_rate",
            "failure_code",
            "latency_ms",
        }
        if unknown:
            raise ValueError(f"unknown script keys: {sorted(unknown)}")
        if "dead_tokens" in spec:
            self.dead_tokens = {str(t) for t in spec["dead_tokens"]}
        if "token_errors" in spec:
            errors = {str(t): str(c) for t, c in dict(spec["token_errors"]).items()}
            for code in errors.values():
                self._check(code)
            self.token_errors = errors
        if "failure_rate" in spec:
            rate = float(spec["failure_rate"])
            if not 0.0 <= rate <= 1.0:
                raise ValueError("failure_rate must be within 0..1")
            self.failure_rate = rate
        if "failure_code" in spec:
            self.failure_code = self._check(str(spec["failure_code"]))
        if self.failure_rate and not self.failure_code:
            raise ValueError("failure_rate needs a failure_code")
        if "latency_ms" in spec:
            self.latency = max(0.0, float(spec["latency_ms"]) / 1000)

    def start_outage(self, seconds: float, code: str, retry_after: int | None = None) -> None:
        """Fail every request with ``code`` for ``seconds`` from now."""
        self.outage = Outage(time.monotonic() + seconds, self._check(code), retry_after)

    def _check(self, code: str) -> str:
        if code not in self.known_codes:
            raise ValueError(f"unknown error code {code!r}; known: {sorted(self.known_codes)}")
        return code

    # -- verdicts, asked by the emulators ------------------------------------------------

    def current_outage(self) -> Outage | None:
        outage = self.outage
        if outage is not None and time.monotonic() >= outage.until:
            self.outage = outage = None
        return outage

    def error_for(self, token: str) -> str | None:
        """The scripted error code for a send to ``token`` now, or None to deliver."""
        if token in self.dead_tokens:
            return self.dead_code
        code = self.token_errors.get(token)
        if code is not None:
            return code
        if self.failure_rate and self._rng.random() < self.failure_rate:
            return self.failure_code
        return None

    # -- the log --------------------------------------------------------------------------

    def record_delivery(self, token: str, target: str) -> None:
        self.delivered[token] += 1
        self.per_target[target] += 1

    def record_error(self, code: str) -> None:
        self.errors[code] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": sum(self.per_target.values()),
            "per_token": dict(self.delivered),
            "per_target": dict(self.per_target),
            "errors": dict(self.errors),
        }


def control(script: Script, request: Request) -> Response:
    """Serve one control-API request (its path starts with :data:`CONTROL_PREFIX`)."""
    action = request.path[len(CONTROL_PREFIX) :].split("?", 1)[0]
    try:
        if request.method == "GET" and action == "deliveries":
            return _json(200, script.snapshot())
        if request.method == "PUT" and action == "script":
            script.configure(json.loads(request.body or b"{}"))
            return _json(200, {"ok": True})
        if request.method == "POST" and action == "outage":
            spec = json.loads(request.body or b"{}")
            retry_after = spec.get("retry_after")
            script.start_outage(
                float(spec["seconds"]),
                str(spec["code"]),
                None if retry_after is None else int(retry_after),
            )
            return _json(200, {"ok": True})
        if request.method == "POST" and action == "reset":
            script.reset()
            return _json(200, {"ok": True})
    except (ValueError, KeyError, TypeError) as exc:
        return _json(400, {"error": str(exc)})
    return _json(404, {"error": f"no control action {request.method} {action}"})


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status, json.dumps(body).encode(), [("content-type", "application/json")])
