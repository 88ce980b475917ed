"""The upstream's server-sent events, read line by line within limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from integrations.gateway.wire import BadChunk

__all__ = ["sse_lines", "upstream_message"]


def upstream_message(event: Any) -> str:
    error = event.get("error") if isinstance(event, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return (message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))[:500]


async def sse_lines(response: httpx.Response, limit: int) -> AsyncIterator[str]:
    """The SSE lines of a response, each at most ``limit`` bytes."""
    buffer = b""
    async for part in response.aiter_bytes():
        buffer += part
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        if len(buffer) > limit:
            raise BadChunk(f"a line longer than the gateway's limit of {limit:,} bytes")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")
