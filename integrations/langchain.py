"""LangChain integration: a chat model wrapper that withholds, and callback handlers that observe.

Two tools, for two jobs:

* ``GuardedChatModel(chat_model, guard)`` **withholds**: a chat model (a
  real ``BaseChatModel``, so it composes in LCEL chains) whose ``stream``,
  ``astream``, ``invoke``, ``ainvoke`` and ``batch`` give only text the guard
  has judged and the debounce has cleared, and end with ``GuardFlaggedError``
  (or, with ``refusal="..."``, that text) when the guard flags:

      guarded = GuardedChatModel(chat_model, guard)            # refusal=None, block_unsafe_prompts=False
      chain = prompt | guarded | StrOutputParser()
      for text in chain.stream({"question": ...}):              # never shows flagged text
          ...

* ``GuardCallbackHandler(guard)`` (``AsyncGuardCallbackHandler`` for async
  runs) **observes and raises**: attached to any run, it judges what the model
  generates and raises ``GuardFlaggedError`` once the guard flags, which stops
  the run. A callback cannot hold text back, and a word is judged only once
  the next one starts: the chunks before the flag, the first words of the
  flagged stretch included, have already reached the caller. Use it to stop
  runs and to audit; use the wrapper to keep flagged text from users.

What is judged, each as its own guard stream (``integrations.streams``):
the message text of every generation (``n > 1`` gives several), and the
arguments of every tool call (streamed ``tool_call_chunks``, or the tool
calls of a finished message), unless ``judge_tool_calls=False``.

The conversation is mapped as the Qwen3 chat template renders it: system,
human and AI messages (AI tool calls as ``<tool_call>`` JSON, earlier
reasoning dropped), tool results inside ``<tool_response>`` in a user turn.
A conversation ending in an AI message is an assistant prefill: its text is
the start of the judged response. Every run's guard sessions are closed on
every path (end, error, a flag, a refused prompt).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from functools import partial
from typing import Any
from uuid import UUID

try:
    from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable
    from pydantic import ConfigDict
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from integrations.extras import install_hint

    raise ImportError(f"the LangChain integration needs langchain-core: {install_hint('langchain')}") from error

from adapter import Flag, JudgedPiece
from integrations.streams import GuardStreams, StreamKey, first_flagged
from integrations.withhold import StreamGate

__all__ = [
    "AsyncGuardCallbackHandler",
    "GuardCallbackHandler",
    "GuardFlaggedError",
    "GuardSetupError",
    "GuardedChatModel",
    "conversation_from_messages",
]

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

    ``verdict``: the verdict that flagged: for a response, the verdict of the
    guard token at ``flagged_at`` (the second of the two that agreed); for a
    blocked prompt, the query verdict. ``pieces``: the judged pieces of the
    flagged stream; ``stream``: which one (a ``StreamKey``; None for the
    prompt); ``text``: the text of the guard tokens that flagged (None for
    the prompt); ``flag``: where and why (an ``adapter.Flag``: the first
    piece of the flagged stretch, whether the end of turn raised it; None
    for the prompt).
    """

    def __init__(
        self,
        message: str,
        pieces: list[JudgedPiece],
        *,
        stream: StreamKey | None = None,
        verdict=None,
        text: str | None = None,
        flag: Flag | None = None,
    ):
        super().__init__(message)
        self.pieces = pieces
        self.stream = stream
        self.verdict = verdict
        self.text = text
        self.flag = flag


class GuardSetupError(RuntimeError):
    """The guard cannot judge a run (a conversation it cannot map, a prompt
    past its context, ...) and ``fail_open`` is off, so the run was refused."""


def _text(message: Any) -> str:
    """A message's (or chunk's) text parts; ``.text`` is a property in
    langchain-core 1.x, a method in 0.3."""
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


def _reasoning_text(message: Any) -> str:
    """A message's (or chunk's) reasoning: ``reasoning_content`` (OpenAI-style
    servers: DeepSeek, vLLM, Ollama) and reasoning or thinking content blocks.
    It is generated text a product may show, so it is judged, as the guard's
    think block."""
    if message is None:
        return ""
    parts = []
    reasoning = (getattr(message, "additional_kwargs", None) or {}).get("reasoning_content")
    if isinstance(reasoning, str):
        parts.append(reasoning)
    content = getattr(message, "content", None)
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
            text = block.get(block["type"])
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


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


