"""Server-Sent Events framing for the proxy (WHATWG HTML "Server-sent events" §9.2.5).

The proxy forwards SSE event by event: an event is written to the client as soon as its terminating
blank line has arrived, never later and never merged with the rest of the stream. Bytes are kept
verbatim (``id:``, ``retry:``, comments) unless a rewrite is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

# An event ends at an empty line; lines end in CRLF, LF or CR, and a stream may mix them. A lone CR
# after LF/CRLF ends an event only once the next byte shows it is not the first half of a CRLF, so a
# CRLF blank line split across two chunks is never cut in the middle.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r|\n\r\n|\r\n\n|\r\n\r(?=[^\n])|\n\r(?=[^\n])")
_LINE = re.compile(r"\r\n|\n|\r")
MAX_EVENT_BYTES = 8 * 1024 * 1024


class EventTooLarge(Exception):
    """An upstream event exceeded MAX_EVENT_BYTES without ending (a broken or hostile upstream)."""


class EventSplitter:
    """Splits a byte stream into complete raw events (each including its terminating blank line)."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk
        start = 0
        while True:
            match = _EVENT_END.search(self._buffer, start)
            if match is None:
                break
            yield self._buffer[start : match.end()]
            start = match.end()
        self._buffer = self._buffer[start:]
        if len(self._buffer) > self._max:
            raise EventTooLarge

    def rest(self) -> bytes:
        """Whatever arrived after the last complete event (sent as-is when the stream ends)."""
        rest, self._buffer = self._buffer, b""
        return rest


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: str | None = None
    comments: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        lines = [f":{c}" for c in self.comments]
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.event != "message":
            lines.append(f"event: {self.event}")
        if self.retry is not None:
            lines.append(f"retry: {self.retry}")
        lines.extend(f"data: {line}" for line in self.data.split("\n"))
        return ("\n".join(lines) + "\n\n").encode()


def parse_event(raw: bytes) -> Event:
    event = Event()
    data: list[str] = []
    for line in _LINE.split(raw.decode("utf-8", errors="replace")):
        if not line:
            continue
        if line.startswith(":"):
            event.comments.append(line[1:])
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event.event = value or "message"
        elif name == "id":
            event.id = value
        elif name == "retry":
            event.retry = value
    event.data = "\n".join(data)
    return event
