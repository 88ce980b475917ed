"""GuardAdapter: generator tokens (or text deltas) in, guard verdicts on them out.

    generator ids ─► SourceDecoder ─► pieces ─► ResponseSplitter ─► StableRetokenizer ─► GuardSession
                                         ▲                                                     │
                                         └──────────────────── verdicts ◄──────────────────────┘

What the guard receives is what upstream's evaluation judges for the last
assistant turn (see ``guard.template``): without reasoning,
``encode_ordinary(answer.lstrip("\\n"))`` then ``<|im_end|>`` and ``\\n`` at
``finish()``; with reasoning, the think block's text
``"\\n" + reasoning.strip("\\n") + "\\n"`` re-tokenized as one text,
``</think>`` and ``\\n\\n``, then the answer as before. Reasoning comes from
``push_reasoning_ids``/``push_reasoning_text`` (a separate stream, before the
answer), or from the generator's own think markers in its one stream
(``think_markers``).

The judge rule: a source piece (a generator token, or a text delta) gets the
verdict of the **last guard token that starts before the piece's end**. That
is the first moment the guard has seen all of the piece's text: a character
that the guard's byte-level BPE splits into several tokens (a rare CJK
character, many emoji, a ZWJ sequence) is seen only at its last token, and
no earlier token would do; a guard token of a stretch that NFC reorders or
composes starts where the stretch starts (see ``StableToken``), so a piece
waits for every guard token holding any of its characters. Guard tokens
that the template adds stand where the template puts them in the response
text: the think block's newlines where its text begins and ends,
``</think>`` where the closing marker starts (so a generator's ``</think>``
token gets the guard's ``</think>`` verdict), the ``\\n\\n`` after it where
the marker ends, and the end of turn after all the text (so it judges no
piece). Text the guard never sees (leading newlines of the answer, markers,
whitespace before an opening marker) is judged by the guard token before
it, or gets None before any. A piece is
released once no guard token can still start before its end. Pieces with no
text (a BOS, an EOS) take the verdict current when they are released.
``finish`` releases everything. Each judged piece records its lag: how many
source pieces were pushed after it before its verdict came.
"""

from __future__ import annotations

import asyncio
import threading
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from adapter.errors import AdapterError, RollbackError, StreamFinishedError
from adapter.reasoning import Close, Op, Open, ResponseSplitter, Text, ThinkMarkers
from adapter.retokenize import StableRetokenizer, StableToken
from adapter.retokenize.stable import DEFAULT_MAX_HELD, TextLog
from adapter.source import SourceDecoder, SourcePiece, token_id_list

if TYPE_CHECKING:  # types only: adapter does not need torch to import
    from guard import GuardSession, Verdict

__all__ = ["Flag", "GuardAdapter", "JudgedPiece", "ThinkMarkers"]

GuardObserver = Callable[[list[StableToken], list["Verdict"]], None]
Stream = Literal["main", "reasoning"]


@dataclass(frozen=True, slots=True)
class JudgedPiece:
    """A source piece with the guard's verdict on it.

    ``verdict`` is the verdict of the last guard token that starts before the
    piece's end, the first one that saw all of its text (None for a piece
    before any guard token, such as a BOS or leading newlines the guard never
    sees). ``lag`` counts the source pieces pushed after this one before the
    verdict came (0: judged as soon as it was pushed). ``reasoning``: the
    piece is part of the think block (its markers included).
    ``flagged_at_finish``: ``finish()`` released it and the end-of-turn tokens
    raised the flag (a response whose last token and ``<|im_end|>`` are both
    Unsafe); ``flagged`` then says so too, so that a streamer that withholds
    flagged pieces withholds it.
    """

    index: int
    text: str
    start: int
    end: int
    verdict: Verdict | None
    lag: int
    reasoning: bool = False
    flagged_at_finish: bool = False

    @property
    def flagged(self) -> bool:
        return (self.verdict is not None and self.verdict.flagged) or self.flagged_at_finish


