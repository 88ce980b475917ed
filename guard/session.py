"""GuardSession: one conversation, O(1) model work per appended token.

The session keeps the KV cache of everything it has seen, so appending n ids
costs cached forwards over those n ids (attention still reads the cached
positions, as any decoder does), never a re-run of the sequence. ``rollback``
crops the cache and the debounce state together, so the session is exactly as
it was at that position; ``fork`` gives a second session in the same state
(the cache copied, not recomputed).

A session is a ``GuardEngine``'s session with one stream: its forwards are
steps of a ``guard.runner.ModelRunner`` (the guard's own, shared by its plain
sessions one step at a time), its cache a region of that runner's KV pool,
and its verdict arithmetic runs on the device, so a plain session on CUDA
takes the engine's path, CUDA graphs included. A call of any size runs in
steps of at most ``SESSION_CHUNK`` tokens, so the memory a call needs is
bounded by the chunk, not by the call (a 1 MB text delta is one call).

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

import copy
import logging
import operator
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from guard.errors import ContextLengthError, SessionClosedError, SessionStateError, TokenIdError
from guard.model import GuardLogits
from guard.policy import SAFE, Debouncer, Policy, Verdict
from guard.runner import Judged, ModelRunner, Segment
from guard.template import Prompt, empty_think_tail_ids, encode_conversation, end_of_turn_ids, think_close_ids
from guard.verdict_math import COLUMNS, verdict_columns

if TYPE_CHECKING:
    from guard.stream_guard import StreamGuard

__all__ = ["GuardSession"]

logger = logging.getLogger("guard")

#: Tokens per step of a plain session's call: a prompt or an append of any
#: size runs in steps of at most this many (its memory is the chunk's).
SESSION_CHUNK = 256

_Row = tuple[int, str, float, "str | None", "float | None", bool]


def _row(
    position: int, columns: list[float], risk_levels: tuple[str, ...], categories: tuple[str, ...], policy: Policy
) -> _Row:
    """A verdict's fields from one row of ``guard.verdict_math`` numbers."""
    level_index, level_prob, category_index, category_prob = columns[:COLUMNS]
    level = risk_levels[int(level_index)]
    category, category_prob = (None, None) if level == SAFE else (categories[int(category_index)], category_prob)
    return position, level, level_prob, category, category_prob, policy.counts_as_unsafe(level)


def _verdicts(
    logits: GuardLogits, first_position: int, risk_levels: tuple[str, ...], categories: tuple[str, ...], policy: Policy
) -> list[_Row]:
    """Verdict fields of logits judged outside a step (the arithmetic of the step's)."""
    upstream = policy.upstream_arithmetic(logits.risk_level.dtype)
    rows = verdict_columns(logits, upstream).tolist()
    return [_row(first_position + offset, row, risk_levels, categories, policy) for offset, row in enumerate(rows)]


