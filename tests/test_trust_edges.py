"""Trust at the edges: canonical reordering, CARE on multi-byte characters,
flagged text that CARE returns, rollback into a think marker, and where and
why a stream was flagged.

Each regression reproduces its defect as a user or an attacker meets it;
each property states the promise it checks in its plain words.
"""

from __future__ import annotations

import itertools
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessageChunk, HumanMessage
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from adapter import GuardAdapter, SourceDecoder, ThinkMarkers
from adapter.bundled_tokenizers import generator_tokenizer, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import StableRetokenizer
from adapter.retokenize.boundaries import nfc_rearranged_spans
from adapter.retokenize.ordinary import cached_ordinary_tokenizer
from guard import StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations.langchain import GuardCallbackHandler, GuardedChatModel, GuardFlaggedError
from integrations.transformers import GuardStoppingCriteria, guarded_generate
from tests.test_langchain import chat_model, scripted
from tests.test_source import encode, reference_decode
from tests.tiny_generator import Scripted, tiny_mistral_vocabulary_llama


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny guard's matrices are too small to share out: on a busy
    machine a second thread waiting for a core made each forward many times
    slower (as ``crossguard moderate --tiny`` does, one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_guard_flagging(folder, *unsafe_ids: int) -> StreamGuard:
    """A tiny guard that calls exactly these Qwen3 ids Unsafe in answers."""
    write_tiny_checkpoint(folder, tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=list(unsafe_ids))
    return StreamGuard.from_pretrained(folder, device="cpu")


# --- 1. NFC canonical reordering: a piece waits for every guard token holding its text -----


def nfc_with_sources(text: str) -> list[tuple[str, frozenset[int]]]:
    """NFC(text) one character at a time, each with the raw offsets of the
    characters it was made from: UAX #15's canonical decomposition, canonical
    ordering and canonical composition, done by hand so that every step
    keeps track of where each character came from."""
    chars = [(part, frozenset([at])) for at, char in enumerate(text) for part in unicodedata.normalize("NFD", char)]
    # Canonical ordering: a stable sort of each run of non-starters by class.
    ordered: list[tuple[str, frozenset[int]]] = []
    for starter, run in itertools.groupby(chars, key=lambda item: unicodedata.combining(item[0]) == 0):
        items = list(run)
        ordered += items if starter else sorted(items, key=lambda item: unicodedata.combining(item[0]))
    # Canonical composition: a character joins the last starter unless a
    # character between them is a starter or has a class at least as high.
    composed: list[list] = []
    starter, last_class = None, None
    for char, sources in ordered:
        char_class = unicodedata.combining(char)
        blocked = last_class is not None and (last_class == 0 or last_class >= char_class)
        if starter is not None and not blocked:
            pair = unicodedata.normalize("NFC", composed[starter][0] + char)
            if len(pair) == 1:
                composed[starter] = [pair, composed[starter][1] | sources]
                continue
        if char_class == 0:
            starter, last_class = len(composed), None
        else:
            last_class = char_class
        composed.append([char, sources])
    result = [(char, sources) for char, sources in composed]
    assert "".join(char for char, _ in result) == unicodedata.normalize("NFC", text), text
    return result


def raw_characters_of_each_token(text: str) -> tuple[list[int], list[frozenset[int]]]:
    """(ids, raw offsets each guard token holds) of ``encode_ordinary(text)``:
    the normalized text is encoded (NFC of NFC text is itself, so offsets
    index it) and each normalized character brings the raw characters it
    was made from."""
    ordinary = cached_ordinary_tokenizer(qwen3_tokenizer()).tokenizer
    normalized = nfc_with_sources(text)
    encoding = ordinary.encode("".join(char for char, _ in normalized), add_special_tokens=False)
    assert encoding.ids == ordinary.encode(text, add_special_tokens=False).ids
    holds = [frozenset().union(*(sources for _, sources in normalized[start:end])) for start, end in encoding.offsets]
    return encoding.ids, holds


#: One mark per canonical combining class, from every range of classes:
#: Latin, Indic, kana, Hebrew, Arabic, Telugu, Thai, Tibetan marks and the
#: general classes below and above the base (attached or not, double marks,
#: iota subscript). Several compose with some of the letters below (ạ, ç,
#: ơ, á, ά, й, が, ᾳ), the case where alignment breaks.
MARKS_BY_CLASS = {
    1: "\u0334", 7: "\u093c", 8: "\u3099", 9: "\u094d", 17: "\u05b7", 27: "\u064b", 84: "\u0c55", 103: "\u0e38",
    129: "\u0f71", 202: "\u0327", 216: "\u031b", 220: "\u0323", 230: "\u0301", 232: "\u0315", 233: "\u035c",
    234: "\u035d", 240: "\u0345",
}  # fmt: skip
#: Letters of eight scripts (a precomposed one too) for the marks to follow.
LETTERS = ["a", "\u00e1", "o", "\u03b1", "\u0438", "\u05e9", "\u0627", "\u0915", "\u304b", "\uac00", "\u4e2d"]
MARK_PAIRS = [
    (first, second)
    for first, second in itertools.permutations(MARKS_BY_CLASS.values(), 2)
    if unicodedata.combining(first) != unicodedata.combining(second)
]


def test_the_marks_cover_the_classes_they_claim():
    assert {unicodedata.combining(mark) for mark in MARKS_BY_CLASS.values()} == set(MARKS_BY_CLASS)
    assert len(MARK_PAIRS) == len(MARKS_BY_CLASS) * (len(MARKS_BY_CLASS) - 1)
    # The reference really rearranges: the example, and one that composes through a reordering.
    assert nfc_with_sources("a\u0301\u0323") == [("\u1ea1", frozenset({0, 2})), ("\u0301", frozenset({1}))]
    assert nfc_with_sources("\u00e1\u0323") == [("\u1ea1", frozenset({0, 1})), ("\u0301", frozenset({0}))]


def test_nfc_rearranged_spans():
    assert nfc_rearranged_spans("plain text") == []
    assert nfc_rearranged_spans("x\u0301 y") == []  # nothing composes or moves: alignment is exact
    assert nfc_rearranged_spans("e\u0301") == [(0, 2)]
    assert nfc_rearranged_spans("ok a\u0301\u0323 x") == [(3, 6)]
    assert nfc_rearranged_spans("\u0301\u0323") == [(0, 2)]
    assert nfc_rearranged_spans("a\u0323\u0301 b\u0301\u0323") == [(0, 2), (4, 7)]  # in order: only a+dot compose
    assert nfc_rearranged_spans("x\u0301\u0323") == [(1, 3)]  # the marks swap; x stays
    assert nfc_rearranged_spans("\u0958\u0958\uf900") == [(0, 1), (1, 2), (2, 3)]  # each changes alone
    assert nfc_rearranged_spans("\uac00\u11a8") == [(0, 2)]  # a Hangul syllable takes a final consonant


def test_every_guard_token_span_holds_every_raw_character_it_was_made_from():
    """Every pair of marks of different classes, in both orders, after
    letters of eight scripts, every cut: each StableToken's span holds every
    raw character that NFC folded into it (so a piece that ends before a
    token's start holds none of its characters)."""
    ordinary = cached_ordinary_tokenizer(qwen3_tokenizer())
    failures = []
    for letter, (first, second) in itertools.product(LETTERS, MARK_PAIRS):
        text = letter + first + second + " x"
        ids, holds = raw_characters_of_each_token(text)
        for cut in range(len(text) + 1):
            retokenizer = StableRetokenizer(ordinary)
            tokens = retokenizer.push(text[:cut]) + retokenizer.push(text[cut:]) + retokenizer.flush()
            if [token.id for token in tokens] != ids:
                failures.append((text, cut, "ids"))
                continue
            for token, held in zip(tokens, holds, strict=True):
                if not all(token.start <= offset < token.end for offset in held):
                    failures.append((text, cut, token, sorted(held)))
    assert not failures, failures[:5]


@pytest.fixture(scope="module")
def reorder_guard(tmp_path_factory):
    """The issue's wiring: the acute's guard token in "a\\u0301\\u0323 x"
    (NFC: U+1EA1, then the acute) and " x" are Unsafe."""
    ordinary = cached_ordinary_tokenizer(qwen3_tokenizer()).tokenizer
    ids = ordinary.encode("a\u0301\u0323 x", add_special_tokens=False).ids
    assert len(ids) == 3
    return tiny_guard_flagging(tmp_path_factory.mktemp("reorder"), ids[1], ids[2])


def test_langchain_stream_never_shows_a_character_whose_mark_is_flagged(reorder_guard):
    # The scenario: "a\u0301" then "\u0323 x"; the acute lands in the
    # guard token after U+1EA1, which is Unsafe, and " x" flags.
    chunks = [AIMessageChunk(content="a\u0301"), AIMessageChunk(content="\u0323 x")]
    shown = []
    with pytest.raises(GuardFlaggedError):
        for chunk in GuardedChatModel(scripted(chunks), reorder_guard).stream("Say it."):
            shown.append(chunk.content)
    assert "".join(shown) == ""


def test_a_piece_is_judged_by_every_guard_token_holding_its_text_for_every_mark_pair(reorder_guard):
    """Through a real adapter: every mark pair after a plain and a precomposed
    letter, cut between the two marks (the issue's deltas); each piece's
    verdict comes from a guard token no earlier than every token that holds
    any of its characters."""
    adapter = GuardAdapter(reorder_guard.session())
    adapter.moderate_prompt("Say it.")
    start = adapter.session.response_start
    failures = []
    for letter, (first, second) in itertools.product(["a", "\u00e1"], MARK_PAIRS):
        text = letter + first + second + " x"
        _, holds = raw_characters_of_each_token(text)
        for deltas in ([letter + first, second + " x"],):
            adapter.rollback(0)  # one session for all: the prompt is judged once
            pieces = [piece for delta in deltas for piece in adapter.push_text(delta)] + adapter.finish()
            for piece in pieces:
                needed = [k for k, held in enumerate(holds) if any(piece.start <= o < piece.end for o in held)]
                if needed and piece.verdict.position - start < needed[-1]:
                    failures.append((text, deltas, piece.index, piece.verdict.position - start, needed))
    assert not failures, failures[:5]


# --- 4. A rollback into text held as a think marker -----------------------------------


def stripped(pieces) -> list[tuple]:
    """What a piece says, without the float noise of batched forwards."""
    said = []
    for piece in pieces:
        verdict = piece.verdict
        judged = (None,) if verdict is None else (verdict.position, verdict.risk_level, verdict.flagged)
        said.append((piece.index, piece.text, piece.reasoning, piece.flagged_at_finish, *judged))
    return said


def test_a_rollback_into_an_opening_marker_judges_what_it_kept_as_a_fresh_run_does(tiny_guard):
    """The issue's run: "<th" is held as the start of a marker, "ink>"
    completes it and releases "<th" unjudged (markers are not shown to the
    guard); a rollback to 1 makes "<th" text again, waiting for what follows."""
    rolled = GuardAdapter(tiny_guard.session(), think_markers=ThinkMarkers())
    rolled.moderate_prompt("hi")
    pieces = rolled.push_text("<th") + rolled.push_text("ink>") + rolled.push_text("why")
    assert pieces[0].verdict is None
    kept = rolled.rollback(1)
    assert kept == 0
    pieces = pieces[:kept] + rolled.push_text("x") + rolled.finish()
    fresh = GuardAdapter(tiny_guard.session(), think_markers=ThinkMarkers())
    fresh.moderate_prompt("hi")
    expected = fresh.push_text("<th") + fresh.push_text("x") + fresh.finish()
    assert stripped(pieces) == stripped(expected)
    assert pieces[0].verdict is not None


LLAMA3_HIDDEN_MARKERS = ThinkMarkers("<|reserved_special_token_10|>", "<|reserved_special_token_11|>")
HIDDEN_OPEN, HIDDEN_CLOSE = 128015, 128016


def marked_response(data, hidden: bool) -> list:
    """Whitespace, an opening marker (whole, cut short or none), reasoning,
    a closing marker (the same), an answer: as text, or as Llama 3 ids with
    hidden marker ids."""
    parts = [
        data.draw(st.sampled_from(["", " ", "\n", "  \n"])),
        data.draw(st.sampled_from(["<think>", "<th", "<", ""])),
        data.draw(st.sampled_from(["", "why", "\nso \u5c4c\n", " x"])),
        data.draw(st.sampled_from(["</think>", "</th", ""])),
        data.draw(st.sampled_from(["", "ok", "\n\nyes ok", " \u5c4c"])),
    ]
    if not hidden:
        return list("".join(parts))
    llama3 = generator_tokenizer("llama3")
    markers = {"<think>": [HIDDEN_OPEN], "</think>": [HIDDEN_CLOSE]}
    return [token_id for part in parts for token_id in markers.get(part) or encode(llama3, part)]


def batches_of(data, items: list, hidden: bool) -> list:
    """``items`` cut into consecutive batches (text deltas, or id lists):
    one at a time (a marker then takes many pieces), or anywhere."""
    one_by_one = data.draw(st.booleans())
    cuts = range(len(items)) if one_by_one else sorted(data.draw(st.sets(st.integers(0, len(items)))))
    batches = [items[a:b] for a, b in itertools.pairwise([0, *cuts, len(items)])]
    return batches if hidden else ["".join(batch) for batch in batches]


@given(data=st.data())
def test_rollback_then_more_judges_every_piece_as_a_fresh_run_over_the_final_stream(tiny_guard, data):
    """Think markers as text (cut anywhere) or as hidden Llama 3 ids,
    whitespace before them, a rollback anywhere (after finish() or not), then
    more: every piece, kept or judged again, says what a fresh run over the
    final stream says."""
    hidden = data.draw(st.booleans())
    generator = generator_tokenizer("llama3") if hidden else None
    if hidden:
        markers = LLAMA3_HIDDEN_MARKERS
    else:
        markers = data.draw(st.sampled_from([ThinkMarkers(), ThinkMarkers(opened_in_prompt=True)]))
    first = batches_of(data, marked_response(data, hidden), hidden)
    rest = batches_of(data, marked_response(data, hidden)[: data.draw(st.integers(0, 6))], hidden)

    def run(batches, finish=True):
        adapter = GuardAdapter(tiny_guard.session(), generator, think_markers=markers)
        adapter.moderate_prompt("hi")
        push = adapter.push_text if generator is None else adapter.push_ids
        pieces = [piece for batch in batches for piece in push(batch)]
        return adapter, pieces + (adapter.finish() if finish else [])

    pushed = len(first) if generator is None else sum(map(len, first))
    index = data.draw(st.integers(0, pushed))
    rolled, pieces = run(first, finish=data.draw(st.booleans()))
    kept = rolled.rollback(index)
    push = rolled.push_text if generator is None else rolled.push_ids
    pieces = pieces[:kept] + [piece for batch in rest for piece in push(batch)] + rolled.finish()

    if generator is None:
        kept_batches = first[:index]
    else:  # the same batches, the one holding the rollback point cut there
        ends = list(itertools.accumulate(map(len, first)))
        kept_batches = [batch for batch, end in zip(first, ends, strict=True) if end <= index]
        cut = index - (ends[len(kept_batches) - 1] if kept_batches else 0)
        kept_batches += [first[len(kept_batches)][:cut]] if cut else []
    _, expected = run(kept_batches + rest)
    assert stripped(pieces) == stripped(expected)


# --- 2 and 3. CARE: roll back whole characters; return only text judged clean -------------

PROMPT_IDS = [1, 22557, 28725]  # <s> Hello, (Mistral v1)
MISTRAL_EOS = 2


def judged_afresh(guard, tokenizer, ids: list[int]) -> GuardAdapter:
    """A fresh adapter fed ``ids`` one at a time, then the end of turn: how
    the guard judges a returned answer as a whole."""
    adapter = GuardAdapter(guard.session(), tokenizer)
    adapter.moderate_prompt("Hello,")
    for token_id in ids:
        adapter.push_ids(token_id)
    adapter.finish()
    return adapter


@pytest.fixture(scope="module")
def mistral_model():
    return tiny_mistral_vocabulary_llama()


@pytest.fixture(scope="module")
def mid_character_guard(tmp_path_factory):
    """The issue's wiring: the guard token of 屌's last byte and " bomb"."""
    ids = cached_ordinary_tokenizer(qwen3_tokenizer()).encode("ok \u5c4c bomb yes")
    assert [qwen3_tokenizer().id_to_token(i) for i in ids[1:4]] == ["\u0120\u00e5\u00b1", "\u012e", "\u0120bomb"]
    return tiny_guard_flagging(tmp_path_factory.mktemp("mid-character"), ids[2], ids[3])


@pytest.mark.parametrize("max_retries", [0, 1])
def test_care_rolls_back_to_the_token_that_begins_the_flagged_character(
    mid_character_guard, mistral_model, max_retries
):
    """Mistral v1 writes 屌 as three byte tokens; the flag's stretch starts
    at its last byte's guard token. CARE takes back all three, not two."""
    tokenizer = generator_tokenizer("mistral-v1")
    script = encode(tokenizer, "ok \u5c4c bomb yes")
    assert script[2:5] == [232, 180, 143]  # <0xE5> <0xB1> <0x8C>
    retry = script[:2] + encode(tokenizer, "fine")
    result = guarded_generate(
        mistral_model, tokenizer, mid_character_guard, "Hello,", input_ids=PROMPT_IDS, max_new_tokens=len(script) + 1,
        max_retries=max_retries, do_sample=False, eos_token_id=MISTRAL_EOS,
        logits_processor=LogitsProcessorList([Scripted(len(PROMPT_IDS), script, retry=retry)]),
    )  # fmt: skip
    assert "\ufffd" not in result.text
    assert result.text == reference_decode(tokenizer, result.ids)
    assert result.flags[0].rollback_to == 2 and result.flags[0].index == 4  # the piece holding 屌, begun at token 2
    if max_retries == 0:
        assert (result.text, result.ids, result.flagged) == ("ok ", script[:2], True)
    else:
        assert (result.text, result.flagged, result.attempts) == ("ok  fine", False, 2)
    assert not judged_afresh(mid_character_guard, tokenizer, result.ids).flagged


@pytest.fixture(scope="module")
def end_of_turn_guard(tmp_path_factory):
    """The issue's wiring: "bomb", " bomb" and <|im_end|> are Unsafe."""
    ordinary = cached_ordinary_tokenizer(qwen3_tokenizer())
    ids = [*ordinary.encode("bomb"), *ordinary.encode(" bomb"), qwen3_tokenizer().token_to_id("<|im_end|>")]
    return tiny_guard_flagging(tmp_path_factory.mktemp("end-of-turn"), *ids)


@pytest.mark.parametrize("max_retries", [0, 2])
def test_care_never_returns_text_that_is_itself_flagged(end_of_turn_guard, mistral_model, max_retries):
    """"bomb  bomb bomb." flags at the third word; rolled back, "bomb" is
    flagged by its own end of turn (bomb, <|im_end|>): that must go too."""
    tokenizer = generator_tokenizer("mistral-v1")
    script = encode(tokenizer, "bomb  bomb bomb.")
    result = guarded_generate(
        mistral_model, tokenizer, end_of_turn_guard, "Hello,", input_ids=PROMPT_IDS, max_new_tokens=len(script) + 1,
        max_retries=max_retries, do_sample=False, eos_token_id=MISTRAL_EOS,
        logits_processor=LogitsProcessorList([Scripted(len(PROMPT_IDS), script)]),
    )  # fmt: skip
    assert result.flagged and result.attempts == max_retries + 1
    assert (result.text, result.ids) == ("", [])
    assert not judged_afresh(end_of_turn_guard, tokenizer, result.ids).flagged
    assert [flag.end_of_turn for flag in result.flags] == [False] * (max_retries + 1) + [True]
    assert all(flag.verdict.risk_level == "Unsafe" for flag in result.flags)


#: Multi-byte characters the guard flags (their byte-level guard tokens are
#: wired Unsafe), words it flags, and text it does not.
CARE_FRAGMENTS = [
    "ok", " ok", " ", "  ", "\u5c4c", " \u5c4c", "\U0001fae0", " \U0001fae0", "bomb", " bomb", "\u00e9",
    " \u4e2d\u6587", ".",
]  # fmt: skip
RETRY_FRAGMENTS = ["fine", " fine", " yes", ".", " bomb", " \u5c4c", "\u00e9"]
END_OF_TEXT = {"llama3": 128009, "deepseek-v3": 1}  # the others end with </s>, id 2


@pytest.fixture(scope="module")
def care_guard(tmp_path_factory):
    ordinary = cached_ordinary_tokenizer(qwen3_tokenizer())
    unsafe = {qwen3_tokenizer().token_to_id("<|im_end|>")}
    for text in ["\u5c4c", " \u5c4c", "\U0001fae0", " \U0001fae0", "bomb", " bomb"]:
        unsafe.update(ordinary.encode(text))
    return tiny_guard_flagging(tmp_path_factory.mktemp("care"), *sorted(unsafe))


class Attempts(LogitsProcessor):
    """A real generator that writes ``scripts[n]`` in its n-th ``generate``
    call (after whatever prefix it is given), then ends."""

    def __init__(self, scripts: list[list[int]], end: int):
        self.scripts, self.end = scripts, end
        self.calls, self.start, self.length = -1, 0, None

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if self.length is None or length != self.length + 1:  # a new generate call
            self.calls, self.start = self.calls + 1, length
        self.length = length
        script = self.scripts[min(self.calls, len(self.scripts) - 1)]
        step = length - self.start
        forced = torch.full_like(scores, -1e9)
        forced[:, script[step] if step < len(script) else self.end] = 0.0
        return forced


@pytest.fixture(scope="module")
def vocabulary_models():
    """A tiny random Llama per generator vocabulary size (the scripts pick every token)."""
    models = {}

    def model_for(size: int):
        if size not in models:
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256,
            )  # fmt: skip
            models[size] = LlamaForCausalLM(config).eval()
        return models[size]

    return model_for


