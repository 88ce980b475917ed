"""LangChain integration: a callback handler that moderates every generated text.

    handler = GuardCallbackHandler(guard)
    for chunk in chat_model.stream(messages, config={"callbacks": [handler]}):
        ...   # raises GuardFlaggedError as soon as the debounced policy flags

The handler feeds each ``on_llm_new_token`` delta to a guard stream (text
mode: LangChain gives text, not ids) and raises on a flag. Because it sets
``raise_error``, LangChain re-raises the error inside the model's stream,
before the flagged chunk reaches the caller, which stops the run.

What is judged, each as its own guard stream (``integrations.streams``):
the message text of every generation (``n > 1`` gives several), and the
arguments of every tool call (streamed ``tool_call_chunks``, or the tool
calls of a finished message), unless ``judge_tool_calls=False``. A run that
was not streamed is judged in ``on_llm_end``, before LangChain returns it.

The conversation is mapped as the Qwen3 chat template renders it: system,
human and AI messages (AI tool calls as ``<tool_call>`` JSON, earlier
reasoning dropped), tool results inside ``<tool_response>`` in a user turn.
A conversation ending in an AI message is an assistant prefill: its text is
the start of the judged response. Every run's sessions are closed on every
path (end, error, a flag, a refused prompt).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from functools import partial
from typing import Any
from uuid import UUID

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.messages import BaseMessage
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("the LangChain integration needs langchain-core: pip install 'crossguard[langchain]'") from error

from adapter import JudgedPiece
from integrations.streams import GuardStreams, StreamKey, first_flagged

__all__ = ["GuardCallbackHandler", "GuardFlaggedError", "GuardSetupError", "conversation_from_messages"]

logger = logging.getLogger(__name__)

_ROLES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
}


class GuardFlaggedError(RuntimeError):
    """The guard flagged the prompt or the response; the run was stopped.

    ``pieces``: the judged pieces of the flagged stream; ``stream``: which
    one (a ``StreamKey``; None for the prompt); ``verdict``: the flagging verdict.
    """

    def __init__(self, message: str, pieces: list[JudgedPiece], *, stream: StreamKey | None = None, verdict=None):
        super().__init__(message)
        self.pieces = pieces
        self.stream = stream
        self.verdict = verdict


class GuardSetupError(RuntimeError):
    """The guard cannot judge a run (a conversation it cannot map, a prompt
    past its context, ...) and ``fail_open`` is off, so the run was refused."""


def _text(message: Any) -> str:
    """A message's (or chunk's) text parts; ``.text`` is a property in
    langchain-core 1.x and a method in 0.3."""
    text = getattr(message, "text", "")
    if callable(text) and not isinstance(text, str):
        text = text()
    return text or ""


def _tool_calls(message: Any) -> list[dict[str, Any]]:
    """An AI message's tool calls as (name, arguments text), parsed or not."""
    calls = [{"name": call["name"], "arguments": call["args"]} for call in getattr(message, "tool_calls", None) or ()]
    for call in getattr(message, "invalid_tool_calls", None) or ():
        calls.append({"name": call.get("name") or "", "arguments": call.get("args") or ""})
    function_call = (getattr(message, "additional_kwargs", None) or {}).get("function_call")
    if not calls and isinstance(function_call, dict):  # the legacy OpenAI form
        calls.append({"name": function_call.get("name") or "", "arguments": function_call.get("arguments") or ""})
    return calls


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def conversation_from_messages(messages: list[BaseMessage]) -> tuple[list[dict[str, Any]], str]:
    """(chat messages for the guard, assistant prefill text) for a LangChain
    conversation. Raises ValueError, saying why, for one it cannot map."""
    conversation: list[dict[str, Any]] = []
    for message in messages:
        kind = getattr(message, "role", None) if message.type == "chat" else message.type
        role = _ROLES.get(kind)
        if role is None:
            raise ValueError(
                f"cannot map a {type(message).__name__} with role {kind!r} onto the Qwen3 chat template (it knows "
                f"{', '.join(sorted(_ROLES))}): use System, Human, AI and Tool messages"
            )
        turn: dict[str, Any] = {"role": role, "content": _text(message)}
        if role == "assistant":
            if calls := _tool_calls(message):
                turn["tool_calls"] = calls
            reasoning = (getattr(message, "additional_kwargs", None) or {}).get("reasoning_content")
            if isinstance(reasoning, str):
                turn["reasoning_content"] = reasoning
        conversation.append(turn)
    prefill = ""
    if conversation and conversation[-1]["role"] == "assistant":
        last = conversation.pop()
        if last.get("tool_calls"):
            raise ValueError(
                "the conversation ends in an AI message with tool calls but no tool results: add the ToolMessages"
            )
        prefill = last["content"]
    if not conversation:
        raise ValueError("the conversation has no message before the response: there is nothing to judge it against")
    return conversation, prefill


