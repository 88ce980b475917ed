"""An OpenAI-compatible gateway that moderates any chat server with Qwen3Guard-Stream.

Users point their apps at the gateway instead of their vLLM, TGI, llama.cpp
or Ollama server. The gateway judges the prompt before forwarding it, then
re-emits the upstream's streamed chunks only once the guard has judged their
text (debounce-aware, ``integrations.withhold.StreamGate``), and cuts the
stream at a flag: the flagged text is withheld, a last chunk says
``finish_reason: "content_filter"`` with the verdict, then ``data: [DONE]``,
and the upstream request is closed so the generator stops.

    crossguard serve --upstream http://127.0.0.1:8000/v1 --generator llama3

or, mounted by the user:

    from integrations.gateway import GatewayConfig, create_app
    app = create_app(GatewayConfig(upstream="http://127.0.0.1:8000/v1", generator="llama3"))
    # uvicorn.run(app, host="127.0.0.1", port=8080)

What is judged (every generated text, each as its own guard stream; see
``integrations.streams``): each choice's message text, its reasoning
(``delta.reasoning``, or the older ``reasoning_content``) in the guard's think
block, and the arguments of each tool call. When the upstream sends the
generator's token ids (vLLM's ``return_token_ids``) and the gateway knows the
generator's tokenizer, a choice's text is judged from its ids, so verdicts
name real generator tokens; otherwise from the text deltas. Chosen per
response and reported in the verdict metadata (``crossguard.mode``).

Shapes follow Azure OpenAI's content-filter convention, which clients
already read: a refused prompt is HTTP 400 with ``code: "content_filter"``
and ``innererror.content_filter_result``; streamed answers carry
``prompt_filter_results`` first and per-choice ``content_filter_results`` on
the cut; non-streamed answers get them on the response. Our own details
(risk level, probability, guard position, generator token) sit under
``crossguard`` keys, which other clients ignore.

Fail closed: a guard error ends the stream with an error event (the SDK
raises ``APIError``), never with text the guard did not judge;
``fail_open=True`` forwards unjudged text instead, for those who choose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

from adapter import SourceDecoder
from guard import EngineCapacityError, GuardError
from integrations.streams import GuardStreams, StreamKey
from integrations.withhold import StreamGate

try:
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from integrations.extras import install_hint

    raise ImportError(
        f"the gateway needs the 'gateway' extra ({error.name} is missing): {install_hint('gateway')}"
    ) from error

__all__ = ["DEFAULT_REFUSAL", "GatewayConfig", "create_app"]

log = logging.getLogger("crossguard.gateway")

DEFAULT_GUARD = "Qwen/Qwen3Guard-Stream-0.6B"
DEFAULT_REFUSAL = "I can't help with that."
SEVERITY = {"Unsafe": "high", "Controversial": "medium", "Safe": "safe"}
# Headers of the upstream's answer that describe the bytes we re-send, not the answer itself.
_HOP_HEADERS = {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class GatewayConfig:
    """Everything ``crossguard serve`` takes; the same in one process and on Ray Serve.

    ``upstream``: the server's OpenAI base URL (ending in ``/v1``).
    ``generator``: its tokenizer (a bundled name, a tokenizer.json, a
    SentencePiece .model or a tokenizer folder), to judge from token ids when
    the upstream sends them; None judges text deltas only.
    ``token_ids``: ``"use"`` judges ids when chunks carry them, ``"request"``
    also asks for them (vLLM's ``return_token_ids``; servers that reject
    unknown fields refuse it), ``"off"`` always judges text.
    ``mode``: strict counts Controversial as Unsafe, loose as Safe.
    ``prompts``: ``"block"`` refuses a flagged prompt with HTTP 400,
    ``"annotate"`` forwards it and reports the verdict.
    ``api_key``: clients must send ``Authorization: Bearer <api_key>``; the
    upstream then gets ``upstream_api_key`` (if set) instead of the client's
    header, which is otherwise forwarded as is.
    """

    upstream: str
    generator: str | None = None
    guard: str = DEFAULT_GUARD
    mode: Literal["strict", "loose"] = "strict"
    prompts: Literal["block", "annotate"] = "block"
    token_ids: Literal["use", "request", "off"] = "use"
    judge_tool_calls: bool = True
    api_key: str | None = field(default=None, repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    fail_open: bool = False
    refusal: str = DEFAULT_REFUSAL
    max_body_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024
    max_streams: int = 256
    max_choices: int = 16
    request_timeout_s: float = 600.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 120.0
    device: str | None = None
    max_batch_tokens: int = 1024
    # Longer than the engine's default: many streams each send a token, and
    # gathering them into one forward is what the gateway's throughput rests on
    # (a lone stream never waits: it is the whole batch).
    max_wait_ms: float = 5.0
    kv_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.upstream, str) or not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.upstream!r}")
        self.upstream = self.upstream.rstrip("/")
        choices = {
            "mode": ("strict", "loose"), "prompts": ("block", "annotate"), "token_ids": ("use", "request", "off"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_body_bytes", "max_response_bytes", "max_line_bytes", "max_streams", "max_choices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.token_ids == "request" and self.generator is None:
            raise ValueError("token_ids='request' needs the generator's tokenizer (generator=...) to judge the ids")
        for name in ("request_timeout_s", "upstream_connect_timeout_s", "upstream_read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")

    def public(self) -> dict[str, Any]:
        """The settings without secrets (for /health and logs)."""
        hidden = {"api_key", "upstream_api_key"}
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        upstream = httpx.URL(self.upstream)
        if upstream.userinfo:  # http://user:password@host sends basic auth: never print it
            settings["upstream"] = str(upstream.copy_with(username="***", password="***"))
        return settings


class GatewayError(Exception):
    """A request the gateway answers with an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers, self.extra = headers or {}, extra or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {**error, **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- verdicts on the wire -----------------------------------------------------


def verdict_json(verdict: Any) -> dict[str, Any] | None:
    if verdict is None:
        return None
    from integrations.cli import verdict_fields

    return verdict_fields(verdict)


def filter_results(verdict: Any, filtered: bool) -> dict[str, Any]:
    """Azure's ``content_filter_results`` shape, with the guard's category."""
    if verdict is None:
        return {}
    category = verdict.category or "unspecified"
    return {category: {"filtered": filtered, "severity": SEVERITY.get(verdict.risk_level, "safe")}}


def prompt_filter_results(verdict: Any, filtered: bool) -> list[dict[str, Any]]:
    results = filter_results(verdict, filtered) if verdict is not None and verdict.unsafe else {}
    return [{"prompt_index": 0, "content_filter_results": results, "crossguard": verdict_json(verdict)}]


# --- requests -------------------------------------------------------------------


# Content parts that hold text the model reads (OpenAI's chat and Responses
# shapes, and vLLM's extensions), and parts that are not text: the guard
# reads text only, so media are forwarded unjudged.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}  # fmt: skip
_MEDIA_PARTS = {"image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "file", "input_file"}


def _text_content(content: Any, *, strict: bool = True) -> str | None:
    """The text of a message's content: a str, or the text of a list of
    parts. ``strict``: a part of a kind the gateway does not know is refused
    (its text could reach the model unjudged); else it is read as text if
    it has some."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise GatewayError(400, f"message content must be a string or a list of parts, got {type(content).__name__}",
                           type="invalid_request_error", param="messages")  # fmt: skip
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            continue
        field = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        text = part.get(field or "text") if isinstance(part, dict) else None
        if (field is None and strict) or not isinstance(text, str):
            raise GatewayError(400, f"a content part of type {kind!r} that the moderating gateway cannot judge; "
                               f"text parts are {', '.join(sorted(_TEXT_PARTS))}", type="invalid_request_error",
                               param="messages")  # fmt: skip
        texts.append(text)
    return "".join(texts)


def guard_conversation(messages: Any) -> tuple[list[dict[str, Any]], str]:
    """(messages the guard's template takes, assistant prefill) from an
    OpenAI request's ``messages``: multi-part contents joined, ``developer``
    read as ``system``, ``function`` results as ``tool`` results, and a last
    assistant message taken as the start of the response."""
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty array of chat messages",
                           type="invalid_request_error", param="messages")  # fmt: skip
    converted = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GatewayError(400, f"messages[{number}] must be an object with a 'role'",
                               type="invalid_request_error", param="messages")  # fmt: skip
        role = {"developer": "system", "function": "tool"}.get(message["role"], message["role"])
        if role not in ("system", "user", "assistant", "tool"):
            raise GatewayError(400, f"messages[{number}] has an unknown role {message['role']!r}",
                               type="invalid_request_error", param="messages")  # fmt: skip
        item: dict[str, Any] = {"role": role, "content": _text_content(message.get("content"))}
        for name in ("tool_calls", "reasoning_content", "reasoning"):
            if message.get(name) and role == "assistant":
                item["reasoning_content" if name == "reasoning" else name] = message[name]
        converted.append(item)
    prefill = ""
    if converted[-1]["role"] == "assistant" and len(converted) > 1:
        prefill = converted.pop()["content"] or ""
    return converted, prefill


class _Metrics:
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


class Gateway:
    """The state behind the app: one guard, one engine, one upstream client."""

    def __init__(self, config: GatewayConfig, guard: Any = None, generator: Any = None) -> None:
        self.config = config
        self._guard = guard
        self._generator = generator
        self.engine: Any = None
        self.client: httpx.AsyncClient | None = None
        self.metrics = _Metrics()
        self._open = 0
        from guard import Policy

        self.policy = Policy(mode=config.mode)

    # --- lifetime -----------------------------------------------------------

    def start(self) -> None:
        """Load the guard (unless given) and the generator tokenizer, start the engine and the upstream client."""
        from guard import GuardEngine, StreamGuard
        from integrations.cli import load_generator_tokenizer

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

    async def read_body(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        too_big = GatewayError(413, f"the request body is larger than the gateway's limit of {limit:,} bytes",
                               type="invalid_request_error", code="request_too_large")  # fmt: skip
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            reason = "it nests too deep" if isinstance(error, RecursionError) else str(error)
            raise GatewayError(400, f"the request body is not valid JSON ({reason})",
                               type="invalid_request_error") from None  # fmt: skip
        if not isinstance(payload, dict):
            raise GatewayError(400, "the request body must be a JSON object", type="invalid_request_error")
        return payload

    def admit(self, cleanup: _Cleanup) -> None:
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


# --- one chat request -------------------------------------------------------------


class _Choice:
    """What the gateway tracks of one choice of a streamed response."""

    __slots__ = ("channel", "decoded", "decoders", "finished", "mode", "shown")

    def __init__(self) -> None:
        self.mode: Literal["ids", "text"] | None = None
        self.channel: Literal["reasoning", "main"] = "main"
        self.finished = False
        self.decoders: dict[str, SourceDecoder] = {}
        self.shown = {"reasoning": "", "main": ""}
        self.decoded = {"reasoning": "", "main": ""}


class _IdsMismatch(Exception):
    """The upstream's token ids do not decode to the text it sent (or cannot be
    split between reasoning and answer): the response is judged from text."""


class _BadChunk(Exception):
    """A chunk the gateway cannot read, so cannot judge: the stream fails closed."""


def _reasoning_text(fields: dict[str, Any]) -> str:
    """Reasoning under either name; both are judged when a server sends two different texts."""
    texts = [fields.get(name) or "" for name in ("reasoning", "reasoning_content")]
    if not all(isinstance(text, str) for text in texts):
        raise _BadChunk("reasoning that is not a string")
    return texts[0] if texts[0] == texts[1] else texts[0] + texts[1]


def _tool_arguments(index: int, fields: dict[str, Any], positions: bool) -> list[tuple[StreamKey, str]]:
    """(stream, arguments text) of every tool call (and legacy function call) in a delta or message."""
    found = []
    try:
        for position, call in enumerate(fields.get("tool_calls") or ()):
            arguments = (call.get("function") or {}).get("arguments") or ""
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            key = StreamKey(index, position if positions else call.get("index", position))
            found.append((key, arguments))
        legacy = (fields.get("function_call") or {}).get("arguments") or ""
    except (AttributeError, TypeError):
        raise _BadChunk("a malformed 'tool_calls' or 'function_call'") from None
    if legacy:
        found.append((StreamKey(index, "function_call"), legacy if isinstance(legacy, str) else json.dumps(legacy)))
    return [(key, arguments) for key, arguments in found if arguments]


class ChatRequest:
    """One ``POST /v1/chat/completions``: the guard streams, the prompt's verdict, the choices."""

    def __init__(self, gateway: Gateway, payload: dict[str, Any]) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.payload = payload
        self.deadline = time.monotonic() + self.config.request_timeout_s
        self.failed_open = False  # the guard failed and the gateway fails open: text goes out unjudged
        stream = payload.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise GatewayError(400, "'stream' must be true or false", type="invalid_request_error", param="stream")
        self.stream = bool(stream)
        choices = payload.get("n", 1)
        if choices is not None and (isinstance(choices, bool) or not isinstance(choices, int)
                                    or not 1 <= choices <= self.config.max_choices):  # fmt: skip
            raise GatewayError(400, f"'n' must be a whole number from 1 to {self.config.max_choices} (the gateway "
                               "judges every choice)", type="invalid_request_error", param="n")  # fmt: skip
        self.messages, self.prefill = guard_conversation(payload.get("messages"))
        self.use_ids = (
            gateway.generator is not None and self.config.token_ids != "off" and not self.prefill
            and not payload.get("tools") and not payload.get("functions")
        )  # fmt: skip
        self.streams = self._new_streams()
        self.choices: dict[int, _Choice] = {}
        self.query_verdict: Any = None
        self.request_id = uuid.uuid4().hex[:12]

    def _new_streams(self) -> GuardStreams:
        return GuardStreams(
            self.gateway.engine, self.messages, policy=self.gateway.policy,
            judge_tool_calls=self.config.judge_tool_calls, response_prefix=self.prefill,
            source_tokenizer=self.gateway.generator if self.use_ids else None,
        )  # fmt: skip

    def judge_from_text(self) -> GuardStreams:
        """Start judging over, from the text (after ids that do not match it);
        returns the old streams, for the caller to close."""
        old = self.streams
        self.use_ids = False
        self.streams = self._new_streams()
        self.choices = {}
        return old

    def remaining(self) -> float:
        """Seconds left before the request's time limit."""
        return self.deadline - time.monotonic()

    def upstream_body(self) -> dict[str, Any]:
        body = dict(self.payload)
        if self.config.token_ids == "request" and self.gateway.generator is not None:
            body["return_token_ids"] = True
        return body

    async def judge_prompt(self) -> None:
        """Judge the conversation before anything is forwarded; refuse it in block mode."""
        verdict = self.query_verdict = await self.gateway.run(self.streams.judge_prompt)
        unsafe = verdict is not None and self.gateway.policy.counts_as_unsafe(verdict.risk_level)
        if not unsafe:
            return
        self.gateway.metrics.flags.labels("prompt", verdict.category or "unspecified").inc()
        if self.config.prompts == "annotate":
            return
        self.gateway.metrics.requests.labels("prompt_blocked").inc()
        raise GatewayError(
            400, f"The prompt was refused by the moderating gateway (Qwen3Guard-Stream: {verdict.risk_level}, "
            f"{verdict.category}).", type="invalid_request_error", code="content_filter", param="prompt",
            extra={"status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                  "content_filter_result": filter_results(verdict, True)},
                   "crossguard": {"verdict": verdict_json(verdict)}},
        )  # fmt: skip

    # --- streaming ------------------------------------------------------------

    def choice(self, index: int) -> _Choice:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _Choice()
        return state

    def deltas(self, chunk: dict[str, Any]) -> list[tuple[StreamKey, Any, bool]]:
        """(stream, text or ids, reasoning?) for every generated text a chunk
        carries. In text mode the chunk's ``token_ids`` and ``logprobs`` are
        removed: they could spell out text the guard has not judged yet."""
        deltas: list[tuple[StreamKey, Any, bool]] = []
        choices = chunk.get("choices")
        choices = [] if choices is None else choices
        if not isinstance(choices, list):
            raise _BadChunk("'choices' is not an array")
        for choice in choices:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            delta = (choice.get("delta") or {}) if isinstance(choice, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(delta, dict):
                raise _BadChunk("a choice without an integer 'index' and an object 'delta'")
            state = self.choice(index)
            if choice.get("finish_reason") is not None:
                state.finished = True
            reasoning = _reasoning_text(delta)
            content = delta.get("content") or ""
            refusal = delta.get("refusal") or ""
            if not isinstance(content, str) or not isinstance(refusal, str):
                raise _BadChunk("a delta whose content or refusal is not a string")
            ids = choice.get("token_ids")
            if state.mode is None and (reasoning or content or ids):
                state.mode = "ids" if self.use_ids and isinstance(ids, list) else "text"
            if state.mode == "ids":
                deltas += self._id_deltas(index, state, ids, reasoning, content)
            else:
                choice.pop("token_ids", None)
                choice.pop("logprobs", None)
                if reasoning:
                    deltas.append((StreamKey(index), reasoning, True))
                if content:
                    deltas.append((StreamKey(index), content, False))
            if refusal:
                deltas.append((StreamKey(index, "refusal"), refusal, False))
            deltas += [(key, arguments, False) for key, arguments in _tool_arguments(index, delta, positions=False)]
        return deltas

    def _id_deltas(self, index: int, state: _Choice, ids: Any, reasoning: str, content: str) -> list:
        if not isinstance(ids, list):
            if reasoning or content:
                raise _IdsMismatch(f"choice {index} sent text without token ids after sending ids")
            return []
        if reasoning and content:
            raise _IdsMismatch(f"choice {index} sent reasoning and answer in one delta, so its ids cannot be split")
        if content:
            state.channel = "main"
        elif reasoning:
            state.channel = "reasoning"
        channel = state.channel
        state.shown[channel] += content if channel == "main" else reasoning
        decoder = state.decoders.get(channel)
        if decoder is None:
            decoder = state.decoders[channel] = SourceDecoder(self.gateway.generator)
        state.decoded[channel] += "".join(piece.text for piece in decoder.push(ids))
        # The chunk is released once its ids are judged, so the text it shows
        # must already be there in the ids' text: a server that sends text
        # before its ids, or other text than its ids, is judged from text.
        if not state.decoded[channel].startswith(state.shown[channel]):
            raise _IdsMismatch(f"choice {index}'s token ids do not decode to the text it sent")
        return [(StreamKey(index), ids, channel == "reasoning")] if ids else []

    def check_ids_cover_text(self) -> None:
        """At the end: every character shown must be judged text of the ids."""
        for index, state in self.choices.items():
            if state.mode != "ids":
                continue
            for channel, decoder in state.decoders.items():
                state.decoded[channel] += "".join(piece.text for piece in decoder.flush())
                if not state.decoded[channel].startswith(state.shown[channel]):
                    raise _IdsMismatch(f"choice {index}'s token ids do not cover the text it sent")

    def mode(self, index: int) -> str:
        state = self.choices.get(index)
        return state.mode if state is not None and state.mode is not None else ("ids" if self.use_ids else "text")

    def flag_metadata(self, key: StreamKey, verdict: Any, withheld_from: int | None) -> dict[str, Any]:
        details: dict[str, Any] = {"flagged": True, "mode": self.mode(key.choice), "stream": str(key),
                                   "choice": key.choice, "tool_call": key.tool_call}  # fmt: skip
        if withheld_from is not None:
            unit = "generator_token" if self.streams.is_id_stream(key) else "delta"
            details["withheld_from"] = {unit: withheld_from}
        return {**details, "verdict": verdict_json(verdict), "request": self.request_id}

    def cut_chunk(self, template: dict[str, Any], key: StreamKey, verdict: Any, withheld_from: int | None) -> dict:
        """The last chunk of a cut stream: ``content_filter`` for every choice still open."""
        open_choices = sorted(index for index, state in self.choices.items() if not state.finished) or [key.choice]
        choices = []
        for index in open_choices:
            filtered = index == key.choice
            choices.append({
                "index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter",
                "content_filter_results": filter_results(verdict, True) if filtered else {},
            })  # fmt: skip
        return {**template, "choices": choices, "crossguard": self.flag_metadata(key, verdict, withheld_from)}


def _sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _error_event(message: str, type: str, code: str) -> bytes:
    return _sse({"error": {"message": message, "type": type, "param": None, "code": code}})


def _json(data: bytes | str) -> Any:
    """Parsed JSON, or ``_BadChunk`` (for text that is not JSON, or nests too deep)."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise _BadChunk(f"not JSON ({type(error).__name__})") from None


def _upstream_message(event: Any) -> str:
    error = event.get("error") if isinstance(event, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return (message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))[:500]


async def _lines(response: httpx.Response, limit: int) -> AsyncIterator[str]:
    """The SSE lines of a response, each at most ``limit`` bytes."""
    buffer = b""
    async for part in response.aiter_bytes():
        buffer += part
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        if len(buffer) > limit:
            raise _BadChunk(f"a line longer than the gateway's limit of {limit:,} bytes")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


class _Relay:
    """Re-emits one upstream stream through the guard (see the module docstring).

    Every chunk goes through a ``StreamGate``, which releases it once its text
    is judged. If the upstream's token ids turn out not to match its text, the
    response is judged afresh from its text: the chunks seen so far are
    replayed into a text-mode gate, and only those not sent yet go out.
    """

    def __init__(self, gateway: Gateway, chat: ChatRequest, response: httpx.Response) -> None:
        self.gateway, self.chat, self.response = gateway, chat, response
        self.gate: StreamGate = StreamGate(chat.streams)
        self.template: dict[str, Any] = {"id": f"chatcmpl-{chat.request_id}", "object": "chat.completion.chunk",
                                         "created": int(time.time()), "model": chat.payload.get("model", "")}
        self.outcome = "completed"
        self.failed_open = chat.failed_open
        self.history: list[dict[str, Any]] = []  # chunks given to the gate, in order
        self.sent: set[int] = set()  # id() of the chunks sent
        self.starts: dict[int, dict[StreamKey, int]] = {}  # per chunk: first source index of each stream it feeds

    def _learn(self, chunk: dict[str, Any]) -> None:
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in chunk:
                self.template[name] = chunk[name]

    async def events(self, cleanup: _Cleanup) -> AsyncIterator[bytes]:
        gateway, chat = self.gateway, self.chat
        try:
            yield _sse({**self.template, "choices": [],
                        "prompt_filter_results": prompt_filter_results(chat.query_verdict, False)})  # fmt: skip
            async for event in self._relay():
                yield event
        except BaseException:
            self.outcome = "client_gone" if self.outcome == "completed" else self.outcome
            raise
        finally:
            gateway.metrics.requests.labels(self.outcome).inc()
            await cleanup.run()  # closes the upstream connection (the generator stops) and frees the guard

    async def _relay(self) -> AsyncIterator[bytes]:
        gateway, chat = self.gateway, self.chat
        lines = _lines(self.response, gateway.config.max_line_bytes)
        try:
            while True:
                remaining = chat.remaining()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    line = await asyncio.wait_for(anext(lines), remaining)
                except StopAsyncIteration:
                    # The body ended without [DONE]: the upstream dropped the stream.
                    raise httpx.RemoteProtocolError("the upstream stream ended without data: [DONE]") from None
                if line.startswith("error:"):  # llama.cpp's error event
                    line = "data:" + json.dumps({"error": {"message": line[6:].strip()}})
                if not line.startswith("data:"):
                    continue  # blank separators, ': ping' comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = _json(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    # The upstream failed mid-stream: what the guard has not released stays withheld.
                    self.outcome = "upstream_error"
                    gateway.metrics.upstream_errors.labels("error_event").inc()
                    yield _error_event(f"the upstream server failed mid-stream: {_upstream_message(chunk)}",
                                       "upstream_error", "upstream_error_event")  # fmt: skip
                    yield _sse("[DONE]")
                    return
                if not isinstance(chunk, dict):
                    raise _BadChunk("a chunk that is not a JSON object")
                self._learn(chunk)
                if self.failed_open:
                    yield _sse(chunk)
                    continue
                async for event in self._judge(chunk):
                    yield event
                if self.gate.flag is not None:
                    return
        except TimeoutError:
            self.outcome = "timeout"
            yield _error_event(f"the request took longer than the gateway's limit of "
                               f"{gateway.config.request_timeout_s:g} s", "timeout_error", "timeout")  # fmt: skip
            yield _sse("[DONE]")
            return
        except _BadChunk as error:
            gateway.metrics.upstream_errors.labels("bad_chunk").inc()
            message = f"the upstream sent a chunk the gateway cannot judge: {error}"
            async for event in self._guard_failed(error, message):
                yield event
            return
        except (httpx.TransportError, httpx.StreamError) as error:
            self.outcome = "upstream_error"
            gateway.upstream_error("dropped", error)
            yield _error_event(f"the upstream server's stream broke off ({error or type(error).__name__}); the "
                               "answer is incomplete", "upstream_error", "upstream_dropped")  # fmt: skip
            yield _sse("[DONE]")
            return
        finally:
            await lines.aclose()
        async for event in self._finish():
            yield event

    async def _push(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Give a chunk to the gate; the chunks now ready that were not sent before."""
        chat = self.chat
        deltas = chat.deltas(chunk)
        self.starts[id(chunk)] = {key: chat.streams.pushed(key) for key, *_ in deltas}
        self.history.append(chunk)
        ready = await self.gateway.run(self.gate.push, chunk, deltas)
        fresh = [item for item in ready if id(item) not in self.sent]
        self.sent.update(id(item) for item in ready)
        return fresh

    async def _judge_from_text(self, chunk: dict[str, Any] | None, error: _IdsMismatch) -> list[dict[str, Any]]:
        log.warning("request %s: %s; judging the response from its text instead", self.chat.request_id, error)
        self.gateway.close_later(self.chat.judge_from_text())
        self.gate = StreamGate(self.chat.streams)
        replay, self.history, self.starts = [*self.history, *([chunk] if chunk else [])], [], {}
        ready = []
        for item in replay:
            ready += await self._push(item)
            if self.gate.flag is not None:
                break
        return ready

    async def _judge(self, chunk: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            try:
                ready = await self._push(chunk)
            except _IdsMismatch as error:
                ready = await self._judge_from_text(chunk, error)
        except _BadChunk:
            raise
        except Exception as error:  # fail closed (or open) on any guard failure
            async for event in self._guard_failed(error):
                yield event
            return
        for item in ready:
            yield _sse(item)
        if self.gate.flag is not None:
            yield self._cut()

    async def _finish(self) -> AsyncIterator[bytes]:
        if self.failed_open:
            yield _sse("[DONE]")
            return
        try:
            try:
                self.chat.check_ids_cover_text()
            except _IdsMismatch as error:
                for item in await self._judge_from_text(None, error):
                    yield _sse(item)
                if self.gate.flag is not None:
                    yield self._cut()
                    return
            ready = await self.gateway.run(self.gate.finish)
        except Exception as error:
            async for event in self._guard_failed(error):
                yield event
            return
        ready = [item for item in ready if id(item) not in self.sent]
        if self.gate.flag is not None:
            # The end of the turn flagged: its finish chunk gives way to ours.
            ready = [item for item in ready if not any(c.get("finish_reason") for c in item.get("choices") or ())]
        for item in ready:
            yield _sse(item)
        if self.gate.flag is not None:
            yield self._cut()
        yield _sse("[DONE]")

    def _withheld_from(self, key: StreamKey) -> int | None:
        """The first source index (generator token, or delta) of the flagged
        stream in a chunk that was not sent: where the client's text stops."""
        for chunk in self.history:
            start = self.starts.get(id(chunk), {}).get(key)
            if start is not None and id(chunk) not in self.sent:
                return start
        withholder = self.gate.withholders.get(key)
        return withholder.withheld[0].index if withholder is not None and withholder.withheld else None

    def _cut(self) -> bytes:
        key, verdict = self.gate.flag
        self.outcome = "flagged"
        self.gateway.metrics.flags.labels("response", getattr(verdict, "category", None) or "unspecified").inc()
        log.info("request %s: %s flagged (%s), stream cut", self.chat.request_id, key,
                 getattr(verdict, "category", None))  # fmt: skip
        cut = self.chat.cut_chunk(self.template, key, verdict, self._withheld_from(key))
        return _sse(cut) + _sse("[DONE]")

    async def _guard_failed(self, error: BaseException, message: str | None = None) -> AsyncIterator[bytes]:
        self.gateway.metrics.guard_errors.inc()
        log.error("request %s: guard failed: %r", self.chat.request_id, error)
        if self.gateway.config.fail_open:
            self.failed_open = True
            self.outcome = "failed_open"
            for item in self.gate.release_all():
                if id(item) not in self.sent:
                    yield _sse(item)
            return
        self.outcome = "guard_error"
        code = "guard_error"
        if message is None and isinstance(error, EngineCapacityError):
            message = "the moderation guard is at capacity; the answer was stopped (retry shortly)"
            code = "guard_capacity"
        text = message or f"the moderation guard failed ({type(error).__name__}); the answer was stopped"
        yield _error_event(text, "server_error", code)
        yield _sse("[DONE]")
        self.gate.flag = (StreamKey(0), None)  # stops the relay


async def _within_limits(gateway: Gateway, chat: ChatRequest, request: Request, work: Any) -> Any:
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


async def _read_completion(gateway: Gateway, chat: ChatRequest, response: httpx.Response, request: Request) -> bytes:
    """The upstream's whole answer, within the time and size limits."""
    limit = gateway.config.max_response_bytes

    async def read() -> bytes:
        body = bytearray()
        try:
            async for part in response.aiter_bytes():
                body += part
                if len(body) > limit:
                    raise gateway.upstream_error("too_large", f"the answer is larger than the gateway's limit of "
                                                              f"{limit:,} bytes")  # fmt: skip
        except httpx.TimeoutException as error:
            raise gateway.upstream_error("timeout", error) from None
        except (httpx.TransportError, httpx.StreamError) as error:
            raise gateway.upstream_error("dropped", error) from None
        return bytes(body)

    return await _within_limits(gateway, chat, request, read())


# Fields of a flagged choice that are kept: everything else (token ids,
# logprobs, tool calls, reasoning) could spell out the withheld answer.
_FLAGGED_CHOICE_FIELDS = ("index",)


async def _completion(gateway: Gateway, chat: ChatRequest, body: bytes) -> JSONResponse:
    """A non-streamed answer, judged whole as a stream would be; flagged choices
    get the refusal and ``finish_reason: "content_filter"``."""
    try:
        data = _json(body)
    except _BadChunk as error:
        raise gateway.upstream_error("bad_response", f"the upstream's answer is {error}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise gateway.upstream_error("bad_response", "the upstream's answer has no 'choices' array of objects")
    try:
        flagged = await gateway.run(_judge_completion, chat, choices)
    except _BadChunk as error:
        raise gateway.upstream_error("bad_response", f"the upstream's answer cannot be judged: {error}") from None
    except Exception as error:
        gateway.metrics.guard_errors.inc()
        log.error("request %s: guard failed: %r", chat.request_id, error)
        if not gateway.config.fail_open:
            raise GatewayError(500, f"the moderation guard failed ({type(error).__name__})",
                               type="server_error", code="guard_error") from error  # fmt: skip
        flagged = {}
    for number, choice in enumerate(choices):
        index = choice.get("index", 0)
        if index in flagged:
            key, verdict = flagged[index]
            choices[number] = {
                **{name: choice[name] for name in _FLAGGED_CHOICE_FIELDS if name in choice},
                "message": {"role": "assistant", "content": gateway.config.refusal}, "logprobs": None,
                "finish_reason": "content_filter", "content_filter_results": filter_results(verdict, True),
                "crossguard": chat.flag_metadata(key, verdict, None),
            }  # fmt: skip
            gateway.metrics.flags.labels("response", getattr(verdict, "category", None) or "unspecified").inc()
        else:
            choice["content_filter_results"] = {}
            choice["crossguard"] = {"flagged": False, "mode": chat.mode(index)}
    data["prompt_filter_results"] = prompt_filter_results(chat.query_verdict, False)
    gateway.metrics.requests.labels("flagged" if flagged else "completed").inc()
    return JSONResponse(data)


def _judge_completion(chat: ChatRequest, choices: list[dict[str, Any]]) -> dict[int, tuple[StreamKey, Any]]:
    """Judge every choice's texts; (stream, verdict) that flagged each flagged choice."""
    streams = chat.streams
    for choice in choices:
        index, message = choice.get("index", 0), choice.get("message") or {}
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(message, dict):
            raise _BadChunk("a choice without an integer 'index' and an object 'message'")
        key = StreamKey(index)
        try:
            content = _text_content(message.get("content"), strict=False)
        except GatewayError:
            content = None
        refusal = message.get("refusal") or ""
        if content is None or not isinstance(refusal, str):
            raise _BadChunk("a message whose content or refusal is not text")
        reasoning = _reasoning_text(message)
        ids = choice.get("token_ids")
        state = chat.choice(index)
        state.mode = "text"
        if chat.use_ids and isinstance(ids, list) and ids and not reasoning and not message.get("tool_calls"):
            decoder = SourceDecoder(chat.gateway.generator)
            decoded = "".join(piece.text for piece in decoder.push(ids) + decoder.flush())
            if decoded == content:
                state.mode = "ids"
        if state.mode == "ids":
            streams.push_ids(key, ids)
        else:
            if reasoning:
                streams.push(key, reasoning, reasoning=True)
            streams.push(key, content)
        if refusal:
            streams.push(StreamKey(index, "refusal"), refusal)
        for tool_key, arguments in _tool_arguments(index, message, positions=True):
            streams.push(tool_key, arguments)
    streams.finish_all()
    flagged: dict[int, tuple[StreamKey, Any]] = {}
    for key in streams.flagged:
        flagged.setdefault(key.choice, (key, streams.flag(key)))
    return flagged


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
        return _passthrough(upstream, upstream.content)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gateway.check_key(request)
        payload = await gateway.read_body(request)
        cleanup = _Cleanup(gateway)
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
                    raise _guard_failure(gateway, chat, error) from error
                chat.failed_open = True
            response = await _within_limits(gateway, chat, request, gateway.send(chat, request))
            cleanup.response = response
            status = response.status_code
            if response.is_redirect or 300 <= status < 400:
                # Never hand a client a way around the guard (an SDK follows redirects).
                raise gateway.upstream_error("redirect", f"the upstream answered HTTP {status} (a redirect)")
            if not response.is_success:
                body = await _read_completion(gateway, chat, response, request)
                gateway.metrics.upstream_errors.labels(f"status_{status}").inc()
                gateway.metrics.requests.labels("upstream_error").inc()
                return _passthrough(response, body)
            streamed = response.headers.get("content-type", "").startswith("text/event-stream")
            if not chat.stream or not streamed:
                return await _completion(gateway, chat, await _read_completion(gateway, chat, response, request))
            relay = _Relay(gateway, chat, response)
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


def _guard_failure(gateway: Gateway, chat: ChatRequest, error: BaseException) -> GatewayError:
    gateway.metrics.guard_errors.inc()
    log.error("request %s: guard failed on the prompt: %r", chat.request_id, error)
    if isinstance(error, EngineCapacityError):
        gateway.metrics.requests.labels("overloaded").inc()
        return GatewayError(503, f"the moderation guard is at capacity: {error}", type="server_error",
                            code="guard_capacity", headers={"retry-after": "1"})  # fmt: skip
    gateway.metrics.requests.labels("guard_error").inc()
    return GatewayError(500, f"the moderation guard failed on the prompt ({type(error).__name__}: {error})",
                        type="server_error", code="guard_error")  # fmt: skip


class _Cleanup:
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


def _passthrough(upstream: httpx.Response, body: bytes) -> Response:
    headers = {name: value for name, value in upstream.headers.items()
               if name.lower() not in _HOP_HEADERS and name.lower() not in ("location", "set-cookie")}  # fmt: skip
    return Response(body, status_code=upstream.status_code, headers=headers)