def _streamed_deltas(
    streams: GuardStreams, text: str, message: Any, judge_tool_calls: bool
) -> Iterator[tuple[StreamKey, str]]:
    """The (stream, delta) pairs of one streamed chunk: its text, then the
    arguments of each tool-call chunk (and of a legacy ``function_call``).
    Consumed one at a time with a push in between (an unindexed tool call's
    key counts the streams opened so far). Reasoning comes first, marked as such."""
    if reasoning := _reasoning_text(message):
        yield StreamKey(), reasoning, True
    yield StreamKey(), text
    if message is None or not judge_tool_calls:
        return
    for number, call in enumerate(getattr(message, "tool_call_chunks", None) or ()):
        index = call.get("index")
        key = StreamKey(0, index if index is not None else f"unindexed-{len(streams.keys)}-{number}")
        yield key, call.get("args") or ""
    function_call = (getattr(message, "additional_kwargs", None) or {}).get("function_call")
    if isinstance(function_call, dict) and isinstance(function_call.get("arguments"), str):
        yield StreamKey(0, "function_call"), function_call["arguments"]


def _final_deltas(message: Any, judge_tool_calls: bool) -> Iterator[tuple[StreamKey, str]]:
    """The (stream, text) pairs of a finished message: its reasoning (marked
    as such), its text and each tool call's arguments."""
    if reasoning := _reasoning_text(message):
        yield StreamKey(), reasoning, True
    yield StreamKey(), _text(message)
    if judge_tool_calls:
        for number, call in enumerate(_tool_calls(message)):
            yield StreamKey(0, number), _arguments_text(call["arguments"])


def _describe(verdict: Any) -> str:
    return "flagged" if verdict is None else f"{verdict.risk_level} ({verdict.category})"


def _flagged_error(streams: GuardStreams, key: StreamKey, verdict: Any, piece: JudgedPiece | None = None):
    text = streams.flagged_text(key)
    flag = streams.open(key).flag if key in streams.keys else None
    if text is not None:
        where = repr(text)
    elif piece is not None:
        where = repr(piece.text)
    else:
        where = f"the end of {streams.text(key)[-40:]!r}"
    if flag is not None and flag.end_of_turn:
        where = f"the end of turn, after {where}"
    return GuardFlaggedError(
        f"the guard flagged the response ({key}) at {where}: {_describe(verdict)}",
        streams.pieces.get(key, []),
        stream=key,
        verdict=verdict,
        text=text,
        flag=flag,
    )


def _prompt_error(verdict: Any) -> GuardFlaggedError:
    return GuardFlaggedError(f"the guard judged the prompt {_describe(verdict)}", [], verdict=verdict)


# --- the wrapper that withholds ----------------------------------------------------------