class GuardSession:
    """Made by ``StreamGuard.session()``; call ``moderate_prompt`` first.

    Safe to share between threads: calls are serialized by a lock, each runs
    whole, and the verdicts are those of the same calls made in that order
    from one thread. The order in which two threads' appends land is theirs
    to arrange; a conversation usually belongs to one producer anyway.
    """

    def __init__(self, guard: StreamGuard, policy: Policy | None = None, *, runner: ModelRunner | None = None) -> None:
        self._guard = guard
        self.policy = policy or Policy()
        self._runner = runner or guard._session_runner()
        self._kv = self._runner.pool.new_region()
        # A session dropped without close() gives its region back when collected.
        self._kv_finalizer = weakref.finalize(self, self._runner.pool.release_later, self._kv)
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
        self._last_judged: Judged | None = None

    # --- state -----------------------------------------------------------

    @property
    def last_logits(self) -> GuardLogits | None:
        """Response-head logits of the last call's ids (after the prompt: of
        the scaffold after the user turn), on the model's device, for inspection."""
        judged = self._last_judged
        return None if judged is None else judged.response

    @property
    def guard(self) -> StreamGuard:
        return self._guard

    @property
    def _upstream(self) -> bool:
        """Whether this session's verdicts take upstream's bf16 arithmetic (``Policy.arithmetic``)."""
        return self.policy.upstream_arithmetic(self._guard.dtype)

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
            if self._closed:
                return 0, 0
            per_token = self._runner.pool.bytes_per_token
            return self._kv.length * per_token, self._kv.reserved * per_token

    def fork(self) -> GuardSession:
        """A new session in this one's state: prompt judged, query verdict,
        position, reasoning state and debounce state; its KV cache a copy of
        this one's (no forward). The two then go on independently (e.g. to
        judge several tool calls of one answer without judging the prompt
        again). On a ``GuardEngine`` it counts against ``max_sessions`` and
        the KV budget like any session (``EngineCapacityError`` if no room)."""
        with self._lock:
            self._check_open()
            child = self._spawn()
            try:
                self._runner.copy_kv(self._kv, child._kv)
            except BaseException:
                child.close()
                raise
            return child

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
            labels, at = self._guard.labels, conversation.query_position
            with self._step():
                judged = self._run(conversation.ids, query=True)
                query = judged.rows[at][COLUMNS:]
                row = _row(at, query, labels.query_risk_levels, labels.query_categories, self.policy)
            self.query_verdict = Verdict(*row, past_trained_length=self._past_trained_length(at))
            # The scaffold after the user turn goes through the response
            # head too; its verdicts belong to no response text.
            self._last_judged = judged.tail(at + 1)
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
            self._runner.pool.truncate(self._kv, start)  # no allocation: this step cannot fail half way
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
            start, labels = self._position, self._guard.labels
            with self._step():
                judged = self._run(tail)
            rows = [
                _row(start + offset, columns, labels.risk_levels, labels.categories, self.policy)
                for offset, columns in enumerate(judged.rows)
            ]
            self._reasoning = False
            self._response_start = self._position
            self._debouncer = Debouncer(self.policy, self._position)
            self._last_judged = judged
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
            self._runner.pool.truncate(self._kv, position)
            self._debouncer.rollback(position)
            self._position = position
            if self._finished_at is not None and position <= self._finished_at:
                self._finished_at = None
            if self._reasoning_end is not None and position <= self._reasoning_end:
                self._reasoning_end = None

    def close(self) -> None:
        """Free the KV cache; the session cannot be used afterwards."""
        with self._lock:
            if not self._closed:
                self._kv_finalizer.detach()
                self._runner.pool.release(self._kv)
            self._closed = True

    def __enter__(self) -> GuardSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------

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
            judged = self._run(batch)
            verdicts = []
            for offset, columns in enumerate(judged.rows):
                row = _row(first + offset, columns, labels.risk_levels, labels.categories, self.policy)
                if row[0] >= debouncer.start:
                    flagged, flagged_at = debouncer.observe(row[0], row[1])
                else:  # before the debounce starts: the "\n" after <think>
                    flagged, flagged_at = False, None
                past = self._past_trained_length(row[0])
                verdicts.append(Verdict(*row, flagged=flagged, flagged_at=flagged_at, past_trained_length=past))
        self._last_judged = judged
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
        """All or nothing: on any exception inside (an out-of-memory in a
        step, a KeyboardInterrupt, a later chunk of a long call failing after
        earlier ones were cached), the cached length, the position and the
        debounce state go back to where they were, then the exception goes
        on. A step commits a length only once it completed; this undoes the
        steps of a call that completed before one failed."""
        position = self._position
        length = self._kv.length
        try:
            yield
        except BaseException:
            self._runner.pool.truncate(self._kv, length)  # never allocates: cannot fail here
            self._position = position
            if self._debouncer is not None:
                self._debouncer.rollback(position)
            raise

    def _run(self, ids: list[int], query: bool = False) -> Judged:
        """Cache ``ids`` and judge them with the response heads (and the query
        heads if ``query``), in steps of at most ``SESSION_CHUNK`` tokens on
        the guard's runner; atomic."""
        parts = []
        with self._step():
            for first in range(0, len(ids), SESSION_CHUNK):
                chunk = ids[first : first + SESSION_CHUNK]
                parts.append(self._runner.run([Segment(self._kv, chunk, self._upstream, query)]).part(0))
                self._position += len(chunk)
        return Judged.concat(parts)

    def _spawn(self) -> GuardSession:
        """A new session of the same kind in this one's state, its KV cache empty (``fork``)."""
        child = GuardSession(self._guard, self.policy, runner=self._runner)
        child._adopt(self)
        return child

    def _adopt(self, parent: GuardSession) -> None:
        """Take ``parent``'s state, all but the KV cache."""
        self._position = parent._position
        self._response_start = parent._response_start
        self._reasoning_start = parent._reasoning_start
        self._reasoning = parent._reasoning
        self._reasoning_end = parent._reasoning_end
        self._finished_at = parent._finished_at
        self._debouncer = copy.deepcopy(parent._debouncer)
        self._warned_past_trained_length = parent._warned_past_trained_length
        self.query_verdict = parent.query_verdict
        self._last_judged = parent._last_judged
