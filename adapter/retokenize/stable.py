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
from adapter.retokenize.boundaries import is_nfc_split, nfc_rearranged_spans, nfc_stable_end, stable_word_count
from adapter.retokenize.ordinary import OrdinaryTokenizer, cached_ordinary_tokenizer

__all__ = ["DEFAULT_MAX_HELD", "StableRetokenizer", "StableToken"]

#: The most characters a StableRetokenizer holds back before it cuts by force.
#: ``benchmarks/pretoken_lengths.py`` measures the longest pre-tokens of real
#: text (code, URLs, base64, CJK, German compounds, Markdown tables): the held
#: text stays far below this in all of them, and a push never encodes more than
#: about this many characters, so the cost per character stays flat.
DEFAULT_MAX_HELD = 256


def _check_well_formed(delta: str) -> None:
    """Refuse lone surrogates before anything changes: they are not text the
    tokenizer can encode (a JSON stream split inside a pair must be rejoined
    first, as GuardAdapter.push_text does)."""
    if not delta.isascii():
        try:
            delta.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"the text has a lone surrogate {delta[error.start]!r} at {error.start}: join surrogate pairs "
                "(or decode the stream as UTF-8) before pushing"
            ) from None


def _widen_to_rearranged(spans: list[tuple[int, int]], stretches: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans that cover every raw character the token may hold: a token
    that touches a stretch NFC rearranges (``nfc_rearranged_spans``) may hold
    any character of it, so its span takes in the whole stretch."""
    if not stretches:
        return spans
    stretch_ends = [end for _, end in stretches]
    widened = []
    for start, end in spans:
        low, high = start, end
        touched = bisect_right(stretch_ends, start)  # the first stretch that ends after the token starts
        while touched < len(stretches) and stretches[touched][0] < max(end, start + 1):
            low, high = min(low, stretches[touched][0]), max(high, stretches[touched][1])
            touched += 1
        widened.append((low, high))
    return widened


@dataclass(frozen=True, slots=True)
class StableToken:
    """A guard-vocabulary token and the raw characters ``[start, end)`` it covers.

    Offsets index the text as it was pushed (before NFC), and the span holds
    every character that went into the token: byte-level tokens that each hold
    part of one character share that character's span, and a token of a
    stretch that NFC reorders or composes (``"a\\u0301\\u0323"``) spans the
    whole stretch, since the normalizer's alignment does not say which of its
    characters went where.
    """

    id: int
    start: int
    end: int


class TextLog:
    """Streamed text, kept once (4 bytes a character, no object per delta) so
    that a rollback can recover any part of it."""

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

    def __init__(self, tokenizer: Any, *, max_held: int = DEFAULT_MAX_HELD) -> None:
        if isinstance(max_held, bool) or not isinstance(max_held, int) or max_held < 8:
            raise ValueError(f"max_held must be an int of at least 8 characters, got {max_held!r}")
        self._ordinary = cached_ordinary_tokenizer(tokenizer)
        self._max_held = max_held
        self._forced_cuts = 0
        self._log = TextLog()
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
        self._checkpoint_cuts = array("q", [0])
        self._finished = False

    @property
    def ordinary(self) -> OrdinaryTokenizer:
        return self._ordinary

    @property
    def max_held(self) -> int:
        """The most characters held back before a forced cut."""
        return self._max_held

    @property
    def forced_cuts(self) -> int:
        """How many times a run without a stable boundary was cut by force.

        While this is 0 the ids are exactly ``encode_ordinary`` of the text.
        """
        return self._forced_cuts

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
        _check_well_formed(delta)
        self._log.append(delta)
        # A large delta goes in slices that fill the held text to one past the
        # bound at most: whether a run needs a forced cut is then decided on the
        # same text as when it streams one character at a time, and no step
        # encodes more than a bounded amount of text.
        tokens: list[StableToken] = []
        start = 0
        while start < len(delta):
            step = max(1, self._max_held + 1 - len(self._held))
            self._held += delta[start : start + step]
            start += step
            tokens += self._release(final=False)
        return tokens

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
        self._forced_cuts = self._checkpoint_cuts[keep - 1]
        del self._checkpoint_lengths[keep:], self._checkpoint_starts[keep:], self._checkpoint_counts[keep:]
        del self._checkpoint_cuts[keep:]
        self._finished = False
        return emitted

    def _release(self, *, final: bool) -> list[StableToken]:
        tokens = self._release_stable(final=final)
        # A run with no stable boundary (letters with no space, a long
        # punctuation rule, combining marks) would otherwise be held whole and
        # re-encoded at every push: cut it at a fixed distance from where it
        # starts, so that what is held, and so the cost of a push, stays bounded.
        while len(self._held) > self._max_held:
            tokens += self._force_cut()
        return tokens

    def _force_cut(self) -> list[StableToken]:
        held = self._held
        limit = self._max_held // 2
        # Prefer a point where NFC splits (the chunk then normalizes as it
        # would in place); a run of combining marks has none, and is cut anyway.
        cut = next((p for p in range(limit, limit // 2, -1) if is_nfc_split(held, p)), limit)
        tokens = self._tokens(held, self._ordinary.tokenizer.encode(held[:cut], add_special_tokens=False), cut)
        self._forced_cuts += 1
        self._advance(held, cut, len(tokens), record=True)
        return tokens

    def _release_stable(self, *, final: bool) -> list[StableToken]:
        held = self._held
        end = len(held) if final or not self._ordinary.normalizes_nfc else nfc_stable_end(held)
        if end == 0:
            return []
        encoding = self._ordinary.tokenizer.encode(held[:end], add_special_tokens=False)
        offsets = encoding.offsets
        word_starts: list[int] = []  # raw start of each pre-token
        word_ends: list[int] = []  # raw end of each pre-token's furthest token
        word_first_token: list[int] = []
        previous_word = None
        for index, word in enumerate(encoding.word_ids):
            start, stop = offsets[index]
            if word != previous_word:
                word_starts.append(start)
                word_ends.append(stop)
                word_first_token.append(index)
                previous_word = word
            else:
                word_starts[-1] = min(word_starts[-1], start)
                word_ends[-1] = max(word_ends[-1], stop)
        if final:
            count = len(word_starts)
        else:
            count = stable_word_count(held[:end], word_starts, self._ordinary.max_digits)
            while 0 < count < len(word_starts) and not self._is_clean_cut(held, word_starts, word_ends, count):
                count -= 1
        if count == 0:
            return []
        if count == len(word_starts):
            cut, token_count = end, len(offsets)
        else:
            cut, token_count = word_starts[count], word_first_token[count]
        tokens = self._tokens(held, encoding, cut, token_count)
        self._advance(held, cut, token_count, record=not final)
        return tokens

    @staticmethod
    def _is_clean_cut(held: str, word_starts: list[int], word_ends: list[int], count: int) -> bool:
        """Whether the raw text can be cut where pre-token ``count`` starts.

        The held text must begin on an NFC boundary so that it can be
        normalized on its own; and no raw character may feed pre-tokens on both
        sides of the cut. NFC can expand one raw character into several (the
        nukta letter U+0958 is KA + NUKTA; Hebrew presentation forms are a
        letter and its points) that the pre-tokenizer puts in different
        pre-tokens, all mapped back to that one raw offset: cutting there would
        send the first part again with the held text.
        """
        cut = word_starts[count]
        return max(word_ends[:count]) <= cut and min(word_starts[count:]) >= cut and is_nfc_split(held, cut)

    def _tokens(self, held: str, encoding: Any, cut: int, token_count: int | None = None) -> list[StableToken]:
        offsets = encoding.offsets
        ids = encoding.ids
        token_count = len(ids) if token_count is None else token_count
        base = self._held_start
        # Normalization can fold characters into their neighbour (e + U+0301
        # becomes one é, whose offsets cover only the e); stretch each span to
        # where the next token starts so that the spans cover all the text.
        starts = [offsets[i][0] for i in range(1, token_count)] + [cut]
        spans = [(offsets[i][0], max(offsets[i][1], starts[i])) for i in range(token_count)]
        if self._ordinary.normalizes_nfc:
            spans = _widen_to_rearranged(spans, nfc_rearranged_spans(held[:cut]))
        return [StableToken(ids[i], base + start, base + end) for i, (start, end) in enumerate(spans)]

    def _advance(self, held: str, cut: int, token_count: int, *, record: bool) -> None:
        self._held = held[cut:]
        self._held_start += cut
        self._emitted += token_count
        if record:
            self._checkpoint_lengths.append(self.text_length)
            self._checkpoint_starts.append(self._held_start)
            self._checkpoint_counts.append(self._emitted)
            self._checkpoint_cuts.append(self._forced_cuts)
