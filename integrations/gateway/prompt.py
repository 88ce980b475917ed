"""Request parsing and prompt judging: the body read within limits, every
text field of the request that reaches the model turned into the guard's
conversation, and ``ChatRequest``, the state of one ``POST
/v1/chat/completions`` (its guard streams, the prompt's verdict, its time
limit)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request

from integrations.gateway.chunks import identifier
from integrations.gateway.wire import GatewayError, filter_results, verdict_json
from integrations.streams import GuardStreams
from integrations.tool_arguments import arguments_text

if TYPE_CHECKING:
    from integrations.gateway.app import Gateway

__all__ = ["ChatRequest", "guard_conversation", "parse_body", "read_body", "text_content"]

# Content parts that hold text the model reads (OpenAI's chat and Responses
# shapes, and vLLM's extensions), and parts that are not text: the guard
# reads text only, so media are forwarded unjudged.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}  # fmt: skip
_MEDIA_PARTS = {"image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "file", "input_file"}
# Message fields the gateway knows: each is judged, or is an identifier. A
# message with any other field is refused (it could carry text the model reads).
_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content",
                   "refusal", "function_call"}  # fmt: skip
# vLLM's request fields that put text into the prompt around the messages.
_PROMPT_SHAPING = ("chat_template", "documents")


def _invalid(message: str, param: str | None = "messages") -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", param=param)


def text_content(content: Any) -> str | None:
    """The text of a message's content: a str, or the text of a list of
    parts. A part of a kind the gateway does not know is refused (its text
    could reach the model unjudged)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"message content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            continue
        field = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        text = part.get(field) if isinstance(part, dict) and field is not None else None
        if not isinstance(text, str):
            raise _invalid(f"a content part of type {kind!r} that the moderating gateway cannot judge; text parts "
                           f"are {', '.join(sorted(_TEXT_PARTS))}")  # fmt: skip
        texts.append(text)
    return "".join(texts)


def _text_field(message: dict[str, Any], name: str, number: int) -> str:
    value = message.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(f"messages[{number}].{name} must be a string")
    return value


def _tool_calls(message: dict[str, Any], number: int) -> list[dict[str, Any]]:
    """The assistant's earlier tool calls as the guard's template prints them,
    their arguments as the decoded text a tool saw."""
    calls = message.get("tool_calls") or []
    legacy = message.get("function_call")
    if not isinstance(calls, list) or (legacy is not None and not isinstance(legacy, dict)):
        raise _invalid(f"messages[{number}] has malformed tool_calls or function_call")
    converted = []
    for call in [*calls, *([{"function": legacy}] if legacy else [])]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(f"messages[{number}] has a tool call without a function name")
        if call.get("id") is not None and identifier(call.get("id"), 64) is None:
            raise _invalid(f"messages[{number}] has a tool call whose id is not an identifier")
        arguments = function.get("arguments") or ""
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        converted.append({"function": {"name": function["name"], "arguments": arguments_text(arguments)}})
    return converted


