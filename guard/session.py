"""GuardSession: one conversation, O(1) model work per appended token.

The session keeps the KV cache of everything it has seen, so appending n ids
costs one cached forward over those n ids (attention still reads the cached
positions, as any decoder does), never a re-run of the sequence. ``rollback``
crops the cache and the debounce state together, so the session is exactly as
it was at that position.

The response is laid out as the Qwen3 chat template renders the last
assistant turn (see ``guard.template``), and judged from where upstream's
evaluation judges it:

* without reasoning: ``<think>\\n\\n</think>\\n\\n`` (part of the prompt's
  scaffold), the answer ids (``append``), then ``finish()`` appends
  ``<|im_end|>`` and ``\\n``. The debounce runs from the first answer token
  to the last end-of-turn token.
* with reasoning: ``begin_reasoning()`` before any answer id turns the
  scaffold's empty think block into an open one; ``append`` the ids of
  ``"\\n" + reasoning + "\\n"``, ``end_reasoning()`` appends ``</think>`` and
  ``\\n\\n``, then the answer and ``finish()`` as above. The debounce runs
  from the second token of the think block (upstream's thinking mode skips
  the ``\\n`` after ``<think>``) to the end.

Each step is all or nothing: a call that raises (an out-of-memory while a KV
buffer grows, say) leaves the session exactly as it was before the call.
Each public method holds the session's lock, so one session shared by
threads serves their calls one at a time.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from guard.errors import ContextLengthError, SessionClosedError, SessionStateError, TokenIdError
from guard.model import GrowableCacheLayer, GuardLogits, new_cache
from guard.policy import SAFE, Debouncer, Policy, Verdict
from guard.template import Prompt, empty_think_tail_ids, encode_conversation, end_of_turn_ids, think_close_ids

if TYPE_CHECKING:
    from guard.stream_guard import StreamGuard

__all__ = ["GuardSession"]

logger = logging.getLogger("guard")


def _best(logits: torch.Tensor, upstream: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, index) of the most likely class at each position.

    Upstream: ``F.softmax`` on bfloat16 logits gives bfloat16 probabilities
    and ``torch.max`` takes the first of equal maxima, so classes whose
    probabilities round to the same bf16 value go to the lower index."""
    if upstream:
        return torch.softmax(logits.to(torch.bfloat16), dim=-1).max(dim=-1)
    return torch.softmax(logits.float(), dim=-1).max(dim=-1)


