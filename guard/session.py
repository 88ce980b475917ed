"""GuardSession: one conversation, O(1) model work per appended token.

The session keeps the KV cache of everything it has seen, so appending n ids
costs one cached forward over those n ids (attention still reads the cached
positions, as any decoder does), never a re-run of the sequence. ``rollback``
crops the cache and the debounce state together, so the session is exactly as
it was at that position.

Each step is all or nothing: a call that raises (an out-of-memory while a KV
buffer grows, say) leaves the session exactly as it was before the call.
Each public method holds the session's lock, so one session shared by
threads serves their calls one at a time.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    """Made by ``StreamGuard.session()``; call ``moderate_prompt`` first.

    Safe to share between threads: calls are serialized by a lock, each runs
    whole, and the verdicts are those of the same calls made in that order
    from one thread. The order in which two threads' appends land is theirs
    to arrange; a conversation usually belongs to one producer anyway.
    """

    def __init__(self, guard: StreamGuard, policy: Policy | None = None) -> None:
        self._guard = guard
        self.policy = policy or Policy()
        self._cache = new_cache(guard.config)
        self._position = 0
        self._response_start: int | None = None
        self._debouncer: Debouncer | None = None
        self._closed = False
        # Reentrant so that code holding it (a subclass, an engine) can call
        # the public methods.
        self._lock = threading.RLock()
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
    def closed(self) -> bool:
        """Whether ``close()`` was called (the session cannot be used then)."""
        return self._closed

    @property
    def flagged(self) -> bool:
        return self._debouncer is not None and self._debouncer.flagged_at is not None

    def kv_cache_bytes(self) -> tuple[int, int]:
        """(bytes holding cached positions, bytes allocated including growth
        room); (0, 0) once closed."""
        with self._lock:
            if self._cache is None:
                return 0, 0
            layers = [layer for layer in self._cache.layers if isinstance(layer, GrowableCacheLayer)]
            return sum(layer.used_bytes() for layer in layers), sum(layer.allocated_bytes() for layer in layers)

    # --- the conversation -----------------------------------------------

    def moderate_prompt(self, prompt: Prompt) -> Verdict:
        """Judge the user turn; then feed the assistant scaffold so that
        ``append`` can take response ids. ``prompt`` is the user's text or a
        list of chat messages ending with the user turn to judge."""
        with self._lock:
            self._check_open()
            if self._response_start is not None:
                raise SessionStateError(
                    "moderate_prompt() was already called; start a new session for a new conversation"
                )
            conversation = encode_conversation(self._guard.tokenizer, prompt)
            self._check_room(len(conversation.ids))
            model, labels, at = self._guard.model, self._guard.labels, conversation.query_position
            with self._step():
                hidden = self._forward(conversation.ids)
                query = model.query_logits(hidden[at : at + 1])
                row = _verdicts(query, at, labels.query_risk_levels, labels.query_categories, self.policy)[0]
                # The scaffold after the user turn goes through the response
                # head too; its verdicts belong to no response text.
                scaffold_logits = model.response_logits(hidden[at + 1 :])
            self.query_verdict = Verdict(*row)
            self.last_logits = scaffold_logits
            self._response_start = conversation.response_start
            self._debouncer = Debouncer(self.policy, self._response_start)
            return self.query_verdict

    def append(self, ids: int | Iterable[int]) -> list[Verdict]:
        """Feed response ids; one verdict per id. Many ids at once give the
        same verdicts as one at a time (one cached forward per call)."""
        with self._lock:
            self._check_open()
            if self._debouncer is None:
                raise SessionStateError(
                    "call moderate_prompt() before append(): the guard judges a response to a prompt"
                )
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
            labels = self._guard.labels
            with self._step():
                logits = self._guard.model.response_logits(self._forward(batch))
                verdicts = []
                for row in _verdicts(logits, first, labels.risk_levels, labels.categories, self.policy):
                    flagged, flagged_at = self._debouncer.observe(row[0], row[1])
                    verdicts.append(Verdict(*row, flagged=flagged, flagged_at=flagged_at))
            self.last_logits = logits
            return verdicts

    def rollback(self, position: int) -> None:
        """Return to an earlier ``position`` (at least ``response_start``)."""
        # A float would pass the range checks and leave a fractional cache length.
        position = operator.index(position)
        with self._lock:
            self._check_open()
            if self._response_start is None:
                raise SessionStateError("nothing to roll back: moderate_prompt() has not been called")
            if position > self._position:
                raise SessionStateError(
                    f"cannot roll back to position {position}: it is past the end, the session is at position "
                    f"{self._position}; rollback only goes back (append ids to go forward)"
                )
            if position < self._response_start:
                raise SessionStateError(
                    f"cannot roll back to position {position}: it is inside the prompt (the response starts at "
                    f"{self._response_start}); rolling back into the prompt needs a new session: start one with "
                    "StreamGuard.session() and call moderate_prompt() again"
                )
            self._cache.crop(position - self._position)  # transformers' crop takes -count
            self._debouncer.rollback(position)
            self._position = position

    def close(self) -> None:
        """Free the KV cache; the session cannot be used afterwards."""
        with self._lock:
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

    @contextmanager
    def _step(self) -> Iterator[None]:
        """All or nothing: on any exception inside (an out-of-memory while
        one layer's KV buffer grows, after earlier layers took the new
        positions; a KeyboardInterrupt), every layer, the position and the
        debounce state go back to where they were, then the exception goes on.
        Without this, layers would hold different lengths and every later
        call would fail with an opaque shape error."""
        position = self._position
        layers = self._cache.layers
        lengths = [layer.get_seq_length() for layer in layers]
        try:
            yield
        except BaseException:
            for layer, length in zip(layers, lengths, strict=True):
                layer.rewind(length)
            self._position = position
            if self._debouncer is not None:
                self._debouncer.rollback(position)
            raise

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._guard.device)
        with self._step():  # atomic on its own too, for callers other than append
            hidden = self._guard.model.hidden_states(input_ids, self._cache)[0]
            self._position += len(ids)
        return hidden