def guard_conversation(messages: Any) -> tuple[list[dict[str, Any]], str]:
    """(messages the guard's template takes, assistant prefill) from an
    OpenAI request's ``messages``: multi-part contents joined, ``developer``
    read as ``system``, ``function`` results as ``tool`` results, every text
    field judged (both reasoning names, refusals, tool-call names and decoded
    arguments), and a last assistant message taken as the start of the
    response."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array of chat messages")
    converted = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"messages[{number}] must be an object with a 'role'")
        unknown = sorted(set(message) - _MESSAGE_FIELDS)
        if unknown:
            raise _invalid(f"messages[{number}] has a field the moderating gateway cannot judge: {unknown[0]!r} "
                           f"(it knows {', '.join(sorted(_MESSAGE_FIELDS))})")  # fmt: skip
        for name in ("name", "tool_call_id"):
            if message.get(name) is not None and identifier(message[name], 64) is None:
                raise _invalid(f"messages[{number}].{name} must be an identifier (letters, digits, _ and -)")
        role = {"developer": "system", "function": "tool"}.get(message["role"], message["role"])
        if role not in ("system", "user", "assistant", "tool"):
            raise _invalid(f"messages[{number}] has an unknown role {message['role']!r}")
        content = text_content(message.get("content")) or ""
        item: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            refusal = _text_field(message, "refusal", number)
            item["content"] = "\n".join(text for text in (content, refusal) if text)
            # Both names are judged: a server may read either one.
            reasonings = [_text_field(message, name, number) for name in ("reasoning", "reasoning_content")]
            reasoning = reasonings[0] if reasonings[0] == reasonings[1] else "\n".join(filter(None, reasonings))
            if reasoning:
                item["reasoning_content"] = reasoning
            calls = _tool_calls(message, number)
            if calls:
                item["tool_calls"] = calls
        else:
            for name in ("refusal", "reasoning", "reasoning_content", "tool_calls", "function_call"):
                if message.get(name):
                    raise _invalid(f"messages[{number}]: only assistant messages carry {name}")
        converted.append(item)
    prefill = ""
    if converted[-1]["role"] == "assistant" and len(converted) > 1:
        last = converted.pop()
        if last.get("tool_calls") or last.get("reasoning_content"):
            raise _invalid("a last assistant message (a prefill) may hold text only, not tool calls or reasoning")
        prefill = last["content"]
    return converted, prefill


def _without_unjudged_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages to forward: the guard's template (as Qwen3's) leaves out
    the reasoning of assistant turns before the last user turn, so that
    reasoning is not judged, and is not forwarded either."""
    last_user = max((number for number, message in enumerate(messages) if message["role"] == "user"), default=-1)
    if not any(message["role"] == "assistant" and (message.get("reasoning") or message.get("reasoning_content"))
               for message in messages[:last_user]):  # fmt: skip
        return messages
    return [
        {name: value for name, value in message.items() if name not in ("reasoning", "reasoning_content")}
        if number < last_user and message["role"] == "assistant" else message
        for number, message in enumerate(messages)
    ]


def _declared_tools(payload: dict[str, Any]) -> tuple[frozenset[str], frozenset[str], frozenset[str], str]:
    """(function tool names, custom tool names, legacy function names, the
    definitions' text for the guard). Tool definitions are read by the model,
    so the guard reads them too, as a system message."""
    tools, functions = payload.get("tools") or [], payload.get("functions") or []
    if not isinstance(tools, list) or not isinstance(functions, list):
        raise _invalid("'tools' and 'functions' must be arrays", param="tools")
    function_names, custom_names = set(), set()
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        spec = tool.get(kind) if kind in ("function", "custom") else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _invalid("each tool must be {'type': 'function' or 'custom', ...: {'name': ...}}", param="tools")
        (function_names if kind == "function" else custom_names).add(spec["name"])
    legacy = set()
    for function in functions:
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid("each function must be an object with a 'name'", param="functions")
        legacy.add(function["name"])
    shown = [*tools, *functions]
    schema = payload.get("response_format")
    if isinstance(schema, dict) and schema.get("type") == "json_schema":
        shown.append(schema)
    text = "\n".join(json.dumps(item, ensure_ascii=False) for item in shown)
    return frozenset(function_names), frozenset(custom_names), frozenset(legacy), text


