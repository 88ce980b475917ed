"""The gateway app: ``Gateway`` (one guard, one engine, one upstream client,
shared by every request) and ``create_app``, whose chat route shows the flow
of a request: admission, the prompt judged (``prompt``), the request sent,
then the answer relayed (``relay``) through chunk rewriting (``chunks``),
within the limits of ``limits``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from guard import EngineCapacityError, GuardError
from integrations.gateway.config import GatewayConfig
from integrations.gateway.limits import Cleanup, Metrics, within_limits
from integrations.gateway.prompt import ChatRequest, read_body
from integrations.gateway.relay import Relay, completion, read_completion
from integrations.gateway.wire import GatewayError
from integrations.streams import GuardStreams

__all__ = ["Gateway", "create_app"]

log = logging.getLogger("crossguard.gateway")

# Headers of the upstream's answer that describe the bytes we re-send, not the answer itself.
_HOP_HEADERS = {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}


class Gateway:
    """The state behind the app: one guard, one engine, one upstream client."""

    def __init__(self, config: GatewayConfig, guard: Any = None, generator: Any = None) -> None:
        self.config = config
        self._guard = guard
        self._generator = generator
        self.engine: Any = None
        self.client: httpx.AsyncClient | None = None
        self.metrics = Metrics()
        self._open = 0
        from guard import Policy

        self.policy = Policy(mode=config.mode)

    # --- lifetime -----------------------------------------------------------

    def start(self) -> None:
        """Load the guard (unless given) and the generator tokenizer, start the engine and the upstream client."""
        from guard import GuardEngine, StreamGuard
        from integrations.common import load_generator_tokenizer

        config = self.config
        if self._guard is None:
            self._guard = StreamGuard.from_pretrained(config.guard, device=config.device)
        if self._generator is None and config.generator is not None:
            self._generator = load_generator_tokenizer(config.generator)
        # Every request may open a guard stream per choice and per tool call.
        self.engine = GuardEngine(
            self._guard, max_batch_tokens=config.max_batch_tokens, max_wait_ms=config.max_wait_ms,
            max_sessions=max(4 * config.max_streams, 16), kv_budget_bytes=config.kv_budget_bytes,
        )  # fmt: skip
        listener = getattr(self.engine, "add_step_listener", None)
        if listener is not None:
            listener(self.metrics.observe_step)
        self.metrics.guard_sessions.set_function(lambda: self.engine.session_count if self.engine else 0)
        timeout = httpx.Timeout(
            connect=config.upstream_connect_timeout_s, read=config.upstream_read_timeout_s, write=30.0,
            pool=config.upstream_connect_timeout_s,
        )  # fmt: skip
        limits = httpx.Limits(max_connections=config.max_streams + 16, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        log.info("gateway ready: %s", config.public())

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.engine is not None:
            self.engine.close()

    @property
    def generator(self) -> Any:
        return self._generator

    @property
    def ready(self) -> bool:
        """Whether the guard engine is running (what /health and Ray Serve's health check report)."""
        return self.engine is not None and not self.engine.closed

    # --- helpers ------------------------------------------------------------

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking guard call on the engine's threads, never on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine.executor, partial(function, *args))

    def close_later(self, streams: GuardStreams) -> None:
        """Free a request's guard sessions without waiting (a call of its may
        still be finishing in a thread: close() waits for it there)."""
        try:
            self.engine.executor.submit(streams.close)
        except RuntimeError:  # the engine is shutting down; its sessions go with it
            streams.close()

    def check_key(self, request: Request) -> None:
        expected = self.config.api_key
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise GatewayError(401, "Incorrect API key provided for the moderating gateway.",
                               type="invalid_request_error", code="invalid_api_key")  # fmt: skip

    def upstream_headers(self, request: Request) -> dict[str, str]:
        headers = {"accept": request.headers.get("accept", "application/json")}
        if self.config.upstream_api_key is not None:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        elif self.config.api_key is None and "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    def admit(self, cleanup: Cleanup) -> None:
        if self._open >= self.config.max_streams:
            self.metrics.requests.labels("overloaded").inc()
            raise GatewayError(
                429, f"the moderating gateway is serving its limit of {self.config.max_streams} concurrent "
                "requests; retry shortly", type="rate_limit_error", code="too_many_concurrent_requests",
                headers={"retry-after": "1"},
            )  # fmt: skip
        self._open += 1
        self.metrics.streams_open.inc()
        cleanup.admitted = True

    def release(self) -> None:
        self._open -= 1
        self.metrics.streams_open.dec()

    async def send(self, chat: ChatRequest, request: Request) -> httpx.Response:
        """Forward the request; the upstream's response, streaming (its body not read yet)."""
        upstream_request = self.client.build_request(
            "POST", f"{self.config.upstream}/chat/completions", json=chat.upstream_body(),
            headers=self.upstream_headers(request),
        )  # fmt: skip
        try:
            return await self.client.send(upstream_request, stream=True)
        except httpx.TimeoutException as error:
            raise self.upstream_error("timeout", error) from None
        except httpx.TransportError as error:
            raise self.upstream_error("unreachable", error) from None

    def upstream_error(self, kind: str, error: BaseException | str) -> GatewayError:
        self.metrics.upstream_errors.labels(kind).inc()
        detail = error if isinstance(error, str) else (str(error) or type(error).__name__)
        log.warning("upstream %s: %s", kind, detail)
        status = 504 if kind == "timeout" else 502
        return GatewayError(status, f"the upstream server failed ({kind}): {detail}", type="upstream_error",
                            code=f"upstream_{kind}")  # fmt: skip


def create_app(config: GatewayConfig, *, guard: Any = None, generator: Any = None) -> FastAPI:
    """The gateway as an ASGI app. Its lifespan loads the guard (``guard``
    gives an already loaded ``StreamGuard`` instead), starts the engine and
    the upstream client, and stops them."""
    gateway = Gateway(config, guard=guard, generator=generator)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, gateway.start)
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="crossguard gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and wrong methods, in the OpenAI error shape clients parse.
        return GatewayError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                            type="invalid_request_error", headers=dict(error.headers or {})).response()  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        engine, ready = gateway.engine, gateway.ready
        body = {"status": "ok" if ready else "unavailable", "streams_open": gateway._open,
                "guard_sessions": engine.session_count if engine is not None else 0}  # fmt: skip
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gateway.check_key(request)
        try:
            upstream = await gateway.client.get(f"{config.upstream}/models", headers=gateway.upstream_headers(request))
        except httpx.TimeoutException as error:
            raise gateway.upstream_error("timeout", error) from None
        except httpx.TransportError as error:
            raise gateway.upstream_error("unreachable", error) from None
        return passthrough(upstream, upstream.content)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gateway.check_key(request)
        payload = await read_body(request, config.max_body_bytes)
        cleanup = Cleanup(gateway)
        try:
            gateway.admit(cleanup)
            chat = ChatRequest(gateway, payload)
            cleanup.streams = chat.streams
            try:
                await chat.judge_prompt()
            except GatewayError:
                raise
            except ValueError as error:
                if isinstance(error, GuardError):
                    raise
                raise GatewayError(400, f"the guard cannot read these messages: {error}",
                                   type="invalid_request_error", param="messages") from None  # fmt: skip
            except Exception as error:
                if not config.fail_open:
                    raise guard_failure(gateway, chat, error) from error
                chat.failed_open = True
            response = await within_limits(gateway, chat, request, gateway.send(chat, request))
            cleanup.response = response
            status = response.status_code
            if response.is_redirect or 300 <= status < 400:
                # Never hand a client a way around the guard (an SDK follows redirects).
                raise gateway.upstream_error("redirect", f"the upstream answered HTTP {status} (a redirect)")
            if not response.is_success:
                body = await read_completion(gateway, chat, response, request)
                gateway.metrics.upstream_errors.labels(f"status_{status}").inc()
                gateway.metrics.requests.labels("upstream_error").inc()
                return passthrough(response, body)
            streamed = response.headers.get("content-type", "").startswith("text/event-stream")
            if not chat.stream or not streamed:
                return await completion(gateway, chat, await read_completion(gateway, chat, response, request))
            relay = Relay(gateway, chat, response)
            stream = StreamingResponse(
                relay.events(cleanup), media_type="text/event-stream", background=BackgroundTask(cleanup.run),
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )  # fmt: skip
            cleanup.handed_over = True
            return stream
        finally:
            if not cleanup.handed_over:
                await cleanup.run()

    return app


def guard_failure(gateway: Gateway, chat: ChatRequest, error: BaseException) -> GatewayError:
    gateway.metrics.guard_errors.inc()
    log.error("request %s: guard failed on the prompt: %r", chat.request_id, error)
    if isinstance(error, EngineCapacityError):
        gateway.metrics.requests.labels("overloaded").inc()
        return GatewayError(503, f"the moderation guard is at capacity: {error}", type="server_error",
                            code="guard_capacity", headers={"retry-after": "1"})  # fmt: skip
    gateway.metrics.requests.labels("guard_error").inc()
    return GatewayError(500, f"the moderation guard failed on the prompt ({type(error).__name__}: {error})",
                        type="server_error", code="guard_error")  # fmt: skip


def passthrough(upstream: httpx.Response, body: bytes) -> Response:
    headers = {name: value for name, value in upstream.headers.items()
               if name.lower() not in _HOP_HEADERS and name.lower() not in ("location", "set-cookie")}  # fmt: skip
    return Response(body, status_code=upstream.status_code, headers=headers)
