"""Logging: the root logger's setup (text or JSON lines) and picows' logger adapter.

Log calls pass structured fields as ``extra=`` (:data:`LOG_FIELDS`): ``key=value``
after the message in text, keys of the object in JSON.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

__all__ = ["LOG_FIELDS", "PICOWS_CHATTER", "PicowsLog", "setup_logging"]

PICOWS_CHATTER = 5              # log level of picows' per-connection lines (below DEBUG)

# Structured fields a log call may pass as ``extra=``: JSON keys, or ``key=value`` in text.
LOG_FIELDS = ("client", "user", "peer", "code", "limit")


class PicowsLog:
    """Logger-like object for picows: one shared object (no per-connection child logger),
    with picows' per-connection info and debug lines demoted below debug (``fastws.conn``
    logs one line per connection event instead)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self.name = logger.name

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging API
        return self._log.isEnabledFor(min(level, PICOWS_CHATTER))

    def log(self, level: int, msg: str, *args: Any, **kw: Any) -> None:
        self._log.log(min(level, PICOWS_CHATTER), msg, *args, **kw)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.log(PICOWS_CHATTER, msg, *args, **kw)

    info = debug

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.warning(msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.error(msg, *args, **kw)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.exception(msg, *args, **kw)


class _TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value…``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={v}" for k in LOG_FIELDS
                  if (v := getattr(record, k, None)) is not None]
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return head + " " + " ".join(fields) + sep + tail


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        for k in LOG_FIELDS:
            if (v := getattr(record, k, None)) is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger: ``text`` lines or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
