"""The gateway app: ``Gateway`` (one guard, one engine, one upstream client,
shared by every request) and ``create_app``, whose chat route shows the flow
of a request: admission, the body read and the prompt judged (``prompt``),
the request sent, then the answer relayed (``relay``) through chunk
rewriting (``chunks``), within the limits of ``limits``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable
from functools import partial
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from guard import GuardError
from integrations.common import load_generator_tokenizer
from integrations.gateway.chunks import identifier
from integrations.gateway.config import GatewayConfig
from integrations.gateway.limits import Admission, Cleanup, EventStream, Metrics, redact_access_log, within_limits
from integrations.gateway.prompt import ChatRequest, read_body
from integrations.gateway.relay import Relay, completion, guard_failure, read_completion
from integrations.gateway.sse import is_event_stream
from integrations.gateway.wire import GatewayError, parse_json
from integrations.streams import GuardStreams

__all__ = ["Gateway", "create_app"]

log = logging.getLogger("crossguard.gateway")

# What the client is told when the upstream fails (the details, which may
# quote the model or name internal hosts, go to the log only).
_UPSTREAM_FAILURES = {
    "timeout": "the upstream server did not answer in time",
    "unreachable": "the upstream server cannot be reached",
    "dropped": "the upstream server's answer broke off",
}


class Gateway:
    """The state behind the app: one guard, one engine, one upstream client."""

    def __init__(self, config: GatewayConfig, guard: Any = None, generator: Any = None) -> None:
        self.config = config
        self._guard = guard
        self._generator = generator
        self.engine: Any = None
        self.client: httpx.AsyncClient | None = None
        self.metrics = Metrics()
        self.admission: Admission | None = None
        from guard import Policy

        self.policy = Policy(mode=config.mode)

    # --- lifetime -----------------------------------------------------------

    def start(self) -> None:
        """Load the guard (unless given) and the generator tokenizer, start the engine and the upstream client."""
        from guard import GuardEngine, StreamGuard

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
        self.admission = Admission(config, self.metrics, self.engine.max_sessions)
        listener = getattr(self.engine, "add_step_listener", None)
        if listener is not None:
            listener(self.metrics.observe_step)
        self.metrics.guard_sessions.set_function(lambda: self.engine.session_count if self.engine else 0)
        timeout = httpx.Timeout(
            connect=config.upstream_connect_timeout_s, read=config.upstream_read_timeout_s, write=30.0,
            pool=config.upstream_connect_timeout_s,
        )  # fmt: skip
        limits = httpx.Limits(max_connections=config.max_streams + 16, max_keepalive_connections=64)
        # No cookie jar: a cookie the upstream sets for one client must never
        # ride along with another client's request.
        no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, cookies=no_cookies)
        redact_access_log()
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
        """Free a request's guard sessions without waiting: closing drops their
        work queued in the engine at once, and waits for a call in flight (at
        most one engine step) on a thread of its own."""
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, streams.close)

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
        """The client's error for an upstream failure: the gateway's own words;
        the upstream's (``error``) go to the log."""
        self.metrics.upstream_errors.labels(kind).inc()
        detail = error if isinstance(error, str) else (str(error) or type(error).__name__)
        log.warning("upstream %s: %s", kind, detail)
        status = 504 if kind == "timeout" else 502
        # A str is the gateway's own account (a limit, a redirect); an exception's text stays in the log.
        message = _UPSTREAM_FAILURES.get(kind) or (error if isinstance(error, str) else f"the upstream failed ({kind})")
        return GatewayError(status, message, type="upstream_error", code=f"upstream_{kind}")


def _upstream_status_error(gateway: Gateway, response: httpx.Response, body: bytes) -> JSONResponse:
    """An upstream error status, passed on as its status and code in the
    gateway's own words: the upstream's message may quote the model."""
    status = response.status_code
    gateway.metrics.upstream_errors.labels(f"status_{status}").inc()
    try:
        error = parse_json(body).get("error")
    except Exception:  # not JSON, or not an object: nothing to take from it
        error = None
    error = error if isinstance(error, dict) else {}
    log.warning("upstream answered HTTP %d: %.500r", status, body)
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else identifier(code, 64)
    shaped = {"message": f"the upstream server answered HTTP {status}", "type": identifier(error.get("type"), 64)
              or "upstream_error", "param": identifier(error.get("param"), 64), "code": code}  # fmt: skip
    headers = {}
    retry = response.headers.get("retry-after", "")
    if retry.isdigit():
        headers["retry-after"] = retry
    return JSONResponse({"error": shaped}, status_code=status, headers=headers)


