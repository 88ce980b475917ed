"""Chunk rewriting: every chunk (and every non-streamed answer) is rebuilt
from the fields the gateway knows, and every text-bearing field among them
is judged; nothing else is relayed.

The allowlist, per object (the README names it too):

* chunk / answer: ``id`` (the gateway's own), ``object``, ``created`` (an
  int), ``model`` and ``system_fingerprint`` and ``service_tier`` (only when
  they are identifiers: no spaces, at most 256 characters), ``choices``,
  ``usage`` (numbers only);
* choice: ``index``, ``delta`` (streamed) or ``message``, ``finish_reason``
  (a lowercase word), ``logprobs`` (see below), ``token_ids`` (id mode only:
  ids the guard judged, and that spell the text shown);
* delta / message: ``role`` (``assistant``), ``content``, ``reasoning`` and
  ``reasoning_content``, ``refusal`` (each judged), ``tool_calls``,
  ``function_call``;
* tool call: ``index``, ``id`` (an identifier, at most 64 characters),
  ``type``, ``function.name`` (a tool the request declared) and
  ``function.arguments`` (judged as the decoded JSON strings a tool sees;
  the raw text is relayed), or for custom tools ``custom.name`` and
  ``custom.input`` (judged as it is);
* logprobs: ``content`` and ``refusal`` entries ``token``, ``logprob``,
  ``bytes`` (``top_logprobs`` emptied: alternatives were never generated,
  so never judged), kept only while their bytes spell the text shown.

Dropped: every other field (``audio``, ``annotations``, ``reasoning_details``,
``thinking``, ``choices[].text``, a ``message`` inside a chunk, the upstream's
own ``content_filter_results``, ``prompt_token_ids``, ``stop_reason``,
extension fields).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from adapter import SourceDecoder
from integrations.gateway.wire import BadChunk, filter_results, prompt_filter_results, verdict_json
from integrations.streams import StreamKey
from integrations.tool_arguments import ArgumentsText, arguments_text

if TYPE_CHECKING:
    from integrations.gateway.prompt import ChatRequest

__all__ = ["ChunkReader", "IdsMismatch", "TooManyToolCalls", "cut_chunk", "flag_metadata", "rewrite_completion"]

Delta = tuple[StreamKey, Any, bool]  # (stream, text or generator ids, reasoning?)

_IDENTIFIER = re.compile(r"[A-Za-z0-9._:/@+=-]{1,256}")
_WORD = re.compile(r"[a-z_]{1,32}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUMBERS = (int, float)


class IdsMismatch(Exception):
    """The upstream's token ids do not decode to the text it sent (or cannot be
    split between reasoning and answer): the response is judged from text."""


class TooManyToolCalls(BadChunk):
    """An answer made more tool calls than the gateway judges (``max_tool_calls``)."""


def identifier(value: Any, longest: int = 256) -> str | None:
    """``value`` if it is an identifier (no spaces, no escapes, not too long), else None."""
    if isinstance(value, str) and len(value) <= longest and _IDENTIFIER.fullmatch(value):
        return value
    return None


def clean_text(value: Any, what: str) -> str | None:
    """A text field as the guard and the client get it: None, or a str whose
    lone UTF-16 surrogates (valid JSON, not text) became U+FFFD."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadChunk(f"{what} that is not a string")
    if _SURROGATE.search(value):
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


def usage_numbers(usage: Any, depth: int = 0) -> dict[str, Any] | None:
    """The numbers of a ``usage`` object (and of its ``*_details`` objects)."""
    if not isinstance(usage, dict):
        return None
    kept: dict[str, Any] = {}
    for name, value in usage.items():
        if not identifier(name, 64):
            continue
        if isinstance(value, _NUMBERS) and not isinstance(value, bool):
            kept[name] = value
        elif depth == 0 and isinstance(value, dict):
            kept[name] = usage_numbers(value, 1)
    return kept