@dataclass(frozen=True, slots=True)
class Flag:
    """Where and why the debounced policy flagged a response.

    The policy flags at the second of two consecutive guard tokens that agree
    (``position``, the verdicts' ``flagged_at``); ``verdict`` is that token's
    verdict, whose ``risk_level`` and ``category`` say why. ``index`` is the
    first source piece of the flagged stretch (the first one the guard token
    before ``position`` judged, the first a withholding stream never shows),
    None when no piece holds it: the end of turn alone flagged the response
    (``<|im_end|>`` and the ``\\n`` after it). ``end_of_turn``: the flag came
    at the end of turn, raised by ``finish()`` (the answer's last token and
    ``<|im_end|>``, or the two end-of-turn tokens). ``rollback_to``: where the
    CARE pattern rolls back to (``adapter.rollback(flag.rollback_to)``) so that
    the flagged stretch is gone and no character is cut: the start of the
    generator token that begins the stretch's first character (the last piece
    for a flag the end of turn alone raised).
    """

    position: int
    verdict: Verdict
    index: int | None
    end_of_turn: bool
    rollback_to: int


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    """The generator id whose token string is exactly ``token``, if any."""
    if hasattr(tokenizer, "piece_to_id") and hasattr(tokenizer, "id_to_piece"):  # SentencePieceProcessor
        token_id = tokenizer.piece_to_id(token)
        return token_id if tokenizer.id_to_piece(token_id) == token else None
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        return tokenizer.token_to_id(token)
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return vocabulary.get(token)


def _hidden_marker_ids(tokenizer: Any, markers: ThinkMarkers) -> dict[int, Literal["open", "close"]]:
    """Marker tokens that decoding hides (special tokens): they must be seen by id."""
    hidden: dict[int, Literal["open", "close"]] = {}
    for kind, token in (("open", markers.open), ("close", markers.close)):
        token_id = _single_token_id(tokenizer, token)
        if token_id is None:
            continue
        decoder = SourceDecoder(tokenizer)
        if not "".join(piece.text for piece in decoder.push(token_id) + decoder.flush()):
            hidden[token_id] = kind
    return hidden


class _AsyncCall:
    """Hand-over between an async call and its worker thread."""

    __slots__ = ("cancelled", "done", "lock", "result")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = self.done = False
        self.result: Any = None


