"""Where is the last boundary that no continuation of the text can move?

Pure functions of strings, kept apart from the streaming state so that each can
be tested on its own. Two layers can still change at the end of a text:

* **NFC** (Unicode UAX #15). A character that is followed later by a combining
  mark, a Hangul vowel or a trailing consonant may compose with it. We use the
  normalization-boundary notions of UAX #15 / ICU: a character has a boundary
  *before* it when nothing earlier can combine with it or reorder past it, and
  a boundary *after* it when nothing later can. Text up to such a boundary
  normalizes the same whatever follows.
* **The pre-tokenizer regex** (the GPT-4-style pattern used by Qwen2/Qwen3 and,
  with ``\\p{N}{1,3}``, by Llama 3). BPE never merges across pre-tokens, so a
  pre-token whose extent no continuation can change is final. See
  :func:`stable_word_count` for the argument.

The tables are built from :mod:`unicodedata`. Where Python's Unicode version
and the tokenizer's differ, every approximation errs towards holding back
more: unassigned code points are never boundaries.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import cache

__all__ = [
    "has_boundary_after",
    "has_boundary_before",
    "is_nfc_split",
    "nfc_rearranged_spans",
    "nfc_stable_end",
    "stable_word_count",
    "trailing_space_start",
]

# Hangul jamo that compose algorithmically (not listed in the decomposition
# data): leading consonants L compose with a following vowel V; LV syllables
# compose with a trailing consonant T.
_HANGUL_L = range(0x1100, 0x1113)
_HANGUL_V = range(0x1161, 0x1176)
_HANGUL_T = range(0x11A8, 0x11C3)
# Below U+0300 every character is a starter that nothing earlier composes with.
_FIRST_COMBINING = 0x0300


@cache
def _composition_tables() -> tuple[frozenset[str], frozenset[str]]:
    """(characters that compose with a following one, ... with a preceding one)."""
    composes_forward: set[str] = set()
    composes_backward: set[str] = set()
    for code in range(0x110000):
        char = chr(code)
        decomposition = unicodedata.decomposition(char)
        if not decomposition or decomposition.startswith("<"):
            continue  # no decomposition, or a compatibility one (NFC ignores it)
        parts = decomposition.split()
        # A primary composite: a canonical pair that NFC recomposes (it is
        # not excluded from composition, so NFC leaves it as it is).
        if len(parts) == 2 and unicodedata.normalize("NFC", char) == char:
            composes_forward.add(chr(int(parts[0], 16)))
            composes_backward.add(chr(int(parts[1], 16)))
    composes_forward.update(map(chr, _HANGUL_L))
    composes_backward.update(map(chr, _HANGUL_V))
    composes_backward.update(map(chr, _HANGUL_T))
    return frozenset(composes_forward), frozenset(composes_backward)


@cache
def has_boundary_before(char: str) -> bool:
    """Nothing before ``char`` can compose with it or reorder past it."""
    if ord(char) < _FIRST_COMBINING:
        return True
    if unicodedata.category(char) == "Cn":
        return False  # unknown to this Unicode version: assume the worst
    _, composes_backward = _composition_tables()
    return (
        unicodedata.combining(char) == 0
        and unicodedata.normalize("NFC", char) == char
        and char not in composes_backward
    )


@cache
def has_boundary_after(char: str) -> bool:
    """Nothing after ``char`` can compose with it or reorder into it."""
    if not has_boundary_before(char):
        return False
    composes_forward, _ = _composition_tables()
    # A character that decomposes (é = e + ◌́, Hangul syllables) can take
    # part in compositions through its last component, so it is no boundary.
    return unicodedata.normalize("NFD", char) == char and char not in composes_forward


def is_nfc_split(text: str, position: int) -> bool:
    """True when ``NFC(text) == NFC(text[:position]) + NFC(text[position:])``
    for every continuation of ``text`` as well."""
    if position == 0:
        return True
    if position < len(text) and has_boundary_before(text[position]):
        return True
    return has_boundary_after(text[position - 1])


def nfc_stable_end(text: str) -> int:
    """Length of the longest prefix whose NFC form no continuation can change.

    Usually ``len(text)`` (text ending in a space, punctuation, a digit, CJK)
    or ``len(text) - 1`` (a letter that a combining mark may still follow).
    """
    end = len(text)
    if end and has_boundary_after(text[-1]):
        return end
    for position in range(end - 1, 0, -1):
        if is_nfc_split(text, position):
            return position
    return 0


# Only a character at or above U+0300 can lack a boundary before it.
_MAY_COMBINE = re.compile("[^\x00-\u02ff]")


def nfc_rearranged_spans(text: str) -> list[tuple[int, int]]:
    """The smallest stretches of ``text`` that NFC changes as a whole, as
    ``(start, end)`` offsets; usually none.

    NFC decomposes, reorders combining marks by canonical class and composes
    each such stretch as a unit, and a tokenizer maps the normalized
    characters back onto it by position only: in ``"a\\u0301\\u0323"`` (acute,
    then dot below) NFC gives U+1EA1 (a with dot below) then the acute,
    which tokenizers align with the dot below's raw offset. Inside such a
    stretch a normalized character may hold any of its raw characters; outside
    of them alignment is exact (nothing changes).
    """
    if unicodedata.is_normalized("NFC", text):  # nearly all text: nothing to find
        return []
    stretches: list[list[int]] = []
    for match in _MAY_COMBINE.finditer(text):
        position = match.start()
        if position == 0 or is_nfc_split(text, position):
            continue
        if stretches and stretches[-1][1] == position:
            stretches[-1][1] = position + 1
        else:
            stretches.append([position - 1, position + 1])
    return [
        part
        for start, end in stretches
        if unicodedata.normalize("NFC", text[start:end]) != text[start:end]
        for part in _nfc_parts(text, start, end)
        if unicodedata.normalize("NFC", text[slice(*part)]) != text[slice(*part)]
    ]


def _nfc_parts(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """``text[start:end]`` cut wherever its NFC form is the NFC forms of the
    two sides put together. ``is_nfc_split`` must hold for every continuation
    and so refuses any character NFC changes (U+0958, CJK compatibility
    ideographs); here the text is known, so a run of them comes apart.
    Quadratic in the stretch, which the retokenizer's hold-back bounds."""
    parts = []
    part, rest = start, unicodedata.normalize("NFC", text[start:end])
    for position in range(start + 1, end):
        head, tail = (unicodedata.normalize("NFC", side) for side in (text[part:position], text[position:end]))
        if head + tail == rest:
            parts.append((part, position))
            part, rest = position, tail
    parts.append((part, end))
    return parts