class _GuardedRun:
    """One run of a GuardedChatModel: its guard streams and the gate that
    releases the wrapped model's chunks once judged. Sync methods; the async
    path runs them in a worker thread."""

    def __init__(self, owner: GuardedChatModel) -> None:
        self.owner = owner
        self.streams: GuardStreams | None = None
        self.gate: StreamGate | None = None
        self.unjudged = False  # the guard could not judge and fail_open let the run go on
        self.blocked: Any = None  # the query verdict of a refused prompt

    # --- steps ---

    def start(self, messages: list[BaseMessage]) -> None:
        owner = self.owner
        try:
            prompt, prefill = conversation_from_messages(messages)
            self.streams = GuardStreams(
                owner.guard, prompt, policy=owner.policy, judge_tool_calls=owner.judge_tool_calls,
                response_prefix=prefill,
            )  # fmt: skip
            self.streams.open(StreamKey())  # judges the prompt (and the prefill)
        except Exception as error:
            self.close()
            if not owner.fail_open:
                raise GuardSetupError(
                    f"the guard cannot judge this run: {error} (pass fail_open=True to let such runs go on unjudged)"
                ) from error
            logger.warning("the guard cannot judge this run, which goes on unjudged as fail_open asks: %s", error)
            self.unjudged = True
            return
        self.gate = StreamGate(self.streams)
        verdict = self.streams.query_verdict
        if owner.block_unsafe_prompts and verdict.unsafe:
            self.blocked = verdict
        self.gate.check_open()  # a flagged prefill

    @property
    def stopped(self) -> bool:
        """Whether the run must end now (a refused prompt, a flag)."""
        return self.blocked is not None or (self.gate is not None and self.gate.flag is not None)

    def push(self, chunk: AIMessageChunk) -> list[AIMessageChunk]:
        if self.unjudged:
            return [chunk]
        gate, streams = self.gate, self.streams
        deltas = _streamed_deltas(streams, _text(chunk), chunk, self.owner.judge_tool_calls)
        return self._guarded(partial(gate.push, chunk, deltas), extra=[chunk])

    def finish(self) -> list[AIMessageChunk]:
        return [] if self.unjudged else self._guarded(self.gate.finish)

    def judge(self, message: BaseMessage) -> bool:
        """Judge a finished message whole; whether it may be returned."""
        if self.unjudged:
            return True
        deltas = _final_deltas(message, self.owner.judge_tool_calls)
        released = self._guarded(partial(self.gate.push, message, deltas), extra=[message])
        if not self.stopped and not self.unjudged:
            released += self._guarded(self.gate.finish)
        return any(item is message for item in released)

    def refuse(self, kind: type[AIMessage] | type[AIMessageChunk]) -> AIMessage | AIMessageChunk:
        """The run's end when it stops: raise GuardFlaggedError, or the refusal message."""
        if self.blocked is not None:
            error, verdict, key = _prompt_error(self.blocked), self.blocked, None
        else:
            key, verdict = self.gate.flag
            error = _flagged_error(self.streams, key, verdict)
        if self.owner.refusal is None:
            raise error
        metadata = {
            "flagged": True,
            "stream": "prompt" if key is None else str(key),
            "risk_level": getattr(verdict, "risk_level", None),
            "category": getattr(verdict, "category", None),
            "end_of_turn": error.flag is not None and error.flag.end_of_turn,
        }
        return kind(content=self.owner.refusal, response_metadata={"crossguard": metadata})

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close()

    # --- internals ---

    def _guarded(self, step: Any, extra: list[Any] | None = None) -> list[Any]:
        try:
            return step()
        except Exception as error:
            if not self.owner.fail_open:
                raise
            logger.warning("the guard failed; the run goes on unjudged as fail_open asks: %s", error)
            self.unjudged = True
            released = self.gate.release_all()
            return released + [item for item in extra or () if not any(item is other for other in released)]


def _as_chunk(value: Any) -> AIMessageChunk:
    if isinstance(value, AIMessageChunk):
        return value
    if isinstance(value, str):
        return AIMessageChunk(content=value)
    if isinstance(value, BaseMessage):  # a runnable that streams whole messages
        calls = [
            {"name": call["name"], "args": _arguments_text(call["args"]), "id": call.get("id"), "index": number}
            for number, call in enumerate(getattr(value, "tool_calls", None) or ())
        ]
        return AIMessageChunk(
            content=value.content,
            additional_kwargs=value.additional_kwargs,
            response_metadata=value.response_metadata,
            tool_call_chunks=calls,
            id=value.id,
        )
    raise TypeError(f"the wrapped chat model streamed a {type(value).__name__}; expected message chunks")


def _as_message(value: Any) -> BaseMessage:
    if isinstance(value, BaseMessage):
        return value
    if isinstance(value, str):
        return AIMessage(content=value)
    raise TypeError(f"the wrapped chat model returned a {type(value).__name__}; expected a message")


