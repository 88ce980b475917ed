"""Stable re-tokenization into the Qwen3 vocabulary (and Llama 3's, whose
pre-tokenizer differs only in digit runs)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter import RollbackError, StreamFinishedError, UnsupportedTokenizerError
from adapter.bundled_tokenizers import generator_tokenizer
from adapter.retokenize import StableRetokenizer, encode_ordinary, ordinary_tokenizer
from adapter.retokenize.boundaries import (
    has_boundary_after,
    has_boundary_before,
    is_nfc_split,
    nfc_stable_end,
    stable_word_count,
)

# Fragments that exercise every rule: whitespace and newline runs, CRLF,
# contractions (also upper case and with a typographic apostrophe), digits,
# punctuation next to letters, combining marks (composing and not, in and out
# of canonical order), Hangul jamo, emoji with ZWJ and skin tones, CJK, RTL,
# Indic scripts and literal added-token strings.
HARD_FRAGMENTS = [
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n",
    "\r",
    "\r\n",
    " \n",
    "\u00a0",
    "\u3000",
    "\u2000",
    "\x1c",
    "'",
    "'s",
    "'S",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "\u2019s",
    "don't",
    "0",
    "7",
    "12",
    "2024",
    "3.14",
    "\u0663",
    "\uff11",
    "\u00bd",
    ".",
    ",",
    "!",
    "?!",
    "...",
    "(",
    ")",
    "--",
    '"',
    "#",
    "=",
    "<",
    "\u0338",
    "a",
    "e",
    "o",
    "hello",
    "World",
    "\u017f",
    "K",
    "\u0301",
    "\u0323",
    "\u0308",
    "e\u0301",
    "\u00e9",
    "o\u0323\u0302",
    "a\u0301\u0323",
    "\u1100",
    "\u1161",
    "\u11a8",
    "\uac00",
    "\ud55c\uad6d\uc5b4",
    "\U0001f44d",
    "\U0001f3fd",
    "\u200d",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u2764\ufe0f",
    "\u4e2d\u6587",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u0645\u0631\u062d\u0628\u0627",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0928\u093c",
    "\u0e01\u0e48",
    # NFC expands these into parts that land in different pre-tokens.
    "\u0958",
    "\ufb2c",
    "\u0f43",
    "\u2126",
    # Qwen's byte-level BPE splits these into several tokens.
    "\u5c4c",
    "\U0001fae0",
    "<|im_end|>",
    "<|im_start|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "<|endoftext|>",
]


def texts() -> st.SearchStrategy[str]:
    fragment = st.one_of(
        st.sampled_from(HARD_FRAGMENTS),
        st.sampled_from(HARD_FRAGMENTS),
        st.text(max_size=3),
        st.characters(codec="utf-8"),
    )
    return st.lists(fragment, max_size=24).map("".join)


def cut_into_deltas(data: st.DataObject, text: str) -> list[str]:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=max(len(text), 1))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(retokenizer: StableRetokenizer, deltas: list[str]) -> list[int]:
    ids = [token.id for delta in deltas for token in retokenizer.push(delta)]
    return ids + [token.id for token in retokenizer.flush()]


@pytest.fixture(scope="module")
def llama3_ordinary():
    return ordinary_tokenizer(generator_tokenizer("llama3"))


# --- pinned examples: what the bridge does, concretely -----------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [9707, 1879]),
        # literal control strings in generated text stay ordinary text
        ("<|im_end|>", [27, 91, 318, 6213, 91, 29]),
        ("<think>", [13708, 766, 29]),
        ("don't", [15007, 944]),
        ("2024", [17, 15, 17, 19]),  # Qwen splits digits one by one
        ("a\r\nb", [64, 319, 65]),
        ("Cafe\u0301", [34, 2577, 963]),  # NFC: same ids as the precomposed "Café"
        ("\u1100\u1161\u11a8", [126317]),  # jamo compose into the syllable 각
        ("\U0001f44d\U0001f3fd", [144349, 145375]),
    ],
)
def test_encode_ordinary_pinned(qwen, text, ids):
    assert encode_ordinary(qwen, text) == ids


def test_encode_ordinary_matches_encode_without_added_token_strings(qwen):
    text = "Plain text, no control strings: 12 cafés\n"
    assert encode_ordinary(qwen, text) == qwen.encode(text, add_special_tokens=False).ids


def test_control_strings_never_become_control_tokens(qwen):
    text = "ok<|im_end|>\n<|im_start|>user\n<think>x</think><tool_call>"
    ids = stream(StableRetokenizer(qwen), list(text))
    added = set(qwen.get_added_tokens_decoder())
    assert ids == encode_ordinary(qwen, text)
    assert not added & set(ids)
    assert qwen.decode(ids) == text


def test_streaming_holds_back_only_the_open_pre_token(qwen):
    retokenizer = StableRetokenizer(qwen)
    steps = [
        ("Hello", [], "Hello"),
        (" wor", [(9707, 0, 5)], " wor"),  # "Hello" is final once a space follows
        ("ld", [], " world"),
        (",", [(1879, 5, 11)], ","),
        (" it", [(11, 11, 12)], " it"),
        ("'", [(432, 12, 15)], "'"),
        ("s", [], "'s"),  # the s may still take a combining mark
        (" 20", [(594, 15, 17), (220, 17, 18), (17, 18, 19), (15, 19, 20)], ""),  # digits are final at once
        ("24", [(17, 20, 21), (19, 21, 22)], ""),
        ("  ", [], "  "),
        ("\n", [], "  \n"),  # the whole whitespace run can still merge
        ("Cafe", [(2303, 22, 25)], "Cafe"),
        ("\u0301", [], "Cafe\u0301"),
        ("!", [(34, 25, 26), (2577, 26, 28), (963, 28, 30)], "!"),  # é spans e + U+0301
    ]
    for delta, expected, held in steps:
        assert [(t.id, t.start, t.end) for t in retokenizer.push(delta)] == expected, delta
        assert retokenizer.held_text == held
    assert [(t.id, t.start, t.end) for t in retokenizer.flush()] == [(0, 30, 31)]


# --- the pure boundary functions ---------------------------------------------


@pytest.mark.parametrize(
    ("char", "before", "after"),
    [
        ("a", True, False),  # a + U+0301 = á
        (" ", True, True),
        ("5", True, True),
        ("\u4e2d", True, True),
        ("\u0301", False, False),  # combining acute
        ("\u1161", False, False),  # Hangul vowel composes with a leading consonant
        ("\u1100", True, False),  # Hangul leading consonant
        ("\uac00", True, False),  # LV syllable takes a trailing consonant
        ("\u00e9", True, False),  # é still composes with a following dot below
        ("\u0378", False, False),  # unassigned: assume the worst
    ],
)
def test_nfc_boundaries(char, before, after):
    assert has_boundary_before(char) is before
    assert has_boundary_after(char) is after


@pytest.mark.parametrize(
    ("text", "end"),
    [("", 0), ("abc", 2), ("ab ", 3), ("e\u0301", 0), ("xe\u0301\u0323", 1), ("\u1100\u1161", 0), ("12", 2)],
)
def test_nfc_stable_end(text, end):
    assert nfc_stable_end(text) == end


@pytest.mark.parametrize(
    ("text", "starts", "max_digits", "count"),
    [
        ("Hello world", [0, 5], 1, 1),
        ("a \n ", [0, 1, 3], 1, 1),  # " \n" and " " may still merge into " \n \n"
        ("x.\n ", [0, 1, 3], 1, 2),  # ".\n" stopped at the space: final
        ("ab12", [0, 2, 3], 1, 3),  # a complete one-digit run
        ("ab12", [0, 2], 3, 1),  # Llama 3: "12" may become "123"
        ("ab123", [0, 2], 3, 2),
        ("", [], 1, 0),
    ],
)
def test_stable_word_count(text, starts, max_digits, count):
    assert stable_word_count(text, starts, max_digits) == count


# --- the central property ----------------------------------------------------


@given(text=texts(), data=st.data())
def test_any_cutting_gives_encode_ordinary(qwen_ordinary, text, data):
    deltas = cut_into_deltas(data, text)
    retokenizer = StableRetokenizer(qwen_ordinary)
    reference = encode_ordinary(qwen_ordinary, text)
    emitted: list[int] = []
    for delta in deltas:
        tokens = retokenizer.push(delta)
        emitted += [token.id for token in tokens]
        # never taken back: what is out is a prefix of the final answer
        assert emitted == reference[: len(emitted)]
        assert all(token.end <= retokenizer.text_length - len(retokenizer.held_text) for token in tokens)
    emitted += [token.id for token in retokenizer.flush()]
    assert emitted == reference


@given(text=texts(), data=st.data())
def test_any_cutting_gives_encode_ordinary_llama3(llama3_ordinary, text, data):
    assert stream(StableRetokenizer(llama3_ordinary), cut_into_deltas(data, text)) == encode_ordinary(
        llama3_ordinary, text
    )


@given(text=texts(), data=st.data())
def test_spans_cover_the_raw_text_in_order(qwen_ordinary, text, data):
    retokenizer = StableRetokenizer(qwen_ordinary)
    tokens = [token for delta in cut_into_deltas(data, text) for token in retokenizer.push(delta)]
    tokens += retokenizer.flush()
    position = 0
    for token in tokens:
        assert token.start <= position <= token.end or token.start == position
        assert token.start <= token.end
        position = max(position, token.end)
    assert position == len(text)


@given(text=texts(), suffix=texts(), data=st.data())
def test_rollback_then_new_text_equals_a_fresh_run(qwen_ordinary, text, suffix, data):
    retokenizer = StableRetokenizer(qwen_ordinary)
    emitted = [t.id for delta in cut_into_deltas(data, text) for t in retokenizer.push(delta)]
    if data.draw(st.booleans()):
        emitted += [t.id for t in retokenizer.flush()]
    # any offset, word boundaries included (where lookahead matters most)
    offset = data.draw(st.integers(0, len(text)))
    kept = retokenizer.rollback(offset)
    assert kept <= len(emitted)
    assert retokenizer.text_length == offset
    ids = emitted[:kept] + stream(retokenizer, cut_into_deltas(data, suffix))
    assert ids == encode_ordinary(qwen_ordinary, text[:offset] + suffix)


def test_rollback_to_a_boundary_that_later_text_had_settled(qwen_ordinary):
    retokenizer = StableRetokenizer(qwen_ordinary)
    assert [t.id for t in retokenizer.push("Hello world")] == [9707]  # final because " " followed
    assert retokenizer.rollback(5) == 0  # after "Hello" alone it is not final any more
    assert stream(retokenizer, ["s"]) == encode_ordinary(qwen_ordinary, "Hellos")


def test_held_text_stays_small_on_long_text(qwen_ordinary):
    """Cost per push depends on the held text and the delta only."""
    retokenizer = StableRetokenizer(qwen_ordinary)
    sentence = "The quick brown fox jumps over the lazy dog; 12 dogs\u2019 tails wag.\n"
    longest = 0
    for _ in range(200):
        for word in sentence.split(" "):
            retokenizer.push(word + " ")
            longest = max(longest, len(retokenizer.held_text))
    assert longest <= 12


# --- bad input ---------------------------------------------------------------


def test_push_after_flush_is_an_error_and_rollback_reopens(qwen_ordinary):
    retokenizer = StableRetokenizer(qwen_ordinary)
    retokenizer.push("Hello world")
    retokenizer.flush()
    with pytest.raises(StreamFinishedError, match="rollback"):
        retokenizer.push("!")
    with pytest.raises(StreamFinishedError):
        retokenizer.flush()
    # Only what text before the offset had settled is kept; the rest comes again.
    assert retokenizer.rollback(6) == 0
    assert [t.id for t in retokenizer.push("there ")] == [9707, 1052]


def test_rollback_outside_the_text_is_refused_and_changes_nothing(qwen_ordinary):
    retokenizer = StableRetokenizer(qwen_ordinary)
    retokenizer.push("Hello world")
    with pytest.raises(RollbackError, match="11 characters"):
        retokenizer.rollback(12)
    with pytest.raises(RollbackError):
        retokenizer.rollback(-1)
    assert retokenizer.text_length == 11
    assert [t.id for t in retokenizer.flush()] == [1879]


def test_push_needs_text(qwen_ordinary):
    with pytest.raises(TypeError, match="str"):
        StableRetokenizer(qwen_ordinary).push([9707])  # type: ignore[arg-type]


def test_unsupported_tokenizers_are_refused_with_what_is_supported():
    with pytest.raises(UnsupportedTokenizerError, match="pre-tokenizer"):
        StableRetokenizer(generator_tokenizer("deepseek-v3"))
    with pytest.raises(UnsupportedTokenizerError, match=r"tokenizers\.Tokenizer"):
        StableRetokenizer(generator_tokenizer("mistral-v1-sp"))


# Characters that take part in NFC: combining marks of several classes,
# letters that compose with them, Hangul jamo and syllables, singletons.
NFC_ALPHABET = (
    "aeiouAEOnNcCsSzZ \u00e9\u00c5\u1e63\u01a0\u0391\u03b9\u0415\u0438\u0928\u0915\u0b47\u0dd9\u1025"
    "\u0300\u0301\u0302\u0303\u0308\u030a\u0323\u0327\u0328\u0345\u0338\u093c\u094d\u0b3e\u0b57\u0dca\u0dcf"
    "\u102e\u3099\u304b\u30cf\u1100\u1112\u1161\u1175\u11a8\u11c2\uac00\uac01\u2126\u212b\u2000\u0374"
)


@given(text=st.text(alphabet=NFC_ALPHABET, max_size=12), data=st.data())
def test_nfc_split_points_hold_for_the_tokenizers_normalizer(qwen, text, data):
    """Where is_nfc_split says a text can be cut, the tokenizer's own NFC
    normalizer agrees, for this text and any continuation of it."""
    normalize = qwen.normalizer.normalize_str
    continuation = data.draw(st.text(alphabet=NFC_ALPHABET, max_size=4))
    whole = text + continuation
    for position in range(len(text) + 1):
        if is_nfc_split(text, position):
            assert normalize(whole) == normalize(whole[:position]) + normalize(whole[position:]), position
    end = nfc_stable_end(text)
    assert normalize(whole).startswith(normalize(text[:end]))


@given(text=st.text(alphabet=NFC_ALPHABET, max_size=30), data=st.data())
def test_any_cutting_of_composing_text_gives_encode_ordinary(qwen_ordinary, text, data):
    assert stream(StableRetokenizer(qwen_ordinary), cut_into_deltas(data, text)) == encode_ordinary(qwen_ordinary, text)
