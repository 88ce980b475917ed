"""Limits and metrics: admission (requests at once, and the guard sessions
each may hold), the request's time limit and disconnects around every wait,
a send timeout for clients that stop reading, the clean-up that frees what a
request holds, keys kept out of access logs, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import Response

from integrations.gateway.wire import GatewayError
from integrations.streams import GuardStreams

if TYPE_CHECKING:
    from integrations.gateway.config import GatewayConfig

__all__ = ["Admission", "Cleanup", "EventStream", "Metrics", "Ticket", "redact_access_log", "within_limits"]

log = logging.getLogger("crossguard.gateway")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_open = Gauge("crossguard_streams_open", "Chat requests being served", registry=r)
        self.guard_sessions = Gauge("crossguard_guard_sessions", "Guard sessions holding a KV cache", registry=r)
        self.requests = Counter("crossguard_requests", "Chat requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("crossguard_guard_tokens", "Guard tokens judged (prompts and responses)", registry=r)
        self.flags = Counter("crossguard_flags", "Prompts and responses flagged, by category",
                             ["kind", "category"], registry=r)  # fmt: skip
        self.upstream_errors = Counter("crossguard_upstream_errors", "Upstream failures by kind", ["kind"], registry=r)
        self.guard_errors = Counter("crossguard_guard_errors", "Guard failures (the stream failed closed)",
                                    registry=r)  # fmt: skip
        self.step_seconds = Histogram(
            "crossguard_guard_step_seconds", "Duration of one batched guard forward",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0), registry=r,
        )  # fmt: skip
        self.step_tokens = Histogram("crossguard_guard_step_tokens", "Tokens in one batched guard forward",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)  # fmt: skip

    def observe_step(self, tokens: int, sessions: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        self.step_seconds.observe(seconds)
        self.step_tokens.observe(tokens)


# --- admission ----------------------------------------------------------------------


class Ticket:
    """One admitted request: the guard sessions it reserved and those it uses."""

    __slots__ = ("reserved", "used")

    def __init__(self) -> None:
        self.reserved = 0
        self.used = 0


class Admission:
    """At most ``max_streams`` requests at once, and guard sessions shared so
    that one request cannot take another's: each request reserves a session
    per choice when it is admitted (refused with 503 if the engine cannot
    hold them), and a stream beyond its reservation (a tool call, a refusal)
    opens only if sessions nobody reserved are free (else that answer fails
    closed). Tool calls per answer are bounded too (``max_tool_calls``)."""

    def __init__(self, config: GatewayConfig, metrics: Metrics, sessions: int) -> None:
        self.config, self.metrics, self.sessions = config, metrics, sessions
        self.open = 0
        self._committed = 0  # sessions held or reserved by the requests admitted: sum of max(reserved, used)
        self._lock = threading.Lock()  # streams open on the engine's threads

    def admit(self) -> Ticket:
        if self.open >= self.config.max_streams:
            self.metrics.requests.labels("overloaded").inc()
            raise GatewayError(
                429, f"the moderating gateway is serving its limit of {self.config.max_streams} concurrent "
                "requests; retry shortly", type="rate_limit_error", code="too_many_concurrent_requests",
                headers={"retry-after": "1"},
            )  # fmt: skip
        self.open += 1
        self.metrics.streams_open.inc()
        return Ticket()

    def reserve(self, ticket: Ticket, sessions: int) -> None:
        with self._lock:
            if self._committed + sessions > self.sessions:
                self.metrics.requests.labels("overloaded").inc()
                raise GatewayError(503, "the moderation guard has no room for this request's streams now; retry "
                                   "shortly", type="server_error", code="guard_capacity",
                                   headers={"retry-after": "1"})  # fmt: skip
            self._committed += sessions
            ticket.reserved = sessions

    def take_session(self, ticket: Ticket) -> bool:
        """Count one more guard session for the request; False if it would
        take a session another request reserved."""
        with self._lock:
            if ticket.used < ticket.reserved:
                ticket.used += 1
                return True
            if self._committed + 1 > self.sessions:
                return False
            ticket.used += 1
            self._committed += 1
            return True

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._committed -= max(ticket.reserved, ticket.used)
            ticket.reserved = ticket.used = 0
        self.open -= 1
        self.metrics.streams_open.dec()


# --- time limits ----------------------------------------------------------------------


async def within_limits(gateway: Any, deadline: Callable[[], float], request: Request, work: Awaitable[Any], *,
                        abandon: Callable[[], None] | None = None) -> Any:  # fmt: skip
    """Await ``work`` within the request's time limit (``deadline()``: the
    seconds left); a client that leaves meanwhile cancels it. ``abandon``
    stops work that cancelling cannot (a guard call in a thread: it closes
    the request's guard streams, which drops their queued work)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            remaining = deadline()
            if remaining <= 0:
                gateway.metrics.requests.labels("timeout").inc()
                raise GatewayError(504, f"the request took longer than the gateway's limit of "
                                   f"{gateway.config.request_timeout_s:g} s", type="timeout_error",
                                   code="timeout")  # fmt: skip
            done, _ = await asyncio.wait({task}, timeout=min(remaining, 0.25))
            if done:
                return task.result()
            if await request.is_disconnected():
                gateway.metrics.requests.labels("client_gone").inc()
                raise GatewayError(499, "the client closed the request", type="invalid_request_error",
                                   code="client_closed_request")  # fmt: skip
    finally:
        if not task.done():
            if abandon is not None:
                abandon()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class Cleanup:
    """Frees what a request holds, once, whichever path ends it: the
    admission slot and sessions, the upstream connection (closing it stops
    the generator) and the guard sessions (closing them drops their work
    still queued in the engine)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.ticket: Ticket | None = None
        self.streams: list[GuardStreams] = []
        self.response: httpx.Response | None = None
        self._done = False

    def close_streams(self) -> None:
        """Close the request's guard streams now, off the event loop (closing
        waits for a call in flight, at most one engine step)."""
        streams, self.streams = self.streams, []
        for each in streams:
            self.gateway.close_later(each)

    async def run(self) -> None:
        if self._done:
            return
        self._done = True
        if self.response is not None:
            with contextlib.suppress(Exception):
                await self.response.aclose()
        self.close_streams()
        if self.ticket is not None:
            self.gateway.admission.release(self.ticket)


class EventStream(Response):
    """A server-sent event stream whose every send is bounded: a client that
    stops reading (its socket buffers full) for ``send_timeout`` seconds, or
    past the request's time limit, is dropped, and ``on_end`` frees what the
    request holds. A client that leaves cancels the producer at once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, send_timeout: float, deadline: Callable[[], float],
                 on_end: Callable[[], Awaitable[None]], on_slow_client: Callable[[], None]) -> None:  # fmt: skip
        # As StreamingResponse: no body given, so no Content-Length.
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.events, self.send_timeout, self.deadline = events, send_timeout, deadline
        self.on_end, self.on_slow_client = on_end, on_slow_client

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        producer = asyncio.ensure_future(self._stream(send))
        watcher = asyncio.ensure_future(self._client_left(receive))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producer, watcher):
                task.cancel()
            for task in (producer, watcher):
                with contextlib.suppress(BaseException):
                    await task
            await self.events.aclose()
            await self.on_end()

    async def _client_left(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _stream(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for data in self.events:
            try:
                # Past the time limit, a second more for the events that say so.
                async with asyncio.timeout(min(self.send_timeout, max(self.deadline(), 0.0) + 1.0)):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except TimeoutError:
                # The response is left incomplete: the server closes the connection.
                self.on_slow_client()
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- secrets ---------------------------------------------------------------------


_QUERY = re.compile(r"\?.*$")


class _RedactQueries(logging.Filter):
    """uvicorn's access log prints the path with its query string, where some
    clients put keys (``?api-key=...``): the query is printed as ``?…``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], _QUERY.sub("?…", args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Keep query strings (and the keys in them) out of uvicorn's access log."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, _RedactQueries) for existing in access.filters):
        access.addFilter(_RedactQueries())