def check_care(guard, model_for, name: str, tokenizer, texts: list[str], max_retries: int):
    """guarded_generate with a generator that writes ``texts[n]`` in attempt
    n: the returned text never ends inside a character (no U+FFFD; it is the
    tokenizer's own decode of the ids) and, judged afresh as a whole answer,
    is never flagged."""
    scripts = [encode(tokenizer, text) for text in texts]
    end = END_OF_TEXT.get(name, 2)
    assert reference_decode(tokenizer, [end]) == ""
    model = model_for(SourceDecoder(tokenizer).vocab_size)
    result = guarded_generate(
        model, tokenizer, guard, "Hello,", input_ids=[end], max_new_tokens=40, max_retries=max_retries,
        do_sample=False, eos_token_id=end, pad_token_id=end,
        logits_processor=LogitsProcessorList([Attempts(scripts, end)]),
    )  # fmt: skip
    assert "\ufffd" not in result.text
    assert result.text == reference_decode(tokenizer, result.ids)
    assert not judged_afresh(guard, tokenizer, result.ids).flagged
    if result.flagged:  # out of retries; the end of turn may have flagged what was kept, and more went
        assert result.attempts == max_retries + 1 and len(result.flags) >= result.attempts
    else:  # each attempt but the last was flagged and rolled back
        assert len(result.flags) == result.attempts - 1
    assert all(flag.verdict.unsafe for flag in result.flags)


