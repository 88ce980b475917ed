"""The upstream relay: a streamed answer re-emitted chunk by chunk through the
guard (``Relay``), or a non-streamed one read whole and judged (``completion``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse

from guard import EngineCapacityError
from integrations.gateway.chunks import (
    IdsMismatch,
    check_ids_cover_text,
    cut_chunk,
    judge_completion,
    read_deltas,
    rewrite_completion,
)
from integrations.gateway.limits import Cleanup, within_limits
from integrations.gateway.prompt import ChatRequest
from integrations.gateway.sse import sse_lines, upstream_message
from integrations.gateway.wire import BadChunk, GatewayError, error_event, parse_json, prompt_filter_results, sse
from integrations.streams import StreamKey
from integrations.withhold import StreamGate

if TYPE_CHECKING:
    from integrations.gateway.app import Gateway

__all__ = ["Relay", "completion", "read_completion"]

log = logging.getLogger("crossguard.gateway")


class Relay:
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

    async def events(self, cleanup: Cleanup) -> AsyncIterator[bytes]:
        gateway, chat = self.gateway, self.chat
        try:
            yield sse({**self.template, "choices": [],
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
        lines = sse_lines(self.response, gateway.config.max_line_bytes)
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
                chunk = parse_json(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    # The upstream failed mid-stream: what the guard has not released stays withheld.
                    self.outcome = "upstream_error"
                    gateway.metrics.upstream_errors.labels("error_event").inc()
                    yield error_event(f"the upstream server failed mid-stream: {upstream_message(chunk)}",
                                       "upstream_error", "upstream_error_event")  # fmt: skip
                    yield sse("[DONE]")
                    return
                if not isinstance(chunk, dict):
                    raise BadChunk("a chunk that is not a JSON object")
                self._learn(chunk)
                if self.failed_open:
                    yield sse(chunk)
                    continue
                async for event in self._judge(chunk):
                    yield event
                if self.gate.flag is not None:
                    return
        except TimeoutError:
            self.outcome = "timeout"
            yield error_event(f"the request took longer than the gateway's limit of "
                               f"{gateway.config.request_timeout_s:g} s", "timeout_error", "timeout")  # fmt: skip
            yield sse("[DONE]")
            return
        except BadChunk as error:
            gateway.metrics.upstream_errors.labels("bad_chunk").inc()
            message = f"the upstream sent a chunk the gateway cannot judge: {error}"
            async for event in self._guard_failed(error, message):
                yield event
            return
        except (httpx.TransportError, httpx.StreamError) as error:
            self.outcome = "upstream_error"
            gateway.upstream_error("dropped", error)
            yield error_event(f"the upstream server's stream broke off ({error or type(error).__name__}); the "
                               "answer is incomplete", "upstream_error", "upstream_dropped")  # fmt: skip
            yield sse("[DONE]")
            return
        finally:
            await lines.aclose()
        async for event in self._finish():
            yield event

    async def _push(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Give a chunk to the gate; the chunks now ready that were not sent before."""
        chat = self.chat
        deltas = read_deltas(chat, chunk)
        self.starts[id(chunk)] = {key: chat.streams.pushed(key) for key, *_ in deltas}
        self.history.append(chunk)
        ready = await self.gateway.run(self.gate.push, chunk, deltas)
        fresh = [item for item in ready if id(item) not in self.sent]
        self.sent.update(id(item) for item in ready)
        return fresh

    async def _judge_from_text(self, chunk: dict[str, Any] | None, error: IdsMismatch) -> list[dict[str, Any]]:
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
            except IdsMismatch as error:
                ready = await self._judge_from_text(chunk, error)
        except BadChunk:
            raise
        except Exception as error:  # fail closed (or open) on any guard failure
            async for event in self._guard_failed(error):
                yield event
            return
        for item in ready:
            yield sse(item)
        if self.gate.flag is not None:
            yield self._cut()

    async def _finish(self) -> AsyncIterator[bytes]:
        if self.failed_open:
            yield sse("[DONE]")
            return
        try:
            try:
                check_ids_cover_text(self.chat)
            except IdsMismatch as error:
                for item in await self._judge_from_text(None, error):
                    yield sse(item)
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
            yield sse(item)
        if self.gate.flag is not None:
            yield self._cut()
        yield sse("[DONE]")

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
        cut = cut_chunk(self.chat, self.template, key, verdict, self._withheld_from(key))
        return sse(cut) + sse("[DONE]")

    async def _guard_failed(self, error: BaseException, message: str | None = None) -> AsyncIterator[bytes]:
        self.gateway.metrics.guard_errors.inc()
        log.error("request %s: guard failed: %r", self.chat.request_id, error)
        if self.gateway.config.fail_open:
            self.failed_open = True
            self.outcome = "failed_open"
            for item in self.gate.release_all():
                if id(item) not in self.sent:
                    yield sse(item)
            return
        self.outcome = "guard_error"
        code = "guard_error"
        if message is None and isinstance(error, EngineCapacityError):
            message = "the moderation guard is at capacity; the answer was stopped (retry shortly)"
            code = "guard_capacity"
        text = message or f"the moderation guard failed ({type(error).__name__}); the answer was stopped"
        yield error_event(text, "server_error", code)
        yield sse("[DONE]")
        self.gate.flag = (StreamKey(0), None)  # stops the relay


async def read_completion(gateway: Gateway, chat: ChatRequest, response: httpx.Response, request: Request) -> bytes:
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

    return await within_limits(gateway, chat, request, read())


async def completion(gateway: Gateway, chat: ChatRequest, body: bytes) -> JSONResponse:
    """A non-streamed answer, judged whole as a stream would be; flagged choices
    get the refusal and ``finish_reason: "content_filter"``."""
    try:
        data = parse_json(body)
    except BadChunk as error:
        raise gateway.upstream_error("bad_response", f"the upstream's answer is {error}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise gateway.upstream_error("bad_response", "the upstream's answer has no 'choices' array of objects")
    try:
        flagged = await gateway.run(judge_completion, chat, choices)
    except BadChunk as error:
        raise gateway.upstream_error("bad_response", f"the upstream's answer cannot be judged: {error}") from None
    except Exception as error:
        gateway.metrics.guard_errors.inc()
        log.error("request %s: guard failed: %r", chat.request_id, error)
        if not gateway.config.fail_open:
            raise GatewayError(500, f"the moderation guard failed ({type(error).__name__})",
                               type="server_error", code="guard_error") from error  # fmt: skip
        flagged = {}
    rewrite_completion(chat, data, flagged)
    for _key, verdict in flagged.values():
        gateway.metrics.flags.labels("response", getattr(verdict, "category", None) or "unspecified").inc()
    gateway.metrics.requests.labels("flagged" if flagged else "completed").inc()
    return JSONResponse(data)