def _verdicts(
    logits: GuardLogits, first_position: int, risk_levels: tuple[str, ...], categories: tuple[str, ...], policy: Policy
) -> list[tuple[int, str, float, str | None, float | None, bool]]:
    upstream = policy.upstream_arithmetic(logits.risk_level.dtype)
    risk_best, risk_index = _best(logits.risk_level, upstream)
    category_best, category_index = _best(logits.category, upstream)
    rows = []
    for offset, (level_index, level_prob, cat_index, cat_prob) in enumerate(
        zip(
            risk_index.tolist(),
            risk_best.float().tolist(),
            category_index.tolist(),
            category_best.float().tolist(),
            strict=True,
        )
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
        self._reasoning_start: int | None = None  # right after the scaffold's <think>
        self._reasoning = False  # the response has a think block (open or closed)
        self._reasoning_end: int | None = None  # position of its </think>, once closed
        self._finished_at: int | None = None  # position of the closing <|im_end|>, once finished
        self._debouncer: Debouncer | None = None
        self._warned_past_trained_length = False
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
        """Position of the first response token (None before the prompt): the
        first answer token, or with reasoning the first token of the think
        block's text."""
        return self._response_start

    @property
    def answer_start(self) -> int | None:
        """Position of the first answer token: ``response_start`` without
        reasoning, after ``</think>`` and ``\\n\\n`` with it (None while the
        think block is open, or before the prompt)."""
        if self._response_start is None or (self._reasoning and self._reasoning_end is None):
            return None
        return self._reasoning_end + 2 if self._reasoning else self._response_start

    @property
    def reasoning(self) -> bool:
        """Whether the response has a think block (``begin_reasoning``)."""
        return self._reasoning

    @property
    def reasoning_open(self) -> bool:
        """Whether the think block is open: ids appended now are reasoning."""
        return self._reasoning and self._reasoning_end is None

    @property
    def finished(self) -> bool:
        """Whether ``finish()`` appended the end of turn (and no rollback took it back)."""
        return self._finished_at is not None

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (the session cannot be used then)."""
        return self._closed

    @property
    def flagged(self) -> bool:
        return self._debouncer is not None and self._debouncer.flagged_at is not None

    @property
    def flagged_at(self) -> int | None:
        """Position where the debounced policy flagged the response (None if not flagged)."""
        return None if self._debouncer is None else self._debouncer.flagged_at

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
            self.query_verdict = Verdict(*row, past_trained_length=self._past_trained_length(at))
            self.last_logits = scaffold_logits
            self._response_start = conversation.response_start
            self._reasoning_start = conversation.reasoning_start
            self._debouncer = Debouncer(self.policy, self._response_start)
            return self.query_verdict

    def append(self, ids: int | Iterable[int]) -> list[Verdict]:
        """Feed response ids; one verdict per id. Many ids at once give the
        same verdicts as one at a time (one cached forward per call)."""
        with self._lock:
            self._check_open()
            self._check_appendable()
            batch = [ids] if isinstance(ids, int) else list(ids)
            vocabulary = self._guard.vocab_size
            for token_id in batch:
                if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocabulary:
                    raise TokenIdError(
                        f"{token_id!r} is not a guard token id (0..{vocabulary - 1}); response text must be "
                        "re-tokenized into the guard's Qwen3 vocabulary first (adapter.retokenize)"
                    )
            return self._judge(batch)

    def begin_reasoning(self) -> None:
        """The response opens with reasoning: replace the scaffold's empty
        think block (``\\n\\n</think>\\n\\n``) by an open one, so that the next
        ids appended are the think block's text, ``"\\n" + reasoning + "\\n"``
        re-tokenized as one text. Only before any response id; cheap (the
        cache forgets three positions)."""
        with self._lock:
            self._check_open()
            self._check_appendable()
            if self._reasoning:
                raise SessionStateError("begin_reasoning() was already called for this response")
            if self._position != self._response_start:
                raise SessionStateError(
                    "begin_reasoning() must come before any answer id: reasoning precedes the answer; roll back to "
                    f"response_start ({self._response_start}) first"
                )
            start = self._reasoning_start
            for layer in self._cache.layers:
                layer.rewind(start)  # no allocation: this step cannot fail half way
            self._position = start
            self._reasoning = True
            self._response_start = start
            # Upstream's thinking mode judges from the token after the "\n"
            # that follows <think> (``assistant`` index + 4).
            self._debouncer = Debouncer(self.policy, start + 1)

    def cancel_reasoning(self) -> list[Verdict]:
        """Undo ``begin_reasoning()`` while the think block is still empty
        (roll back to ``response_start`` first): append the thinking-disabled
        scaffold's ``\\n\\n</think>\\n\\n`` again; their verdicts belong to no
        response text and are not debounced."""
        with self._lock:
            self._check_open()
            if not self._reasoning or self._position != self._response_start:
                raise SessionStateError(
                    "cancel_reasoning() undoes begin_reasoning() on an empty think block: "
                    f"roll back to response_start ({self._response_start}) first"
                    if self._reasoning
                    else "cancel_reasoning(): this response has no think block"
                )
            tail = empty_think_tail_ids(self._guard.tokenizer)
            self._check_room(len(tail))
            start = self._position
            with self._step():
                logits = self._guard.model.response_logits(self._forward(tail))
            rows = _verdicts(logits, start, self._guard.labels.risk_levels, self._guard.labels.categories, self.policy)
            self._reasoning = False
            self._response_start = self._position
            self._debouncer = Debouncer(self.policy, self._position)
            self.last_logits = logits
            return [Verdict(*row, past_trained_length=self._past_trained_length(row[0])) for row in rows]

    def end_reasoning(self) -> list[Verdict]:
        """Close the think block: append ``</think>`` and ``\\n\\n``, judged by
        the response head and debounced like the text; their two verdicts."""
        with self._lock:
            self._check_open()
            self._check_appendable()
            if not self._reasoning or self._reasoning_end is not None:
                raise SessionStateError(
                    "end_reasoning(): no think block is open (call begin_reasoning() before the reasoning ids)"
                )
            if self._position == self._response_start:
                raise SessionStateError(
                    "end_reasoning(): the think block holds no text; append the ids of \"\\n\" + reasoning + \"\\n\" "
                    "(\"\\n\\n\" for empty reasoning) first"
                )
            at = self._position
            verdicts = self._judge(think_close_ids(self._guard.tokenizer))
            self._reasoning_end = at
            return verdicts

    def finish(self) -> list[Verdict]:
        """End of the response: append ``<|im_end|>`` and ``\\n``, as the
        template closes the turn and upstream's evaluation judges them, and
        return their verdicts (part of the debounce: a response whose last
        token and ``<|im_end|>`` are both Unsafe is flagged here). Append
        nothing more until a rollback to before them."""
        with self._lock:
            self._check_open()
            self._check_appendable()
            if self.reasoning_open:
                raise SessionStateError(
                    "finish(): the think block is still open; append its closing \"\\n\" and call end_reasoning() first"
                )
            at = self._position
            verdicts = self._judge(end_of_turn_ids(self._guard.tokenizer))
            self._finished_at = at
            return verdicts

    def rollback(self, position: int) -> None:
        """Return to an earlier ``position`` (at least ``response_start``).
        Rolling back to or before the end of turn (``finish``) or the
        ``</think>`` (``end_reasoning``) takes them back too."""
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
            inside = (("the end of turn", self._finished_at), ("</think> and its newlines", self._reasoning_end))
            for name, at in inside:
                if at is not None and at < position < at + 2:
                    raise SessionStateError(
                        f"cannot roll back to position {position}: it is inside {name} at {at}..{at + 1}; "
                        f"roll back to {at} or before"
                    )
            self._cache.crop(position - self._position)  # transformers' crop takes -count
            self._debouncer.rollback(position)
            self._position = position
            if self._finished_at is not None and position <= self._finished_at:
                self._finished_at = None
            if self._reasoning_end is not None and position <= self._reasoning_end:
                self._reasoning_end = None

    def fork(self) -> GuardSession:
        """A new session whose state equals this one's: the prompt judged, the
        query verdict, the position, the debounce and the reasoning state, and
        a copy of the KV cache (no forward). The two go on independently; each
        must be closed. On an engine, the new session counts against
        ``max_sessions`` and the KV budget like any other."""
        with self._lock:
            self._check_open()
            twin = self._new_twin()
            try:
                twin._copy_state_of(self)
            except BaseException:
                twin.close()
                raise
            return twin

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

    def _new_twin(self) -> GuardSession:
        return GuardSession(self._guard, self.policy)

    def _copy_state_of(self, other: GuardSession) -> None:
        self._cache = _copy_cache(other._cache, self._guard.config)
        for name in ("_position", "_response_start", "_reasoning_start", "_reasoning", "_reasoning_end",
                     "_finished_at", "_warned_past_trained_length"):  # fmt: skip
            setattr(self, name, getattr(other, name))
        self._debouncer = None if other._debouncer is None else _copy_debouncer(other._debouncer)
        self.query_verdict = other.query_verdict
        self.last_logits = other.last_logits

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this session was closed; start a new one with StreamGuard.session()")

    def _check_appendable(self) -> None:
        if self._debouncer is None:
            raise SessionStateError(
                "call moderate_prompt() before append(): the guard judges a response to a prompt"
            )
        if self._finished_at is not None:
            raise SessionStateError(
                f"finish() appended the end of turn at position {self._finished_at}; roll back to "
                f"{self._finished_at} or before to change the response"
            )

    def _judge(self, batch: list[int]) -> list[Verdict]:
        """Append ids and judge them with the response head (the debounce
        starts at the debouncer's start)."""
        if not batch:
            return []
        self._check_room(len(batch))
        first = self._position
        labels = self._guard.labels
        debouncer = self._debouncer
        with self._step():
            logits = self._guard.model.response_logits(self._forward(batch))
            verdicts = []
            for row in _verdicts(logits, first, labels.risk_levels, labels.categories, self.policy):
                if row[0] >= debouncer.start:
                    flagged, flagged_at = debouncer.observe(row[0], row[1])
                else:  # before the debounce starts: the "\n" after <think>
                    flagged, flagged_at = False, None
                past = self._past_trained_length(row[0])
                verdicts.append(Verdict(*row, flagged=flagged, flagged_at=flagged_at, past_trained_length=past))
        self.last_logits = logits
        return verdicts

    def _check_room(self, count: int) -> None:
        limit = self._guard.config.max_position_embeddings
        if self._position + count <= limit:
            return
        if self.policy.context_limit == "error":
            raise ContextLengthError(
                f"appending {count} tokens at position {self._position} would pass the model's "
                f"{limit} positions (its trained length), and Policy(context_limit='error') stops there; stop "
                "the stream or start a new session, or pass Policy(context_limit='continue') to judge past it"
            )

    def _past_trained_length(self, position: int) -> bool:
        limit = self._guard.config.max_position_embeddings
        if position < limit:
            return False
        if not self._warned_past_trained_length:
            self._warned_past_trained_length = True
            logger.warning(
                "the guard is judging position %d, past the %d positions it was trained on "
                "(max_position_embeddings); its verdicts there are marked past_trained_length=True. "
                "Pass Policy(context_limit='error') to stop at the limit instead",
                position,
                limit,
            )
        return True

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


def _copy_cache(cache, config):
    """A copy of a session's KV cache (its used positions only)."""
    twin = new_cache(config)
    for source, layer in zip(cache.layers, twin.layers, strict=True):
        if source._key_buffer is None:
            continue
        layer.device, layer.is_initialized = source.device, True
        layer._key_buffer = source._key_buffer[..., : source.length, :].clone()
        layer._value_buffer = source._value_buffer[..., : source.length, :].clone()
        layer.rewind(source.length)
    return twin


def _copy_debouncer(debouncer: Debouncer) -> Debouncer:
    twin = Debouncer(debouncer.policy, debouncer.start)
    twin._levels = list(debouncer._levels)
    twin._flagged_at = debouncer.flagged_at
    return twin