@settings(max_examples=max(5, settings.default.max_examples // 10))
@given(data=st.data())
def test_care_on_every_bundled_tokenizer_returns_whole_characters_judged_clean(
    care_guard, vocabulary_models, generator, data
):
    """CARE over every bundled tokenizer, multi-byte characters on the flag."""
    first = "".join(data.draw(st.lists(st.sampled_from(CARE_FRAGMENTS), min_size=1, max_size=8)))
    retries = [
        "".join(data.draw(st.lists(st.sampled_from(RETRY_FRAGMENTS), min_size=1, max_size=4))) for _ in range(2)
    ]
    check_care(care_guard, vocabulary_models, *generator, [first, *retries], data.draw(st.integers(0, 2)))


@pytest.mark.parametrize(
    "text", ["ok \u5c4c bomb yes", "bomb  bomb bomb.", "ok \U0001fae0\U0001fae0 x", "\u5c4c\u5c4c", " \u5c4c bomb"]
)
def test_care_on_every_bundled_tokenizer_pinned(care_guard, vocabulary_models, generator, text):
    """The issue's scripts and runs of flagged characters, out of retries at
    once and with a retry that is flagged too."""
    for max_retries in (0, 1):
        check_care(care_guard, vocabulary_models, *generator, [text, " bomb bomb", "fine"], max_retries)


# --- 6. Where and why, end of turn included, in every library result ------------------------


@pytest.fixture(scope="module")
def bye_guard(tmp_path_factory):
    """The issue's wiring: " bye" and <|im_end|> are Unsafe: "Good bye" is
    flagged by its end of turn only."""
    ordinary = cached_ordinary_tokenizer(qwen3_tokenizer())
    ids = [*ordinary.encode(" bye"), qwen3_tokenizer().token_to_id("<|im_end|>")]
    return tiny_guard_flagging(tmp_path_factory.mktemp("bye"), *ids)


def assert_flagged_at_the_end_of_turn_from(flag, index: int):
    assert flag is not None and flag.end_of_turn and flag.index == index
    verdict = flag.verdict
    assert (verdict.risk_level, verdict.category, verdict.flagged_at) == ("Unsafe", "Violent", flag.position)


def test_every_library_result_says_where_and_why_the_end_of_turn_flagged(bye_guard, mistral_model):
    adapter = GuardAdapter(bye_guard.session())
    adapter.moderate_prompt("Say goodbye")
    pieces = adapter.push_text("Good") + adapter.push_text(" bye")
    assert adapter.flag is None
    pieces += adapter.finish()
    assert_flagged_at_the_end_of_turn_from(adapter.flag, 1)
    assert [(piece.flagged, piece.flagged_at_finish) for piece in pieces] == [(False, False), (True, True)]
    assert adapter.flag.position == adapter.end_verdicts[0].position  # <|im_end|>
    adapter.rollback(adapter.flag.rollback_to)
    assert adapter.flag is None and not adapter.flagged

    # transformers: the stopping criterion (and its streamer), after finish()
    tokenizer = generator_tokenizer("mistral-v1")
    script = encode(tokenizer, "Good bye")
    stop = GuardStoppingCriteria(tokenizer, bye_guard, prompt="Say goodbye")
    mistral_model.generate(
        input_ids=torch.tensor([PROMPT_IDS]), max_new_tokens=len(script) + 2, do_sample=False,
        eos_token_id=MISTRAL_EOS, logits_processor=LogitsProcessorList([Scripted(len(PROMPT_IDS), script)]),
        stopping_criteria=StoppingCriteriaList([stop]),
    )  # fmt: skip
    assert stop.finish() == [True]
    assert_flagged_at_the_end_of_turn_from(stop.flags[0], 1)
    assert stop.streamers[0].flag == stop.flags[0]

    # LangChain: the wrapper's error and its refusal, the handler's error
    chunks = [AIMessageChunk(content="Good"), AIMessageChunk(content=" bye")]
    with pytest.raises(GuardFlaggedError, match="at the end of turn, after ' bye': Unsafe") as raised:
        list(GuardedChatModel(scripted(chunks), bye_guard).stream("Say goodbye"))
    assert_flagged_at_the_end_of_turn_from(raised.value.flag, 1)
    refused = [chunk for chunk in GuardedChatModel(scripted(chunks), bye_guard, refusal="No.").stream("Say goodbye")]
    refusal = next(chunk for chunk in refused if chunk.content == "No.")
    assert "".join(chunk.content for chunk in refused) == "GoodNo."
    assert refusal.response_metadata["crossguard"]["end_of_turn"] is True
    config = {"callbacks": [GuardCallbackHandler(bye_guard)]}
    with pytest.raises(GuardFlaggedError, match="at the end of turn") as raised:
        list(scripted(chunks).stream([HumanMessage("Say goodbye")], config=config))
    assert_flagged_at_the_end_of_turn_from(raised.value.flag, 1)
    with pytest.raises(GuardFlaggedError, match="at the end of turn") as raised:
        chat_model("Good bye").invoke([HumanMessage("Say goodbye")], config=config)
    assert_flagged_at_the_end_of_turn_from(raised.value.flag, 0)  # judged whole: one piece