class GuardAdapter:
    """Ties a GuardSession to a generator's stream.

    With ``source_tokenizer`` the stream is generator token ids (``push_ids``);
    without it, text deltas (``push_text``), as LangChain or an SSE stream give.
    Reasoning that a server sends apart from the answer (``reasoning_content``)
    goes in first with ``push_reasoning_ids``/``push_reasoning_text``;
    ``think_markers`` (a ``ThinkMarkers``) makes the adapter find the think
    block in the one stream of a generator that writes it there (DeepSeek R1
    and its distills, QwQ, Qwen3 in thinking mode). A generator that never
    reasons needs neither. Pieces of every stream share one index and one
    text: offsets index the reasoning and answer text as pushed, markers
    included.

    ``on_guard_tokens(tokens, verdicts)`` is called with every batch the guard
    judges (for audit logs), the template's control tokens and newlines
    included; their ``StableToken`` spans are empty (``start == end``) where
    they cover no response text. ``max_held`` bounds the characters held back
    before a forced cut (see ``StableRetokenizer``).
    """

    def __init__(
        self,
        session: GuardSession,
        source_tokenizer: Any = None,
        *,
        on_guard_tokens: GuardObserver | None = None,
        max_held: int = DEFAULT_MAX_HELD,
        think_markers: ThinkMarkers | None = None,
    ) -> None:
        if think_markers is not None and not isinstance(think_markers, ThinkMarkers):
            raise TypeError(
                f"think_markers takes a ThinkMarkers, e.g. ThinkMarkers('<think>', '</think>'), got {think_markers!r}"
            )
        self.session = session
        self.source_tokenizer = source_tokenizer
        self.think_markers = think_markers
        self._decoder = SourceDecoder(source_tokenizer) if source_tokenizer is not None else None
        self._hidden_markers = (
            _hidden_marker_ids(source_tokenizer, think_markers)
            if think_markers is not None and source_tokenizer is not None
            else {}
        )
        self._max_held = max_held
        self._retokenizer = StableRetokenizer(session.guard.tokenizer, max_held=max_held)  # the answer
        self._reasoning: StableRetokenizer | None = None  # the think block's text
        self._splitter = ResponseSplitter(think_markers)
        self._log = TextLog()
        self._observer = on_guard_tokens
        self._observed: list[tuple[list[StableToken], list[Verdict]]] = []
        self._pushed = 0  # source pieces pushed (ids, or deltas)
        self._reasoning_pieces = 0  # the first pieces, pushed as reasoning
        self._main_start: tuple[int, int] | None = None  # (piece index, text offset) of the first answer push
        self._marker_indices: dict[int, Literal["open", "close"]] = {}  # pushed ids that are hidden markers
        self._markers_seen: list[tuple[int, int, Literal["open", "close"]]] = []  # (piece index, offset, kind)
        self._last_stream: Stream = "main"
        self._delta_ends = array("q")  # text mode: end offset of each delta fed, for rollback
        # Text mode: a delta ending in half a surrogate pair waits for the rest.
        # Text mode: a delta ending in half a surrogate pair waits for the
        # rest, and empty deltas pushed meanwhile wait behind it, in order.
        self._deferred: tuple[list[SourcePiece], Stream] | None = None
        self._pending: deque[SourcePiece] = deque()  # waiting for a verdict
        self._ready: list[JudgedPiece] = []  # judged, not yet returned to the caller
        self._call_lock = threading.Lock()  # async calls run in worker threads
        # Per judged piece: the guard token (ordinal in the response) that
        # judged it (-1 for none), its end, and the moment it was released
        # (source pieces routed by then; one more in finish()). A rollback
        # keeps a piece only if both are kept: its judge, and the history it
        # was released in (text after a piece can release it: the rest of a
        # marker it was held for, a later word that made its token final).
        self._judges = array("q")
        self._judge_ends = array("q")
        self._released_at = array("q")
        self._routed = 0  # source pieces whose text went in, in index order
        self._finishing = False
        self._verdicts: list[Verdict] = []  # one per guard token of the response, template tokens included
        self._end_verdicts: list[Verdict] = []
        self._finished = False
        self._guard_error: BaseException | None = None

    # --- the conversation -------------------------------------------------

    def moderate_prompt(self, prompt: Any) -> Verdict:
        """Judge the user turn (a string or chat messages); see GuardSession."""
        return self.session.moderate_prompt(prompt)

    @property
    def flagged(self) -> bool:
        """Whether the debounced policy has flagged the response (the
        end-of-turn tokens included, once ``finish()`` ran)."""
        return self.session.flagged

    @property
    def pushed(self) -> int:
        return self._pushed

    @property
    def text(self) -> str:
        """The text pushed so far (decoded, for ids), reasoning and answer
        together as the pieces' offsets index it."""
        return self._log.slice(0, len(self._log))

    @property
    def forced_cuts(self) -> int:
        """Runs without a stable boundary that were cut by force (see
        ``StableRetokenizer.forced_cuts``): 0 means the guard received exactly
        the template's rendering of the response, re-tokenized."""
        return self._retokenizer.forced_cuts + (self._reasoning.forced_cuts if self._reasoning is not None else 0)

    @property
    def guard_tokens(self) -> int:
        """Guard tokens of the response judged so far, the template's
        included: ``session.position == session.response_start + guard_tokens``."""
        return len(self._verdicts)

    @property
    def flag(self) -> Flag | None:
        """Where and why the response was flagged (None while it is not)."""
        session = self.session
        position = session.flagged_at
        if position is None:
            return None
        ordinal = position - session.response_start
        verdict = self._verdicts[ordinal]
        end_of_turn = bool(self._end_verdicts) and ordinal >= len(self._verdicts) - len(self._end_verdicts)
        # Judges are released in order, so they never decrease.
        first = bisect_left(self._judges, ordinal - 1)
        if first < len(self._judges):
            index: int | None = first
        else:
            index = self._pending[0].index if self._pending else None
        last = index if index is not None else max(self._pushed - 1, 0)
        return Flag(position, verdict, index, end_of_turn, self.character_start(last))

    def character_start(self, index: int) -> int:
        """The last source index at or before ``index`` where no character is
        cut: ``index``, unless generator token ``index - 1`` holds the first
        bytes of a character a later token completes (then the token that
        began it; text deltas are whole characters). Roll back there to take
        back a whole character."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= self._pushed:
            raise RollbackError(f"no source piece {index!r}: {self._pushed} were pushed")
        return index if self._decoder is None else self._decoder.character_start(index)

    @property
    def end_verdicts(self) -> list[Verdict]:
        """Verdicts of ``<|im_end|>`` and the ``\\n`` after it, which ``finish()``
        appends and judges (debounced with the rest; no generator token holds
        them). Empty before ``finish()``."""
        return list(self._end_verdicts)

    def push_ids(self, ids: Any) -> list[JudgedPiece]:
        """Feed generator token ids of the response (an int, a sequence, a 1-d
        array or tensor); return the pieces judged by now."""
        return self._push_ids(ids, "main")

    def push_reasoning_ids(self, ids: Any) -> list[JudgedPiece]:
        """Feed generator token ids of the reasoning, before any ``push_ids``
        (the ids of a server's ``reasoning_content``, markers left out)."""
        return self._push_ids(ids, "reasoning")

    def push_text(self, delta: str) -> list[JudgedPiece]:
        """Feed a text delta of the response (one source piece); return the
        pieces judged by now.

        A delta may end inside a UTF-16 surrogate pair (a JSON stream that
        splits "\\ud83d" and "\\ude00"): that piece waits for the next delta,
        and an unpaired surrogate becomes U+FFFD, as decoders do."""
        return self._push_text(delta, "main")

    def push_reasoning_text(self, delta: str) -> list[JudgedPiece]:
        """Feed a text delta of the reasoning (``reasoning_content``), before
        any ``push_text``; one source piece, like ``push_text``."""
        return self._push_text(delta, "reasoning")

    def finish(self) -> list[JudgedPiece]:
        """End of the response: judge everything still held back, close an
        open think block, then append and judge the end of turn
        (``end_verdicts``). If the end of turn raises the flag, every piece
        returned here is ``flagged`` (``flagged_at_finish``)."""
        self._check_open()
        if self._decoder is not None:
            pieces = self._decoder.flush()
        elif self._deferred is not None:
            waiting, stream = self._deferred
            self._deferred = None
            return self._finish_with([(self._text_piece(piece.index, piece.text), stream) for piece in waiting])
        else:
            pieces = []
        return self._finish_with([(piece, self._last_stream) for piece in pieces])

    # --- asyncio: the same calls, off the event loop ----------------------------

    async def moderate_prompt_async(self, prompt: Any) -> Verdict:
        return await self._call_async(self.moderate_prompt, prompt)

    async def push_ids_async(self, ids: Any) -> list[JudgedPiece]:
        return await self._call_async(self.push_ids, token_id_list(ids))

    async def push_reasoning_ids_async(self, ids: Any) -> list[JudgedPiece]:
        return await self._call_async(self.push_reasoning_ids, token_id_list(ids))

    async def push_text_async(self, delta: str) -> list[JudgedPiece]:
        return await self._call_async(self.push_text, delta)

    async def push_reasoning_text_async(self, delta: str) -> list[JudgedPiece]:
        return await self._call_async(self.push_reasoning_text, delta)

    async def finish_async(self) -> list[JudgedPiece]:
        return await self._call_async(self.finish)

    async def rollback_async(self, index: int) -> int:
        return await self._call_async(self.rollback, index)

    async def _call_async(self, method: Callable[..., Any], *args: Any) -> Any:
        """Run a call in a worker thread (the engine's pool for an engine
        session, so that waiting streams share its batched forwards; else the
        loop's default executor). A forward cannot be interrupted, so a call
        whose caller is cancelled still completes: its judged pieces are kept
        and come out first from the next call, so no verdict is lost and
        nothing is judged twice."""
        call = _AsyncCall()
        executor = getattr(getattr(self.session, "engine", None), "executor", None)
        future = asyncio.get_running_loop().run_in_executor(executor, self._run_call, call, method, args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with call.lock:  # held only around the hand-over, never during a forward
                call.cancelled = True
                if call.done:
                    self._keep(call.result)
            raise

    def _run_call(self, call: _AsyncCall, method: Callable[..., Any], args: tuple) -> Any:
        with self._call_lock:  # one call at a time, in the order the threads get here
            result = method(*args)
            with call.lock:
                if call.cancelled:
                    self._keep(result)
                else:
                    call.result, call.done = result, True
            return result

    def _keep(self, result: Any) -> None:
        if isinstance(result, list):
            self._ready[:0] = result

    def rollback(self, index: int) -> int:
        """Return to the state after source piece ``index - 1`` (the CARE
        pattern: detect, roll back, regenerate). Decoder, retokenizers and
        guard session roll back together; nothing is judged twice or skipped,
        and the stream goes on exactly as a fresh one over the kept pieces
        would (a rollback into the reasoning reopens the think block, one to
        before the end takes the end of turn back).

        Returns how many source pieces keep their verdicts. The pieces from
        there up to ``index`` are judged again, by the guard tokens that come
        next: their old verdict came from guard tokens that the rollback took
        back (a word is only final once the text after it is known), or was
        given once text after ``index`` had arrived (text held as the start of
        a think marker is judged only once the marker is complete or is not).
        """
        # Everything that can refuse is checked before anything changes.
        if self._guard_error is not None:
            self._check_open()  # raises: a failed stream cannot be repaired by a rollback
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= self._pushed:
            raise RollbackError(f"cannot roll back to source piece {index!r}: {self._pushed} were pushed")
        session = self.session
        if session.closed:
            raise AdapterError("the guard session was closed; start a new session and adapter")
        if session.response_start is None:
            raise AdapterError("nothing to roll back: call moderate_prompt() before pushing the response")
        if self._decoder is not None:
            self._decoder.rollback(index)
            text_length, kept_pieces = self._decoder.text_length, self._decoder.piece_count
        else:
            if self._deferred is not None:
                waiting = [piece for piece in self._deferred[0] if piece.index < index]
                self._deferred = (waiting, self._deferred[1]) if waiting else None
            fed = min(index, len(self._delta_ends))
            text_length, kept_pieces = (self._delta_ends[fed - 1] if fed else 0), fed
            del self._delta_ends[fed:]
        self._reasoning_pieces = min(self._reasoning_pieces, index)
        if self._main_start is not None and index <= self._main_start[0]:
            self._main_start = None
        self._marker_indices = {i: kind for i, kind in self._marker_indices.items() if i < index}
        self._markers_seen = [seen for seen in self._markers_seen if seen[0] < kept_pieces]
        self._last_stream = "reasoning" if self._reasoning_pieces and self._main_start is None else "main"
        self._log.truncate(text_length)
        splitter = self._replay(text_length)

        # The think block and the answer, each back to what the kept text gives.
        if splitter.block_open:
            kept = self._reasoning.rollback(1 + splitter.reasoning_pushed)  # "\n" + reasoning pushed
            self._retokenizer = StableRetokenizer(session.guard.tokenizer, max_held=self._max_held)
            position = session.response_start + kept
        elif splitter.has_block:  # closed: its tokens and </think> stay
            kept = self._retokenizer.rollback(splitter.answer_pushed)
            position = session.answer_start + kept
        else:
            self._reasoning = None
            if session.reasoning:  # the block was before the kept text: made an empty one lazily
                self._retokenizer = StableRetokenizer(session.guard.tokenizer, max_held=self._max_held)
                position = session.response_start
            else:
                position = session.response_start + self._retokenizer.rollback(splitter.answer_pushed)
        session.rollback(position)
        self._splitter = splitter
        kept_tokens = position - session.response_start
        del self._verdicts[kept_tokens:]
        if not session.finished:
            self._end_verdicts = []

        judged = min(len(self._judges), kept_pieces)
        kept = 0
        while kept < judged and self._judges[kept] < kept_tokens and self._released_at[kept] <= index:
            kept += 1
        starts = [self._judge_ends[i - 1] if i else 0 for i in range(kept, judged)]
        reopened = [
            SourcePiece(i, self._log.slice(start, self._judge_ends[i]), start, self._judge_ends[i])
            for i, start in zip(range(kept, judged), starts, strict=True)
        ]
        waiting = [piece for piece in self._pending if piece.index < kept_pieces]
        self._pending = deque(reopened + waiting)
        del self._judges[kept:], self._judge_ends[kept:], self._released_at[kept:]
        self._ready = [piece for piece in self._ready if piece.index < kept]
        self._pushed = index
        self._routed = kept_pieces
        self._finished = False
        return kept

    # --- internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._guard_error is not None:
            raise AdapterError(
                f"the guard failed on this stream ({self._guard_error}); the tokens of that step were never "
                "judged, so start a new session and adapter"
            ) from self._guard_error
        if self._finished:
            raise StreamFinishedError("finish() was called; roll back or start a new adapter for a new response")

    def _check_stream(self, stream: Stream) -> None:
        if stream == "reasoning" and self._main_start is not None:
            raise AdapterError(
                "reasoning comes before the answer, and answer pieces were pushed from piece "
                f"{self._main_start[0]} on; roll back to {self._main_start[0]} to push more reasoning"
            )

    def _push_ids(self, ids: Any, stream: Stream) -> list[JudgedPiece]:
        if self._decoder is None:
            raise TypeError(
                "this adapter takes text deltas (push_text, push_reasoning_text); pass source_tokenizer to push ids"
            )
        batch = token_id_list(ids)
        self._check_open()
        self._check_stream(stream)
        pieces = self._decoder.push(batch)  # validates every id before changing anything
        if self._hidden_markers and stream == "main":
            for offset, token_id in enumerate(batch):
                if token_id in self._hidden_markers:
                    self._marker_indices[self._pushed + offset] = self._hidden_markers[token_id]
        return self._feed([(piece, stream) for piece in pieces], stream, len(batch))

    def _push_text(self, delta: str, stream: Stream) -> list[JudgedPiece]:
        if self._decoder is not None:
            raise TypeError(
                "this adapter decodes generator ids (push_ids, push_reasoning_ids); text would break the id spans"
            )
        if not isinstance(delta, str):
            raise TypeError(f"push_text() takes str, got {type(delta).__name__}")
        self._check_open()
        self._check_stream(stream)
        pieces: list[tuple[SourcePiece, Stream]] = []
        if self._deferred is not None:
            waiting, deferred_stream = self._deferred
            same = deferred_stream == stream
            if same and not delta:  # settles nothing: waits behind the half pair
                waiting.append(SourcePiece(self._pushed, "", 0, 0))
                return self._feed([], stream, 1)
            head = delta[:1] if same and delta[:1] and "\udc00" <= delta[0] <= "\udfff" else ""
            first, *rest = waiting
            pieces.append((self._text_piece(first.index, first.text + head), deferred_stream))
            pieces += [(self._text_piece(piece.index, ""), deferred_stream) for piece in rest]
            delta = delta[len(head) :]
            self._deferred = None
        if delta and "\ud800" <= delta[-1] <= "\udbff":
            self._deferred = ([SourcePiece(self._pushed, delta, 0, 0)], stream)
        else:
            pieces.append((self._text_piece(self._pushed, delta), stream))
        return self._feed(pieces, stream, 1)

    def _text_piece(self, index: int, text: str) -> SourcePiece:
        if not text.isascii():
            # Join surrogate pairs; a lone surrogate becomes U+FFFD.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        start = len(self._delta_ends) and self._delta_ends[-1]
        self._delta_ends.append(start + len(text))
        return SourcePiece(index, text, start, start + len(text))

    def _feed(self, pieces: list[tuple[SourcePiece, Stream]], stream: Stream, count: int) -> list[JudgedPiece]:
        first = self._pushed
        self._pushed += count
        if stream == "reasoning":
            self._reasoning_pieces += count  # reasoning pieces are the first ones (_check_stream)
        self._last_stream = stream
        try:
            started = False
            for piece, piece_stream in pieces:
                if piece_stream == stream and not started:
                    self._start_stream(stream, first)
                    started = True
                self._route(piece, piece_stream)  # a piece of the stream before (text mode) goes first
            if not started:
                self._start_stream(stream, first)
        finally:
            self._release(self._frontier())
        return self._take()

    def _start_stream(self, stream: Stream, first: int) -> None:
        """A reasoning push opens the think block even before any text; an
        answer push closes a block that a reasoning stream opened."""
        if stream == "main" and self._main_start is None:
            self._main_start = (first, len(self._log))
        self._apply(self._splitter.text("", stream))

    def _finish_with(self, pieces: list[tuple[SourcePiece, Stream]]) -> list[JudgedPiece]:
        self._finishing = True
        try:
            for piece, stream in pieces:
                self._route(piece, stream)
            self._apply(self._splitter.finish())
            self._reconcile_session(self._splitter.has_block)
            self._judge_text(self._retokenizer.flush(), "answer")
            self._release(len(self._log))
            at = len(self._log)
            flagged_before = self.session.flagged
            self._end_verdicts = self._judge_control("end", at, at)
        finally:
            self._release(self._frontier())
            self._finishing = False
        self._finished = True
        if self.session.flagged and not flagged_before:  # the end of turn raised the flag
            self._ready = [
                JudgedPiece(p.index, p.text, p.start, p.end, p.verdict, p.lag, p.reasoning, True) for p in self._ready
            ]
        return self._take()

    def _take(self) -> list[JudgedPiece]:
        judged, self._ready = self._ready, []
        observed, self._observed = self._observed, []
        if self._observer is not None:
            # Called once the adapter's state is complete: if it raises, the
            # judged pieces come out of the next call.
            error: BaseException | None = None
            for tokens, verdicts in observed:
                try:
                    self._observer(tokens, verdicts)
                except Exception as raised:
                    error = error or raised
            if error is not None:
                self._ready = judged
                raise error
        return judged

    def _route(self, piece: SourcePiece, stream: Stream) -> None:
        self._routed = piece.index + 1
        self._log.append(piece.text)
        self._pending.append(piece)
        ops = self._splitter.text(piece.text, stream)
        kind = self._marker_indices.get(piece.index) if stream == "main" else None
        if kind is not None:
            self._markers_seen.append((piece.index, len(self._log), kind))
            ops += self._splitter.marker(kind)
        self._apply(ops)

    def _apply(self, ops: list[Op]) -> None:
        for op in ops:
            if isinstance(op, Text) and op.channel == "answer":
                self._reconcile_session(self._splitter.has_block)
                self._judge_text(self._retokenizer.push(op.text), "answer")
            elif isinstance(op, Text):
                self._judge_text(self._reasoning.push(op.text), "reasoning")
            elif isinstance(op, Open):
                self._reconcile_session(True)
                self._reasoning = StableRetokenizer(self.session.guard.tokenizer, max_held=self._max_held)
                self._reasoning.push("\n")  # the template's newline after <think>
            elif isinstance(op, Close):
                self._judge_text(self._reasoning.push("\n") + self._reasoning.flush(), "reasoning")
                self._judge_control("close", op.start, op.end)

    def _reconcile_session(self, reasoning: bool) -> None:
        """Give the session the think block the response has (it changes only
        while the response holds no guard token)."""
        if reasoning == self.session.reasoning:
            return
        try:
            if reasoning:
                self.session.begin_reasoning()
            else:  # a rollback took the block back and the answer came without one
                self.session.cancel_reasoning()
        except Exception as error:
            self._guard_error = error
            raise

    def _judge_text(self, tokens: list[StableToken], channel: Literal["reasoning", "answer"]) -> None:
        if not tokens:
            return
        place = self._splitter.reasoning_offset if channel == "reasoning" else self._splitter.answer_offset
        placed = [StableToken(token.id, place(token.start), place(token.end)) for token in tokens]
        self._judge(placed, lambda: self.session.append([token.id for token in tokens]))

    def _judge_control(self, kind: Literal["close", "end"], start: int, end: int) -> list[Verdict]:
        """Append the template's two tokens that close the think block
        (``</think>``, ``\\n\\n``) or the turn (``<|im_end|>``, ``\\n``): the
        first stands at ``start`` in the response text, the second at ``end``."""
        from guard.template import end_of_turn_ids, think_close_ids  # the session's package: already imported

        tokenizer = self.session.guard.tokenizer
        ids = think_close_ids(tokenizer) if kind == "close" else end_of_turn_ids(tokenizer)
        append = self.session.end_reasoning if kind == "close" else self.session.finish
        places = (start, end)
        return self._judge([StableToken(token_id, at, at) for token_id, at in zip(ids, places, strict=True)], append)

    def _judge(self, tokens: list[StableToken], append: Callable[[], list[Verdict]]) -> list[Verdict]:
        try:
            verdicts = append()
        except Exception as error:
            # The retokenizer has emitted these tokens and cannot take them
            # back alone: refuse to go on rather than skip them silently.
            self._guard_error = error
            raise
        for token, verdict in zip(tokens, verdicts, strict=True):
            # Pieces that end where this token starts were wholly seen by
            # the token before it.
            self._release(token.start)
            self._verdicts.append(verdict)
        if self._observer is not None:
            self._observed.append((tokens, verdicts))
        return verdicts

    def _frontier(self) -> int:
        """No guard token still to come can start before this offset."""
        splitter = self._splitter
        frontier = len(self._log)
        held = splitter.held_from
        if held is not None:
            frontier = min(frontier, held)
        reasoning = self._reasoning
        if splitter.block_open and reasoning is not None and reasoning.held_text:
            frontier = min(frontier, splitter.reasoning_offset(reasoning.emitted_text_length))
        if self._retokenizer.held_text and splitter.answer_started:
            frontier = min(frontier, splitter.answer_offset(self._retokenizer.emitted_text_length))
        return frontier

    def _release(self, seen_until: int) -> None:
        """Release the waiting pieces that end at or before ``seen_until``."""
        verdict = self._verdicts[-1] if self._verdicts else None
        judge = len(self._verdicts) - 1
        spans = self._splitter.open_span, self._splitter.close_span
        while self._pending and self._pending[0].end <= seen_until:
            piece = self._pending.popleft()
            lag = self._pushed - 1 - piece.index
            reasoning = (
                spans[0] is not None and piece.start >= spans[0][0] and (spans[1] is None or piece.end <= spans[1][1])
            )
            self._ready.append(JudgedPiece(piece.index, piece.text, piece.start, piece.end, verdict, lag, reasoning))
            self._judges.append(judge)
            self._judge_ends.append(piece.end)
            self._released_at.append(self._routed + self._finishing)

    def _replay(self, length: int) -> ResponseSplitter:
        """A fresh splitter fed the kept text: the state a stream of the kept
        pieces would be in."""
        splitter = ResponseSplitter(self.think_markers)
        text = self._log.slice(0, length)
        main = min(self._main_start[1], length) if self._main_start is not None else length
        if self._reasoning_pieces:
            splitter.text(text[:main], "reasoning")
        if self._main_start is not None:
            position = main
            splitter.text("", "main")
            for _, offset, kind in self._markers_seen:
                splitter.text(text[position:offset])
                splitter.marker(kind)
                position = offset
            splitter.text(text[position:])
        return splitter
