"""Incremental re-tokenization that never takes a token back.

``StableRetokenizer`` keeps only the *held* text: everything after the last
pre-token boundary that no continuation can move. Each ``push`` re-encodes the
held text plus the delta (never the whole text), emits the pre-tokens that have
become final, and keeps the rest. Because BPE never merges across pre-tokens
and the held text starts on an NFC boundary, encoding the held text alone gives
exactly the tokens that encoding the whole text would give there.
"""

from __future__ import annotations

import io
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from adapter.errors import RollbackError, StreamFinishedError
from adapter.retokenize.boundaries import is_nfc_split, nfc_stable_end, stable_word_count
from adapter.retokenize.ordinary import OrdinaryTokenizer, ordinary_tokenizer

__all__ = ["StableRetokenizer", "StableToken"]


@dataclass(frozen=True, slots=True)
class StableToken:
    """A guard-vocabulary token and the raw characters ``[start, end)`` it covers.

    Offsets index the text as it was pushed (before NFC). Byte-level tokens that
    each hold part of one character share that character's span.
    """

    id: int
    start: int
    end: int


class _TextLog:
    """The pushed text, kept once (4 bytes a character, no object per delta)
    so that rollback can recover any held text."""

    __slots__ = ("_buffer", "_length")

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def append(self, delta: str) -> None:
        self._buffer.write(delta)
        self._length += len(delta)

    def slice(self, start: int, end: int) -> str:
        self._buffer.seek(start)
        text = self._buffer.read(end - start)
        self._buffer.seek(self._length)
        return text

    def truncate(self, end: int) -> None:
        self._buffer.truncate(end)
        self._buffer.seek(end)
        self._length = end


class StableRetokenizer:
    """Turn streamed text into guard-vocabulary ids that no later text can change.

    Invariant: for every text and every way of cutting it into deltas, the ids
    of all ``push`` results followed by ``flush`` equal
    ``encode_ordinary(tokenizer, text)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._ordinary = tokenizer if isinstance(tokenizer, OrdinaryTokenizer) else ordinary_tokenizer(tokenizer)
        self._log = _TextLog()
        self._held = ""
        self._held_start = 0
        self._emitted = 0
        # After every push that moved the boundary: (text length then, held
        # start, tokens emitted). The tokens before the held start were final
        # for every text extending text[:length], so rollback to any offset at
        # or past `length` may keep them.
        self._checkpoint_lengths = array("q", [0])
        self._checkpoint_starts = array("q", [0])
        self._checkpoint_counts = array("q", [0])
        self._finished = False

    @property
    def ordinary(self) -> OrdinaryTokenizer:
        return self._ordinary

    @property
    def text_length(self) -> int:
        """Characters pushed so far."""
        return self._held_start + len(self._held)

    @property
    def emitted_count(self) -> int:
        """Tokens emitted so far."""
        return self._emitted

    @property
    def emitted_text_length(self) -> int:
        """Characters covered by the tokens emitted so far."""
        return self._held_start

    def text(self, start: int, end: int) -> str:
        """The pushed text ``[start, end)``."""
        if not 0 <= start <= end <= self.text_length:
            raise RollbackError(f"no text [{start}, {end}): the stream holds {self.text_length} characters")
        return self._log.slice(start, end)

    @property
    def held_text(self) -> str:
        """The text whose tokens are not final yet."""
        return self._held

    @property
    def finished(self) -> bool:
        return self._finished

    def held_ids(self) -> list[int]:
        """The ids the held text would give if the text ended now (for
        measuring the hold-back; not part of the streaming path)."""
        return self._ordinary.encode(self._held)

    def push(self, delta: str) -> list[StableToken]:
        """Add text; return the tokens that became final."""
        if not isinstance(delta, str):
            raise TypeError(f"push() takes text (str), got {type(delta).__name__}")
        if self._finished:
            raise StreamFinishedError(
                "this stream was flushed; call rollback(offset) to continue from an "
                "earlier point, or start a new StableRetokenizer"
            )
        if not delta:
            return []
        self._log.append(delta)
        self._held += delta
        return self._release(final=False)

    def flush(self) -> list[StableToken]:
        """End of text: return every token that is left."""
        if self._finished:
            raise StreamFinishedError("flush() was already called on this stream")
        tokens = self._release(final=True)
        self._finished = True
        return tokens

    def rollback(self, offset: int) -> int:
        """Return to the state of a stream that was pushed ``text[:offset]``.

        Returns how many emitted tokens stay valid; the caller drops the rest.
        Tokens of the text between that point and ``offset`` come out again from
        the next ``push`` or ``flush``. Works after ``flush`` too.
        """
        if not 0 <= offset <= self.text_length:
            raise RollbackError(f"cannot roll back to offset {offset}: the stream holds {self.text_length} characters")
        keep = bisect_right(self._checkpoint_lengths, offset)
        start, emitted = self._checkpoint_starts[keep - 1], self._checkpoint_counts[keep - 1]
        self._held = self._log.slice(start, offset)
        self._log.truncate(offset)
        self._held_start, self._emitted = start, emitted
        del self._checkpoint_lengths[keep:], self._checkpoint_starts[keep:], self._checkpoint_counts[keep:]
        self._finished = False
        return emitted

    def _release(self, *, final: bool) -> list[StableToken]:
        held = self._held
        end = len(held) if final or not self._ordinary.normalizes_nfc else nfc_stable_end(held)
        if end == 0:
            return []
        encoding = self._ordinary.tokenizer.encode(held[:end], add_special_tokens=False)
        offsets = encoding.offsets
        word_starts: list[int] = []  # raw start of each pre-token
        word_first_token: list[int] = []
        previous_word = None
        for index, word in enumerate(encoding.word_ids):
            if word != previous_word:
                word_starts.append(offsets[index][0])
                word_first_token.append(index)
                previous_word = word
            else:
                word_starts[-1] = min(word_starts[-1], offsets[index][0])
        if final:
            count = len(word_starts)
        else:
            count = stable_word_count(held[:end], word_starts, self._ordinary.max_digits)
            # The held text must begin on an NFC boundary so that it can be
            # normalized on its own.
            while 0 < count < len(word_starts) and not is_nfc_split(held, word_starts[count]):
                count -= 1
        if count == 0:
            return []
        if count == len(word_starts):
            cut, token_count = end, len(offsets)
        else:
            cut, token_count = word_starts[count], word_first_token[count]
        base = self._held_start
        ids = encoding.ids
        # Normalization can fold characters into their neighbour (e + U+0301
        # becomes one é, whose offsets cover only the e); stretch each span to
        # where the next token starts so that the spans cover all the text.
        starts = [offsets[i][0] for i in range(1, token_count)] + [cut]
        tokens = [
            StableToken(ids[i], base + offsets[i][0], base + max(offsets[i][1], starts[i])) for i in range(token_count)
        ]
        self._held = held[cut:]
        self._held_start += cut
        self._emitted += token_count
        if not final:
            self._checkpoint_lengths.append(self.text_length)
            self._checkpoint_starts.append(self._held_start)
            self._checkpoint_counts.append(self._emitted)
        return tokens