class GuardedChatModel(BaseChatModel):
    """A chat model that shows only judged text: wraps ``chat_model`` (any
    chat model, or a runnable such as ``chat_model.bind_tools(...)``) and
    judges everything it generates with the guard, text and tool-call
    arguments, before passing it on.

        guarded = GuardedChatModel(chat_model, guard, refusal=None, block_unsafe_prompts=False)
        chain = prompt | guarded | StrOutputParser()

    ``stream``/``astream``: each chunk of the wrapped model comes out once
    every piece of text it carries is judged and cleared by the debounce (a
    token that counts as unsafe waits for the next verdict), in order.
    ``invoke``/``ainvoke``/``batch``: the whole answer is judged before it
    is returned. When the guard flags, the run stops and raises
    ``GuardFlaggedError`` (its ``verdict`` is the one at ``flagged_at``);
    with ``refusal="..."`` it ends with that text instead (an ``AIMessage``,
    or a last chunk, whose ``response_metadata["crossguard"]`` says why).
    Flagged text never comes out, not even its first word.

    ``block_unsafe_prompts``: a prompt the query head judges unsafe is refused
    the same way, before the wrapped model runs (the error carries the query
    verdict). ``judge_tool_calls=False`` exempts tool-call arguments.
    ``fail_open``: if the guard cannot judge (a conversation it cannot map,
    an error mid-run), go on unjudged instead of raising. ``policy``: the
    guard's policy. ``guard``: a ``StreamGuard`` (or anything with its
    ``session(policy)``).

    The wrapped model runs outside the caller's callbacks, so its unjudged
    tokens never reach a callback handler, ``astream_events`` or a
    streaming UI; this model's own run reports the judged chunks (callbacks
    set on the wrapped model itself still run).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chat_model: Any
    guard: Any
    policy: Any = None
    refusal: str | None = None
    block_unsafe_prompts: bool = False
    judge_tool_calls: bool = True
    fail_open: bool = False

    def __init__(self, chat_model: Any = None, guard: Any = None, **kwargs: Any) -> None:
        if not isinstance(chat_model, Runnable):
            raise TypeError(
                "GuardedChatModel(chat_model, guard) wraps a LangChain chat model (or a runnable made from one, such "
                f"as chat_model.bind_tools(...)); got {type(chat_model).__name__}"
            )
        if not callable(getattr(guard, "session", None)):
            raise TypeError(
                f"GuardedChatModel(chat_model, guard) needs the guard (a StreamGuard); got {type(guard).__name__}"
            )
        super().__init__(chat_model=chat_model, guard=guard, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "crossguard-guarded"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"chat_model": self.chat_model.get_name(), "refusal": self.refusal}

    def bind_tools(self, tools: Any, **kwargs: Any) -> GuardedChatModel:
        """The wrapped model with tools bound, still guarded (tool-call arguments are judged)."""
        return self.model_copy(update={"chat_model": self.chat_model.bind_tools(tools, **kwargs)})

    # --- the wrapped model, outside the caller's callbacks ---

    @staticmethod
    def _inner_kwargs(stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        # callbacks=[] keeps the caller's handlers (and astream_events) off the unjudged tokens.
        inner = {"config": {"callbacks": []}, **kwargs}
        if stop is not None:  # None would override a stop bound on the wrapped runnable
            inner["stop"] = stop
        return inner

    # --- sync ---

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        run = _GuardedRun(self)
        try:
            run.start(messages)
            if not run.stopped:
                with closing(iter(self.chat_model.stream(messages, **self._inner_kwargs(stop, kwargs)))) as upstream:
                    for value in upstream:
                        for chunk in run.push(_as_chunk(value)):
                            yield ChatGenerationChunk(message=chunk)
                        if run.stopped:
                            break
                if not run.stopped:
                    for chunk in run.finish():
                        yield ChatGenerationChunk(message=chunk)
            if run.stopped:
                yield ChatGenerationChunk(message=run.refuse(AIMessageChunk))
        finally:
            run.close()

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        run = _GuardedRun(self)
        try:
            run.start(messages)
            if not run.stopped:
                message = _as_message(self.chat_model.invoke(messages, **self._inner_kwargs(stop, kwargs)))
                if run.judge(message):
                    return ChatResult(generations=[ChatGeneration(message=message)])
            return ChatResult(generations=[ChatGeneration(message=run.refuse(AIMessage))])
        finally:
            run.close()

    # --- async: the guard's work runs in a worker thread, off the event loop ---

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        run = _GuardedRun(self)
        try:
            await asyncio.to_thread(run.start, messages)
            if not run.stopped:
                upstream = self.chat_model.astream(messages, **self._inner_kwargs(stop, kwargs))
                async with aclosing(upstream):
                    async for value in upstream:
                        for chunk in await asyncio.to_thread(run.push, _as_chunk(value)):
                            yield ChatGenerationChunk(message=chunk)
                        if run.stopped:
                            break
                if not run.stopped:
                    for chunk in await asyncio.to_thread(run.finish):
                        yield ChatGenerationChunk(message=chunk)
            if run.stopped:
                yield ChatGenerationChunk(message=run.refuse(AIMessageChunk))
        finally:
            run.close()

    async def _agenerate(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        run = _GuardedRun(self)
        try:
            await asyncio.to_thread(run.start, messages)
            if not run.stopped:
                message = _as_message(await self.chat_model.ainvoke(messages, **self._inner_kwargs(stop, kwargs)))
                if await asyncio.to_thread(run.judge, message):
                    return ChatResult(generations=[ChatGeneration(message=message)])
            return ChatResult(generations=[ChatGeneration(message=run.refuse(AIMessage))])
        finally:
            run.close()


# --- the callback handlers that observe and raise ---------------------------------------------


class GuardCallbackHandler(BaseCallbackHandler):
    """Moderates every LLM/chat-model run it is attached to, and raises
    ``GuardFlaggedError`` once the guard flags (observe and raise: the text
    streamed before the flag has reached the caller; ``GuardedChatModel``
    withholds instead).

    ``block_unsafe_prompts``: raise at the start of a run whose prompt the
    query head judges unsafe under the policy (the error carries the query
    verdict). ``judge_tool_calls``: judge tool-call arguments (default; each
    call its own stream). ``fail_open``: if the guard cannot judge a run (it
    raises, or the conversation cannot be mapped onto its template), log a
    warning and let the run go on unjudged (default: the error stops the
    run).

    One handler may serve many runs at once: its state is kept per run id and
    freed when the run ends (``live_sessions`` counts the guard sessions of
    runs in progress). ``keep_results=N`` keeps, for the last N runs,
    ``judged[run_id]`` (each stream's judged pieces) and ``unjudged[run_id]``
    (why a run went on unjudged); by default nothing is kept.
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
        keep_results: int = 0,
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

    @property
    def live_runs(self) -> int:
        """Runs in progress that this handler holds state for."""
        return len(self._runs)

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
        message = getattr(chunk, "message", None)
        for key, delta, *kind in _streamed_deltas(streams, _chunk_text(token, chunk), message, self.judge_tool_calls):
            self._step(run_id, streams, key, partial(streams.push, key, delta, reasoning=bool(kind)))

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        streams = self._runs.get(run_id)
        if streams is None:
            return
        try:
            generations = [generation for row in response.generations for generation in row]
            for choice, generation in enumerate(generations):
                message = getattr(generation, "message", None)
                text = _text(message) if message is not None else generation.text
                key = StreamKey(choice)
                reasoning, judged = _reasoning_text(message), streams.reasoning(key)
                if len(reasoning) > len(judged) and reasoning.startswith(judged) and not streams.text(key):
                    # Reasoning that was not streamed: into the think block, before the answer.
                    push = partial(streams.push, key, reasoning[len(judged) :], reasoning=True)
                    self._step(run_id, streams, key, push)
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
            raise _prompt_error(verdict)
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
        # can come before the piece that holds them is released. The verdict
        # reported is the one at flagged_at, not a later (sticky) one.
        piece, verdict = first_flagged(pieces), streams.flag(key)
        if piece is None and verdict is None:
            return
        self._close(run_id)
        raise _flagged_error(streams, key, verdict or piece.verdict, piece)

    def _close(self, run_id: UUID) -> None:
        streams = self._runs.pop(run_id, None)
        if streams is not None:
            streams.close()

    def _remember(self, results: OrderedDict, run_id: UUID, value: Any) -> None:
        if self.keep_results <= 0:
            return
        with self._lock:
            results[run_id] = value
            while len(results) > self.keep_results:
                results.popitem(last=False)


class AsyncGuardCallbackHandler(AsyncCallbackHandler):
    """``GuardCallbackHandler`` as an ``AsyncCallbackHandler``, for async
    runs (``astream``, ``ainvoke``, ``abatch``): the guard's work runs in a
    worker thread, off the event loop, and a flag raises
    ``GuardFlaggedError`` in the run. Same options and attributes. In a
    sync run LangChain logs and swallows an async handler's errors: use
    ``GuardCallbackHandler`` there (it works in both)."""

    raise_error = True

    def __init__(self, guard: Any, **options: Any) -> None:
        self.handler = GuardCallbackHandler(guard, **options)

    @property
    def judged(self) -> OrderedDict[UUID, dict[StreamKey, list[JudgedPiece]]]:
        return self.handler.judged

    @property
    def unjudged(self) -> OrderedDict[UUID, str]:
        return self.handler.unjudged

    @property
    def live_sessions(self) -> int:
        return self.handler.live_sessions

    @property
    def live_runs(self) -> int:
        return self.handler.live_runs

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        await asyncio.to_thread(self.handler.on_chat_model_start, serialized, messages, run_id=run_id, **kwargs)

    async def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        await asyncio.to_thread(self.handler.on_llm_start, serialized, prompts, run_id=run_id, **kwargs)

    async def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        await asyncio.to_thread(self.handler.on_llm_new_token, token, chunk=chunk, run_id=run_id, **kwargs)

    async def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        await asyncio.to_thread(self.handler.on_llm_end, response, run_id=run_id, **kwargs)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.handler.on_llm_error(error, run_id=run_id, **kwargs)
