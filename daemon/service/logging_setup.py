"""Logging set-up for the CLI and the daemon: one event per line, text or JSON.

Flow: cli -> **logging_setup** -> every module's ``getLogger(__name__)``.

* ``text``: ``2026-12-02 13:00:00,123 INFO daemon.service.lifecycle: message``.  Under
  journald (``$JOURNAL_STREAM`` names our stderr) the timestamp is left out --
  the journal stamps every entry -- and the level is sent as a syslog prefix
  (``<6>``), so ``journalctl -p warning`` filters by it.
* ``json``: one object per line, ``{"time", "level", "logger", "message"}``
  plus ``exception`` when there is one; for log shippers.
* Either way one event is one line: newlines inside a message or a traceback
  are escaped (``\\n``), so journald and line-based shippers never split an event.
* Library loggers (alembic, aiokafka, botocore) stay at warning unless the
  level asked for is debug.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO

LEVELS = ("debug", "info", "warning", "error")
"""The values ``--log-level`` and ``log_level`` accept."""

NOISY_LIBRARIES = ("alembic", "aiokafka", "botocore", "aiobotocore")
"""Loggers kept at warning unless the level is debug (they log every start-up step)."""

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


_HANDLER_NAME = "refreshd"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


def under_journald(stream: IO[str]) -> bool:
    """True when ``stream`` is the journal stream systemd gave us (``$JOURNAL_STREAM``
    is ``device:inode`` of that socket; a redirected stderr no longer matches)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    """``[time] LEVEL logger: message`` on one line; ``journald``: no time, syslog prefix."""

    def __init__(self, *, journald: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if journald else "%(asctime)s " + fmt)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = _one_line(super().format(record))
        if self._journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False, default=str)


def configure_logging(
    *, level: str = "info", fmt: LogFormat = LogFormat.TEXT, stream: IO[str] | None = None
) -> None:
    """Log to ``stream`` (stderr) through one root handler (replacing the one an
    earlier call installed)."""
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journald=under_journald(out)))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # ours from an earlier call; others stay
            root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Set the root level (one of :data:`LEVELS`) and the libraries' level with it."""
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    library = logging.INFO if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(library)
