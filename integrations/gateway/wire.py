"""Shapes on the wire: OpenAI-style errors, SSE events, and verdicts in
Azure OpenAI's content-filter shapes (which clients already read)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from integrations.common import verdict_fields

__all__ = [
    "SEVERITY",
    "BadChunk",
    "GatewayError",
    "error_event",
    "filter_results",
    "parse_json",
    "prompt_filter_results",
    "sse",
    "verdict_json",
]

SEVERITY = {"Unsafe": "high", "Controversial": "medium", "Safe": "safe"}


class GatewayError(Exception):
    """A request the gateway answers with an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers, self.extra = headers or {}, extra or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {**error, **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadChunk(Exception):
    """A chunk the gateway cannot read, so cannot judge: the stream fails closed."""


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # Text fields come cleaned of lone surrogates; "replace" guards the rest (a
    # client's own tool name, say) so that no chunk can break the stream.
    return f"data: {text}\n\n".encode("utf-8", "replace")


def error_event(message: str, type: str, code: str) -> bytes:
    return sse({"error": {"message": message, "type": type, "param": None, "code": code}})


def parse_json(data: bytes | str) -> Any:
    """Parsed JSON, or ``BadChunk`` (for text that is not JSON, or nests too deep)."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BadChunk(f"not JSON ({type(error).__name__})") from None


# --- verdicts -----------------------------------------------------------------


def verdict_json(verdict: Any) -> dict[str, Any] | None:
    return None if verdict is None else verdict_fields(verdict)


def filter_results(verdict: Any, filtered: bool) -> dict[str, Any]:
    """Azure's ``content_filter_results`` shape, with the guard's category."""
    if verdict is None:
        return {}
    category = verdict.category or "unspecified"
    return {category: {"filtered": filtered, "severity": SEVERITY.get(verdict.risk_level, "safe")}}


def prompt_filter_results(verdict: Any, filtered: bool) -> list[dict[str, Any]]:
    results = filter_results(verdict, filtered) if verdict is not None and verdict.unsafe else {}
    return [{"prompt_index": 0, "content_filter_results": results, "crossguard": verdict_json(verdict)}]
