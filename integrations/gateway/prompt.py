"""Request parsing and prompt judging: the body read within limits, the
messages turned into the guard's conversation, and ``ChatRequest``, the state
of one ``POST /v1/chat/completions`` (its guard streams, the prompt's verdict,
its time limit)."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request

from integrations.gateway.wire import GatewayError, filter_results, verdict_json
from integrations.streams import GuardStreams

if TYPE_CHECKING:
    from integrations.gateway.app import Gateway
    from integrations.gateway.chunks import ChoiceState

__all__ = ["ChatRequest", "guard_conversation", "read_body", "text_content"]

# Content parts that hold text the model reads (OpenAI's chat and Responses
# shapes, and vLLM's extensions), and parts that are not text: the guard
# reads text only, so media are forwarded unjudged.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}  # fmt: skip
_MEDIA_PARTS = {"image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "file", "input_file"}


def text_content(content: Any, *, strict: bool = True) -> str | None:
    """The text of a message's content: a str, or the text of a list of
    parts. ``strict``: a part of a kind the gateway does not know is refused
    (its text could reach the model unjudged); else it is read as text if
    it has some."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise GatewayError(400, f"message content must be a string or a list of parts, got {type(content).__name__}",
                           type="invalid_request_error", param="messages")  # fmt: skip
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            continue
        field = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        text = part.get(field or "text") if isinstance(part, dict) else None
        if (field is None and strict) or not isinstance(text, str):
            raise GatewayError(400, f"a content part of type {kind!r} that the moderating gateway cannot judge; "
                               f"text parts are {', '.join(sorted(_TEXT_PARTS))}", type="invalid_request_error",
                               param="messages")  # fmt: skip
        texts.append(text)
    return "".join(texts)


def guard_conversation(messages: Any) -> tuple[list[dict[str, Any]], str]:
    """(messages the guard's template takes, assistant prefill) from an
    OpenAI request's ``messages``: multi-part contents joined, ``developer``
    read as ``system``, ``function`` results as ``tool`` results, and a last
    assistant message taken as the start of the response."""
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty array of chat messages",
                           type="invalid_request_error", param="messages")  # fmt: skip
    converted = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GatewayError(400, f"messages[{number}] must be an object with a 'role'",
                               type="invalid_request_error", param="messages")  # fmt: skip
        role = {"developer": "system", "function": "tool"}.get(message["role"], message["role"])
        if role not in ("system", "user", "assistant", "tool"):
            raise GatewayError(400, f"messages[{number}] has an unknown role {message['role']!r}",
                               type="invalid_request_error", param="messages")  # fmt: skip
        item: dict[str, Any] = {"role": role, "content": text_content(message.get("content"))}
        for name in ("tool_calls", "reasoning_content", "reasoning"):
            if message.get(name) and role == "assistant":
                item["reasoning_content" if name == "reasoning" else name] = message[name]
        converted.append(item)
    prefill = ""
    if converted[-1]["role"] == "assistant" and len(converted) > 1:
        prefill = converted.pop()["content"] or ""
    return converted, prefill


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, at most ``limit`` bytes."""
    too_big = GatewayError(413, f"the request body is larger than the gateway's limit of {limit:,} bytes",
                           type="invalid_request_error", code="request_too_large")  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "it nests too deep" if isinstance(error, RecursionError) else str(error)
        raise GatewayError(400, f"the request body is not valid JSON ({reason})",
                           type="invalid_request_error") from None  # fmt: skip
    if not isinstance(payload, dict):
        raise GatewayError(400, "the request body must be a JSON object", type="invalid_request_error")
    return payload


class ChatRequest:
    """One ``POST /v1/chat/completions``: the guard streams, the prompt's verdict, the choices."""

    def __init__(self, gateway: Gateway, payload: dict[str, Any]) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.payload = payload
        self.deadline = time.monotonic() + self.config.request_timeout_s
        self.failed_open = False  # the guard failed and the gateway fails open: text goes out unjudged
        stream = payload.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise GatewayError(400, "'stream' must be true or false", type="invalid_request_error", param="stream")
        self.stream = bool(stream)
        choices = payload.get("n", 1)
        if choices is not None and (isinstance(choices, bool) or not isinstance(choices, int)
                                    or not 1 <= choices <= self.config.max_choices):  # fmt: skip
            raise GatewayError(400, f"'n' must be a whole number from 1 to {self.config.max_choices} (the gateway "
                               "judges every choice)", type="invalid_request_error", param="n")  # fmt: skip
        self.messages, self.prefill = guard_conversation(payload.get("messages"))
        self.use_ids = (
            gateway.generator is not None and self.config.token_ids != "off" and not self.prefill
            and not payload.get("tools") and not payload.get("functions")
        )  # fmt: skip
        self.streams = self._new_streams()
        self.choices: dict[int, ChoiceState] = {}
        self.query_verdict: Any = None
        self.request_id = uuid.uuid4().hex[:12]

    def _new_streams(self) -> GuardStreams:
        return GuardStreams(
            self.gateway.engine, self.messages, policy=self.gateway.policy,
            judge_tool_calls=self.config.judge_tool_calls, response_prefix=self.prefill,
            source_tokenizer=self.gateway.generator if self.use_ids else None,
        )  # fmt: skip

    def judge_from_text(self) -> GuardStreams:
        """Start judging over, from the text (after ids that do not match it);
        returns the old streams, for the caller to close."""
        old = self.streams
        self.use_ids = False
        self.streams = self._new_streams()
        self.choices = {}
        return old

    def remaining(self) -> float:
        """Seconds left before the request's time limit."""
        return self.deadline - time.monotonic()

    def upstream_body(self) -> dict[str, Any]:
        body = dict(self.payload)
        if self.config.token_ids == "request" and self.gateway.generator is not None:
            body["return_token_ids"] = True
        return body

    async def judge_prompt(self) -> None:
        """Judge the conversation before anything is forwarded; refuse it in block mode."""
        verdict = self.query_verdict = await self.gateway.run(self.streams.judge_prompt)
        unsafe = verdict is not None and self.gateway.policy.counts_as_unsafe(verdict.risk_level)
        if not unsafe:
            return
        self.gateway.metrics.flags.labels("prompt", verdict.category or "unspecified").inc()
        if self.config.prompts == "annotate":
            return
        self.gateway.metrics.requests.labels("prompt_blocked").inc()
        raise GatewayError(
            400, f"The prompt was refused by the moderating gateway (Qwen3Guard-Stream: {verdict.risk_level}, "
            f"{verdict.category}).", type="invalid_request_error", code="content_filter", param="prompt",
            extra={"status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                  "content_filter_result": filter_results(verdict, True)},
                   "crossguard": {"verdict": verdict_json(verdict)}},
        )  # fmt: skip