def _check_options(payload: dict[str, Any]) -> None:
    for name in _PROMPT_SHAPING:
        if payload.get(name) is not None:
            raise _invalid(f"'{name}' puts text into the prompt that the moderating gateway cannot judge; leave "
                           "it out", param=name)  # fmt: skip
    kwargs = payload.get("chat_template_kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or any(
            isinstance(value, str | list | dict) for value in kwargs.values())):  # fmt: skip
        raise _invalid("'chat_template_kwargs' may hold flags and numbers only (text in it reaches the prompt "
                       "unjudged)", param="chat_template_kwargs")  # fmt: skip
    modalities = payload.get("modalities")
    if payload.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise _invalid("the moderating gateway judges text only: audio answers cannot be judged; ask for text",
                       param="modalities")  # fmt: skip


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object; an OpenAI-style 400 for anything else."""
    try:
        # NaN and Infinity are not JSON (Python's parser takes them by default).
        payload = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise _invalid("the request body is not valid JSON (it nests too deep)", param=None) from None
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError, NaN, an int too long to read
        raise _invalid(f"the request body is not valid JSON ({error})", param=None) from None
    if not isinstance(payload, dict):
        raise _invalid("the request body must be a JSON object", param=None)
    return payload


async def read_body(request: Request, limit: int, timeout: float) -> dict[str, Any]:
    """The request's JSON object: at most ``limit`` bytes, all of it within
    ``timeout`` seconds (a client that sends part of a body and goes quiet
    gets a 408, not a connection held open)."""
    # Both errors close the connection: the rest of the body is never read.
    too_big = GatewayError(413, f"the request body is larger than the gateway's limit of {limit:,} bytes",
                           type="invalid_request_error", code="request_too_large",
                           headers={"connection": "close"})  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise too_big
    except TimeoutError:
        raise GatewayError(408, f"the request body did not arrive within {timeout:g} s",
                           type="invalid_request_error", code="request_timeout",
                           headers={"connection": "close"}) from None  # fmt: skip
    return parse_body(bytes(body))


class ChatRequest:
    """One ``POST /v1/chat/completions``: the guard streams, the prompt's verdict, the choices."""

    def __init__(self, gateway: Gateway, payload: dict[str, Any], *, deadline: float | None = None) -> None:
        self.gateway = gateway
        self.config = config = gateway.config
        self.payload = payload
        self.deadline = deadline if deadline is not None else time.monotonic() + config.request_timeout_s
        self.failed_open = False  # the guard failed and the gateway fails open: text goes out unjudged
        self.request_id = uuid.uuid4().hex[:12]
        self.created = int(time.time())
        self.model = identifier(payload.get("model")) or "unknown"
        stream = payload.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise _invalid("'stream' must be true or false", param="stream")
        self.stream = bool(stream)
        choices = payload.get("n", 1)
        if choices is not None and (isinstance(choices, bool) or not isinstance(choices, int)
                                    or not 1 <= choices <= config.max_choices):  # fmt: skip
            raise _invalid(f"'n' must be a whole number from 1 to {config.max_choices} (the gateway judges every "
                           "choice)", param="n")  # fmt: skip
        self.choice_count = choices or 1
        _check_options(payload)
        self.messages, self.prefill = guard_conversation(payload.get("messages"))
        self.function_tools, self.custom_tools, self.legacy_functions, tools_text = _declared_tools(payload)
        if tools_text:
            self.messages.insert(0, {"role": "system", "content": tools_text})
        self.use_ids = (
            gateway.generator is not None and config.token_ids != "off" and not self.prefill
            and not payload.get("tools") and not payload.get("functions")
        )  # fmt: skip
        self.streams = self.new_streams(use_ids=self.use_ids)
        self.query_verdict: Any = None

    def new_streams(self, *, use_ids: bool) -> GuardStreams:
        return GuardStreams(
            self.gateway.engine, self.messages, policy=self.gateway.policy,
            judge_tool_calls=self.config.judge_tool_calls, response_prefix=self.prefill,
            source_tokenizer=self.gateway.generator if use_ids else None,
        )  # fmt: skip

    def remaining(self) -> float:
        """Seconds left before the request's time limit."""
        return self.deadline - time.monotonic()

    def upstream_body(self) -> dict[str, Any]:
        body = dict(self.payload)
        body["messages"] = _without_unjudged_reasoning(body["messages"])
        if self.config.token_ids == "request" and self.gateway.generator is not None:
            body["return_token_ids"] = True
        return body

    def refuse_if_flagged(self) -> None:
        """After the prompt is judged: refuse it in block mode if it counts as unsafe."""
        verdict = self.query_verdict
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
