"""The upstream relay: a streamed answer re-emitted chunk by chunk through the
guard (``Relay``), or a non-streamed one read whole and judged (``completion``).

A streamed answer is read in batches: every event that has arrived while the
guard judged the last batch is read, rebuilt (``chunks``) and given to the
``StreamGate`` in one call on the engine's threads, and what the gate
releases goes out in one write. A lone stream's batches are single chunks;
under load, batches grow and the gateway's own cost per chunk falls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse

from guard import ContextLengthError, EngineCapacityError
from integrations.gateway.chunks import ChunkReader, IdsMismatch, TooManyToolCalls, cut_chunk, rewrite_completion
from integrations.gateway.limits import Cleanup, Ticket, within_limits
from integrations.gateway.prompt import ChatRequest
from integrations.gateway.sse import EventReader
from integrations.gateway.wire import (
    BadChunk,
    GatewayError,
    error_event,
    parse_json,
    prompt_filter_results,
    sse,
)
from integrations.streams import GuardStreams, StreamKey
from integrations.withhold import StreamGate

if TYPE_CHECKING:
    from integrations.gateway.app import Gateway

__all__ = ["Relay", "completion", "guard_failure", "read_completion"]

log = logging.getLogger("crossguard.gateway")

DONE = sse("[DONE]")


class _NoSession(Exception):
    """A stream of the answer cannot open: its guard session would take one another request reserved."""


def _upstream_error_code(event: Any) -> int | str | None:
    """The status or code of an upstream error event, if it is one (never its text)."""
    error = event.get("error") if isinstance(event, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    return None


def open_streams(admission: Any, ticket: Ticket, streams: GuardStreams, deltas: list,
                 opening: set[StreamKey]) -> None:  # fmt: skip
    """Count the guard session of every stream these deltas open (``opening``:
    those counted already but not open yet; the first stream takes the
    session that judged the prompt)."""
    for key, delta, _reasoning in deltas:
        if not delta or not streams.judges(key) or streams.is_open(key) or key in opening:
            continue
        if (streams.keys or opening) and not admission.take_session(ticket):
            raise _NoSession(f"the {key} stream needs a guard session, and none is free")
        opening.add(key)


class Relay:
    """Re-emits one upstream stream through the guard (see the module docstring).

    Every chunk goes through a ``StreamGate``, which releases it once its text
    is judged. If the upstream's token ids turn out not to match its text, the
    response is judged afresh from its text: the chunks seen so far are read
    again by a text-mode reader into a new gate, and only those not sent yet
    go out.
    """

    def __init__(self, gateway: Gateway, chat: ChatRequest, response: httpx.Response, cleanup: Cleanup) -> None:
        self.gateway, self.chat, self.response, self.cleanup = gateway, chat, response, cleanup
        config = gateway.config
        self.reader = ChunkReader(chat, use_ids=chat.use_ids)
        self.gate: StreamGate = StreamGate(chat.streams)
        self.head = self.reader.head({}, "chat.completion.chunk")
        self.outcome = "completed"
        self.failed_open = chat.failed_open
        self.events_in = EventReader(response, max_line_bytes=config.max_line_bytes,
                                     max_bytes=config.max_response_bytes)  # fmt: skip
        self.seq = 0
        # The chunks read, by number, while ids are judged (a mismatch reads them again as text).
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.sent: set[int] = set()  # numbers of the chunks sent
        self.held: dict[int, int] = {}  # chunks given to the gate and not released: number -> bytes
        self.starts: dict[int, dict[StreamKey, int]] = {}  # per chunk: first source index of each stream it feeds

    # --- the stream -------------------------------------------------------------

    async def events(self) -> AsyncIterator[bytes]:
        gateway, chat = self.gateway, self.chat
        try:
            yield sse({**self.head, "choices": [], "prompt_filter_results": prompt_filter_results(
                chat.query_verdict, False)})  # fmt: skip
            async for event in self._relay():
                yield event
        except BaseException:
            self.outcome = "client_gone" if self.outcome == "completed" else self.outcome
            raise
        finally:
            gateway.metrics.requests.labels(self.outcome).inc()
            await self.events_in.aclose()
            await self.cleanup.run()  # closes the upstream connection (the generator stops) and frees the guard

    async def _relay(self) -> AsyncIterator[bytes]:
        gateway = self.gateway
        try:
            done = False
            while not done:
                batch = await self._within_time(self.events_in.batch())
                if not batch:
                    # The body ended without [DONE]: the upstream dropped the stream.
                    raise httpx.RemoteProtocolError("the upstream stream ended without data: [DONE]")
                chunks: list[tuple[dict[str, Any], int]] = []
                for kind, data in batch:
                    if kind == "data" and data.strip() == b"[DONE]":
                        done = True
                        break
                    chunk = parse_json(data) if kind == "data" else {"error": data}
                    if not isinstance(chunk, dict):
                        raise BadChunk("a chunk that is not a JSON object")
                    if kind == "error" or chunk.get("error"):
                        async for event in self._upstream_failed(chunk):
                            yield event
                        return
                    chunks.append((chunk, len(data)))
                if not chunks:
                    continue
                if self.failed_open:
                    out = []
                    for chunk, _size in chunks:
                        rebuilt, _deltas = self.reader.read_chunk(chunk)
                        out.append(sse(rebuilt))
                    yield b"".join(out)
                    continue
                async for event in self._judge(chunks):
                    yield event
                if self.gate.flag is not None:
                    return
        except TimeoutError:
            self.outcome = "timeout"
            yield error_event(f"the request took longer than the gateway's limit of "
                              f"{gateway.config.request_timeout_s:g} s", "timeout_error", "timeout")  # fmt: skip
            yield DONE
            return
        except BadChunk as error:
            gateway.metrics.upstream_errors.labels("too_many_tool_calls" if isinstance(error, TooManyToolCalls)
                                                   else "bad_chunk").inc()  # fmt: skip
            message = f"the upstream sent a chunk the gateway cannot judge: {error}"
            if isinstance(error, TooManyToolCalls):
                message = f"the answer was stopped: {error}"
            async for event in self._guard_failed(error, message):
                yield event
            return
        except (httpx.TransportError, httpx.StreamError) as error:
            self.outcome = "upstream_error"
            gateway.upstream_error("dropped", error)
            yield error_event("the upstream server's stream broke off; the answer is incomplete", "upstream_error",
                              "upstream_dropped")  # fmt: skip
            yield DONE
            return
        async for event in self._finish():
            yield event

    async def _within_time(self, work: Any) -> Any:
        """``work`` within the request's time limit (TimeoutError past it).
        ``asyncio.timeout``, not ``wait_for``: no task made per call."""
        async with asyncio.timeout(self.chat.remaining()):
            return await work

    async def _upstream_failed(self, event: dict[str, Any]) -> AsyncIterator[bytes]:
        # The upstream failed mid-stream: what the guard has not released stays
        # withheld, and its message (which may quote the model) stays in the log.
        self.outcome = "upstream_error"
        self.gateway.metrics.upstream_errors.labels("error_event").inc()
        log.warning("request %s: the upstream failed mid-stream: %.500r", self.chat.request_id, event.get("error"))
        error = {"message": "the upstream server failed mid-stream; the answer is incomplete",
                 "type": "upstream_error", "param": None, "code": "upstream_error_event"}  # fmt: skip
        status = _upstream_error_code(event)
        if status is not None:
            error["upstream_status"] = status
        yield sse({"error": error})
        yield DONE

    # --- judging ------------------------------------------------------------------

    def _push(self, chunks: list[tuple[dict[str, Any], int]]) -> list[tuple[int, dict[str, Any]]]:
        """On an engine thread: read the chunks, give them to the gate; the chunks
        now ready that were not sent before. A mismatch between ids and text
        starts the response over in text mode."""
        numbered = []
        for chunk, size in chunks:
            self.seq += 1
            if self.reader.use_ids:
                self.history.append((self.seq, chunk))
            numbered.append((self.seq, chunk, size))
        try:
            ready = self._checked(self._give(numbered))
        except IdsMismatch as error:
            ready = self._judge_from_text(error)
        return self._fresh(ready)

    def _checked(self, ready: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        for _seq, item in ready:
            self.reader.check_released(item)
        return ready

    def _give(self, numbered: list[tuple[int, dict[str, Any], int]]) -> list[tuple[int, dict[str, Any]]]:
        """Read the chunks and give them to the gate in one go (a stream's ids
        of consecutive chunks are judged in one call: ``StreamGate.push_many``)."""
        streams = self.chat.streams
        entries, opening, pushed = [], set(), {}
        for seq, chunk, size in numbered:
            rebuilt, deltas = self.reader.read_chunk(chunk)
            open_streams(self.gateway.admission, self.cleanup.ticket, streams, deltas, opening)
            starts = self.starts[seq] = {}
            for key, delta, _reasoning in deltas:
                if delta and streams.judges(key):
                    starts.setdefault(key, pushed.get(key, streams.pushed(key)))
                    pushed[key] = pushed.get(key, streams.pushed(key)) + (1 if isinstance(delta, str) else len(delta))
            self.held[seq] = size
            entries.append(((seq, rebuilt), deltas))
        return self.gate.push_many(entries)

    def _fresh(self, ready: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        fresh = []
        for seq, item in ready:
            self.held.pop(seq, None)
            if seq not in self.sent:
                self.sent.add(seq)
                fresh.append((seq, item))
        return fresh

    def _judge_from_text(self, error: IdsMismatch | None) -> list[tuple[int, dict[str, Any]]]:
        chat = self.chat
        log.warning("request %s: %s; judging the response from its text instead", chat.request_id, error)
        old = chat.streams
        chat.use_ids = False
        chat.streams = chat.new_streams(use_ids=False)
        self.cleanup.streams.append(chat.streams)
        old.close()
        self.reader = ChunkReader(chat, use_ids=False)
        self.gate = StreamGate(chat.streams)
        replay, self.history, self.starts, self.held = self.history, [], {}, {}
        return self._give([(seq, chunk, 0) for seq, chunk in replay])

    async def _judge(self, chunks: list[tuple[dict[str, Any], int]]) -> AsyncIterator[bytes]:
        try:
            ready = await self._within_time(self.gateway.run(self._push, chunks))
        except (BadChunk, TimeoutError):
            raise
        except _NoSession as error:
            async for event in self._guard_failed(EngineCapacityError(str(error))):
                yield event
            return
        except Exception as error:  # fail closed (or open) on any guard failure
            async for event in self._guard_failed(error):
                yield event
            return
        if ready:
            yield b"".join(sse(item) for _seq, item in ready)
        if self.gate.flag is not None:
            yield self._cut()
            return
        limits = self.gateway.config
        if len(self.held) > limits.max_held_chunks or sum(self.held.values()) > limits.max_held_bytes:
            self.gateway.metrics.upstream_errors.labels("held_too_much").inc()
            message = (f"the answer was stopped: the upstream sent more than the gateway holds while the guard "
                       f"judges ({limits.max_held_chunks:,} chunks or {limits.max_held_bytes:,} bytes)")  # fmt: skip
            async for event in self._guard_failed(BadChunk(message), message):
                yield event

    async def _finish(self) -> AsyncIterator[bytes]:
        if self.failed_open:
            yield DONE
            return

        def finish() -> list[tuple[int, dict[str, Any]]]:
            try:
                return self._fresh(self._checked(self.gate.finish()))
            except IdsMismatch as error:
                ready = self._judge_from_text(error)
                if self.gate.flag is None:
                    ready += self.gate.finish()
                return self._fresh(ready)

        try:
            ready = await self._within_time(self.gateway.run(finish))
        except TimeoutError:
            raise
        except Exception as error:
            async for event in self._guard_failed(error):
                yield event
            return
        if self.gate.flag is not None:
            # The end of the turn flagged: its finish chunk gives way to ours.
            ready = [(seq, item) for seq, item in ready
                     if not any(c.get("finish_reason") for c in item.get("choices") or ())]  # fmt: skip
        out = [sse(item) for _seq, item in ready]
        if self.gate.flag is not None:
            out.append(self._cut())
        else:
            out.append(DONE)
        yield b"".join(out)

    def _withheld_from(self, key: StreamKey) -> int | None:
        """The first source index (generator token, or delta) of the flagged
        stream in a chunk that was not sent: where the client's text stops."""
        for seq in sorted(self.starts):
            start = self.starts[seq].get(key)
            if start is not None and seq not in self.sent:
                return start
        withholder = self.gate.withholders.get(key)
        return withholder.withheld[0].index if withholder is not None and withholder.withheld else None

    def _cut(self) -> bytes:
        key, verdict = self.gate.flag
        self.outcome = "flagged"
        self.gateway.metrics.flags.labels("response", getattr(verdict, "category", None) or "unspecified").inc()
        log.info("request %s: %s flagged (%s), stream cut", self.chat.request_id, key,
                 getattr(verdict, "category", None))  # fmt: skip
        cut = cut_chunk(self.chat, self.reader, self.head, key, verdict, self._withheld_from(key))
        return sse(cut) + DONE

    async def _guard_failed(self, error: BaseException, message: str | None = None) -> AsyncIterator[bytes]:
        gateway = self.gateway
        gateway.metrics.guard_errors.inc()
        log.error("request %s: guard failed: %r", self.chat.request_id, error)
        if gateway.config.fail_open and not isinstance(error, BadChunk):
            self.failed_open = True
            self.outcome = "failed_open"
            items = [item for seq, item in self.gate.release_all() if seq not in self.sent]
            if items:
                yield b"".join(sse(item) for item in items)
            return
        self.outcome = "guard_error"
        code = "guard_error"
        if message is None and isinstance(error, EngineCapacityError):
            message = "the moderation guard is at capacity; the answer was stopped (retry shortly)"
            code = "guard_capacity"
        elif isinstance(error, BadChunk):
            code = "too_many_tool_calls" if isinstance(error, TooManyToolCalls) else "upstream_bad_chunk"
        text = message or f"the moderation guard failed ({type(error).__name__}); the answer was stopped"
        yield error_event(text, "server_error", code) + DONE
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

    return await within_limits(gateway, chat.remaining, request, read())


