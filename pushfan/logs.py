"""Structured logging for every pushfan process, with device tokens redacted.

A raw device token is a credential: whoever holds it can push to that device. So every
log line, from pushfan's own structlog loggers and from libraries logging through the
standard library (aiokafka, aioapns, asyncpg), passes through :func:`redact_tokens`
before it is rendered. It replaces anything that looks like an APNs or FCM token with
``<token sha256:HASH>``, where HASH is a short stable hash so lines about one token can still
be correlated. Values under token-named keys are replaced whatever they look like.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from pushfan.settings import LoggingSettings
from schemas import token_fingerprint

# Keys whose values are tokens whatever their shape.
TOKEN_KEYS = frozenset({"token", "tokens", "device_token", "registration_token", "push_token"})

# APNs tokens are 32 bytes shown as 64 hex digits. FCM registration tokens are an
# instance id, a colon and an "APA91b" blob; anything else long and unbroken in the
# base64url alphabet (web push tokens, future formats) is caught by the last branch.
_TOKEN_RE = re.compile(
    r"(?<![0-9A-Za-z])[0-9A-Fa-f]{64}(?![0-9A-Za-z])"
    r"|[A-Za-z0-9_-]{8,}:APA91[A-Za-z0-9_-]{20,}"
    r"|[A-Za-z0-9_:-]{100,}"
)


def mask(token: str) -> str:
    """How a token appears wherever a person might read it: ``<token sha256:…>``, the same
    fingerprint that events' reprs show, so one grep finds every line about a token."""
    return f"<token {token_fingerprint(token)}>"


def redact_text(text: str) -> str:
    """``text`` with every token-like substring replaced by :func:`mask`."""
    return _TOKEN_RE.sub(lambda m: mask(m.group(0)), text)


def _redact_value(value: Any, *, is_token: bool = False) -> Any:
    if isinstance(value, str):
        return mask(value) if is_token else redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: _redact_value(v, is_token=str(k).lower() in TOKEN_KEYS) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, is_token=is_token) for v in value]
    if isinstance(value, bytes | bytearray):
        return _redact_value(bytes(value).decode("utf-8", "replace"), is_token=is_token)
    if value is None or isinstance(value, bool | int | float):
        return value
    # Objects render through str() anyway; redact what that would print.
    return redact_text(str(value))


def redact_tokens(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact device tokens from every value of the event."""
    for key in list(event_dict):
        if key.startswith("_"):  # structlog's own bookkeeping (_record, _from_structlog)
            continue
        event_dict[key] = _redact_value(event_dict[key], is_token=key.lower() in TOKEN_KEYS)
    return event_dict


def _renderer(settings: LoggingSettings, stream: TextIO) -> Processor:
    use_console = settings.format == "console" or (
        settings.format == "auto" and hasattr(stream, "isatty") and stream.isatty()
    )
    if use_console:
        return structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    return structlog.processors.JSONRenderer()


def configure_logging(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library through one redacting renderer.

    JSON lines in production (``format=json``, or ``auto`` off a terminal), readable
    console lines on a terminal. Safe to call again (tests do); the last call wins.
    """
    out = stream if stream is not None else sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            # Tracebacks become text before redaction so tokens in them are caught too.
            structlog.processors.format_exc_info,
            redact_tokens,
            _renderer(settings, out),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pushfan", False):
            root.removeHandler(old)
    handler._pushfan = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.level)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use the module's ``__name__``)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


__all__ = [
    "TOKEN_KEYS",
    "configure_logging",
    "get_logger",
    "mask",
    "redact_text",
    "redact_tokens",
]
