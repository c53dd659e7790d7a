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
# The callers' keyword sets, each with its fields in line order: a call site passes the same names every
# time, so emit looks the order up instead of probing every field. Bounded anyway (a set not kept is
# worked out again).
_FIELD_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
_MAX_FIELD_ORDERS = 256
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
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        record: dict[str, Any] = {"ts": _timestamp(), "event": event}
        for name in _in_line_order(fields):
            value = fields[name]
            if value is not None:
                # Sets are not JSON; tuples are written as arrays as they are.
                record[name] = list(value) if isinstance(value, (frozenset, set)) else value
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


def _in_line_order(fields: dict[str, Any]) -> tuple[str, ...]:
    """The audit fields among ``fields``, in line order (others are not written)."""
    names = tuple(fields)
    order = _FIELD_ORDERS.get(names)
    if order is None:
        order = tuple(name for name in _RECORD_FIELDS if name in fields)
        if len(_FIELD_ORDERS) < _MAX_FIELD_ORDERS:
            _FIELD_ORDERS[names] = order
    return order


class _Timestamps:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")`` with ``Z`` for ``+00:00``, the date and time of
    day formatted once per second: both read the system clock and truncate it to the millisecond."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._formatted: tuple[int, str] = (-1, "")  # one attribute: never a second with another's text

    def __call__(self) -> str:
        second, nanoseconds = divmod(self._clock(), 1_000_000_000)
        cached = self._formatted
        if cached[0] != second:
            cached = (second, datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds").removesuffix("+00:00"))
            self._formatted = cached
        return f"{cached[1]}.{nanoseconds // 1_000_000:03d}Z"


_timestamp = _Timestamps()


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
