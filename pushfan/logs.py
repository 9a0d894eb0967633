"""Structured logging for every pushfan process, with device tokens redacted.

A raw device token is a credential: whoever holds it can push to that device. So every
log line, from pushfan's own structlog loggers and from libraries logging through the
standard library (aiokafka, aioapns, asyncpg), passes through :func:`redact_tokens`
before it is rendered. It replaces anything that looks like an APNs or FCM token with
``<token sha256:HASH>``, where HASH is a short stable hash so lines about one token can still
be correlated. Values under token-named keys are replaced whatever they look like.
"""

from __future__ import annotations

import contextlib
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
TOKEN_KEYS = frozenset(
    {
        "token",
        "tokens",
        "device_token",
        "registration_token",
        "push_token",
        "fid",
        "fids",
        "apns_token",
        "fcm_token",
    }
)
_MAX_DEPTH = 8

# APNs tokens are 32 bytes shown as 64 hex digits (once also as eight space-separated
# groups in angle brackets). FCM registration tokens are an instance id, a colon and an
# "APA91b" blob; anything else long and unbroken in the base64url alphabet (web push
# tokens, future formats) is caught by the last branch. Longer hex runs go too: a token
# glued to other hex digits is still a token.
_TOKEN_RE = re.compile(
    r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64,}(?![0-9A-Fa-f])"
    r"|(?:[0-9A-Fa-f]{8} ){7}[0-9A-Fa-f]{8}"
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


def _redact_value(value: Any, *, is_token: bool = False, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, str):
        return mask(value) if is_token else redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {
            redact_text(str(k)): _redact_value(
                v, is_token=str(k).lower() in TOKEN_KEYS, depth=depth + 1
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, is_token=is_token, depth=depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        return _redact_value(text, is_token=is_token, depth=depth + 1)
    # Objects render through str() anyway; redact what that would print.
    try:
        text = str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
    return mask(text) if is_token else redact_text(text)


def redact_tokens(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact device tokens from every value of the event."""
    redacted = {
        redact_text(key): _redact_value(value, is_token=key.lower() in TOKEN_KEYS)
        for key, value in event_dict.items()
    }
    event_dict.clear()
    event_dict.update(redacted)
    return event_dict


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler whose own failures never print a record's raw arguments."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The standard handler dumps the message and its arguments to stderr, unredacted.
        with contextlib.suppress(Exception):
            self.stream.write(
                f"pushfan: a log record from {record.name} could not be formatted "
                f"({record.pathname}:{record.lineno})\n"
            )


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
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pushfan", False):
            root.removeHandler(old)
    handler._pushfan = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.level)
    # warnings.warn text could carry a token too; send it through the same redactor.
    logging.captureWarnings(True)
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