# Whitespace as the tokenizer's regex engine sees it (Oniguruma's \s is
# White_Space plus \t..\r and U+0085). str.isspace() covers all of it and a
# little more (U+001C..U+001F), and a larger run only makes us hold back more.
def _is_space(char: str) -> bool:
    return char.isspace()


def trailing_space_start(text: str) -> int:
    """Start of the run of whitespace that ends ``text`` (``len(text)`` if none)."""
    position = len(text)
    while position and _is_space(text[position - 1]):
        position -= 1
    return position


def _is_final_digit_run(word: str, max_digits: int) -> bool:
    """A run of exactly ``max_digits`` long-established decimal digits is a
    complete ``\\p{N}{1,max}`` match: no continuation extends it."""
    return len(word) == max_digits and all(_is_old_decimal_digit(c) for c in word)


def _is_old_decimal_digit(char: str) -> bool:
    # Restricted to digits that every tokenizer's Unicode tables know (ASCII,
    # the Indic and Arabic blocks below U+1000, fullwidth) so that the regex
    # engine is sure to match them with \p{N}.
    code = ord(char)
    return unicodedata.category(char) == "Nd" and (code < 0x1000 or 0xFF10 <= code <= 0xFF19)


def stable_word_count(text: str, word_starts: Sequence[int], max_digits: int) -> int:
    """How many leading pre-tokens of ``text`` no continuation can change.

    ``text`` is already NFC-stable; ``word_starts`` are the start offsets of
    its pre-tokens under the pattern

        (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,max}
        | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

    A pre-token is final when the regex engine, matching it, never looked at
    the end of the text. Going through the alternatives:

    * the last pre-token reaches the end and can always grow or re-split
      (``'`` + ``s``; ``"ab"`` + ``"c"``), except a complete digit run;
    * letter runs, digit runs and punctuation runs stop at a character that is
      already there, so they are final once anything follows them; the
      contraction alternative needs at most three characters, and whenever
      it fails for lack of text the letter alternative swallows the rest, so
      the ``'`` becomes part of the last pre-token anyway;
    * ``\\s*[\\r\\n]+`` and ``\\s+(?!\\S)`` scan the whole whitespace run (and
      one character beyond it): every pre-token that starts inside a
      whitespace run reaching the end of the text may still change
      (``"a \\n "`` + ``"\\n"`` merges ``" \\n"`` and ``" "`` into
      ``" \\n \\n"``). A punctuation pre-token that absorbed newlines is
      final once a non-newline follows it, so the run counts from where the
      first pre-token *starts* inside it.
    """
    count = len(word_starts)
    if count == 0:
        return 0
    last_start = word_starts[-1]
    if not _is_final_digit_run(text[last_start:], max_digits):
        count -= 1
    space_start = trailing_space_start(text)
    if space_start < len(text):
        while count and word_starts[count - 1] >= space_start:
            count -= 1
    return count
