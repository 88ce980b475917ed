"""The gateway's settings (``crossguard serve``'s options, the same on Ray Serve)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import httpx

__all__ = ["DEFAULT_GUARD", "DEFAULT_REFUSAL", "GatewayConfig"]

DEFAULT_GUARD = "Qwen/Qwen3Guard-Stream-0.6B"
DEFAULT_REFUSAL = "I can't help with that."


@dataclass
class GatewayConfig:
    """Everything ``crossguard serve`` takes; the same in one process and on Ray Serve.

    ``upstream``: the server's OpenAI base URL (ending in ``/v1``).
    ``generator``: its tokenizer (a bundled name, a tokenizer.json, a
    SentencePiece .model or a tokenizer folder), to judge from token ids when
    the upstream sends them; None judges text deltas only.
    ``token_ids``: ``"use"`` judges ids when chunks carry them, ``"request"``
    also asks for them (vLLM's ``return_token_ids``; servers that reject
    unknown fields refuse it), ``"off"`` always judges text.
    ``mode``: strict counts Controversial as Unsafe, loose as Safe.
    ``prompts``: ``"block"`` refuses a flagged prompt with HTTP 400,
    ``"annotate"`` forwards it and reports the verdict.
    ``api_key``: clients must send ``Authorization: Bearer <api_key>``; the
    upstream then gets ``upstream_api_key`` (if set) instead of the client's
    header, which is otherwise forwarded as is.

    Limits (each failure is a clear OpenAI-style error, and fails closed):
    ``max_body_bytes`` and ``body_timeout_s`` bound the request body;
    ``request_timeout_s`` the whole request, stream included;
    ``send_timeout_s`` how long a client may leave a chunk unread before it is
    dropped; ``max_response_bytes`` what is read from the upstream per answer,
    ``max_line_bytes`` per SSE line or event; ``max_held_chunks`` and
    ``max_held_bytes`` what an answer may hold back while the guard judges;
    ``max_streams`` requests at once; ``max_choices`` the ``n`` of a request;
    ``max_tool_calls`` the tool calls of one answer (each is a guard stream).
    """

    upstream: str
    generator: str | None = None
    guard: str = DEFAULT_GUARD
    mode: Literal["strict", "loose"] = "strict"
    prompts: Literal["block", "annotate"] = "block"
    token_ids: Literal["use", "request", "off"] = "use"
    judge_tool_calls: bool = True
    api_key: str | None = field(default=None, repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    fail_open: bool = False
    refusal: str = DEFAULT_REFUSAL
    max_body_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024
    max_streams: int = 256
    max_choices: int = 16
    max_tool_calls: int = 16
    max_held_chunks: int = 1024
    max_held_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 120.0
    device: str | None = None
    max_batch_tokens: int = 1024
    # Longer than the engine's default: many streams each send a token, and
    # gathering them into one forward is what the gateway's throughput rests on
    # (a lone stream never waits: it is the whole batch).
    max_wait_ms: float = 5.0
    kv_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.upstream, str) or not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.upstream!r}")
        self.upstream = self.upstream.rstrip("/")
        choices = {
            "mode": ("strict", "loose"), "prompts": ("block", "annotate"), "token_ids": ("use", "request", "off"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_body_bytes", "max_response_bytes", "max_line_bytes", "max_streams", "max_choices",
                     "max_tool_calls", "max_held_chunks", "max_held_bytes"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.token_ids == "request" and self.generator is None:
            raise ValueError("token_ids='request' needs the generator's tokenizer (generator=...) to judge the ids")
        for name in ("request_timeout_s", "body_timeout_s", "send_timeout_s", "upstream_connect_timeout_s",
                     "upstream_read_timeout_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")

    def public(self) -> dict[str, Any]:
        """The settings without secrets (for /health and logs)."""
        hidden = {"api_key", "upstream_api_key"}
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        upstream = httpx.URL(self.upstream)
        if upstream.userinfo:  # http://user:password@host sends basic auth: never print it
            settings["upstream"] = str(upstream.copy_with(username="***", password="***"))
        return settings
