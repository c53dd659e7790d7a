"""The process log (stderr): text lines for people, or one JSON object per line for log pipelines.

``logging.format: json`` makes every line a JSON object with ``ts``, ``level``, ``logger``, ``message``
and, for lines written while a request is handled, ``request_id``: the same id the client receives as
``X-Request-Id`` and the audit trail records, so ingress logs, gateway logs and audit lines join on it.
The id travels in a context variable, which asyncio copies into every task a request starts.
Under ``serve --workers N`` every line of a worker also names it (``worker 3`` in text, ``"worker": 3``
in JSON), so one stream of interleaved lines can be told apart; the supervisor's lines come from the
``gateway.supervisor`` logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime

LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# One encoder for every JSON line: json.dumps with options builds a new JSONEncoder per call, and the
# access log writes a line per request.
_encode_entry = json.JSONEncoder(ensure_ascii=False, default=str).encode


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` with the date and time of day of ``asctime`` formatted once per second (the
    access log writes a line per request); the text is the same."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._formatted: tuple[int, str] = (-1, "")  # one attribute: never a second with another's text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._formatted
        if cached[0] != second:
            cached = (second, time.strftime(self.default_time_format, self.converter(record.created)))
            self._formatted = cached
        return self.default_msec_format % (cached[1], record.msecs)


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode_entry(entry)


def configure(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Send every logger's records at ``level`` and above to stderr in ``log_format``; replaces any
    earlier configuration (``serve`` configures text at once, then the config's format)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        label = "" if worker is None else f"worker {worker} "
        handler.setFormatter(TextFormatter(TEXT_FORMAT.replace("%(name)s", label + "%(name)s")))
    # Neither format names the caller's file, line, function, thread or process, and the access log
    # writes a record per request: skip working them out (the logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
