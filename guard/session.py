"""GuardSession: one conversation, O(1) model work per appended token.

The session keeps the KV cache of everything it has seen, so appending n ids
costs one cached forward over those n ids (attention still reads the cached
positions, as any decoder does), never a re-run of the sequence. ``rollback``
crops the cache and the debounce state together, so the session is exactly as
it was at that position.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from guard.errors import ContextLengthError, SessionClosedError, SessionStateError, TokenIdError
from guard.model import GrowableCacheLayer, GuardLogits, new_cache
from guard.policy import SAFE, Debouncer, Policy, Verdict
from guard.template import Prompt, encode_conversation

if TYPE_CHECKING:
    from guard.stream_guard import StreamGuard

__all__ = ["GuardSession"]


def _verdicts(
    logits: GuardLogits, first_position: int, risk_levels: tuple[str, ...], categories: tuple[str, ...], policy: Policy
) -> list[tuple[int, str, float, str | None, float | None, bool]]:
    risk_probs = torch.softmax(logits.risk_level.float(), dim=-1)
    category_probs = torch.softmax(logits.category.float(), dim=-1)
    risk_best, risk_index = risk_probs.max(dim=-1)
    category_best, category_index = category_probs.max(dim=-1)
    rows = []
    for offset, (level_index, level_prob, cat_index, cat_prob) in enumerate(
        zip(risk_index.tolist(), risk_best.tolist(), category_index.tolist(), category_best.tolist(), strict=True)
    ):
        level = risk_levels[level_index]
        category, category_prob = (None, None) if level == SAFE else (categories[cat_index], cat_prob)
        rows.append(
            (first_position + offset, level, level_prob, category, category_prob, policy.counts_as_unsafe(level))
        )
    return rows


class GuardSession:
    """Made by ``StreamGuard.session()``; call ``moderate_prompt`` first."""

    def __init__(self, guard: StreamGuard, policy: Policy | None = None) -> None:
        self._guard = guard
        self.policy = policy or Policy()
        self._cache = new_cache(guard.config)
        self._position = 0
        self._response_start: int | None = None
        self._debouncer: Debouncer | None = None
        self._closed = False
        self.query_verdict: Verdict | None = None
        #: Logits of the last ``append`` (or of the prompt), for inspection.
        self.last_logits: GuardLogits | None = None

    # --- state -----------------------------------------------------------

    @property
    def guard(self) -> StreamGuard:
        return self._guard

    @property
    def position(self) -> int:
        """Tokens the session holds: prompt, scaffold and response."""
        return self._position

    @property
    def response_start(self) -> int | None:
        """Position of the first response token (None before the prompt)."""
        return self._response_start

    @property
    def flagged(self) -> bool:
        return self._debouncer is not None and self._debouncer.flagged_at is not None

    def kv_cache_bytes(self) -> tuple[int, int]:
        """(bytes holding cached positions, bytes allocated including growth room)."""
        layers = [layer for layer in self._cache.layers if isinstance(layer, GrowableCacheLayer)]
        return sum(layer.used_bytes() for layer in layers), sum(layer.allocated_bytes() for layer in layers)

    # --- the conversation -----------------------------------------------

    def moderate_prompt(self, prompt: Prompt) -> Verdict:
        """Judge the user turn; then feed the assistant scaffold so that
        ``append`` can take response ids. ``prompt`` is the user's text or a
        list of chat messages ending with the user turn to judge."""
        self._check_open()
        if self._response_start is not None:
            raise SessionStateError("moderate_prompt() was already called; start a new session for a new conversation")
        conversation = encode_conversation(self._guard.tokenizer, prompt)
        self._check_room(len(conversation.ids))
        hidden = self._forward(conversation.ids)
        query = self._guard.model.query_logits(hidden[conversation.query_position : conversation.query_position + 1])
        labels = self._guard.labels
        row = _verdicts(
            query, conversation.query_position, labels.query_risk_levels, labels.query_categories, self.policy
        )[0]
        self.query_verdict = Verdict(*row)
        # The scaffold after the user turn goes through the response head too;
        # its verdicts belong to no response text.
        self.last_logits = self._guard.model.response_logits(hidden[conversation.query_position + 1 :])
        self._response_start = conversation.response_start
        self._debouncer = Debouncer(self.policy, self._response_start)
        return self.query_verdict

    def append(self, ids: int | Iterable[int]) -> list[Verdict]:
        """Feed response ids; one verdict per id. Many ids at once give the
        same verdicts as one at a time (one cached forward per call)."""
        self._check_open()
        if self._debouncer is None:
            raise SessionStateError("call moderate_prompt() before append(): the guard judges a response to a prompt")
        batch = [ids] if isinstance(ids, int) else list(ids)
        vocabulary = self._guard.vocab_size
        for token_id in batch:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocabulary:
                raise TokenIdError(
                    f"{token_id!r} is not a guard token id (0..{vocabulary - 1}); response text must be "
                    "re-tokenized into the guard's Qwen3 vocabulary first (adapter.retokenize)"
                )
        if not batch:
            return []
        self._check_room(len(batch))
        first = self._position
        logits = self._guard.model.response_logits(self._forward(batch))
        self.last_logits = logits
        labels = self._guard.labels
        verdicts = []
        for row in _verdicts(logits, first, labels.risk_levels, labels.categories, self.policy):
            flagged, flagged_at = self._debouncer.observe(row[0], row[1])
            verdicts.append(Verdict(*row, flagged=flagged, flagged_at=flagged_at))
        return verdicts

    def rollback(self, position: int) -> None:
        """Return to an earlier ``position`` (at least ``response_start``)."""
        self._check_open()
        if self._response_start is None:
            raise SessionStateError("nothing to roll back: moderate_prompt() has not been called")
        if not self._response_start <= position <= self._position:
            raise SessionStateError(
                f"cannot roll back to position {position}: the response spans positions "
                f"{self._response_start}..{self._position} (rolling back into the prompt needs a new session)"
            )
        self._cache.crop(position - self._position)  # transformers' crop takes -count
        self._debouncer.rollback(position)
        self._position = position

    def close(self) -> None:
        """Free the KV cache; the session cannot be used afterwards."""
        self._cache = None
        self._closed = True

    def __enter__(self) -> GuardSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this session was closed; start a new one with StreamGuard.session()")

    def _check_room(self, count: int) -> None:
        limit = self._guard.config.max_position_embeddings
        if self._position + count > limit:
            raise ContextLengthError(
                f"appending {count} tokens at position {self._position} would pass the model's "
                f"{limit} positions; stop the stream or start a new session"
            )

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._guard.device)
        hidden = self._guard.model.hidden_states(input_ids, self._cache)[0]
        self._position += len(ids)
        return hidden