def _chunk_text(token: Any, chunk: Any) -> str:
    if chunk is not None:
        message = getattr(chunk, "message", None)
        return _text(message) if message is not None else (getattr(chunk, "text", "") or "")
    if isinstance(token, str):
        return token
    return "".join(
        part if isinstance(part, str) else part.get("text", "") if part.get("type") == "text" else ""
        for part in token or ()
    )


class GuardCallbackHandler(BaseCallbackHandler):
    """Moderates every LLM/chat-model run it is attached to.

    ``block_unsafe_prompts``: raise at the start of a run whose prompt the
    query head judges unsafe under the policy. ``judge_tool_calls``: judge
    tool-call arguments (default; each call its own stream). ``fail_open``:
    if the guard cannot judge a run (it raises, or the conversation cannot be
    mapped onto its template), log a warning and let the run go on unjudged
    (default: the error stops the run). ``judged[run_id]`` maps each stream
    of the last ``keep_results`` runs to its judged pieces.
    """

    raise_error = True

    def __init__(
        self,
        guard: Any,
        *,
        policy: Any = None,
        block_unsafe_prompts: bool = False,
        fail_open: bool = False,
        judge_tool_calls: bool = True,
        keep_results: int = 100,
    ) -> None:
        self.guard = guard
        self.policy = policy
        self.block_unsafe_prompts = block_unsafe_prompts
        self.fail_open = fail_open
        self.judge_tool_calls = judge_tool_calls
        self.keep_results = keep_results
        self._runs: dict[UUID, GuardStreams] = {}
        self.judged: OrderedDict[UUID, dict[StreamKey, list[JudgedPiece]]] = OrderedDict()
        self.unjudged: OrderedDict[UUID, str] = OrderedDict()  # runs that went on unjudged (fail_open), and why
        self._lock = threading.Lock()

    @property
    def live_sessions(self) -> int:
        """Guard sessions (KV caches) held for runs still in progress."""
        return sum(streams.live_sessions for streams in list(self._runs.values()))

    # --- run lifecycle --------------------------------------------------------

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._start(run_id, lambda: conversation_from_messages(messages[0]))

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self._start(run_id, lambda: (prompts[0], ""))

    def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        streams = self._runs.get(run_id)
        if streams is None:
            return
        self._push(run_id, streams, StreamKey(), _chunk_text(token, chunk))
        message = getattr(chunk, "message", None)
        if message is None or not self.judge_tool_calls:
            return
        for number, call in enumerate(getattr(message, "tool_call_chunks", None) or ()):
            index = call.get("index")
            key = StreamKey(0, index if index is not None else f"unindexed-{len(streams.keys)}-{number}")
            self._push(run_id, streams, key, call.get("args") or "")
        function_call = (getattr(message, "additional_kwargs", None) or {}).get("function_call")
        if isinstance(function_call, dict) and isinstance(function_call.get("arguments"), str):
            self._push(run_id, streams, StreamKey(0, "function_call"), function_call["arguments"])

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        streams = self._runs.get(run_id)
        if streams is None:
            return
        try:
            generations = [generation for row in response.generations for generation in row]
            for choice, generation in enumerate(generations):
                message = getattr(generation, "message", None)
                text = _text(message) if message is not None else generation.text
                # Not streamed (a plain invoke, n > 1), or streamed text that
                # the final message does not extend: judge the final text.
                self._step(run_id, streams, StreamKey(choice), partial(streams.replace, StreamKey(choice), text))
                if message is None or not self.judge_tool_calls:
                    continue
                # Tool calls that were not streamed as tool_call_chunks.
                calls = _tool_calls(message)
                streamed = sum(1 for key in streams.keys if key.choice == choice and key.tool_call is not None)
                for number, call in enumerate(calls[streamed:], start=streamed):
                    key = StreamKey(choice, f"final-{number}" if streamed else number)
                    self._push(run_id, streams, key, _arguments_text(call["arguments"]))
            for key in streams.keys:
                self._step(run_id, streams, key, partial(streams.finish, key))
        finally:
            self._close(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    # --- internals -------------------------------------------------------------

    def _start(self, run_id: UUID, conversation: Any) -> None:
        streams = None
        try:
            prompt, prefill = conversation()
            streams = GuardStreams(
                self.guard, prompt, policy=self.policy, judge_tool_calls=self.judge_tool_calls, response_prefix=prefill
            )
            streams.open(StreamKey())  # judges the prompt (and the prefill)
        except Exception as error:
            if streams is not None:
                streams.close()
            if self.fail_open:
                logger.warning("the guard cannot judge this run, which goes on unjudged as fail_open asks: %s", error)
                self._remember(self.unjudged, run_id, f"{type(error).__name__}: {error}")
                return
            raise GuardSetupError(
                f"the guard cannot judge this run: {error} (pass fail_open=True to let such runs go on unjudged)"
            ) from error
        self._runs[run_id] = streams
        self._remember(self.judged, run_id, streams.pieces)
        verdict = streams.query_verdict
        if self.block_unsafe_prompts and verdict.unsafe:
            self._close(run_id)
            raise GuardFlaggedError(
                f"the guard judged the prompt {verdict.risk_level} ({verdict.category})", [], verdict=verdict
            )
        self._check(run_id, streams, StreamKey(), streams.pieces[StreamKey()])  # a flagged prefill

    def _push(self, run_id: UUID, streams: GuardStreams, key: StreamKey, delta: str) -> None:
        self._step(run_id, streams, key, lambda: streams.push(key, delta))

    def _step(self, run_id: UUID, streams: GuardStreams, key: StreamKey, step: Any) -> None:
        if run_id not in self._runs:
            return  # the guard failed earlier in this run and fail_open let it go on unjudged
        try:
            pieces = step()
        except Exception as error:
            self._close(run_id)
            if self.fail_open:
                logger.warning("the guard failed; the run goes on unjudged as fail_open asks: %s", error)
                self._remember(self.unjudged, run_id, f"{type(error).__name__}: {error}")
                return
            raise
        self._check(run_id, streams, key, pieces)

    def _check(self, run_id: UUID, streams: GuardStreams, key: StreamKey, pieces: list[JudgedPiece]) -> None:
        # The stream itself, not only its pieces: the guard tokens that flag
        # can come before the piece that holds them is released.
        piece, verdict = first_flagged(pieces), streams.flag(key)
        if piece is None and verdict is None:
            return
        self._close(run_id)
        verdict = verdict or piece.verdict
        where = repr(piece.text) if piece is not None else f"the end of {streams.text(key)[-40:]!r}"
        raise GuardFlaggedError(
            f"the guard flagged the response ({key}) at {where}: {verdict.risk_level} ({verdict.category})",
            streams.pieces[key],
            stream=key,
            verdict=verdict,
        )

    def _close(self, run_id: UUID) -> None:
        streams = self._runs.pop(run_id, None)
        if streams is not None:
            streams.close()

    def _remember(self, results: OrderedDict, run_id: UUID, value: Any) -> None:
        with self._lock:
            results[run_id] = value
            while len(results) > self.keep_results:
                results.popitem(last=False)
