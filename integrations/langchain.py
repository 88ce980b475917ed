"""LangChain integration: a callback handler that moderates streamed tokens.

    handler = GuardCallbackHandler(guard)
    for chunk in chat_model.stream(messages, config={"callbacks": [handler]}):
        ...   # raises GuardFlaggedError as soon as the debounced policy flags

The handler feeds each ``on_llm_new_token`` text delta to a GuardAdapter
(text mode: LangChain gives text, not ids) and raises on a flag. Because it
sets ``raise_error``, LangChain re-raises the error inside the model's stream,
before the flagged chunk reaches the caller, which stops the run.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.messages import BaseMessage
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("the LangChain integration needs langchain-core: pip install 'crossguard[langchain]'") from error

from adapter import GuardAdapter, JudgedPiece

__all__ = ["GuardCallbackHandler", "GuardFlaggedError"]

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


class GuardFlaggedError(RuntimeError):
    """The guard flagged the prompt or the response; the run was stopped."""

    def __init__(self, message: str, pieces: list[JudgedPiece]) -> None:
        super().__init__(message)
        self.pieces = pieces


class GuardCallbackHandler(BaseCallbackHandler):
    """Moderates every LLM/chat-model run it is attached to.

    ``block_unsafe_prompts``: raise at the start of a run whose prompt the
    query head judges unsafe under the policy. ``fail_open``: if the guard
    itself raises, let the run go on (default: the error stops the run).
    """

    raise_error = True

    def __init__(self, guard: Any, *, policy: Any = None, block_unsafe_prompts: bool = False, fail_open: bool = False):
        self.guard = guard
        self.policy = policy
        self.block_unsafe_prompts = block_unsafe_prompts
        self.fail_open = fail_open
        self._adapters: dict[UUID, GuardAdapter] = {}
        self.judged: dict[UUID, list[JudgedPiece]] = {}

    def _start(self, run_id: UUID, prompt: Any) -> None:
        adapter = GuardAdapter(self.guard.session(self.policy))
        verdict = adapter.moderate_prompt(prompt)
        self._adapters[run_id] = adapter
        self.judged[run_id] = []
        if self.block_unsafe_prompts and verdict.unsafe:
            raise GuardFlaggedError(f"the guard judged the prompt {verdict.risk_level} ({verdict.category})", [])

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        conversation = [{"role": _ROLES.get(message.type, "user"), "content": message.text} for message in messages[0]]
        self._start(run_id, conversation)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self._start(run_id, prompts[0])

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        adapter = self._adapters.get(run_id)
        if adapter is None:
            return
        self._judge(run_id, lambda: adapter.push_text(token))

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        adapter = self._adapters.pop(run_id, None)
        if adapter is None or adapter.flagged:
            return
        if adapter.pushed == 0 and response.generations and response.generations[0]:
            # Not streamed (a plain invoke): judge the whole answer now, before
            # it is returned to the caller.
            self._judge(run_id, lambda: adapter.push_text(response.generations[0][0].text))
        self._judge(run_id, adapter.finish)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._adapters.pop(run_id, None)

    def _judge(self, run_id: UUID, step: Any) -> None:
        try:
            pieces = step()
        except Exception:
            if self.fail_open:
                self._adapters.pop(run_id, None)
                return
            raise
        self.judged[run_id] += pieces
        flagged = [piece for piece in pieces if piece.flagged]
        if flagged:
            verdict = flagged[0].verdict
            raise GuardFlaggedError(
                f"the guard flagged the response at {flagged[0].text!r}: {verdict.risk_level} ({verdict.category})",
                self.judged[run_id],
            )