def _models(data: Any) -> dict[str, Any]:
    """The upstream's model list, rebuilt from the fields clients read."""
    models = data.get("data") if isinstance(data, dict) else None
    kept = []
    for model in models if isinstance(models, list) else ():
        name = identifier(model.get("id")) if isinstance(model, dict) else None
        if name is None:
            continue
        entry: dict[str, Any] = {"id": name, "object": "model"}
        created = model.get("created")
        if isinstance(created, int) and not isinstance(created, bool):
            entry["created"] = created
        owner = identifier(model.get("owned_by"))
        if owner is not None:
            entry["owned_by"] = owner
        kept.append(entry)
    return {"object": "list", "data": kept}


# --- the app --------------------------------------------------------------------


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
        body = {"status": "ok" if ready else "unavailable",
                "streams_open": gateway.admission.open if gateway.admission else 0,
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
        if upstream.is_redirect or not upstream.is_success:
            return _upstream_status_error(gateway, upstream, upstream.content)
        try:
            return JSONResponse(_models(parse_json(upstream.content)))
        except Exception:
            raise gateway.upstream_error("bad_response", "the upstream's model list is not JSON") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gateway.check_key(request)
        cleanup = Cleanup(gateway)
        # Counted from the first byte: a client that sends a body slowly holds a slot.
        cleanup.ticket = gateway.admission.admit()
        handed_over = False
        try:
            payload = await read_body(request, config.max_body_bytes, min(config.body_timeout_s,
                                                                          config.request_timeout_s))  # fmt: skip
            chat = ChatRequest(gateway, payload)
            gateway.admission.reserve(cleanup.ticket, chat.choice_count)
            cleanup.streams.append(chat.streams)
            await _judge_prompt(gateway, chat, request, cleanup)
            response = await within_limits(gateway, chat.remaining, request, gateway.send(chat, request))
            cleanup.response = response
            status = response.status_code
            if response.is_redirect or 300 <= status < 400:
                # Never hand a client a way around the guard (an SDK follows redirects).
                raise gateway.upstream_error("redirect", f"the upstream answered HTTP {status} (a redirect)")
            if not response.is_success:
                body = await read_completion(gateway, chat, response, request)
                gateway.metrics.requests.labels("upstream_error").inc()
                return _upstream_status_error(gateway, response, body)
            streamed = is_event_stream(response.headers.get("content-type", ""))
            if chat.stream and not streamed:
                raise gateway.upstream_error("not_event_stream", "the upstream answered a streaming request with "
                                             "something other than an event stream (text/event-stream)")  # fmt: skip
            if not chat.stream:
                if streamed:
                    raise gateway.upstream_error("event_stream", "the upstream answered a request without "
                                                 "streaming with an event stream")  # fmt: skip
                body = await read_completion(gateway, chat, response, request)
                return await completion(gateway, chat, body, request, cleanup)
            relay = Relay(gateway, chat, response, cleanup)

            def slow_client() -> None:
                relay.outcome = "slow_client"
                log.warning("request %s: the client stopped reading for %g s; dropped", chat.request_id,
                            config.send_timeout_s)  # fmt: skip

            stream = EventStream(relay.events(), send_timeout=config.send_timeout_s, deadline=chat.remaining,
                                 on_end=cleanup.run, on_slow_client=slow_client)  # fmt: skip
            handed_over = True
            return stream
        finally:
            if not handed_over:
                await cleanup.run()

    return app


async def _judge_prompt(gateway: Gateway, chat: ChatRequest, request: Request, cleanup: Cleanup) -> None:
    """Judge the conversation before anything is forwarded, within the time
    limit (a client that leaves, or a limit that passes, stops the guard's
    work on it); refuse it in block mode."""
    try:
        work = gateway.run(chat.streams.judge_prompt)
        chat.query_verdict = await within_limits(gateway, chat.remaining, request, work,
                                                 abandon=cleanup.close_streams)  # fmt: skip
    except GatewayError:
        raise
    except ValueError as error:
        if isinstance(error, GuardError):
            raise guard_failure(gateway, chat, error, "the prompt") from error
        raise GatewayError(400, f"the guard cannot read these messages: {error}", type="invalid_request_error",
                           param="messages") from None  # fmt: skip
    except Exception as error:
        if not gateway.config.fail_open:
            raise guard_failure(gateway, chat, error, "the prompt") from error
        chat.failed_open = True
    chat.refuse_if_flagged()
