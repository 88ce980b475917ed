"""Limits and metrics: the Prometheus metrics, the request's time limit and
disconnects around every wait on the upstream, and the clean-up that frees
what a request holds (admission slot, upstream connection, guard sessions)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from integrations.gateway.wire import GatewayError
from integrations.streams import GuardStreams

if TYPE_CHECKING:
    from integrations.gateway.app import Gateway
    from integrations.gateway.prompt import ChatRequest

__all__ = ["Cleanup", "Metrics", "within_limits"]


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



async def within_limits(gateway: Gateway, chat: ChatRequest, request: Request, work: Any) -> Any:
    """Await ``work`` (a coroutine talking to the upstream) within the
    request's time limit; a client that leaves meanwhile cancels it (which
    closes the upstream request: the generator stops)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            remaining = chat.remaining()
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
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class Cleanup:
    """Frees what a request holds, once, whichever path ends it: the
    admission slot, the upstream connection (closing it stops the generator)
    and the guard sessions. A stream runs it when it ends, and Starlette's
    background task runs it again (a no-op) or for the first time when the
    client left before the stream started."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.admitted = False
        self.streams: GuardStreams | None = None
        self.response: httpx.Response | None = None
        self.handed_over = False
        self._done = False

    async def run(self) -> None:
        if self._done:
            return
        self._done = True
        if self.response is not None:
            with contextlib.suppress(Exception):
                await self.response.aclose()
        if self.streams is not None:
            self.gateway.close_later(self.streams)
        if self.admitted:
            self.gateway.release()

