"""Chunk rewriting: what each chunk (or non-streamed answer) carries for the
guard, per choice, in id or text mode; the chunk that ends a cut stream; and
the non-streamed answer judged whole and rewritten."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from adapter import SourceDecoder
from integrations.gateway.prompt import text_content
from integrations.gateway.wire import BadChunk, GatewayError, filter_results, prompt_filter_results, verdict_json
from integrations.streams import StreamKey

if TYPE_CHECKING:
    from integrations.gateway.prompt import ChatRequest

__all__ = [
    "ChoiceState",
    "IdsMismatch",
    "check_ids_cover_text",
    "choice_mode",
    "cut_chunk",
    "flag_metadata",
    "judge_completion",
    "read_deltas",
    "rewrite_completion",
]


class ChoiceState:
    """What the gateway tracks of one choice of a streamed response."""

    __slots__ = ("channel", "decoded", "decoders", "finished", "mode", "shown")

    def __init__(self) -> None:
        self.mode: Literal["ids", "text"] | None = None
        self.channel: Literal["reasoning", "main"] = "main"
        self.finished = False
        self.decoders: dict[str, SourceDecoder] = {}
        self.shown = {"reasoning": "", "main": ""}
        self.decoded = {"reasoning": "", "main": ""}


class IdsMismatch(Exception):
    """The upstream's token ids do not decode to the text it sent (or cannot be
    split between reasoning and answer): the response is judged from text."""


def reasoning_text(fields: dict[str, Any]) -> str:
    """Reasoning under either name; both are judged when a server sends two different texts."""
    texts = [fields.get(name) or "" for name in ("reasoning", "reasoning_content")]
    if not all(isinstance(text, str) for text in texts):
        raise BadChunk("reasoning that is not a string")
    return texts[0] if texts[0] == texts[1] else texts[0] + texts[1]


def tool_arguments(index: int, fields: dict[str, Any], positions: bool) -> list[tuple[StreamKey, str]]:
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
        raise BadChunk("a malformed 'tool_calls' or 'function_call'") from None
    if legacy:
        found.append((StreamKey(index, "function_call"), legacy if isinstance(legacy, str) else json.dumps(legacy)))
    return [(key, arguments) for key, arguments in found if arguments]



def choice_state(chat: ChatRequest, index: int) -> ChoiceState:
    state = chat.choices.get(index)
    if state is None:
        state = chat.choices[index] = ChoiceState()
    return state


def read_deltas(chat: ChatRequest, chunk: dict[str, Any]) -> list[tuple[StreamKey, Any, bool]]:
    """(stream, text or ids, reasoning?) for every generated text a chunk
    carries. In text mode the chunk's ``token_ids`` and ``logprobs`` are
    removed: they could spell out text the guard has not judged yet."""
    deltas: list[tuple[StreamKey, Any, bool]] = []
    choices = chunk.get("choices")
    choices = [] if choices is None else choices
    if not isinstance(choices, list):
        raise BadChunk("'choices' is not an array")
    for choice in choices:
        index = choice.get("index", 0) if isinstance(choice, dict) else None
        delta = (choice.get("delta") or {}) if isinstance(choice, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(delta, dict):
            raise BadChunk("a choice without an integer 'index' and an object 'delta'")
        state = choice_state(chat, index)
        if choice.get("finish_reason") is not None:
            state.finished = True
        reasoning = reasoning_text(delta)
        content = delta.get("content") or ""
        refusal = delta.get("refusal") or ""
        if not isinstance(content, str) or not isinstance(refusal, str):
            raise BadChunk("a delta whose content or refusal is not a string")
        ids = choice.get("token_ids")
        if state.mode is None and (reasoning or content or ids):
            state.mode = "ids" if chat.use_ids and isinstance(ids, list) else "text"
        if state.mode == "ids":
            deltas += _id_deltas(chat, index, state, ids, reasoning, content)
        else:
            choice.pop("token_ids", None)
            choice.pop("logprobs", None)
            if reasoning:
                deltas.append((StreamKey(index), reasoning, True))
            if content:
                deltas.append((StreamKey(index), content, False))
        if refusal:
            deltas.append((StreamKey(index, "refusal"), refusal, False))
        deltas += [(key, arguments, False) for key, arguments in tool_arguments(index, delta, positions=False)]
    return deltas


def _id_deltas(chat: ChatRequest, index: int, state: ChoiceState, ids: Any, reasoning: str, content: str) -> list:
    if not isinstance(ids, list):
        if reasoning or content:
            raise IdsMismatch(f"choice {index} sent text without token ids after sending ids")
        return []
    if reasoning and content:
        raise IdsMismatch(f"choice {index} sent reasoning and answer in one delta, so its ids cannot be split")
    if content:
        state.channel = "main"
    elif reasoning:
        state.channel = "reasoning"
    channel = state.channel
    state.shown[channel] += content if channel == "main" else reasoning
    decoder = state.decoders.get(channel)
    if decoder is None:
        decoder = state.decoders[channel] = SourceDecoder(chat.gateway.generator)
    state.decoded[channel] += "".join(piece.text for piece in decoder.push(ids))
    # The chunk is released once its ids are judged, so the text it shows
    # must already be there in the ids' text: a server that sends text
    # before its ids, or other text than its ids, is judged from text.
    if not state.decoded[channel].startswith(state.shown[channel]):
        raise IdsMismatch(f"choice {index}'s token ids do not decode to the text it sent")
    return [(StreamKey(index), ids, channel == "reasoning")] if ids else []


def check_ids_cover_text(chat: ChatRequest) -> None:
    """At the end: every character shown must be judged text of the ids."""
    for index, state in chat.choices.items():
        if state.mode != "ids":
            continue
        for channel, decoder in state.decoders.items():
            state.decoded[channel] += "".join(piece.text for piece in decoder.flush())
            if not state.decoded[channel].startswith(state.shown[channel]):
                raise IdsMismatch(f"choice {index}'s token ids do not cover the text it sent")


def choice_mode(chat: ChatRequest, index: int) -> str:
    state = chat.choices.get(index)
    return state.mode if state is not None and state.mode is not None else ("ids" if chat.use_ids else "text")


def flag_metadata(chat: ChatRequest, key: StreamKey, verdict: Any, withheld_from: int | None) -> dict[str, Any]:
    details: dict[str, Any] = {"flagged": True, "mode": choice_mode(chat, key.choice), "stream": str(key),
                               "choice": key.choice, "tool_call": key.tool_call}  # fmt: skip
    if withheld_from is not None:
        unit = "generator_token" if chat.streams.is_id_stream(key) else "delta"
        details["withheld_from"] = {unit: withheld_from}
    return {**details, "verdict": verdict_json(verdict), "request": chat.request_id}


def cut_chunk(
    chat: ChatRequest, template: dict[str, Any], key: StreamKey, verdict: Any, withheld_from: int | None
) -> dict:
    """The last chunk of a cut stream: ``content_filter`` for every choice still open."""
    open_choices = sorted(index for index, state in chat.choices.items() if not state.finished) or [key.choice]
    choices = []
    for index in open_choices:
        filtered = index == key.choice
        choices.append({
            "index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter",
            "content_filter_results": filter_results(verdict, True) if filtered else {},
        })  # fmt: skip
    return {**template, "choices": choices, "crossguard": flag_metadata(chat, key, verdict, withheld_from)}

# Fields of a flagged choice that are kept: everything else (token ids,
# logprobs, tool calls, reasoning) could spell out the withheld answer.
_FLAGGED_CHOICE_FIELDS = ("index",)


def rewrite_completion(chat: ChatRequest, data: dict[str, Any], flagged: dict[int, tuple[StreamKey, Any]]) -> None:
    """Give flagged choices the refusal and ``finish_reason: "content_filter"``, and every choice its annotations."""
    choices = data["choices"]
    for number, choice in enumerate(choices):
        index = choice.get("index", 0)
        if index in flagged:
            key, verdict = flagged[index]
            choices[number] = {
                **{name: choice[name] for name in _FLAGGED_CHOICE_FIELDS if name in choice},
                "message": {"role": "assistant", "content": chat.config.refusal}, "logprobs": None,
                "finish_reason": "content_filter", "content_filter_results": filter_results(verdict, True),
                "crossguard": flag_metadata(chat, key, verdict, None),
            }  # fmt: skip
        else:
            choice["content_filter_results"] = {}
            choice["crossguard"] = {"flagged": False, "mode": choice_mode(chat, index)}
    data["prompt_filter_results"] = prompt_filter_results(chat.query_verdict, False)


def judge_completion(chat: ChatRequest, choices: list[dict[str, Any]]) -> dict[int, tuple[StreamKey, Any]]:
    """Judge every choice's texts; (stream, verdict) that flagged each flagged choice."""
    streams = chat.streams
    for choice in choices:
        index, message = choice.get("index", 0), choice.get("message") or {}
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(message, dict):
            raise BadChunk("a choice without an integer 'index' and an object 'message'")
        key = StreamKey(index)
        try:
            content = text_content(message.get("content"), strict=False)
        except GatewayError:
            content = None
        refusal = message.get("refusal") or ""
        if content is None or not isinstance(refusal, str):
            raise BadChunk("a message whose content or refusal is not text")
        reasoning = reasoning_text(message)
        ids = choice.get("token_ids")
        state = choice_state(chat, index)
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
        for tool_key, arguments in tool_arguments(index, message, positions=True):
            streams.push(tool_key, arguments)
    streams.finish_all()
    flagged: dict[int, tuple[StreamKey, Any]] = {}
    for key in streams.flagged:
        flagged.setdefault(key.choice, (key, streams.flag(key)))
    return flagged

