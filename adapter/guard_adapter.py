"""GuardAdapter: generator tokens (or text deltas) in, guard verdicts on them out.

    generator ids ─► SourceDecoder ─► pieces ─► StableRetokenizer ─► GuardSession
                                         ▲                                │
                                         └──────── verdicts ◄─────────────┘

A source piece (a generator token, or a text delta) is *judged* by the first
guard token whose span reaches the end of the piece's text: that is the moment
the guard has seen all of it. Pieces whose text is still held back wait and
are released, in order, as soon as that token comes; ``finish`` releases
everything. Each judged piece records its lag: how many source pieces were
pushed after it before its verdict came.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapter.errors import AdapterError, RollbackError, StreamFinishedError
from adapter.retokenize import StableRetokenizer, StableToken
from adapter.retokenize.ordinary import cached_ordinary_tokenizer
from adapter.source import SourceDecoder, SourcePiece

if TYPE_CHECKING:  # types only: adapter does not need torch to import
    from guard import GuardSession, Verdict

__all__ = ["GuardAdapter", "JudgedPiece"]

GuardObserver = Callable[[list[StableToken], list["Verdict"]], None]


@dataclass(frozen=True, slots=True)
class JudgedPiece:
    """A source piece with the guard's verdict on it.

    ``verdict`` is the verdict of the guard token that completed this piece's
    text (None for a piece with no text before any guard token, such as a BOS).
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
    judges (for audit logs).
    """

    def __init__(
        self, session: GuardSession, source_tokenizer: Any = None, *, on_guard_tokens: GuardObserver | None = None
    ) -> None:
        self.session = session
        self.source_tokenizer = source_tokenizer
        self._decoder = SourceDecoder(source_tokenizer) if source_tokenizer is not None else None
        self._retokenizer = StableRetokenizer(cached_ordinary_tokenizer(session.guard.tokenizer))
        self._observer = on_guard_tokens
        self._pushed = 0  # source pieces pushed (ids, or deltas)
        self._delta_ends = array("q")  # text mode: end offset of each delta, for rollback
        self._pending: deque[SourcePiece] = deque()  # waiting for a verdict
        # Per judged piece: the guard token (ordinal in the response) that
        # judged it, -1 for none. Rollback re-opens pieces whose judge it drops.
        self._judges = array("q")
        self._judge_ends = array("q")
        self._guard_tokens = 0  # guard tokens of the response fed so far
        self._judged_until = 0  # text offset the guard has seen all of
        self._last_verdict: Verdict | None = None
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

    def push_ids(self, ids: int | Iterable[int]) -> list[JudgedPiece]:
        """Feed generator token ids; return the pieces judged by now."""
        if self._decoder is None:
            raise TypeError("this adapter takes text deltas (push_text); pass source_tokenizer to push ids")
        self._check_open()
        batch = [ids] if isinstance(ids, int) else list(ids)
        pieces = self._decoder.push(batch)  # validates every id before changing anything
        self._pushed += len(batch)
        return self._feed(pieces, final=False)

    def push_text(self, delta: str) -> list[JudgedPiece]:
        """Feed a text delta (one source piece); return the pieces judged by now."""
        if self._decoder is not None:
            raise TypeError("this adapter decodes generator ids (push_ids); text would break the id spans")
        if not isinstance(delta, str):
            raise TypeError(f"push_text() takes str, got {type(delta).__name__}")
        self._check_open()
        start = self._retokenizer.text_length
        piece = SourcePiece(self._pushed, delta, start, start + len(delta))
        self._pushed += 1
        self._delta_ends.append(piece.end)
        return self._feed([piece], final=False)

    def finish(self) -> list[JudgedPiece]:
        """End of the response: judge everything still held back."""
        self._check_open()
        judged = self._feed(self._decoder.flush() if self._decoder is not None else [], final=True)
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
        if self._guard_error is not None:
            self._check_open()  # raises: a failed stream cannot be repaired by a rollback
        if not 0 <= index <= self._pushed:
            raise RollbackError(f"cannot roll back to source piece {index}: {self._pushed} were pushed")
        if self._decoder is not None:
            self._decoder.rollback(index)
            text_length, kept_pieces = self._decoder.text_length, self._decoder.piece_count
        else:
            text_length, kept_pieces = (self._delta_ends[index - 1] if index else 0), index
            del self._delta_ends[index:]
        kept_tokens = self._retokenizer.rollback(text_length)
        self.session.rollback(self.session.response_start + kept_tokens)
        self._guard_tokens = kept_tokens
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
        self._judged_until = self._retokenizer.emitted_text_length
        self._last_verdict = None
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

    def _feed(self, pieces: list[SourcePiece], *, final: bool) -> list[JudgedPiece]:
        judged: list[JudgedPiece] = []
        for piece in pieces:
            self._pending.append(piece)
            judged += self._judge(self._retokenizer.push(piece.text))
        if final:
            judged += self._judge(self._retokenizer.flush())
            # Whatever is left has no text the guard has not seen (a trailing
            # EOS, say): it takes the last verdict.
            judged += self._release(self._guard_tokens - 1, everything=True)
        return judged

    def _judge(self, tokens: list[StableToken]) -> list[JudgedPiece]:
        if not tokens:
            return []
        try:
            verdicts = self.session.append([token.id for token in tokens])
        except Exception as error:
            # The retokenizer has emitted these tokens and cannot take them
            # back alone: refuse to go on rather than skip them silently.
            self._guard_error = error
            raise
        if self._observer is not None:
            self._observer(tokens, verdicts)
        released: list[JudgedPiece] = []
        for token, verdict in zip(tokens, verdicts, strict=True):
            self._judged_until = max(self._judged_until, token.end)
            self._last_verdict = verdict
            released += self._release(self._guard_tokens)
            self._guard_tokens += 1
        return released

    def _release(self, judge: int, *, everything: bool = False) -> list[JudgedPiece]:
        """Release the waiting pieces whose text the guard has wholly seen."""
        released = []
        while self._pending and (everything or self._pending[0].end <= self._judged_until):
            piece = self._pending.popleft()
            verdict = self._last_verdict
            lag = self._pushed - 1 - piece.index
            released.append(JudgedPiece(piece.index, piece.text, piece.start, piece.end, verdict, lag))
            self._judges.append(judge if verdict is not None else -1)
            self._judge_ends.append(piece.end)
        return released
