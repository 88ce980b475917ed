"""SourceDecoder against the real generator tokenizers' own decode."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter import RollbackError, SourceDecoder, StreamFinishedError, TokenIdError, UnsupportedTokenizerError
from adapter.bundled_tokenizers import decode_ids, encode_text, generator_tokenizer
from tests.test_retokenize import texts

reference_decode = decode_ids
encode = encode_text


@cache
def tricky_ids(name: str) -> list[int]:
    """Ids that decode to nothing or to broken UTF-8 on their own: byte
    tokens, partial characters and special tokens."""
    tokenizer = generator_tokenizer(name)
    size = SourceDecoder(tokenizer).vocab_size
    found = [i for i in range(size) if (text := reference_decode(tokenizer, [i])) == "" or "\ufffd" in text]
    return found or list(range(min(size, 300)))


def decode_all(decoder: SourceDecoder, groups: list[list[int]]):
    pieces = [piece for group in groups for piece in decoder.push(group)]
    return pieces + decoder.flush()


def group(data: st.DataObject, ids: list[int]) -> list[list[int]]:
    groups, position = [], 0
    while position < len(ids):
        size = data.draw(st.integers(1, 4))
        groups.append(ids[position : position + size])
        position += size
    return groups


def assert_pieces_tile(pieces, token_count: int, text: str) -> None:
    assert [piece.index for piece in pieces] == list(range(token_count))
    position = 0
    for piece in pieces:
        assert (piece.start, piece.end) == (position, position + len(piece.text))
        position = piece.end
    assert "".join(piece.text for piece in pieces) == text


def id_lists(name: str, size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.one_of(st.integers(0, size - 1), st.sampled_from(tricky_ids(name))), max_size=16)


@given(text=texts(), data=st.data())
def test_encoded_text_decodes_like_the_tokenizer(generator, text, data):
    _name, tokenizer = generator
    ids = encode(tokenizer, text)
    pieces = decode_all(SourceDecoder(tokenizer), group(data, ids))
    assert_pieces_tile(pieces, len(ids), reference_decode(tokenizer, ids))


@given(data=st.data())
def test_random_ids_decode_like_the_tokenizer(generator, data):
    name, tokenizer = generator
    decoder = SourceDecoder(tokenizer)
    ids = data.draw(id_lists(name, decoder.vocab_size))
    pieces = decode_all(decoder, group(data, ids))
    assert_pieces_tile(pieces, len(ids), reference_decode(tokenizer, ids))


@given(data=st.data())
def test_rollback_then_new_ids_equals_a_fresh_run(generator, data):
    name, tokenizer = generator
    decoder = SourceDecoder(tokenizer)
    ids = data.draw(id_lists(name, decoder.vocab_size))
    more = data.draw(id_lists(name, decoder.vocab_size))
    pieces = [piece for chunk in group(data, ids) for piece in decoder.push(chunk)]
    if data.draw(st.booleans()):
        pieces += decoder.flush()
    index = data.draw(st.integers(0, len(ids)))
    kept = decoder.rollback(index)
    assert kept <= min(index, len(pieces))
    assert decoder.token_count == index
    pieces = pieces[:kept] + decode_all(decoder, group(data, more))
    assert_pieces_tile(pieces, index + len(more), reference_decode(tokenizer, ids[:index] + more))


# --- pinned examples ------------------------------------------------------------


def texts_of(name: str, ids: list[int]) -> list[tuple[int, str]]:
    decoder = SourceDecoder(generator_tokenizer(name))
    return [(piece.index, piece.text) for piece in decoder.push(ids) + decoder.flush()]


def test_llama3_pinned():
    ids = encode(generator_tokenizer("llama3"), "Hello world \U0001f916")
    assert ids == [9906, 1917, 11410, 97, 244]
    # " " + the robot's first byte, then two more tokens: the last completes it
    assert texts_of("llama3", ids) == [(0, "Hello"), (1, " world"), (2, " "), (3, ""), (4, "\U0001f916")]
    assert texts_of("llama3", [128000, 9906, 128009]) == [(0, ""), (1, "Hello"), (2, "")]  # BOS/EOT are silent


def test_mistral_v1_sentencepiece_pinned():
    sp = generator_tokenizer("mistral-v1-sp")
    ids = sp.encode("Hello \U0001f916")
    assert [sp.id_to_piece(i) for i in ids] == ["▁Hello", "▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert texts_of("mistral-v1-sp", [1, *ids, 2]) == [
        (0, ""), (1, "Hello"), (2, " "), (3, ""), (4, ""), (5, ""), (6, "\U0001f916"), (7, ""),
    ]  # fmt: skip
    # sentencepiece keeps the valid character and replaces the stray byte alone
    euro_then_junk = [sp.piece_to_id(p) for p in ["<0xE2>", "<0x82>", "<0xAC>", "<0xFF>"]]
    assert "".join(text for _, text in texts_of("mistral-v1-sp", euro_then_junk)) == "€\ufffd"


def test_mistral_v1_fast_tokenizer_replaces_a_broken_byte_run_whole():
    # tokenizers' ByteFallback turns a byte run with any invalid byte into one
    # U+FFFD per byte, so nothing of the run is final until it ends.
    tokenizer = generator_tokenizer("mistral-v1")
    run = tokenizer.convert_tokens_to_ids(["<0xE2>", "<0x82>", "<0xAC>", "<0xFF>"])
    decoder = SourceDecoder(tokenizer)
    assert decoder.push(run) == []
    assert [p.text for p in decoder.flush()] == ["\ufffd"] * 4
    assert texts_of("mistral-v1", [*run[:3], tokenizer.convert_tokens_to_ids("▁a")]) == [
        (0, ""), (1, ""), (2, "€"), (3, " a"),
    ]  # fmt: skip


def test_deepseek_non_special_added_tokens_are_text():
    tokenizer = generator_tokenizer("deepseek-v3")
    user = tokenizer.token_to_id("<｜User｜>")
    assert texts_of("deepseek-v3", [0, user]) == [(0, ""), (1, "<｜User｜>")]


# --- bad input ---------------------------------------------------------------------


def test_out_of_range_id_is_refused_and_loses_nothing():
    decoder = SourceDecoder(generator_tokenizer("llama3"))
    first = decoder.push([9906, 11410])
    with pytest.raises(TokenIdError, match=r"outside the generator's vocabulary \(0\.\.128255\)"):
        decoder.push([97, 128256])
    with pytest.raises(TokenIdError, match="must be integers"):
        decoder.push(["97"])  # type: ignore[list-item]
    assert decoder.token_count == 2
    rest = decoder.push([97, 244]) + decoder.flush()
    assert "".join(p.text for p in first + rest) == "Hello \U0001f916"


def test_push_after_flush_and_bad_rollback():
    decoder = SourceDecoder(generator_tokenizer("llama3"))
    decoder.push([9906])
    decoder.flush()
    with pytest.raises(StreamFinishedError, match="rollback"):
        decoder.push([1917])
    with pytest.raises(RollbackError, match="holds 1 tokens"):
        decoder.rollback(2)
    assert decoder.rollback(1) == 1
    assert [p.text for p in decoder.push([1917])] == [" world"]


def test_unsupported_tokenizer_says_what_to_pass():
    with pytest.raises(UnsupportedTokenizerError, match="SentencePieceProcessor"):
        SourceDecoder(object())


@pytest.mark.parametrize(
    ("name", "ids", "pieces"),
    [
        # Tekken: byte-level BPE; " " + the robot's first bytes, then the token that completes it
        ("tekken", [1067, 4032, 1337, 119685, 1164, 1150], ["C", "af", "é", " ", "", "\U0001f916"]),
        # Mistral v3 (fast and sentencepiece): the robot as four byte-fallback tokens
        (
            "mistral-v3",
            [1102, 2783, 29565, 29473, 1011, 930, 935, 921],
            ["C", "af", "é", " ", "", "", "", "\U0001f916"],
        ),
        (
            "mistral-v3-sp",
            [1102, 2783, 29565, 29473, 1011, 930, 935, 921],
            ["C", "af", "é", " ", "", "", "", "\U0001f916"],
        ),
        # DeepSeek V3: byte-level BPE with a " " + partial-emoji token
        ("deepseek-v3", [37, 2797, 619, 112838, 247], ["C", "af", "é", " ", "\U0001f916"]),
    ],
)
def test_cafe_robot_pinned(name, ids, pieces):
    assert encode(generator_tokenizer(name), "Café \U0001f916") == ids
    assert [text for _, text in texts_of(name, ids)] == pieces
