"""The audit trail: one JSON line per authorization decision.

Security teams ask "who did what, and what did we refuse?". Every grant, refusal, call and session
mismatch becomes one line with a stable schema (README "Audit log"). Lines never contain tokens,
secrets or tool arguments (only, if enabled, a keyed HMAC of the arguments). Writing never blocks the
event loop: ``emit`` appends to a bounded queue and a background task writes batches from a worker
thread; if the sink stalls long enough for the queue to fill, lines are dropped and counted rather
than stalling MCP traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import select
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from gateway.oauth.keys import derive_key
from gateway.telemetry import AuditRecords

log = logging.getLogger(__name__)

OTLP_SINK = "otlp"  # audit.sink value: OpenTelemetry log records to telemetry.otlp_endpoint
FIELDS = (
    "ts",
    "event",
    "request_id",
    "route",
    "sub",
    "client_id",
    "idp",
    "tenant",
    "groups",
    "method",
    "target",
    "decision",
    "reason",
    "rule",
    "status",
    "latency_ms",
    "args_sha256",
    "old_sha256",
    "new_sha256",
    "approval_id",
    "approver",
    "approver_idp",
    "approver_groups",
)
_RECORD_FIELDS = FIELDS[2:]  # what callers pass; ts and event are emit's own
# One encoder for every line: json.dumps with any non-default option builds a new JSONEncoder per
# call, which was a measurable part of an audit line's cost on the request path (docs/benchmarks.md).
_encode_line = json.JSONEncoder(separators=(",", ":")).encode


def argument_digester(secret_material: bytes) -> Callable[[Any], str]:
    """HMAC-SHA256 (RFC 2104) of the canonical JSON of tool arguments: correlates calls without
    storing them. Keyed, because a plain hash of a low-entropy argument (an amount, an account
    number) is reversed by hashing every candidate; the key is derived with HKDF (RFC 5869) from the
    gateway's signing key, so replicas sharing the key produce the same digests."""
    key = derive_key(secret_material, "audit-arguments/v1")

    def digest(arguments: Any) -> str:
        canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # surrogatepass: JSON may carry lone surrogates ("\ud800"), which strict UTF-8 cannot encode.
        return hmac.new(key, canonical.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    return digest


class AuditLog:
    def __init__(
        self,
        sink: str = "stdout",
        *,
        max_queue: int = 100_000,
        flush_interval: float = 0.05,
        otlp_endpoint: str | None = None,
    ) -> None:
        self.sink = sink
        self._otlp_endpoint = otlp_endpoint
        self._records: AuditRecords | None = None
        # Lines are handed to the writer thread at most this often: one thread hand-off per batch,
        # not per request, keeps the writer from competing with the event loop for the GIL.
        self._flush_interval = flush_interval
        self._queue: deque[str] = deque()
        self._max_queue = max_queue
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._file: IO[str] | None = None
        self.dropped = 0
        self.written = 0
        self._closing = False

    def emit(self, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
        }
        for name in _RECORD_FIELDS:
            value = fields.get(name)
            if value is not None:
                record[name] = list(value) if isinstance(value, tuple | frozenset | set) else value
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        self._queue.append(_encode_line(record))
        if self._wakeup is not None:
            self._wakeup.set()

    async def start(self) -> None:
        if self.sink == OTLP_SINK:
            assert self._otlp_endpoint is not None  # the config requires telemetry.otlp_endpoint
            self._records = AuditRecords(self._otlp_endpoint)
        elif self.sink != "stdout":
            self._file = await asyncio.to_thread(open, self.sink, "a", encoding="utf-8")
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer())

    async def close(self) -> None:
        """Flush what is queued, then stop (called on shutdown). The writer is asked to finish, not
        cancelled: cancelling could leave its worker thread writing while the final flush writes
        too, interleaving lines or writing to a closed file."""
        self._closing = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            await self._task
        await asyncio.to_thread(self._write, self._drain())
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
        if self._records is not None:
            await asyncio.to_thread(self._records.shutdown)

    async def _writer(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            await self._wakeup.wait()
            if not self._closing:
                await asyncio.sleep(self._flush_interval)
            self._wakeup.clear()
            lines = self._drain()
            if lines:
                try:
                    await asyncio.to_thread(self._write, lines)
                except OSError as exc:
                    log.error("audit sink %s failed: %s (%d lines lost)", self.sink, exc, len(lines))
                    self.dropped += len(lines)

    def _drain(self) -> list[str]:
        lines = list(self._queue)
        self._queue.clear()
        return lines

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        if self._records is not None:
            self._records.emit([json.loads(line) for line in lines])
            self.written += len(lines)
            return
        stream = self._file if self._file is not None else sys.stdout
        for chunk in _whole_line_chunks(lines):
            stream.write(chunk)
            stream.flush()
        self.written += len(lines)


def _whole_line_chunks(lines: list[str]) -> list[str]:
    """``lines`` joined into chunks of whole lines of at most PIPE_BUF bytes where possible, each written
    and flushed alone. Several processes (``serve --workers``) share stdout or the audit file: a write of
    at most PIPE_BUF bytes to a pipe is atomic (pipe(7)), as is each write to a file opened for append,
    so one process's line never lands inside another's. Lines are ASCII (``json.dumps`` escapes the rest),
    so characters are bytes."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        if current and size + len(line) + 1 > select.PIPE_BUF:
            chunks.append("\n".join(current) + "\n")
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    chunks.append("\n".join(current) + "\n")
    return chunks


def elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
