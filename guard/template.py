"""The Qwen3 chat template (thinking disabled), as guard input ids.

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{response}<|im_end|>\\n

This renders what the Qwen3 chat template that ships with the guard's
tokenizer renders with ``add_generation_prompt=True, enable_thinking=False``
(no tool definitions), for every message shape: system, user, assistant
(``reasoning_content`` or an inline ``<think>...</think>``, which the
template drops from turns before the last user query), assistant
``tool_calls`` (``<tool_call>`` JSON) and ``tool`` results (inside
``<tool_response>`` in a user turn).

The response part is what the template renders for the conversation's last
assistant turn with ``add_generation_prompt=False``, as upstream's evaluation
renders it: ``<think>\\n{reasoning.strip("\\n")}\\n</think>\\n\\n`` then
``{answer.lstrip("\\n")}<|im_end|>\\n``. Without reasoning the think block is
``<think>\\n\\n</think>\\n\\n``, the same ids as the thinking-disabled
generation prompt, so a session starts with that scaffold and
``GuardSession.begin_reasoning`` swaps it for an open think block
(``reasoning_start``) when the response reasons. ``think_close_ids`` and
``end_of_turn_ids`` are the control tokens (and the newlines after them) that
close the think block and the turn.

Message text is encoded as ordinary text: a user who writes ``<|im_end|>``
gets the characters, not the control token, so no prompt can close its own
turn and smuggle in a fake assistant turn. Only the template's own markup
becomes control tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.errors import CheckpointError

__all__ = [
    "Conversation",
    "empty_think_tail_ids",
    "encode_conversation",
    "encode_plain_text",
    "end_of_turn_ids",
    "render_segments",
    "think_close_ids",
]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
ASSISTANT_SCAFFOLD = f"\n{IM_START}assistant\n{THINK}\n\n{END_THINK}\n\n"
# What follows the answer: the template closes the assistant turn.
END_OF_TURN = (IM_END, "\n")
# What closes a think block: then the answer, its leading newlines stripped.
THINK_CLOSE = (END_THINK, "\n\n")
# Ids after the generation prompt's <think> with thinking disabled: "\n\n" </think> "\n\n".
EMPTY_THINK_TAIL_LENGTH = 3
ROLES = ("system", "user", "assistant", "tool")

Prompt = str | Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Conversation:
    """Guard input ids for a prompt, up to where the response begins."""

    ids: list[int]
    # The <|im_end|> that closes the last user turn (tool results are a user
    # turn too), where upstream's evaluation reads the query verdict, even
    # when system turns come after it; the last turn's without a user turn.
    query_position: int

    @property
    def response_start(self) -> int:
        return len(self.ids)

    @property
    def reasoning_start(self) -> int:
        """Position right after the scaffold's ``<think>``: where the think
        block's text begins when the response reasons."""
        return len(self.ids) - EMPTY_THINK_TAIL_LENGTH


def encode_plain_text(tokenizer: Any, text: str) -> list[int]:
    """``text`` through the tokenizer's normalizer, pre-tokenizer and model
    only, so that no added token (special or not) is ever matched."""
    normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(normalized) if tokenizer.pre_tokenizer else [(normalized, None)]
    return [token.id for piece, _ in pieces for token in tokenizer.model.tokenize(piece)]


def _control_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise CheckpointError(
            f"the guard tokenizer has no {token} token: is this the Qwen3 tokenizer of the checkpoint?"
        )
    return token_id


def _template_ids(tokenizer: Any, parts: tuple[str, str]) -> list[int]:
    control, text = parts
    return [_control_id(tokenizer, control), *encode_plain_text(tokenizer, text)]


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """``<|im_end|>`` and the ``\\n`` after it: what the template renders after
    the answer, and what upstream's evaluation judges last."""
    return _template_ids(tokenizer, END_OF_TURN)


def think_close_ids(tokenizer: Any) -> list[int]:
    """``</think>`` and the ``\\n\\n`` after it: what closes a think block."""
    return _template_ids(tokenizer, THINK_CLOSE)


def empty_think_tail_ids(tokenizer: Any) -> list[int]:
    """What follows ``<think>`` in the thinking-disabled scaffold: the empty
    think block's text ``"\\n" + "" + "\\n"`` (one ``\\n\\n`` token), then
    ``think_close_ids``."""
    ids = encode_plain_text(tokenizer, "\n\n") + think_close_ids(tokenizer)
    assert len(ids) == EMPTY_THINK_TAIL_LENGTH
    return ids


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(
            f"message content must be a str (or None), got {type(content).__name__} in {message!r}; "
            "join the text parts of a multi-part content first"
        )
    return content


def _tool_call(call: Any) -> tuple[str, str]:
    """(name, arguments text) of one tool call, as the template prints them:
    arguments that are a string verbatim, anything else as JSON (the way
    transformers' ``tojson`` writes it: not ASCII-escaped, keys in order)."""
    if not isinstance(call, Mapping):
        raise ValueError(f"a tool call must be a mapping with 'name' and 'arguments', got {call!r}")
    function = call.get("function") or call
    name, arguments = function.get("name"), function.get("arguments", function.get("args"))
    if not isinstance(name, str):
        raise ValueError(f"a tool call needs a str 'name', got {call!r}")
    if isinstance(arguments, str):
        return name, arguments
    try:
        return name, json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"tool call arguments must be a str or JSON-serialisable, got {arguments!r}") from error