def judge_answer(gateway: Gateway, chat: ChatRequest, reader: ChunkReader, ticket: Ticket,
                 deltas: list) -> dict[int, tuple[StreamKey, Any]]:  # fmt: skip
    """On an engine thread: judge every text of a whole answer; (stream,
    verdict) that flagged each flagged choice."""
    streams = chat.streams
    open_streams(gateway.admission, ticket, streams, deltas, set())
    for key, delta, reasoning in deltas:
        if isinstance(delta, str):
            streams.push(key, delta, reasoning=reasoning)
        else:
            streams.push_ids(key, delta, reasoning=reasoning)
    streams.finish_all()
    flagged: dict[int, tuple[StreamKey, Any]] = {}
    for key in streams.flagged:
        flagged.setdefault(key.choice, (key, streams.flag(key)))
    return flagged


async def completion(gateway: Gateway, chat: ChatRequest, body: bytes, request: Request,
                     cleanup: Cleanup) -> JSONResponse:  # fmt: skip
    """A non-streamed answer, judged whole as a stream would be; flagged choices
    get the refusal and ``finish_reason: "content_filter"``."""
    reader = ChunkReader(chat, use_ids=chat.use_ids)
    try:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise BadChunk("not a JSON object")
        answer, deltas = reader.read_answer(data)
    except BadChunk as error:
        raise gateway.upstream_error("bad_response", f"the upstream's answer cannot be judged: {error}") from None
    try:
        work = gateway.run(judge_answer, gateway, chat, reader, cleanup.ticket, deltas)
        flagged = await within_limits(gateway, chat.remaining, request, work, abandon=cleanup.close_streams)
    except GatewayError:
        raise
    except _NoSession as error:
        raise guard_failure(gateway, chat, EngineCapacityError(str(error))) from None
    except Exception as error:
        if not gateway.config.fail_open:
            raise guard_failure(gateway, chat, error) from error
        gateway.metrics.guard_errors.inc()
        log.error("request %s: guard failed, answer forwarded unjudged (fail_open): %r", chat.request_id, error)
        flagged = {}
    rewrite_completion(chat, reader, answer, flagged)
    for _key, verdict in flagged.values():
        gateway.metrics.flags.labels("response", getattr(verdict, "category", None) or "unspecified").inc()
    gateway.metrics.requests.labels("flagged" if flagged else "completed").inc()
    return JSONResponse(answer)


def guard_failure(gateway: Gateway, chat: ChatRequest, error: BaseException, what: str = "") -> GatewayError:
    """The client's error for a guard failure before any answer went out (``what``: on what)."""
    gateway.metrics.guard_errors.inc()
    log.error("request %s: guard failed%s: %r", chat.request_id, what and f" on {what}", error)
    if isinstance(error, EngineCapacityError):
        gateway.metrics.requests.labels("overloaded").inc()
        return GatewayError(503, "the moderation guard is at capacity; retry shortly", type="server_error",
                            code="guard_capacity", headers={"retry-after": "1"})  # fmt: skip
    if isinstance(error, ContextLengthError):
        return GatewayError(400, f"the {what or 'text'} is longer than the guard can judge: {error}",
                            type="invalid_request_error", param="messages", code="context_length_exceeded")
    gateway.metrics.requests.labels("guard_error").inc()
    return GatewayError(500, f"the moderation guard failed{what and f' on {what}'} ({type(error).__name__})",
                        type="server_error", code="guard_error")  # fmt: skip
