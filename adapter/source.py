"""Generator token ids → response text with exact per-token spans.

The text must equal the generator tokenizer's own ``decode`` of the whole
response (``skip_special_tokens=True``, no clean-up of tokenization spaces),
byte for byte, while arriving one token at a time. Each tokenizer family has
its own rules for the bytes of an incomplete character, so a small codec per
family implements one step (``feed``) and ``SourceDecoder`` does the
bookkeeping: spans, validation, finishing and rollback.

Attribution: a character belongs to the generator token that completes it (its
last byte, or the token whose arrival decides that bytes are invalid). A piece
is returned only once its text is final, so a token that holds the first byte
of an emoji is returned, with ``text=""``, together with the token that
completes the emoji.
"""

from __future__ import annotations

import codecs
import json
import operator
import re
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from adapter.errors import RollbackError, StreamFinishedError, TokenIdError, UnsupportedTokenizerError

__all__ = ["SourceDecoder", "SourcePiece", "token_id_list"]

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True, slots=True)
class SourcePiece:
    """Generator token ``index`` of the response and the text it contributed,
    ``response_text[start:end]``."""

    index: int
    text: str
    start: int
    end: int


Resolved = list[tuple[int, str]]  # (token index, final text) in index order


def _token_id(value: Any) -> int:
    if isinstance(value, bool):
        raise TokenIdError(f"token ids must be integers, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TokenIdError(f"token ids must be integers, got {value!r} ({type(value).__name__})") from None


def token_id_list(ids: Any) -> list[int]:
    """Generator token ids as a list of ints: one id (an int, a numpy integer,
    a 0-d tensor) or a sequence of them (a list, a 1-d numpy array or tensor).
    Text and bytes are refused: bytes iterate as ints, which would silently
    turn b"ab" into the ids [97, 98]."""
    if isinstance(ids, str | bytes | bytearray | memoryview):
        raise TokenIdError(
            f"token ids must be integers, got {type(ids).__name__}; decode text deltas with "
            "GuardAdapter.push_text (an adapter made without a source tokenizer) instead"
        )
    shape = getattr(ids, "shape", None)
    if shape is not None and len(shape) > 1:
        raise TokenIdError(
            f"token ids must be one sequence (a 1-d array), got shape {tuple(shape)}; push one row "
            "(one conversation) at a time"
        )
    if (shape is not None and len(shape) == 0) or not hasattr(ids, "__iter__"):
        return [_token_id(ids)]
    if hasattr(ids, "tolist"):  # numpy arrays and tensors: one conversion, not one object per element
        ids = ids.tolist()
    return [_token_id(value) for value in ids]


class _Codec(Protocol):
    vocab_size: int

    def feed(self, index: int, token_id: int) -> Resolved: ...

    def finish(self) -> Resolved: ...

    def quiet_state(self) -> object | None:
        """A snapshot when nothing is pending (every fed token resolved), else None."""

    def restore(self, state: object) -> None: ...

    def mid_character(self) -> bool:
        """Whether the bytes fed so far end inside a character (a rollback
        to here would leave the start of a character, decoded as U+FFFD)."""


class _PendingPieces:
    """Tokens fed but not resolved yet, with the text each has so far."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[list[Any]] = []  # [index, text]

    def add(self, index: int, text: str = "") -> None:
        self.items.append([index, text])

    def take_all(self) -> Resolved:
        resolved = [(index, text) for index, text in self.items]
        self.items.clear()
        return resolved


# ---------------------------------------------------------------------------
# Byte-level BPE (Llama 3, DeepSeek, Tekken, Qwen): every token is bytes; the
# whole response is decoded with String::from_utf8_lossy, whose replacement of
# maximal invalid subparts Python's "replace" error handler also follows.


def _byte_decoder() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


class _ByteLevelCodec:
    def __init__(self, token_bytes: list[bytes | None]) -> None:
        self._token_bytes = token_bytes  # None: skipped special token
        self.vocab_size = len(token_bytes)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = _PendingPieces()

    def feed(self, index: int, token_id: int) -> Resolved:
        self._pending.add(index, self._decoder.decode(self._token_bytes[token_id] or b""))
        if self._decoder.getstate()[0]:
            return []  # bytes of an unfinished character are waiting
        return self._pending.take_all()

    def finish(self) -> Resolved:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._pending.items[-1][1] += tail
        return self._pending.take_all()

    def quiet_state(self) -> object | None:
        return () if not self._pending.items else None

    def restore(self, state: object) -> None:
        self._decoder.reset()
        self._pending = _PendingPieces()

    def mid_character(self) -> bool:
        return bool(self._decoder.getstate()[0])


# ---------------------------------------------------------------------------
# SentencePiece converted to `tokenizers` (Mistral, Llama 2, Gemma fast
# tokenizers): Sequence[Replace("▁", " ")..., ByteFallback, Fuse, Strip?].
# ByteFallback turns a run of <0xHH> tokens into its UTF-8 text if the whole
# run is valid, and otherwise into one U+FFFD per byte, so a run is decided
# only when it ends. Strip then removes up to `strip_count` leading `strip`
# characters of the fused text.


class _ByteFallbackCodec:
    def __init__(self, units: list[str | int | None], strip: str, strip_count: int) -> None:
        self._units = units  # str: text, int: a byte, None: skipped
        self.vocab_size = len(units)
        self._strip, self._strip_count = strip, strip_count
        self._to_strip = strip_count
        self._run: list[tuple[int, int]] = []  # (index, byte) of the open byte run
        self._run_characters = codecs.getincrementaldecoder("utf-8")("replace")  # where the run's characters end
        self._pending = _PendingPieces()

    def _stripped(self, text: str) -> str:
        while self._to_strip and text:
            if text[0] != self._strip:
                self._to_strip = 0
                break
            text = text[1:]
            self._to_strip -= 1
        return text

    def _close_run(self) -> Resolved:
        if not self._run:
            return []
        try:
            bytes(byte for _, byte in self._run).decode("utf-8")
        except UnicodeDecodeError:
            texts = [_REPLACEMENT] * len(self._run)
        else:
            decoder = codecs.getincrementaldecoder("utf-8")()
            texts = [decoder.decode(bytes([byte])) for _, byte in self._run]
        for item, text in zip(self._pending.items, texts, strict=False):
            item[1] = self._stripped(text)
        self._run.clear()
        self._run_characters.reset()
        return self._pending.take_all()

    def feed(self, index: int, token_id: int) -> Resolved:
        unit = self._units[token_id]
        if isinstance(unit, int):
            self._run.append((index, unit))
            self._run_characters.decode(bytes([unit]))
            self._pending.add(index)
            return []
        if unit is None and self._run:
            # A skipped special token is removed before the decoder runs, so
            # it does not end the byte run around it; it resolves with it.
            self._pending.add(index)
            return []
        resolved = self._close_run()
        resolved.append((index, self._stripped(unit or "")))
        return resolved

    def finish(self) -> Resolved:
        return self._close_run()

    def quiet_state(self) -> object | None:
        return self._to_strip if not self._run else None

    def restore(self, state: object) -> None:
        assert isinstance(state, int)
        self._to_strip = state
        self._run.clear()
        self._run_characters.reset()
        self._pending = _PendingPieces()

    def mid_character(self) -> bool:
        return bool(self._run_characters.getstate()[0])


# ---------------------------------------------------------------------------
# sentencepiece.SentencePieceProcessor.decode: control tokens are invisible,
# <unk> shows as " ⁇ ", the first piece loses its leading "▁" (with
# add_dummy_prefix), and in a run of byte pieces each byte that cannot start
# a valid character becomes U+FFFD on its own while valid characters survive.


class _SentencePieceCodec:
    def __init__(self, processor: Any, units: list[str | int | None], leading_space: tuple[bool, bool]) -> None:
        self._sp = processor
        self._units = units
        self.vocab_size = len(units)
        self._strips_first_space, self._strips_all_leading = leading_space
        self._expect_bos_space = True
        self._bos_space_seen = False
        self._text_started = False
        self._bytes: list[tuple[int, int]] = []  # (index, byte) not yet decided
        self._pending = _PendingPieces()

    def _decide_bytes(self, final: bool) -> None:
        """Settle every byte whose fate is known: a complete valid character
        (its text goes to the piece holding its last byte) or a byte that can
        start no valid character (U+FFFD, and the next byte starts afresh)."""
        while self._bytes:
            sequence = bytes(byte for _, byte in self._bytes[:4])
            status, length = _utf8_prefix_status(sequence)
            if status == "partial" and not final:
                return
            if status == "valid":
                self._set_text(self._bytes[length - 1][0], sequence[:length].decode("utf-8"))
                del self._bytes[:length]
            else:
                self._set_text(self._bytes[0][0], _REPLACEMENT)
                del self._bytes[0]

    def _set_text(self, index: int, text: str) -> None:
        for item in self._pending.items:
            if item[0] == index:
                item[1] = text
        self._text_started = self._text_started or bool(text)

    def _resolved_prefix(self) -> Resolved:
        waiting = self._bytes[0][0] if self._bytes else None
        resolved: Resolved = []
        while self._pending.items and self._pending.items[0][0] != waiting:
            index, text = self._pending.items.pop(0)
            resolved.append((index, text))
        return resolved

    def feed(self, index: int, token_id: int) -> Resolved:
        unit = self._units[token_id]
        self._pending.add(index)
        if isinstance(unit, int):
            self._bytes.append((index, unit))
            self._decide_bytes(final=False)
            return self._resolved_prefix()
        self._decide_bytes(final=True)  # a non-byte piece ends the byte run
        if self._bos_space_seen or self._text_started:
            self._expect_bos_space = False
        text, self._bos_space_seen = unit or "", False
        if isinstance(unit, str) and not self._sp.is_unknown(token_id):
            if self._expect_bos_space and self._strips_first_space and text.startswith("▁"):
                text = text[1:]
                self._bos_space_seen = not self._strips_all_leading
            text = text.replace("▁", " ")
        self._set_text(index, text)
        return self._resolved_prefix()

    def finish(self) -> Resolved:
        self._decide_bytes(final=True)
        return self._resolved_prefix()

    def quiet_state(self) -> object | None:
        if self._bytes or self._pending.items:
            return None
        return (self._expect_bos_space, self._bos_space_seen, self._text_started)

    def restore(self, state: object) -> None:
        self._expect_bos_space, self._bos_space_seen, self._text_started = state  # type: ignore[misc]
        self._bytes.clear()
        self._pending = _PendingPieces()

    def mid_character(self) -> bool:
        return bool(self._bytes)


def _sentencepiece_codec(processor: Any) -> Callable[[], _Codec]:
    units: list[str | int | None] = []
    for token_id in range(processor.get_piece_size()):
        if processor.is_control(token_id):
            units.append(None)
        elif processor.is_byte(token_id):
            units.append(int(_BYTE_PIECE.fullmatch(processor.id_to_piece(token_id)).group(1), 16))
        elif processor.is_unknown(token_id):
            units.append(processor.decode([token_id]))  # the unk surface, " ⁇ " by default
        else:
            units.append(processor.id_to_piece(token_id))
    # Whether decode drops the first piece's leading ▁ (add_dummy_prefix) and
    # whether it drops every leading ▁ (remove_extra_whitespaces): read from
    # the processor's behaviour, since the flags live in a protobuf.
    space = processor.piece_to_id("▁")
    leading_space = (False, False)
    if not processor.is_unknown(space):
        decoded = processor.decode([space, space])
        leading_space = (decoded != "  ", decoded == "")
    return partial(_SentencePieceCodec, processor, units, leading_space)


def _utf8_prefix_status(sequence: bytes) -> tuple[str, int]:
    """("valid", n) if ``sequence`` starts with a whole valid character of n
    bytes, ("partial", 0) if it may still become one, else ("invalid", 0)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for length in range(1, len(sequence) + 1):
        try:
            text = decoder.decode(sequence[length - 1 : length])
        except UnicodeDecodeError:
            return "invalid", 0
        if text:
            return "valid", length
    return "partial", 0


# ---------------------------------------------------------------------------
# Choosing a codec.


def _backend_spec(tokenizer: Any) -> tuple[Any, dict[str, Any]] | None:
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    return backend, json.loads(backend.to_str())


def _vocab_tokens(backend: Any, spec: dict[str, Any], skip_special_tokens: bool) -> list[str | None]:
    size = backend.get_vocab_size(with_added_tokens=True)
    skipped = {added["id"] for added in spec["added_tokens"] if added["special"]} if skip_special_tokens else set()
    return [None if token_id in skipped else backend.id_to_token(token_id) for token_id in range(size)]


def _byte_level_codec(tokens: list[str | None]) -> Callable[[], _Codec]:
    byte_of = _byte_decoder()

    def token_bytes(token: str) -> bytes:
        # As tokenizers' ByteLevel decoder: map every char back to its byte,
        # or, if any char is not in the map (an added token such as DeepSeek's
        # "<｜User｜>"), take the token's own UTF-8.
        try:
            return bytes(byte_of[char] for char in token)
        except KeyError:
            return token.encode("utf-8")

    return partial(_ByteLevelCodec, [None if token is None else token_bytes(token) for token in tokens])


def _byte_fallback_codec(tokens: list[str | None], steps: list[dict[str, Any]]) -> Callable[[], _Codec] | None:
    replaces: list[tuple[str, str]] = []
    position = 0
    while position < len(steps) and steps[position]["type"] == "Replace" and "String" in steps[position]["pattern"]:
        replaces.append((steps[position]["pattern"]["String"], steps[position]["content"]))
        position += 1
    if [step["type"] for step in steps[position : position + 2]] != ["ByteFallback", "Fuse"]:
        return None
    rest = steps[position + 2 :]
    strip, strip_count = " ", 0
    if rest and rest[0]["type"] == "Strip" and rest[0]["stop"] == 0 and len(rest[0]["content"]) == 1:
        strip, strip_count = rest[0]["content"], rest[0]["start"]
        rest = rest[1:]
    if rest:
        return None

    def unit(token: str | None) -> str | int | None:
        if token is None:
            return None
        for old, new in replaces:
            token = token.replace(old, new)
        match = _BYTE_PIECE.fullmatch(token)
        return int(match.group(1), 16) if match else token

    return partial(_ByteFallbackCodec, [unit(token) for token in tokens], strip, strip_count)


def _codec_factory(tokenizer: Any, skip_special_tokens: bool) -> Callable[[], _Codec]:
    """A maker of fresh codecs sharing one per-id table (building the table
    reads the whole vocabulary, so it is cached per tokenizer)."""
    # Keyed on what the table depends on, not only on the object: adding
    # tokens to the same tokenizer must give a new table.
    key = (id(tokenizer), skip_special_tokens, _vocabulary_fingerprint(tokenizer))
    cached = _FACTORIES.get(key)
    if cached is None or cached[0] is not tokenizer:
        if len(_FACTORIES) >= _FACTORY_CACHE_SIZE:
            _FACTORIES.pop(next(iter(_FACTORIES)))
        # Holding the tokenizer keeps its id() from being reused.
        cached = (tokenizer, _build_codec_factory(tokenizer, skip_special_tokens))
        _FACTORIES[key] = cached
    return cached[1]


_FACTORIES: dict[tuple[int, bool, object], tuple[Any, Callable[[], _Codec]]] = {}


def _vocabulary_fingerprint(tokenizer: Any) -> object:
    """Cheap summary of what the per-id table is built from: the vocabulary
    size and the added tokens (which ``add_tokens`` changes)."""
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        # add_tokens grows the vocabulary; marking an existing token special
        # changes which ids skip_special_tokens hides.
        special = sum(token.special for token in backend.get_added_tokens_decoder().values())
        return backend.get_vocab_size(with_added_tokens=True), special
    size = getattr(tokenizer, "get_piece_size", None)
    return size() if callable(size) else None


_FACTORY_CACHE_SIZE = 8


def _build_codec_factory(tokenizer: Any, skip_special_tokens: bool) -> Callable[[], _Codec]:
    backend_and_spec = _backend_spec(tokenizer)
    if backend_and_spec is not None:
        backend, spec = backend_and_spec
        decoder = spec["decoder"] or {}
        tokens = _vocab_tokens(backend, spec, skip_special_tokens)
        if decoder.get("type") == "ByteLevel":
            return _byte_level_codec(tokens)
        if decoder.get("type") == "Sequence":
            factory = _byte_fallback_codec(tokens, decoder["decoders"])
            if factory is not None:
                return factory
        raise UnsupportedTokenizerError(
            f"SourceDecoder does not know the decoder {json.dumps(decoder)[:200]}; supported: ByteLevel, and "
            "Sequence[Replace..., ByteFallback, Fuse, Strip?] (SentencePiece converted to tokenizers)"
        )
    if type(tokenizer).__module__.startswith("sentencepiece") and hasattr(tokenizer, "is_byte"):
        if not skip_special_tokens:
            raise UnsupportedTokenizerError(
                "a SentencePieceProcessor always hides control tokens; use skip_special_tokens=True"
            )
        return _sentencepiece_codec(tokenizer)
    sp_model = getattr(tokenizer, "sp_model", None)
    hint = " (pass its .sp_model, a sentencepiece.SentencePieceProcessor)" if sp_model is not None else ""
    raise UnsupportedTokenizerError(
        f"SourceDecoder takes a tokenizers.Tokenizer, a transformers fast tokenizer or a "
        f"sentencepiece.SentencePieceProcessor, got {type(tokenizer).__name__}{hint}"
    )


# ---------------------------------------------------------------------------


class SourceDecoder:
    """Incremental detokenizer for the generator's token ids.

    Invariant: the concatenated ``text`` of all returned pieces equals the
    tokenizer's ``decode(ids, skip_special_tokens=True)`` of the whole response
    (no clean-up of tokenization spaces), and spans tile that text.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._codec = _codec_factory(tokenizer, skip_special_tokens)()
        # A few machine words per generator token (arrays, not lists of ints).
        self._ids = array("q")
        self._ends = array("q")  # end offset of each returned piece
        # Wherever nothing was pending: (token index, text length, codec
        # state). Rollback restores the last one and replays the ids after it.
        self._quiet_indices = array("q", [0])
        self._quiet_lengths = array("q", [0])
        self._interned_states: dict[object, object] = {}
        self._quiet_states: list[object] = [self._intern(self._codec.quiet_state())]
        # Per token count k: 1 when ids[:k] end between two characters.
        self._between_characters = bytearray(b"\x01")
        self._finished = False

    @property
    def vocab_size(self) -> int:
        return self._codec.vocab_size

    @property
    def token_count(self) -> int:
        """Generator tokens pushed so far."""
        return len(self._ids)

    @property
    def piece_count(self) -> int:
        """Pieces returned so far (``token_count`` minus the unresolved ones)."""
        return len(self._ends)

    @property
    def text_length(self) -> int:
        """Characters of response text returned so far."""
        return self._ends[-1] if self._ends else 0

    @property
    def finished(self) -> bool:
        return self._finished

    def push(self, ids: Any) -> list[SourcePiece]:
        """Add generator token ids (an int, a sequence, a 1-d array or tensor);
        return the pieces whose text became final."""
        if self._finished:
            raise StreamFinishedError(
                "this response was flushed; call rollback(index) to continue from an earlier "
                "token, or start a new SourceDecoder"
            )
        batch = token_id_list(ids)
        for token_id in batch:  # validate everything before changing anything
            if not 0 <= token_id < self._codec.vocab_size:
                raise TokenIdError(
                    f"token id {token_id} is outside the generator's vocabulary (0..{self._codec.vocab_size - 1}); "
                    "is this the tokenizer of the model that produced the ids?"
                )
        pieces: list[SourcePiece] = []
        for token_id in batch:
            index = len(self._ids)
            self._ids.append(token_id)
            pieces += self._pieces(self._codec.feed(index, token_id))
            self._between_characters.append(not self._codec.mid_character())
            state = self._codec.quiet_state()
            if state is not None:
                self._quiet_indices.append(index + 1)
                self._quiet_lengths.append(self.text_length)
                self._quiet_states.append(self._intern(state))
        return pieces

    def flush(self) -> list[SourcePiece]:
        """End of the response: return every piece still waiting."""
        if self._finished:
            raise StreamFinishedError("flush() was already called on this response")
        self._finished = True
        return self._pieces(self._codec.finish())

    def rollback(self, index: int) -> int:
        """Return to the state of a decoder that was pushed ``ids[:index]``.

        Returns how many pieces stay valid (pieces ``< index`` whose text was
        only settled by a later token come out again from the next push).
        The response text keeps ``text_length`` characters afterwards.
        """
        if not 0 <= index <= len(self._ids):
            raise RollbackError(f"cannot roll back to token {index}: the response holds {len(self._ids)} tokens")
        keep = bisect_right(self._quiet_indices, index)
        quiet_index, text_length = self._quiet_indices[keep - 1], self._quiet_lengths[keep - 1]
        state = self._quiet_states[keep - 1]
        replay = self._ids[quiet_index:index].tolist()
        del self._quiet_indices[keep:], self._quiet_lengths[keep:], self._quiet_states[keep:]
        del self._ids[quiet_index:], self._ends[quiet_index:], self._between_characters[quiet_index + 1 :]
        self._codec.restore(state)
        self._finished = False
        assert self.text_length == text_length
        self.push(replay)  # replays at most the few ids of one unfinished character or byte run
        return len(self._ends)

    def character_start(self, index: int) -> int:
        """The last token count at or before ``index`` where the ids end
        between two characters: ``index`` itself, unless token ``index - 1``
        holds the first bytes of a character that a later token completes
        (a byte-fallback or byte-level run), then the token that began it.
        Rolling back there never leaves part of a character behind."""
        if not 0 <= index <= len(self._ids):
            raise RollbackError(f"no token {index}: the response holds {len(self._ids)} tokens")
        while not self._between_characters[index]:
            index -= 1
        return index

    def _intern(self, state: object) -> object:
        # Quiet states repeat (a few flags); keep one object per distinct one.
        return self._interned_states.setdefault(state, state)

    def _pieces(self, resolved: Resolved) -> list[SourcePiece]:
        pieces = []
        for index, text in resolved:
            start = self.text_length
            self._ends.append(start + len(text))
            pieces.append(SourcePiece(index, text, start, start + len(text)))
        return pieces