def _messages(prompt: Prompt) -> list[Mapping[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"each message needs a role in {ROLES}, got {message!r}")
        _content(message)
        if message.get("tool_calls") and message["role"] != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, got {message!r}")
        for call in message.get("tool_calls") or ():
            _tool_call(call)
    if not messages:
        raise ValueError("the conversation is empty: pass the user turn to moderate")
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            "the last message must be the user turn to moderate (or tool results, or a system message), not an "
            "assistant message: an assistant prefill is the start of the response, so push its text as response "
            "text after moderate_prompt() on the messages before it"
        )
    return messages


def _split_reasoning(message: Mapping[str, Any]) -> tuple[str, str]:
    """(content, reasoning) of an assistant message, as the template splits them."""
    content = _content(message)
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        return content, str(reasoning)
    if END_THINK in content:
        reasoning = content.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
        return content.split(END_THINK)[-1].lstrip("\n"), reasoning
    return content, ""


def _is_tool_response(message: Mapping[str, Any]) -> bool:
    content = _content(message)
    return content.startswith(TOOL_RESPONSE) and content.endswith(END_TOOL_RESPONSE)


def render_segments(prompt: Prompt) -> tuple[list[tuple[bool, str]], int]:
    """The rendered template as ``(is_control_token, text)`` segments, up to the
    start of the response, and the index of the segment that is the query's
    ``<|im_end|>``: the one closing the last user turn, as upstream's
    evaluation finds it (the last ``<|im_start|>user``, then the next
    ``<|im_end|>``), or the last turn's when there is no user turn. Adjacent
    text segments are merged: the tokenizer sees the text between two control
    tokens as one piece."""
    messages = _messages(prompt)
    segments: list[tuple[bool, str]] = []

    def text(value: str) -> None:
        if segments and not segments[-1][0]:
            segments[-1] = (False, segments[-1][1] + value)
        elif value:
            segments.append((False, value))

    def control(token: str) -> None:
        segments.append((True, token))

    last = len(messages) - 1
    # The last user turn that is a real query (not wrapped tool output):
    # assistant turns after it keep their reasoning, earlier ones lose it.
    last_query = next(
        (
            index
            for index in range(last, -1, -1)
            if messages[index]["role"] == "user" and not _is_tool_response(messages[index])
        ),
        last,
    )
    query_segment = last_turn_end = -1
    for index, message in enumerate(messages):
        role = message["role"]
        if role in ("system", "user"):
            control(IM_START)
            text(f"{role}\n{_content(message)}")
            control(IM_END)
            last_turn_end = len(segments) - 1
            if role == "user":
                query_segment = last_turn_end
            text("\n")
        elif role == "assistant":
            content, reasoning = _split_reasoning(message)
            control(IM_START)
            text("assistant\n")
            if index > last_query and (index == last or reasoning):
                control(THINK)
                text("\n" + reasoning.strip("\n") + "\n")
                control(END_THINK)
                text("\n\n" + content.lstrip("\n"))
            else:
                text(content)
            for number, call in enumerate(message.get("tool_calls") or ()):
                if number or content:
                    text("\n")
                name, arguments = _tool_call(call)
                control(TOOL_CALL)
                text('\n{"name": "' + name + '", "arguments": ' + arguments + "}\n")
                control(END_TOOL_CALL)
            control(IM_END)
            last_turn_end = len(segments) - 1
            text("\n")
        else:  # tool: results go inside <tool_response> in a user turn
            if index == 0 or messages[index - 1]["role"] != "tool":
                control(IM_START)
                text("user")
            text("\n")
            control(TOOL_RESPONSE)
            text("\n" + _content(message) + "\n")
            control(END_TOOL_RESPONSE)
            if index == last or messages[index + 1]["role"] != "tool":
                control(IM_END)
                query_segment = last_turn_end = len(segments) - 1
                text("\n")
    # The generation prompt with thinking disabled (the leading "\n" above
    # closes the last turn).
    control(IM_START)
    text("assistant\n")
    control(THINK)
    text("\n\n")
    control(END_THINK)
    text("\n\n")
    return segments, query_segment if query_segment >= 0 else last_turn_end


def encode_conversation(tokenizer: Any, prompt: Prompt) -> Conversation:
    """Ids of the conversation up to the start of the assistant's response."""
    segments, query_segment = render_segments(prompt)
    ids: list[int] = []
    query_position = -1
    for number, (is_control, value) in enumerate(segments):
        if is_control:
            ids.append(_control_id(tokenizer, value))
        else:
            ids += encode_plain_text(tokenizer, value)
        if number == query_segment:
            query_position = len(ids) - 1
    return Conversation(ids, query_position)
