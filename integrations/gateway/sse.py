"""The upstream's server-sent events, parsed as the WHATWG spec says.

Lines end with CRLF, LF or CR; the ``data:`` lines of one event are joined
with ``\\n`` and the event is dispatched at a blank line; one space after the
colon is dropped; comment lines (``: ping``) and the ``id``, ``retry`` and
unknown fields are ignored. Servers' own error forms are recognised: an
``event: error`` event, and llama.cpp's ``error:`` lines. Bytes, lines and
events are bounded, so an upstream cannot make the gateway hold without limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import httpx

from integrations.gateway.wire import BadChunk

__all__ = ["Event", "EventReader", "is_event_stream"]

Event = tuple[Literal["data", "error"], bytes]


def is_event_stream(content_type: str) -> bool:
    """Whether a Content-Type names an event stream (any case, parameters aside)."""
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class EventReader:
    """The events of an SSE body, a batch at a time: ``batch()`` returns every
    event complete in what has arrived (reading more only when none is), so
    that a caller can judge what came together in one go; an empty batch
    means the body ended."""

    def __init__(self, response: httpx.Response, *, max_line_bytes: int, max_bytes: int) -> None:
        self._parts: AsyncIterator[bytes] = response.aiter_bytes()
        self.max_line_bytes, self.max_bytes = max_line_bytes, max_bytes
        self.bytes_read = 0
        self._buffer = b""
        self._data: list[bytes] = []
        self._kind: Literal["data", "error"] = "data"
        self._started = False
        self._ended = False

    async def batch(self) -> list[Event]:
        events: list[Event] = []
        while not events and not self._ended:
            try:
                part = await anext(self._parts)
            except StopAsyncIteration:
                self._ended = True
                events += self._lines(final=True)
                break
            self.bytes_read += len(part)
            if self.bytes_read > self.max_bytes:
                raise BadChunk(f"a stream larger than the gateway's limit of {self.max_bytes:,} bytes")
            if not self._started:
                self._started = True
                part = part.removeprefix(b"\xef\xbb\xbf")  # a byte order mark is not part of the stream
            self._buffer += part
            events += self._lines(final=False)
        return events

    async def aclose(self) -> None:
        await self._parts.aclose()

    def _lines(self, final: bool) -> list[Event]:
        buffer, held = self._buffer, b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r") and not final:  # a CR that a LF may follow
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        rest = b"" if final else lines.pop()
        if len(rest) > self.max_line_bytes:
            raise BadChunk(f"a line longer than the gateway's limit of {self.max_line_bytes:,} bytes")
        self._buffer = rest + held
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._kind, b"\n".join(self._data)))
                self._data, self._kind = [], "data"
                continue
            field, colon, value = line.partition(b":")
            if not field:
                continue  # a comment
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value)
                if sum(map(len, self._data)) > self.max_line_bytes:
                    raise BadChunk(f"an event longer than the gateway's limit of {self.max_line_bytes:,} bytes")
            elif field == b"event":
                self._kind = "error" if value.strip() == b"error" else "data"
            elif field == b"error":  # llama.cpp's error line, an event of its own
                events.append(("error", value))
        if final and self._data:  # the body ended without the blank line after its last event
            events.append((self._kind, b"\n".join(self._data)))
            self._data = []
        return events