class ChoiceState:
    """What the gateway tracks of one choice of a response."""

    __slots__ = ("arguments", "channel", "finished", "judged_pieces", "logprob_bytes", "logprobs_dropped", "mode",
                 "shown_bytes", "tool_calls", "unshown")  # fmt: skip

    def __init__(self) -> None:
        self.mode: Literal["ids", "text"] | None = None
        self.channel: Literal["reasoning", "main"] = "main"
        self.finished = False
        # Id mode: the judged pieces of the choice's stream taken so far, and
        # their text that no released chunk has shown yet, per channel.
        self.judged_pieces = 0
        self.unshown = {"reasoning": "", "main": ""}
        self.arguments: dict[StreamKey, ArgumentsText] = {}
        self.tool_calls: set[StreamKey] = set()
        self.logprob_bytes = {"content": bytearray(), "refusal": bytearray()}
        self.shown_bytes = {"content": bytearray(), "refusal": bytearray()}
        self.logprobs_dropped = False


class ChunkReader:
    """Reads what the upstream sends for the guard, and rebuilds each chunk
    (or answer) from the allowlist above. One per way of judging a response:
    a response whose ids turn out not to match its text is read again by a
    reader in text mode."""

    def __init__(self, chat: ChatRequest, *, use_ids: bool) -> None:
        self.chat = chat
        self.use_ids = use_ids
        self.choices: dict[int, ChoiceState] = {}

    def state(self, index: int) -> ChoiceState:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState()
        return state

    def mode(self, index: int) -> str:
        state = self.choices.get(index)
        return state.mode if state is not None and state.mode is not None else ("ids" if self.use_ids else "text")

    # --- the top level -----------------------------------------------------------

    def head(self, data: dict[str, Any], kind: str) -> dict[str, Any]:
        """The gateway's own top-level fields of a chunk or answer, with the upstream's that are allowed."""
        chat = self.chat
        created = data.get("created")
        head: dict[str, Any] = {
            "id": f"chatcmpl-{chat.request_id}", "object": kind,
            "created": created if isinstance(created, int) and not isinstance(created, bool) else chat.created,
            "model": identifier(data.get("model")) or chat.model,
        }  # fmt: skip
        for name in ("system_fingerprint", "service_tier"):
            value = identifier(data.get(name))
            if value is not None:
                head[name] = value
        return head

    def read_chunk(self, chunk: dict[str, Any]) -> tuple[dict[str, Any], list[Delta]]:
        """(the chunk to relay, once judged; what it carries for the guard)."""
        choices = chunk.get("choices")
        choices = [] if choices is None else choices
        if not isinstance(choices, list):
            raise BadChunk("'choices' is not an array")
        rebuilt = self.head(chunk, "chat.completion.chunk")
        rebuilt["choices"] = kept = []
        deltas: list[Delta] = []
        for choice in choices:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            delta = (choice.get("delta") or {}) if isinstance(choice, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(delta, dict):
                raise BadChunk("a choice without an integer 'index' and an object 'delta'")
            state = self.state(index)
            finish = self._finish_reason(choice)
            if finish is not None:
                state.finished = True
            out_delta, texts = self._message(index, state, delta, streamed=True)
            out = {"index": index, "delta": out_delta, "logprobs": None, "finish_reason": finish}
            ids = choice.get("token_ids")
            reasoning, content, refusal = texts.reasoning, texts.content, texts.refusal
            if state.mode is None and (reasoning or content or ids):
                state.mode = "ids" if self.use_ids and isinstance(ids, list) else "text"
            if state.mode == "ids":
                deltas += self._id_deltas(index, state, ids, reasoning, content)
                if isinstance(ids, list) and ids:
                    out["token_ids"] = ids
            deltas += texts.deltas(index, answer=state.mode != "ids")
            out["logprobs"] = self._logprobs(state, choice.get("logprobs"), content, refusal)
            kept.append(out)
        usage = usage_numbers(chunk.get("usage"))
        if usage is not None:
            rebuilt["usage"] = usage
        return rebuilt, deltas

    def read_answer(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[Delta]]:
        """A non-streamed answer: (the answer to send, once judged; what it carries for the guard)."""
        choices = data.get("choices")
        if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
            raise BadChunk("an answer without a 'choices' array of objects")
        rebuilt = self.head(data, "chat.completion")
        rebuilt["choices"] = kept = []
        deltas: list[Delta] = []
        for choice in choices:
            index, message = choice.get("index", 0), choice.get("message") or {}
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(message, dict):
                raise BadChunk("a choice without an integer 'index' and an object 'message'")
            state = self.state(index)
            state.finished = True
            out_message, texts = self._message(index, state, message, streamed=False)
            out_message.setdefault("content", None)
            reasoning, content, refusal = texts.reasoning, texts.content, texts.refusal
            out = {"index": index, "message": out_message, "logprobs": None,
                   "finish_reason": self._finish_reason(choice)}  # fmt: skip
            ids = choice.get("token_ids")
            state.mode = "text"
            if self.use_ids and isinstance(ids, list) and ids and not reasoning and content:
                if all(isinstance(token, int) and not isinstance(token, bool) for token in ids):
                    decoder = SourceDecoder(self.chat.gateway.generator)
                    try:
                        decoded = "".join(piece.text for piece in decoder.push(ids) + decoder.flush())
                    except ValueError:  # an id the generator's tokenizer does not have
                        decoded = None
                    if decoded == content:
                        state.mode = "ids"
            if state.mode == "ids":
                deltas.append((StreamKey(index), ids, False))
                out["token_ids"] = ids
            deltas += texts.deltas(index, answer=state.mode != "ids")
            out["logprobs"] = self._logprobs(state, choice.get("logprobs"), content, refusal)
            if out["logprobs"] is not None and not self._logprobs_complete(state):
                out["logprobs"] = None
            kept.append(out)
        usage = usage_numbers(data.get("usage"))
        if usage is not None:
            rebuilt["usage"] = usage
        return rebuilt, deltas

    # --- one delta or message -----------------------------------------------------

    @staticmethod
    def _finish_reason(choice: dict[str, Any]) -> str | None:
        finish = choice.get("finish_reason")
        if finish is None:
            return None
        if not isinstance(finish, str) or not _WORD.fullmatch(finish):
            raise BadChunk("a finish_reason that is not a lowercase word")
        return finish

    def _message(self, index: int, state: ChoiceState, fields: dict[str, Any], *,
                 streamed: bool) -> tuple[dict[str, Any], _Texts]:  # fmt: skip
        """(the delta or message rebuilt, its texts: reasoning, content, refusal and the tool-call deltas)."""
        out: dict[str, Any] = {}
        if fields.get("role") == "assistant":
            out["role"] = "assistant"
        content = fields.get("content")
        if isinstance(content, list) and not streamed:
            content = _answer_parts(content)
        content = clean_text(content, "a content")
        if "content" in fields:
            out["content"] = content
        reasonings = []
        for name in ("reasoning", "reasoning_content"):
            value = clean_text(fields.get(name), f"a {name}")
            if name in fields:
                out[name] = value
            reasonings.append(value or "")
        # Both names are judged when a server sends two different texts.
        reasoning = reasonings[0] if reasonings[0] == reasonings[1] else reasonings[0] + reasonings[1]
        refusal = clean_text(fields.get("refusal"), "a refusal")
        if "refusal" in fields:
            out["refusal"] = refusal
        tools: list[Delta] = []
        calls = fields.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise BadChunk("'tool_calls' that is not an array")
            out["tool_calls"] = [self._tool_call(index, state, position, call, tools, streamed)
                                 for position, call in enumerate(calls)]  # fmt: skip
        if fields.get("function_call") is not None:
            out["function_call"] = self._function_call(index, state, fields["function_call"], tools, streamed)
        return out, _Texts(reasoning, content or "", refusal or "", tools)

    def _tool_call(self, index: int, state: ChoiceState, position: int, call: Any, tools: list[Delta],
                   streamed: bool) -> dict[str, Any]:  # fmt: skip
        if not isinstance(call, dict):
            raise BadChunk("a tool call that is not an object")
        number = call.get("index", position) if streamed else position
        if not isinstance(number, int) or isinstance(number, bool):
            raise BadChunk("a tool call whose 'index' is not an integer")
        key = StreamKey(index, number)
        self._count_tool_call(state, key)
        out: dict[str, Any] = {"index": number} if streamed else {}
        if call.get("id") is not None:
            call_id = identifier(call.get("id"), 64)
            if call_id is None:
                raise BadChunk("a tool call whose 'id' is not an identifier")
            out["id"] = call_id
        kind = call.get("type")
        if kind is not None:
            if kind not in ("function", "custom"):
                raise BadChunk("a tool call of a type other than function or custom")
            out["type"] = kind
        if kind == "custom" or "custom" in call:
            custom = call.get("custom")
            if not isinstance(custom, dict):
                raise BadChunk("a custom tool call without a 'custom' object")
            rebuilt = self._named(custom, self.chat.custom_tools, "custom tool")
            text = clean_text(custom.get("input"), "a custom tool input")
            if text is not None:
                rebuilt["input"] = text
                if text:
                    tools.append((key, text, False))  # free text: judged as it is
            out["custom"] = rebuilt
            return out
        function = call.get("function")
        if function is None:
            return out
        out["function"] = self._arguments(state, key, function, self.chat.function_tools, tools, streamed)
        return out

    def _function_call(self, index: int, state: ChoiceState, call: Any, tools: list[Delta],
                       streamed: bool) -> dict[str, Any]:  # fmt: skip
        key = StreamKey(index, "function_call")
        self._count_tool_call(state, key)
        return self._arguments(state, key, call, self.chat.legacy_functions, tools, streamed)

    def _arguments(self, state: ChoiceState, key: StreamKey, function: Any, declared: frozenset[str],
                   tools: list[Delta], streamed: bool) -> dict[str, Any]:  # fmt: skip
        if not isinstance(function, dict):
            raise BadChunk("a function call that is not an object")
        out = self._named(function, declared, "tool")
        raw = function.get("arguments")
        if raw is None:
            return out
        if not isinstance(raw, str):  # some servers send an object: the client gets the JSON text
            raw = json.dumps(raw, ensure_ascii=False)
        raw = clean_text(raw, "arguments")
        out["arguments"] = raw
        if streamed:
            decoder = state.arguments.get(key)
            if decoder is None:
                decoder = state.arguments[key] = ArgumentsText()
            # An escape still open at the very end (at most "\uXXX") spells no
            # character, so what the decoder never releases needs no judging.
            text = decoder.push(raw)
        else:
            text = arguments_text(raw)
        if text:
            tools.append((key, text, False))
        return out

    @staticmethod
    def _named(fields: dict[str, Any], declared: frozenset[str], what: str) -> dict[str, Any]:
        name = fields.get("name")
        if name is None:
            return {}
        if not isinstance(name, str) or name not in declared:
            # A tool name is generated text too: only the names the client's
            # own request declared go out (they are the client's words).
            raise BadChunk(f"a call to a {what} the request did not declare")
        return {"name": name}

    def _count_tool_call(self, state: ChoiceState, key: StreamKey) -> None:
        if key in state.tool_calls:
            return
        state.tool_calls.add(key)
        limit = self.chat.config.max_tool_calls
        if len(state.tool_calls) > limit:
            raise TooManyToolCalls(f"choice {key.choice} made more than {limit} tool calls (the gateway's "
                                   "max_tool_calls)")  # fmt: skip

    def _id_deltas(self, index: int, state: ChoiceState, ids: Any, reasoning: str, content: str) -> list[Delta]:
        if not isinstance(ids, list):
            if reasoning or content:
                raise IdsMismatch(f"choice {index} sent text without token ids after sending ids")
            return []
        if reasoning and content:
            raise IdsMismatch(f"choice {index} sent reasoning and answer in one delta, so its ids cannot be split")
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in ids):
            raise BadChunk("token ids that are not integers")
        if content:
            state.channel = "main"
        elif reasoning:
            state.channel = "reasoning"
        return [(StreamKey(index), ids, state.channel == "reasoning")] if ids else []

    def check_released(self, chunk: dict[str, Any]) -> None:
        """Before a chunk goes out in id mode: the text it shows must be text
        the guard judged from the ids (what the guard's own decoding of them
        gave, in the judged pieces): a server that sends text before its ids,
        or other text than its ids, is judged from text (``IdsMismatch``).
        Chunks come out in order, so each one's text continues the last's."""
        for choice in chunk["choices"]:
            state = self.choices.get(choice["index"])
            if state is None or state.mode != "ids":
                continue
            delta = choice["delta"]
            content = delta.get("content") or ""
            reasonings = [delta.get(name) or "" for name in ("reasoning", "reasoning_content")]
            reasoning = reasonings[0] if reasonings[0] == reasonings[1] else reasonings[0] + reasonings[1]
            if not content and not reasoning:
                continue
            pieces = self.chat.streams.pieces.get(StreamKey(choice["index"]), ())
            for piece in pieces[state.judged_pieces :]:
                state.unshown["reasoning" if piece.reasoning else "main"] += piece.text
            state.judged_pieces = len(pieces)
            for channel, text in (("reasoning", reasoning), ("main", content)):
                if not state.unshown[channel].startswith(text):
                    raise IdsMismatch(f"choice {choice['index']}'s token ids do not decode to the text it sent")
                state.unshown[channel] = state.unshown[channel][len(text) :]

    # --- logprobs ---------------------------------------------------------------------

    def _logprobs(self, state: ChoiceState, logprobs: Any, content: str, refusal: str) -> dict[str, Any] | None:
        """The logprobs of the text this chunk shows, while their bytes spell
        it; once they do not (or cannot be read), none for the rest of the choice."""
        for name, text in (("content", content), ("refusal", refusal)):
            state.shown_bytes[name] += text.encode("utf-8")
        if logprobs is None or state.logprobs_dropped:
            return None
        kept: dict[str, Any] = {}
        for name in ("content", "refusal"):
            entries = logprobs.get(name) if isinstance(logprobs, dict) else None
            if entries is None:
                continue
            rebuilt = _logprob_entries(entries)
            if rebuilt is not None:
                for entry in rebuilt:
                    state.logprob_bytes[name] += bytes(entry["bytes"])
            if rebuilt is None or not _spells(state.logprob_bytes[name], state.shown_bytes[name]):
                state.logprobs_dropped = True
                return None
            kept[name] = rebuilt
        return kept or None

    @staticmethod
    def _logprobs_complete(state: ChoiceState) -> bool:
        return all(state.logprob_bytes[name] == state.shown_bytes[name] or not state.logprob_bytes[name]
                   for name in ("content", "refusal"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Texts:
    """What a delta or message carries for the guard."""

    reasoning: str
    content: str
    refusal: str
    tools: list[Delta]

    def deltas(self, index: int, *, answer: bool) -> list[Delta]:
        """What goes to the guard: the reasoning and answer text (unless the
        choice's ids carry them), the refusal, the tool calls."""
        deltas: list[Delta] = []
        if answer and self.reasoning:
            deltas.append((StreamKey(index), self.reasoning, True))
        if answer and self.content:
            deltas.append((StreamKey(index), self.content, False))
        if self.refusal:
            deltas.append((StreamKey(index, refusal=True), self.refusal, False))
        return deltas + self.tools


def _answer_parts(parts: list[Any]) -> str:
    """The text of an answer given as content parts (``[{"type": "text", "text": ...}]``)."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in ("text", "output_text") or not isinstance(
                part.get("text"), str):  # fmt: skip
            raise BadChunk("an answer content part that is not text")
        texts.append(part["text"])
    return "".join(texts)


def _logprob_entries(entries: Any) -> list[dict[str, Any]] | None:
    """Logprob entries rebuilt (``token`` from the bytes, no alternatives), or None if unreadable."""
    if not isinstance(entries, list):
        return None
    rebuilt = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        logprob, raw = entry.get("logprob"), entry.get("bytes")
        if not isinstance(logprob, _NUMBERS) or isinstance(logprob, bool):
            return None
        if raw is None:
            token = entry.get("token")
            if not isinstance(token, str):
                return None
            raw = list(token.encode("utf-8", "replace"))
        if not isinstance(raw, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in raw):
            return None
        token = bytes(raw).decode("utf-8", "replace")
        rebuilt.append({"token": token, "logprob": logprob, "bytes": raw, "top_logprobs": []})
    return rebuilt


def _spells(logprob_bytes: bytearray, shown: bytearray) -> bool:
    """Whether the logprobs' bytes so far agree with the text shown so far:
    they may lag it, or run ahead by the first bytes of one character (a
    server holds back an incomplete character), never by more."""
    if shown.startswith(logprob_bytes):
        return True
    if not logprob_bytes.startswith(shown) or len(logprob_bytes) - len(shown) > 3:
        return False
    try:
        bytes(logprob_bytes[len(shown) :]).decode("utf-8")
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data"
    return False


# --- the end of a cut stream, and non-streamed answers ------------------------------


def flag_metadata(chat: ChatRequest, reader: ChunkReader, key: StreamKey, verdict: Any,
                  withheld_from: int | None) -> dict[str, Any]:  # fmt: skip
    details: dict[str, Any] = {"flagged": True, "mode": reader.mode(key.choice), "stream": str(key),
                               "choice": key.choice, "tool_call": key.tool_call}  # fmt: skip
    if withheld_from is not None:
        unit = "generator_token" if chat.streams.is_id_stream(key) else "delta"
        details["withheld_from"] = {unit: withheld_from}
    return {**details, "verdict": verdict_json(verdict), "request": chat.request_id}


def cut_chunk(chat: ChatRequest, reader: ChunkReader, head: dict[str, Any], key: StreamKey, verdict: Any,
              withheld_from: int | None) -> dict[str, Any]:  # fmt: skip
    """The last chunk of a cut stream: ``content_filter`` for every choice still open."""
    open_choices = sorted(index for index, state in reader.choices.items() if not state.finished) or [key.choice]
    choices = []
    for index in open_choices:
        filtered = index == key.choice
        choices.append({
            "index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter",
            "content_filter_results": filter_results(verdict, True) if filtered else {},
        })  # fmt: skip
    return {**head, "choices": choices, "crossguard": flag_metadata(chat, reader, key, verdict, withheld_from)}


def rewrite_completion(chat: ChatRequest, reader: ChunkReader, answer: dict[str, Any],
                       flagged: dict[int, tuple[StreamKey, Any]]) -> None:  # fmt: skip
    """Flagged choices get the refusal and ``finish_reason: "content_filter"``
    (nothing of the withheld answer: no ids, logprobs, tool calls or
    reasoning); every choice gets its annotations."""
    choices = answer["choices"]
    for number, choice in enumerate(choices):
        index = choice["index"]
        if index in flagged:
            key, verdict = flagged[index]
            choices[number] = {
                "index": index, "message": {"role": "assistant", "content": chat.config.refusal}, "logprobs": None,
                "finish_reason": "content_filter", "content_filter_results": filter_results(verdict, True),
                "crossguard": flag_metadata(chat, reader, key, verdict, None),
            }  # fmt: skip
        else:
            choice["content_filter_results"] = {}
            choice["crossguard"] = {"flagged": False, "mode": reader.mode(index)}
    answer["prompt_filter_results"] = prompt_filter_results(chat.query_verdict, False)
