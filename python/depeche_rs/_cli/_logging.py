"""Log lines for people (text) or machines (`--log-format json`), on stderr.

Each notable event is one line: `event(...)` attaches an event name and fields to a
record; the text format prints the message, the JSON format prints an object with
`time`, `level`, `event`, `message` and the fields. The console also owns the TTY
progress line, so that a log line never lands in the middle of it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import threading
from typing import Any, TextIO

LOGGER_NAME = "depeche_rs.cli"
logger = logging.getLogger(LOGGER_NAME)

_CLEAR_LINE = "\r\x1b[K"


def event(level: int, name: str, message: str, **fields: Any) -> None:
    """Log one notable event: `name` is stable (for machines), `message` is for people."""
    logger.log(level, message, extra={"event": name, "fields": fields})


def _timestamp(record: logging.LogRecord) -> str:
    moment = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`2025-01-31T12:00:00.000Z INFO  accounts: caught up ...`."""

    def format(self, record: logging.LogRecord) -> str:
        """One line; a traceback, if any, follows on the next lines."""
        line = f"{_timestamp(record)} {record.levelname:<5} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# By hand, not python-json-logger: one fixed object per event (time, level, event, message,
# fields) is a dozen lines, against a dependency of the command line.
class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """`{"time", "level", "event", "message", ...fields}`."""
        data: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                data.setdefault(key, value)
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class Console(logging.Handler):
    """stderr, shared by log lines and the progress line (shown only on a TTY); the handler
    of the command's log records."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.is_tty = bool(getattr(stream, "isatty", lambda: False)())
        self._status = ""
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """Write a full line, keeping the progress line below it."""
        with self._lock:
            if self._status:
                self.stream.write(_CLEAR_LINE)
            self.stream.write(text + "\n")
            if self._status:
                self.stream.write(self._status)
            self.stream.flush()

    def status(self, text: str) -> None:
        """Show (or replace) the progress line; a no-op unless stderr is a TTY."""
        if not self.is_tty:
            return
        with self._lock:
            self._status = text
            self.stream.write(_CLEAR_LINE + text)
            self.stream.flush()

    def clear_status(self) -> None:
        """Remove the progress line."""
        with self._lock:
            if self._status:
                self.stream.write(_CLEAR_LINE)
                self.stream.flush()
            self._status = ""

    def emit(self, record: logging.LogRecord) -> None:
        """Write `record` as a line."""
        try:
            self.line(self.format(record))
        except Exception:
            self.handleError(record)


def setup_logging(log_format: str, level: str, stream: TextIO | None = None) -> Console:
    """Send the command's events to `stream` (stderr) in `log_format` ("text" or "json")."""
    console = Console(stream if stream is not None else sys.stderr)
    console.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(console)
    logger.setLevel(level.upper())
    # The command's lines are complete on their own; the root logger would print them twice.
    logger.propagate = False
    return console
