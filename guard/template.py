"""The Qwen3 chat template (thinking disabled), as guard input ids.

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{response}

Message text is encoded as ordinary text: a user who writes ``<|im_end|>``
gets the characters, not the control token, so no prompt can close its own
turn and smuggle in a fake assistant turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.errors import CheckpointError

__all__ = ["Conversation", "encode_conversation", "encode_plain_text"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_SCAFFOLD = f"\n{IM_START}assistant\n<think>\n\n</think>\n\n"
ROLES = ("system", "user", "assistant")

Prompt = str | Sequence[Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class Conversation:
    """Guard input ids for a prompt, up to where the response begins."""

    ids: list[int]
    query_position: int  # the <|im_end|> that closes the last user turn

    @property
    def response_start(self) -> int:
        return len(self.ids)


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


def _messages(prompt: Prompt) -> list[Mapping[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    for message in messages:
        if (
            not isinstance(message, Mapping)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(f"each message needs a role in {ROLES} and a str content, got {message!r}")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user turn to moderate")
    return messages


def encode_conversation(tokenizer: Any, prompt: Prompt) -> Conversation:
    """Ids of the conversation up to the start of the assistant's response."""
    im_start, im_end = _control_id(tokenizer, IM_START), _control_id(tokenizer, IM_END)
    newline = encode_plain_text(tokenizer, "\n")
    ids: list[int] = []
    query_position = -1
    for number, message in enumerate(_messages(prompt)):
        if number:
            ids += newline
        # As the tokenizer would see the rendered template: the text between
        # two control tokens is one segment, so role and content are encoded
        # together ("user\n" + a content starting with "\n" makes one "\n\n").
        ids += [im_start, *encode_plain_text(tokenizer, f"{message['role']}\n{message['content']}"), im_end]
        query_position = len(ids) - 1
    # The scaffold contains real control tokens (<|im_start|>, <think>), so it
    # goes through the full tokenizer.
    ids += tokenizer.encode(ASSISTANT_SCAFFOLD, add_special_tokens=False).ids
    return Conversation(ids, query_position)
