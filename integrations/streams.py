"""One guard stream per generated stream of a request.

A chat model's answer can hold several independently generated texts: the
message text of each choice (``n > 1``) and, in each choice, the arguments
of each tool call. Every one of them is generated text, so each gets its own
guard stream (a GuardSession that judged the same prompt, and a GuardAdapter
in text mode) and is judged in the order its deltas arrive:

    streams = GuardStreams(guard, messages)
    streams.push(StreamKey(choice=0), "Sure, ")                          # message text
    streams.push(StreamKey(choice=0, tool_call=0), '{"query": "dyn')     # tool-call arguments
    pieces = streams.finish_all()
    streams.close()                                                      # frees every KV cache

``judge_tool_calls=False`` exempts tool-call arguments (they are then not
judged at all; a refusal is not a tool call and is always judged). The
LangChain handler and the OpenAI-compatible gateway share this: a streamed
chunk names its choice and its tool-call index, and each (choice, tool call)
pair maps to one stream. The prompt is judged once: a stream opens lazily,
at its first non-empty delta; the first one takes the session that judged
the prompt, and each later one is a ``fork()`` of a session in that state
(no forward).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from threading import Lock
from typing import Any

from adapter import GuardAdapter, JudgedPiece

__all__ = ["GuardStreams", "StreamKey", "first_flagged"]


@dataclass(frozen=True, slots=True)
class StreamKey:
    """Which generated text: the message text of ``choice``, its ``refusal``
    text (OpenAI's ``refusal`` field), or the arguments of its tool call
    number ``tool_call`` (the index the stream gives it; a str for calls
    that come without one)."""

    choice: int = 0
    tool_call: int | str | None = None
    refusal: bool = False

    @property
    def is_tool_call(self) -> bool:
        return self.tool_call is not None

    @property
    def is_message_text(self) -> bool:
        return self.tool_call is None and not self.refusal

    def __str__(self) -> str:
        where = f"choice {self.choice}"
        if self.refusal:
            return where + " refusal"
        return where + (" text" if self.tool_call is None else f" tool call {self.tool_call} arguments")


def first_flagged(pieces: Iterable[JudgedPiece]) -> JudgedPiece | None:
    return next((piece for piece in pieces if piece.flagged), None)


class GuardStreams:
    """The guard streams of one request (see the module docstring).

    ``response_prefix`` (an assistant prefill) is pushed at the start of every
    message-text stream, so the continuation is judged in its context; its
    pieces are judged too. ``pieces[key]`` holds every judged piece of a
    stream, in order; ``close()`` frees every session (call it on every path;
    the object is also a context manager).
    """

    def __init__(
        self,
        guard: Any,
        prompt: Any,
        *,
        policy: Any = None,
        judge_tool_calls: bool = True,
        response_prefix: str = "",
        source_tokenizer: Any = None,
    ) -> None:
        self.guard = guard
        self.source_tokenizer = source_tokenizer
        self.prompt = prompt
        self.policy = policy
        self.judge_tool_calls = judge_tool_calls
        self.response_prefix = response_prefix
        self.query_verdict: Any = None
        self.pieces: dict[StreamKey, list[JudgedPiece]] = {}
        self._adapters: dict[StreamKey, GuardAdapter] = {}
        self._generated: dict[StreamKey, list[str]] = {}  # what was pushed after the prefix
        self._reasoning: dict[StreamKey, list[str]] = {}
        self._prefix_pieces: dict[StreamKey, int] = {}
        self._finished: set[StreamKey] = set()
        self._flags: dict[StreamKey, Any] = {}  # the verdict that flagged each flagged stream
        self._flag_spans: dict[StreamKey, tuple[int, int]] = {}  # text offsets of the two tokens that flagged
        self._last_start: dict[StreamKey, int] = {}  # start offset of the last guard token judged
        self._id_streams: set[StreamKey] = set()  # streams fed generator ids (the others take text deltas)
        self._template: Any = None  # the session that judged the prompt, until the first stream takes it
        self._sessions: list[Any] = []  # the streams' sessions, the first stream's first
        self._lock = Lock()  # close() may come from another thread while a call opens a stream
        self._closed = False

    # --- streams ----------------------------------------------------------

    def judges(self, key: StreamKey) -> bool:
        """Whether this stream is judged at all (tool calls can be exempt)."""
        return not key.is_tool_call or self.judge_tool_calls

    def is_open(self, key: StreamKey) -> bool:
        return key in self._adapters

    @property
    def keys(self) -> list[StreamKey]:
        """The streams opened so far, in the order they opened."""
        return list(self._adapters)

    @property
    def live_sessions(self) -> int:
        """Guard sessions still holding a KV cache."""
        return len(self._sessions) + (self._template is not None) if not self._closed else 0

    def judge_prompt(self) -> Any:
        """Judge the prompt now, before any stream opens (a gateway refuses a
        flagged prompt before forwarding it); the session is kept for the
        first stream, whichever it is and however it is fed. Returns the
        prompt's verdict. ``close()`` from another thread stops it (the
        session's queued work is dropped)."""
        if self.query_verdict is not None:
            return self.query_verdict
        with self._lock:
            self._check_open()
            if self._template is None and not self._sessions:
                self._template = self.guard.session(self.policy)
            template = self._template
        self.query_verdict = template.moderate_prompt(self.prompt)
        return self.query_verdict

    def open(self, key: StreamKey, *, ids: bool = False) -> GuardAdapter:
        """The stream's adapter, opening it on first use (with the session
        that judged the prompt, or a fork of one in that state; the prompt is
        judged now if it was not yet). ``ids``: the stream will be fed
        generator token ids (``push_ids``), decoded with ``source_tokenizer``,
        instead of text."""
        adapter = self._adapters.get(key)
        if adapter is not None:
            if ids != (key in self._id_streams):
                fed = "generator ids" if key in self._id_streams else "text deltas"
                raise ValueError(f"the {key} stream is fed {fed}; one stream cannot take both")
            return adapter
        self._check_open()
        if ids and self.source_tokenizer is None:
            raise ValueError("generator ids need the generator's tokenizer: GuardStreams(..., source_tokenizer=...)")
        self.judge_prompt()
        with self._lock:
            session, self._template = self._template, None
        if session is None:
            session = self._fork_prompt_state()  # outside the lock: close() must be able to stop a fork that waits
        with self._lock:
            if self._closed:
                session.close()
                self._check_open()
            self._sessions.append(session)
        adapter = GuardAdapter(session, self.source_tokenizer if ids else None,
                               on_guard_tokens=partial(self._observe, key))  # fmt: skip
        self._adapters[key] = adapter
        if ids:
            self._id_streams.add(key)
        self.pieces[key] = []
        self._generated[key] = []
        if key.is_message_text and self.response_prefix:
            self._prefix_pieces[key] = 1
            self.pieces[key] += adapter.push_text(self.response_prefix)
        return adapter

    def push(self, key: StreamKey, delta: str, *, reasoning: bool = False) -> list[JudgedPiece]:
        """Judge the next delta of a stream; the pieces judged by now.
        ``reasoning`` deltas (a server's ``reasoning_content``, thinking
        blocks) go into the guard's think block, before the answer's text."""
        if not self.judges(key) or (not delta and key not in self._adapters):
            return []
        if key in self._finished:
            raise RuntimeError(f"the {key} stream was finished; it takes no more text")
        adapter = self.open(key)
        if reasoning:
            pieces = adapter.push_reasoning_text(delta)
            self._reasoning.setdefault(key, []).append(delta)
        else:
            pieces = adapter.push_text(delta)
            self._generated[key].append(delta)
        self.pieces[key] += pieces
        return pieces

    def push_ids(self, key: StreamKey, ids: list[int], *, reasoning: bool = False) -> list[JudgedPiece]:
        """Judge the next generator token ids of a stream (decoded with
        ``source_tokenizer``); the pieces judged by now. A stream is fed either
        ids or text deltas, from its first push on."""
        if not self.judges(key) or (not ids and key not in self._adapters):
            return []
        if key in self._finished:
            raise RuntimeError(f"the {key} stream was finished; it takes no more ids")
        adapter = self.open(key, ids=True)
        pieces = adapter.push_reasoning_ids(ids) if reasoning else adapter.push_ids(ids)
        self.pieces[key] += pieces
        return pieces

    def is_id_stream(self, key: StreamKey) -> bool:
        return key in self._id_streams

    def reasoning(self, key: StreamKey) -> str:
        """The reasoning text pushed to a stream so far."""
        return "".join(self._reasoning.get(key, ()))

    def text(self, key: StreamKey) -> str:
        """The text pushed to a stream so far (without the prefix); for a
        stream fed ids, their text as decoded so far (reasoning first)."""
        if key in self._id_streams:
            return self._adapters[key].text
        return "".join(self._generated.get(key, ()))

    def pushed(self, key: StreamKey) -> int:
        """Source pieces pushed to a stream (the prefix counts as one): the
        last delta pushed is the piece of index ``pushed(key) - 1``."""
        adapter = self._adapters.get(key)
        return 0 if adapter is None else adapter.pushed

    def replace(self, key: StreamKey, text: str) -> list[JudgedPiece]:
        """Make the stream's text ``text``: push what extends what was pushed,
        or roll the stream back to its start and judge ``text`` afresh (the
        final text of a response that does not extend the streamed deltas)."""
        pushed = self.text(key)
        if text.startswith(pushed):
            return self.push(key, text[len(pushed) :])
        adapter = self.open(key)
        kept = adapter.rollback(self._prefix_pieces.get(key, 0))
        del self.pieces[key][kept:]
        self._generated[key] = []
        if not adapter.flagged:
            self._flags.pop(key, None)
            self._flag_spans.pop(key, None)
        self._last_start.pop(key, None)
        # The rollback took the reasoning back too: it goes in again first.
        reasoning = "".join(self._reasoning.pop(key, ()))
        pieces = self.push(key, reasoning, reasoning=True) if reasoning else []
        return pieces + self.push(key, text)

    def finish(self, key: StreamKey) -> list[JudgedPiece]:
        """End of a stream: judge what it still holds back."""
        adapter = self._adapters.get(key)
        if adapter is None or key in self._finished:
            return []
        self._finished.add(key)
        pieces = adapter.finish()
        self.pieces[key] += pieces
        return pieces

    def finish_all(self) -> dict[StreamKey, list[JudgedPiece]]:
        """Finish every open stream; the pieces each one judged at its end."""
        return {key: self.finish(key) for key in self.keys}

    @property
    def flagged(self) -> list[StreamKey]:
        """The streams the debounced policy has flagged."""
        return [key for key, adapter in self._adapters.items() if adapter.flagged]

    def flag(self, key: StreamKey) -> Any:
        """The verdict that flagged this stream (None if it is not flagged).
        A stream can be flagged before any of its pieces carries the flag: a
        piece is judged once the guard has seen all of its text, and the
        tokens that flag can come earlier."""
        adapter = self._adapters.get(key)
        if adapter is None or not adapter.flagged:
            return None
        return self._flags.get(key)

    def flagged_text(self, key: StreamKey) -> str | None:
        """The text of the guard tokens that flagged this stream (the token at
        ``flagged_at`` and the one before it), for messages and logs; None if
        it is not flagged."""
        span = self._flag_spans.get(key) if self.flag(key) is not None else None
        if span is None:
            return None
        prefix = self.response_prefix if key.is_message_text else ""
        return (prefix + self.text(key))[span[0] : span[1]]

    def _observe(self, key: StreamKey, tokens: list, verdicts: list) -> None:
        if key not in self._flags:
            for number, verdict in enumerate(verdicts):
                if verdict.flagged:
                    self._flags[key] = verdict
                    start = tokens[number - 1].start if number else self._last_start.get(key, tokens[0].start)
                    self._flag_spans[key] = (start, tokens[number].end)
                    break
        if tokens:
            self._last_start[key] = tokens[-1].start

    # --- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Free every session's KV cache (idempotent; from any thread: a call
        of these streams waiting for the guard then fails). Judged pieces stay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = [*self._sessions, *([self._template] if self._template is not None else [])]
        for session in sessions:
            session.close()

    def _fork_prompt_state(self) -> Any:
        """A session in the state right after the prompt: a fork of the first
        stream's, rolled back to where its response starts (and to the
        scaffold's empty think block, if it began reasoning)."""
        session = self._sessions[0].fork()
        try:
            session.rollback(session.response_start)
            if session.reasoning:
                session.cancel_reasoning()
        except BaseException:
            session.close()
            raise
        return session

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("these guard streams were closed; start a new GuardStreams for a new request")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GuardStreams:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
