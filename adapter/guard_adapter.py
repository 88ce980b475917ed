"""GuardAdapter: generator tokens (or text deltas) in, guard verdicts on them out.

    generator ids ─► SourceDecoder ─► pieces ─► StableRetokenizer ─► GuardSession
                                         ▲                                │
                                         └──────── verdicts ◄─────────────┘

The judge rule: a source piece (a generator token, or a text delta) gets the
verdict of the **last guard token that starts before the piece's end**. That
is the first moment the guard has seen all of the piece's text: a character
that the guard's byte-level BPE splits into several tokens (a rare CJK
character, many emoji, a ZWJ sequence) is seen only at its last token, and
no earlier token would do. A piece is released once no guard token can still
start before its end: when a later token starts at or past it, or when the
retokenizer has emitted all the text up to it. Pieces with no text (a BOS, an
EOS) take the verdict current when they are released. ``finish`` releases
everything. Each judged piece records its lag: how many source pieces were
pushed after it before its verdict came.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapter.errors import AdapterError, RollbackError, StreamFinishedError
from adapter.retokenize import StableRetokenizer, StableToken
from adapter.retokenize.stable import DEFAULT_MAX_HELD
from adapter.source import SourceDecoder, SourcePiece, token_id_list

if TYPE_CHECKING:  # types only: adapter does not need torch to import
    from guard import GuardSession, Verdict

__all__ = ["GuardAdapter", "JudgedPiece"]

GuardObserver = Callable[[list[StableToken], list["Verdict"]], None]


@dataclass(frozen=True, slots=True)
class JudgedPiece:
    """A source piece with the guard's verdict on it.

    ``verdict`` is the verdict of the last guard token that starts before the
    piece's end, the first one that saw all of its text (None for a piece with
    no text before any guard token, such as a BOS).
    ``lag`` counts the source pieces pushed after this one before the verdict
    came (0: judged as soon as it was pushed).
    """

    index: int
    text: str
    start: int
    end: int
    verdict: Verdict | None
    lag: int

    @property
    def flagged(self) -> bool:
        return self.verdict is not None and self.verdict.flagged


class GuardAdapter:
    """Ties a GuardSession to a generator's stream.

    With ``source_tokenizer`` the stream is generator token ids (``push_ids``);
    without it, text deltas (``push_text``), as LangChain or an SSE stream give.
    ``on_guard_tokens(tokens, verdicts)`` is called with every batch the guard
    judges (for audit logs). ``max_held`` bounds the characters held back
    before a forced cut (see ``StableRetokenizer``).
    """

    def __init__(
        self,
        session: GuardSession,
        source_tokenizer: Any = None,
        *,
        on_guard_tokens: GuardObserver | None = None,
        max_held: int = DEFAULT_MAX_HELD,
    ) -> None:
        self.session = session
        self.source_tokenizer = source_tokenizer
        self._decoder = SourceDecoder(source_tokenizer) if source_tokenizer is not None else None
        self._retokenizer = StableRetokenizer(session.guard.tokenizer, max_held=max_held)
        self._observer = on_guard_tokens
        self._pushed = 0  # source pieces pushed (ids, or deltas)
        self._delta_ends = array("q")  # text mode: end offset of each delta fed, for rollback
        # Text mode: a delta ending in half a surrogate pair waits for the rest.
        self._deferred: SourcePiece | None = None
        self._pending: deque[SourcePiece] = deque()  # waiting for a verdict
        self._ready: list[JudgedPiece] = []  # judged, not yet returned to the caller
        # Per judged piece: the guard token (ordinal in the response) that
        # judged it, -1 for none. Rollback re-opens pieces whose judge it drops.
        self._judges = array("q")
        self._judge_ends = array("q")
        self._verdicts: list[Verdict] = []  # one per guard token of the response
        self._finished = False
        self._guard_error: BaseException | None = None

    # --- the conversation -------------------------------------------------

    def moderate_prompt(self, prompt: Any) -> Verdict:
        """Judge the user turn (a string or chat messages); see GuardSession."""
        return self.session.moderate_prompt(prompt)

    @property
    def flagged(self) -> bool:
        """Whether the debounced policy has flagged the response."""
        return self.session.flagged

    @property
    def pushed(self) -> int:
        return self._pushed

    @property
    def forced_cuts(self) -> int:
        """Runs without a stable boundary that were cut by force (see
        ``StableRetokenizer.forced_cuts``): 0 means the guard received exactly
        ``encode_ordinary(response)``."""
        return self._retokenizer.forced_cuts

    @property
    def guard_tokens(self) -> int:
        """Guard tokens of the response judged so far."""
        return len(self._verdicts)

    def push_ids(self, ids: Any) -> list[JudgedPiece]:
        """Feed generator token ids (an int, a sequence, a 1-d array or tensor);
        return the pieces judged by now."""
        if self._decoder is None:
            raise TypeError("this adapter takes text deltas (push_text); pass source_tokenizer to push ids")
        batch = token_id_list(ids)
        self._check_open()
        pieces = self._decoder.push(batch)  # validates every id before changing anything
        self._pushed += len(batch)
        return self._feed(pieces, final=False)

    def push_text(self, delta: str) -> list[JudgedPiece]:
        """Feed a text delta (one source piece); return the pieces judged by now.

        A delta may end inside a UTF-16 surrogate pair (a JSON stream that
        splits "\\ud83d" and "\\ude00"): that piece waits for the next delta,
        and an unpaired surrogate becomes U+FFFD, as decoders do."""
        if self._decoder is not None:
            raise TypeError("this adapter decodes generator ids (push_ids); text would break the id spans")
        if not isinstance(delta, str):
            raise TypeError(f"push_text() takes str, got {type(delta).__name__}")
        self._check_open()
        pieces = []
        if self._deferred is not None:
            head = delta[:1] if delta[:1] and "\udc00" <= delta[0] <= "\udfff" else ""
            pieces.append(self._text_piece(self._deferred.index, self._deferred.text + head))
            delta = delta[len(head) :]
            self._deferred = None
        if delta and "\ud800" <= delta[-1] <= "\udbff":
            self._deferred = SourcePiece(self._pushed, delta, 0, 0)
        else:
            pieces.append(self._text_piece(self._pushed, delta))
        self._pushed += 1
        return self._feed(pieces, final=False)

    def finish(self) -> list[JudgedPiece]:
        """End of the response: judge everything still held back."""
        self._check_open()
        if self._decoder is not None:
            pieces = self._decoder.flush()
        elif self._deferred is not None:
            pieces = [self._text_piece(self._deferred.index, self._deferred.text)]
            self._deferred = None
        else:
            pieces = []
        judged = self._feed(pieces, final=True)
        self._finished = True
        return judged

    def rollback(self, index: int) -> int:
        """Return to the state after source piece ``index - 1`` (the CARE
        pattern: detect, roll back, regenerate). Decoder, retokenizer and guard
        session roll back together; nothing is judged twice or skipped.

        Returns how many source pieces keep their verdicts. The pieces from
        there up to ``index`` are judged again, by the guard tokens that come
        next: their old verdict came from guard tokens that the rollback took
        back (a word is only final once the text after it is known).
        """
        # Everything that can refuse is checked before anything changes.
        if self._guard_error is not None:
            self._check_open()  # raises: a failed stream cannot be repaired by a rollback
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= self._pushed:
            raise RollbackError(f"cannot roll back to source piece {index!r}: {self._pushed} were pushed")
        if self.session.closed:
            raise AdapterError("the guard session was closed; start a new session and adapter")
        if self.session.response_start is None:
            raise AdapterError("nothing to roll back: call moderate_prompt() before pushing the response")
        if self._decoder is not None:
            self._decoder.rollback(index)
            text_length, kept_pieces = self._decoder.text_length, self._decoder.piece_count
        else:
            if self._deferred is not None and self._deferred.index >= index:
                self._deferred = None
            fed = min(index, len(self._delta_ends))
            text_length, kept_pieces = (self._delta_ends[fed - 1] if fed else 0), fed
            del self._delta_ends[fed:]
        kept_tokens = self._retokenizer.rollback(text_length)
        self.session.rollback(self.session.response_start + kept_tokens)
        del self._verdicts[kept_tokens:]
        judged = min(len(self._judges), kept_pieces)
        kept = 0
        while kept < judged and self._judges[kept] < kept_tokens:
            kept += 1
        starts = [self._judge_ends[i - 1] if i else 0 for i in range(kept, judged)]
        reopened = [
            SourcePiece(i, self._retokenizer.text(start, self._judge_ends[i]), start, self._judge_ends[i])
            for i, start in zip(range(kept, judged), starts, strict=True)
        ]
        waiting = [piece for piece in self._pending if piece.index < kept_pieces]
        self._pending = deque(reopened + waiting)
        del self._judges[kept:], self._judge_ends[kept:]
        self._ready = [piece for piece in self._ready if piece.index < kept]
        self._pushed = index
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

    def _text_piece(self, index: int, text: str) -> SourcePiece:
        if not text.isascii():
            # Join surrogate pairs; a lone surrogate becomes U+FFFD.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        start = self._retokenizer.text_length
        self._delta_ends.append(start + len(text))
        return SourcePiece(index, text, start, start + len(text))

    def _feed(self, pieces: list[SourcePiece], *, final: bool) -> list[JudgedPiece]:
        for piece in pieces:
            self._pending.append(piece)
            self._judge(self._retokenizer.push(piece.text))
        if final:
            self._judge(self._retokenizer.flush())
        judged, self._ready = self._ready, []
        return judged

    def _judge(self, tokens: list[StableToken]) -> None:
        verdicts: list[Verdict] = []
        if tokens:
            try:
                verdicts = self.session.append([token.id for token in tokens])
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
        # No later token can start before what the retokenizer has emitted.
        self._release(self._retokenizer.emitted_text_length)
        if tokens and self._observer is not None:
            # Called once the adapter's state is complete: if it raises, the
            # judged pieces stay in _ready and come out of the next call.
            self._observer(tokens, verdicts)

    def _release(self, seen_until: int) -> None:
        """Release the waiting pieces that end at or before ``seen_until``."""
        verdict = self._verdicts[-1] if self._verdicts else None
        judge = len(self._verdicts) - 1
        while self._pending and self._pending[0].end <= seen_until:
            piece = self._pending.popleft()
            lag = self._pushed - 1 - piece.index
            self._ready.append(JudgedPiece(piece.index, piece.text, piece.start, piece.end, verdict, lag))
            self._judges.append(judge)
            self._judge_ends.append(piece.end)
