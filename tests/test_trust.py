"""The two core promises, on the characters that break naive bridges.

* The guard receives exactly ``encode_ordinary(response)``: no id twice, none
  missing (NFC-expanding characters, surrogate halves, long runs within the
  hold-back bound).
* A generator token is judged only once the guard has seen all of its text:
  the **last guard token that starts before the piece's end** (characters that
  Qwen's byte-level BPE splits into several tokens).

Each regression here failed before the fix it guards.
"""

from __future__ import annotations

import dataclasses
import itertools
import unicodedata
from threading import Thread

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from transformers import LogitsProcessorList, StoppingCriteriaList

from adapter import AdapterError, GuardAdapter, RollbackError, SourceDecoder, TokenIdError
from adapter.bundled_tokenizers import generator_tokenizer, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import StableRetokenizer, encode_ordinary, ordinary_tokenizer
from adapter.retokenize.ordinary import cached_ordinary_tokenizer
from guard import StreamGuard
from guard.template import end_of_turn_ids
from guard.testing import write_tiny_checkpoint
from integrations.langchain import GuardCallbackHandler, GuardFlaggedError
from integrations.transformers import GuardedStreamer, GuardStoppingCriteria, guarded_generate
from tests.test_retokenize import cut_into_deltas, stream
from tests.test_source import encode, reference_decode
from tests.tiny_generator import Scripted, tiny_mistral_vocabulary_llama


def guard_receives(guard, response: str) -> list[int]:
    """What the guard is fed for an answer: upstream's template drops its
    leading newlines and closes the turn with <|im_end|> and a newline."""
    return encode_ordinary(guard.tokenizer, response.lstrip("\n")) + end_of_turn_ids(guard.tokenizer)


# --- 1. NFC-expanding characters: no id twice --------------------------------

#: Every code point whose NFC form differs from itself (singletons such as
#: U+212B, composition exclusions such as the nukta letters U+0958..U+095F,
#: Hebrew presentation forms, Tibetan, CJK compatibility ideographs).
NFC_CHANGED = [
    chr(code)
    for code in range(0x110000)
    if not 0xD800 <= code < 0xE000 and unicodedata.normalize("NFC", chr(code)) != chr(code)
]
#: What the review found to trigger the duplicate: nothing, a space, a digit,
#: CJK, punctuation, a newline before; plus a letter.
BEFORE = ["", " ", "1", "\u4e2d", ".", "\n", "a"]
#: A letter (merges with the mark), a space, nothing, a combining mark, a digit.
AFTER = ["t", " ", "", "\u0301", "1"]


def test_the_set_of_nfc_changing_code_points_is_what_the_review_counted():
    assert len(NFC_CHANGED) > 1000
    assert sum(len(unicodedata.normalize("NFC", char)) > 1 for char in NFC_CHANGED) == 85


@pytest.fixture(scope="module", params=["qwen3", "llama3"])
def guard_vocabulary(request):
    """The guard's Qwen3 tokenizer (NFC) and Llama 3's (no normalizer, same
    pre-tokenizer family with 3-digit runs) as the retokenizer's target."""
    tokenizer = qwen3_tokenizer() if request.param == "qwen3" else generator_tokenizer("llama3")
    return ordinary_tokenizer(tokenizer)


def test_every_nfc_changing_code_point_in_every_context_and_every_cut(guard_vocabulary):
    failures = []
    for char in NFC_CHANGED:
        for before in BEFORE:
            for after in AFTER:
                text = before + char + after
                expected = guard_vocabulary.encode(text)
                cuts = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
                for deltas in cuts:
                    got = stream(StableRetokenizer(guard_vocabulary), deltas)
                    if got != expected:
                        failures.append((text, deltas, got, expected))
    assert not failures, failures[:5]


@pytest.mark.parametrize("text", ["\u0958\u0959", "\u0958 \u0958", "\ufb2c\ufb2c", "\u0f43\u0f4d1", "\u0958\u093c"])
def test_runs_of_expanding_characters(qwen, text):
    ordinary = ordinary_tokenizer(qwen)
    for cut in range(len(text) + 1):
        assert stream(StableRetokenizer(ordinary), [text[:cut], text[cut:]]) == ordinary.encode(text)
    assert stream(StableRetokenizer(ordinary), list(text)) == ordinary.encode(text)


def test_the_review_example_sends_each_id_once(qwen):
    assert (
        stream(StableRetokenizer(qwen), ["\u0958", "t"])
        == encode_ordinary(qwen, "\u0958t")
        == [
            64704,
            5502,
            120,
            83,
        ]
    )


def test_hindi_from_llama3_ids_reaches_the_guard_exactly(tiny_guard):
    # The review's sentence: क़ (KA + NUKTA) precomposed and decomposed.
    text = "\u092f\u0939 \u0915\u093c\u093e\u0928\u0942\u0928 \u095b\u0930\u0942\u0930\u0940 \u0939\u0948\u0964"
    llama3 = generator_tokenizer("llama3")
    for sample in [text, text.replace("\u0915\u093c", "\u0958")]:
        seen: list[int] = []
        record = lambda tokens, verdicts, seen=seen: seen.extend(token.id for token in tokens)  # noqa: E731
        adapter = GuardAdapter(tiny_guard.session(), llama3, on_guard_tokens=record)
        adapter.moderate_prompt("Say something in Hindi.")
        for token_id in encode(llama3, sample):
            adapter.push_ids(token_id)
        adapter.finish()
        assert seen == guard_receives(tiny_guard, reference_decode(llama3, encode(llama3, sample)))


# --- 2. Multi-token characters: judged by the last guard token ----------------

MULTI_TOKEN_FRAGMENTS = [
    "\u5c4c",  # 屌: two byte-level guard tokens
    "\u808f",  # 肏
    "\u9f98",  # 龘
    "\U0001fae0",  # 🫠: three
    "\u200d",  # ZWJ
    "\ufe0f",  # variation selector
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u2764\ufe0f",
    "\u0958",
    "\ufb2c",
    "e\u0301",
    " ",
    "  ",
    "\n",
    "ok",
    " word",
    "7",
    "\u4e2d\u6587",
    "\U0001f44d\U0001f3fd",
]


def multi_token_texts() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(MULTI_TOKEN_FRAGMENTS), min_size=1, max_size=16).map("".join)


def strip(verdict):
    return None if verdict is None else dataclasses.replace(verdict, risk_prob=0.0, category_prob=None)


def expected_judges(guard, response: str) -> list[tuple[int, int]]:
    """(start in the response, position among the guard's response tokens) of
    every guard token, from one encoding of the whole answer. The template
    drops the answer's leading newlines, so the guard's text starts after them."""
    stripped = len(response) - len(response.lstrip("\n"))
    encoding = cached_ordinary_tokenizer(guard.tokenizer).tokenizer.encode(
        response[stripped:], add_special_tokens=False
    )
    return [(stripped + start, position) for position, (start, _) in enumerate(encoding.offsets)]


def direct_response_verdicts(guard, response: str):
    direct = guard.session()
    direct.moderate_prompt("Tell me something.")
    qwen_ids = encode_ordinary(guard.tokenizer, response.lstrip("\n"))
    return direct.append(qwen_ids) if qwen_ids else []


def check_judge_rule(guard, generator, ids):
    adapter = GuardAdapter(guard.session(), generator)
    adapter.moderate_prompt("Tell me something.")
    pieces = [piece for token_id in ids for piece in adapter.push_ids(token_id)] + adapter.finish()
    response = "".join(piece.text for piece in pieces)
    assert response == reference_decode(generator, ids)
    verdicts = direct_response_verdicts(guard, response)
    judges = expected_judges(guard, response)
    for piece in pieces:
        before_end = [position for start, position in judges if start < piece.end]
        expected = verdicts[before_end[-1]] if before_end else None
        assert strip(piece.verdict) == strip(expected), (piece, response)


@pytest.mark.parametrize(
    "text", ["ok \u5c4c", "\u5c4c\u808f\u9f98", "a\U0001fae0b", "\U0001f468\u200d\U0001f469\u200d\U0001f467 x"]
)
def test_judge_rule_pinned(tiny_guard, generator, text):
    _, tokenizer = generator
    check_judge_rule(tiny_guard, tokenizer, encode(tokenizer, text))


#: Each example streams through a guard twice per generator: a quarter of the
#: profile's examples per generator keeps the default run short.
PER_GENERATOR = settings(max_examples=max(10, settings.default.max_examples // 4))


@PER_GENERATOR
@given(text=multi_token_texts())
def test_judge_rule_on_text_rich_in_multi_token_characters(tiny_guard, generator, text):
    _, tokenizer = generator
    check_judge_rule(tiny_guard, tokenizer, encode(tokenizer, text))


@given(text=multi_token_texts(), data=st.data())
def test_judge_rule_for_text_deltas(tiny_guard, text, data):
    deltas = cut_into_deltas(data, text)
    adapter = GuardAdapter(tiny_guard.session())
    adapter.moderate_prompt("Tell me something.")
    pieces = [piece for delta in deltas for piece in adapter.push_text(delta)] + adapter.finish()
    assert "".join(piece.text for piece in pieces) == text
    verdicts = direct_response_verdicts(tiny_guard, text)
    judges = expected_judges(tiny_guard, text)
    for piece in pieces:
        before_end = [position for start, position in judges if start < piece.end]
        assert strip(piece.verdict) == strip(verdicts[before_end[-1]] if before_end else None)


UNSAFE_CHARACTER = "\u5c4c"  # 屌: Qwen splits " 屌" into two byte-level tokens


@pytest.fixture(scope="module")
def byte_guard(tmp_path_factory):
    """A tiny guard that calls both byte tokens of " 屌" Unsafe, so the
    official debounce flags at the second, which completes the character."""
    unsafe = encode_ordinary(qwen3_tokenizer(), " " + UNSAFE_CHARACTER)
    assert len(unsafe) == 2
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("byte-guard"), tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe
    )
    return StreamGuard.from_pretrained(folder, device="cpu")


def test_the_flag_lands_on_the_piece_holding_the_whole_character(byte_guard, generator):
    _, tokenizer = generator
    adapter = GuardAdapter(byte_guard.session(), tokenizer)
    adapter.moderate_prompt("Say it.")
    pieces = [piece for token_id in encode(tokenizer, "ok " + UNSAFE_CHARACTER) for piece in adapter.push_ids(token_id)]
    pieces += adapter.finish()
    assert adapter.flagged
    holder = next(piece for piece in pieces if UNSAFE_CHARACTER in piece.text)
    assert holder.flagged


def test_text_deltas_flag_the_delta_holding_the_character(byte_guard):
    adapter = GuardAdapter(byte_guard.session())
    adapter.moderate_prompt("Say it.")
    pieces = adapter.push_text("ok ") + adapter.push_text(UNSAFE_CHARACTER) + adapter.finish()
    assert [piece.flagged for piece in pieces] == [False, True]


# --- the integrations never show the flagged character ----------------------


@pytest.fixture(scope="module")
def mistral_model():
    return tiny_mistral_vocabulary_llama()


PROMPT_IDS = [1, 22557, 28725]  # <s> Hello,


def test_guarded_streamer_withholds_the_multi_token_character(byte_guard, mistral_model):
    tokenizer = generator_tokenizer("mistral-v1")
    answer = encode(tokenizer, "ok " + UNSAFE_CHARACTER + " and more text here")
    streamer = GuardedStreamer(GuardAdapter(byte_guard.session(), tokenizer))
    streamer.adapter.moderate_prompt("Hello,")
    kwargs = dict(
        input_ids=torch.tensor([PROMPT_IDS]), max_new_tokens=len(answer) + 2, do_sample=False,
        logits_processor=LogitsProcessorList([Scripted(len(PROMPT_IDS), answer)]), streamer=streamer,
        stopping_criteria=StoppingCriteriaList([GuardStoppingCriteria(streamer)]), eos_token_id=2,
    )  # fmt: skip
    thread = Thread(target=mistral_model.generate, kwargs=kwargs)
    thread.start()
    shown = "".join(streamer)
    thread.join(timeout=60)
    assert streamer.adapter.flagged
    assert UNSAFE_CHARACTER not in shown and "more" not in shown
    assert "ok".startswith(shown.strip()) or shown.strip() == "ok"


def test_guarded_generate_rolls_back_the_multi_token_character(byte_guard, mistral_model):
    tokenizer = generator_tokenizer("mistral-v1")
    first = encode(tokenizer, "ok " + UNSAFE_CHARACTER + " then")
    retry = encode(tokenizer, "ok fine then")
    result = guarded_generate(
        mistral_model, tokenizer, byte_guard, "Hello,", input_ids=PROMPT_IDS, max_new_tokens=len(first) + 1,
        max_retries=2, do_sample=False, eos_token_id=2,
        logits_processor=LogitsProcessorList([Scripted(len(PROMPT_IDS), first, retry=retry)]),
    )  # fmt: skip
    assert result.attempts == 2 and not result.flagged
    assert UNSAFE_CHARACTER not in result.text
    assert result.text.startswith("ok")


def test_langchain_invoke_raises_on_the_multi_token_character(byte_guard):
    handler = GuardCallbackHandler(byte_guard)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="ok " + UNSAFE_CHARACTER)]))
    with pytest.raises(GuardFlaggedError):
        model.invoke([HumanMessage("Say it.")], config={"callbacks": [handler]})


def test_langchain_handler_flags_the_chunk_holding_the_character(byte_guard):
    handler = GuardCallbackHandler(byte_guard)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="ok " + UNSAFE_CHARACTER + " and more")]))
    with pytest.raises(GuardFlaggedError) as raised:
        for _ in model.stream([HumanMessage("Say it.")], config={"callbacks": [handler]}):
            pass
    flagged = [piece for piece in raised.value.pieces if piece.flagged]
    assert flagged and UNSAFE_CHARACTER in flagged[0].text


# --- 3. Long runs: bounded hold-back, every character judged ------------------


@pytest.mark.parametrize(
    "run", ["a" * 3000, "\u4e2d" * 1500, "-" * 2000, " " * 1000, "\u0301" * 800, "\U0001fae0" * 400]
)
def test_a_run_without_boundary_is_cut_and_never_held_whole(qwen, run):
    text = "before " + run + " after"
    retokenizer = StableRetokenizer(qwen)
    tokens = []
    for char in text:
        tokens += retokenizer.push(char)
        assert len(retokenizer.held_text) <= retokenizer.max_held
    tokens += retokenizer.flush()
    assert retokenizer.forced_cuts > 0
    # Every character is covered, in order (a byte-level token may hold the
    # end of one character and the start of the next, so spans can overlap).
    assert tokens[0].start == 0 and tokens[-1].end == len(text)
    assert all(a.start <= b.start <= a.end and a.end <= b.end for a, b in itertools.pairwise(tokens))
    # Exactly what a fresh stream of the same text in one delta gives.
    whole = StableRetokenizer(qwen)
    assert [t.id for t in whole.push(text) + whole.flush()] == [t.id for t in tokens]
    assert whole.forced_cuts == retokenizer.forced_cuts


@given(
    text=st.lists(
        st.sampled_from(["a", "b", "\u4e2d", " ", "\n", ".", "1", "\u0301", "\u0958", "\U0001fae0"]), max_size=120
    ).map("".join),
    data=st.data(),
)
def test_forced_cuts_do_not_depend_on_how_the_text_was_cut_and_without_one_ids_are_exact(qwen, text, data):
    deltas = cut_into_deltas(data, text)
    retokenizer = StableRetokenizer(qwen, max_held=16)
    ids = stream(retokenizer, deltas)
    one_by_one = StableRetokenizer(qwen, max_held=16)
    assert stream(one_by_one, list(text)) == ids
    assert one_by_one.forced_cuts == retokenizer.forced_cuts
    if retokenizer.forced_cuts == 0:
        assert ids == encode_ordinary(qwen, text)


def test_within_the_bound_no_forced_cut(qwen):
    retokenizer = StableRetokenizer(qwen)
    text = "Donaudampfschifffahrtsgesellschaftskapit\u00e4nsm\u00fctze " * 20 + "|" + "---|" * 40
    assert stream(retokenizer, list(text)) == encode_ordinary(qwen, text)
    assert retokenizer.forced_cuts == 0


def test_adapter_reports_forced_cuts(tiny_guard):
    adapter = GuardAdapter(tiny_guard.session())
    adapter.moderate_prompt("Spell it out.")
    pieces = [piece for _ in range(1200) for piece in adapter.push_text("z")]
    assert adapter.forced_cuts > 0
    assert len(pieces) > 1000  # judged as it streams, not held until the run ends
    pieces += adapter.finish()
    assert len(pieces) == 1200 and all(piece.verdict is not None for piece in pieces)


def test_max_held_is_validated(qwen):
    with pytest.raises(ValueError, match="max_held"):
        StableRetokenizer(qwen, max_held=2)


# --- 4. Smaller defects -------------------------------------------------------


def test_empty_pieces_after_rollback_get_the_verdict_a_fresh_stream_gives(tiny_guard):
    llama3 = generator_tokenizer("llama3")
    eot = llama3.token_to_id("<|eot_id|>")
    ids = [*encode(llama3, "Hello there, friend"), eot]

    def run(adapter, batch):
        return [piece for token_id in batch for piece in adapter.push_ids(token_id)]

    fresh = GuardAdapter(tiny_guard.session(), llama3)
    fresh.moderate_prompt("Hi")
    expected = run(fresh, ids) + fresh.finish()

    rolled = GuardAdapter(tiny_guard.session(), llama3)
    rolled.moderate_prompt("Hi")
    run(rolled, ids)
    rolled.finish()
    kept = rolled.rollback(2)
    again = run(rolled, ids[2:]) + rolled.finish()
    assert [strip(piece.verdict) for piece in again] == [strip(piece.verdict) for piece in expected[kept:]]
    assert again[-1].text == "" and again[-1].verdict is not None


@pytest.mark.parametrize(
    ("deltas", "text"),
    [
        (["a\ud83d", "\ude00b"], "a\U0001f600b"),
        (["\ud83d", "\ude00"], "\U0001f600"),
        (["x\ud83d"], "x\ufffd"),
        (["\ud83d", "y"], "\ufffdy"),
        (["\ude00z"], "\ufffdz"),
        (["\ud83d", "\ud83d", "\ude00"], "\ufffd\U0001f600"),
        (["a\ud83d", "", "", "\ude00b"], "a\U0001f600b"),
        (["a\ud83d", ""], "a\ufffd"),
    ],
)
def test_surrogate_halves_in_text_deltas(tiny_guard, deltas, text):
    seen: list[int] = []
    adapter = GuardAdapter(tiny_guard.session(), on_guard_tokens=lambda t, v: seen.extend(x.id for x in t))
    adapter.moderate_prompt("Hi")
    pieces = [piece for delta in deltas for piece in adapter.push_text(delta)] + adapter.finish()
    assert "".join(piece.text for piece in pieces) == text
    assert [piece.index for piece in pieces] == list(range(len(deltas)))
    assert seen == guard_receives(tiny_guard, text)


@given(text=multi_token_texts(), data=st.data())
def test_text_split_between_utf16_code_units_reaches_the_guard_whole(tiny_guard, text, data):
    """A JSON stream may cut between the two halves of a surrogate pair."""
    units = text.encode("utf-16-le", "surrogatepass")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(units) // 2), max_size=6)))
    bounds = [0, *cuts, len(units) // 2]
    deltas = [units[2 * a : 2 * b].decode("utf-16-le", "surrogatepass") for a, b in itertools.pairwise(bounds)]
    seen: list[int] = []
    adapter = GuardAdapter(tiny_guard.session(), on_guard_tokens=lambda t, v: seen.extend(x.id for x in t))
    adapter.moderate_prompt("Hi")
    pieces = [piece for delta in deltas for piece in adapter.push_text(delta)] + adapter.finish()
    assert "".join(piece.text for piece in pieces) == text
    assert seen == guard_receives(tiny_guard, text)


def test_a_lone_surrogate_is_refused_by_the_retokenizer_and_changes_nothing(qwen):
    retokenizer = StableRetokenizer(qwen)
    first = [token.id for token in retokenizer.push("ab ")]
    with pytest.raises(ValueError, match="surrogate"):
        retokenizer.push("c\ud83d")
    assert retokenizer.text_length == 3
    assert first + stream(retokenizer, ["cd"]) == encode_ordinary(qwen, "ab cd")


@pytest.mark.parametrize(
    "make", [np.int64, lambda i: torch.tensor(i), lambda i: torch.tensor([i]), lambda i: np.array([i], dtype=np.int32)]
)
def test_numpy_and_tensor_ids_are_accepted(tiny_guard, make):
    llama3 = generator_tokenizer("llama3")
    ids = encode(llama3, "Hello world")
    adapter = GuardAdapter(tiny_guard.session(), llama3)
    adapter.moderate_prompt("Hi")
    pieces = [piece for token_id in ids for piece in adapter.push_ids(make(token_id))] + adapter.finish()
    assert "".join(piece.text for piece in pieces) == "Hello world"


def test_a_whole_1d_tensor_of_ids_is_accepted(tiny_guard):
    llama3 = generator_tokenizer("llama3")
    adapter = GuardAdapter(tiny_guard.session(), llama3)
    adapter.moderate_prompt("Hi")
    pieces = adapter.push_ids(torch.tensor(encode(llama3, "Hello world"))) + adapter.finish()
    assert "".join(piece.text for piece in pieces) == "Hello world"


@pytest.mark.parametrize("bad", [b"ab", "ab", 1.0, [1.5], True, torch.tensor([[1, 2]]), torch.tensor([1.0])])
def test_bytes_text_and_floats_are_refused_clearly_and_change_nothing(tiny_guard, bad):
    llama3 = generator_tokenizer("llama3")
    adapter = GuardAdapter(tiny_guard.session(), llama3)
    adapter.moderate_prompt("Hi")
    adapter.push_ids(encode(llama3, "Hello"))
    with pytest.raises(TokenIdError, match=r"integers|one sequence"):
        adapter.push_ids(bad)
    assert adapter.pushed == 1
    pieces = adapter.push_ids(encode(llama3, " world")) + adapter.finish()
    assert "".join(piece.text for piece in pieces).endswith(" world")


def test_rollback_before_the_prompt_is_a_clear_error(tiny_guard):
    adapter = GuardAdapter(tiny_guard.session())
    with pytest.raises(AdapterError, match="moderate_prompt"):
        adapter.rollback(0)


def test_rollback_on_a_closed_session_changes_nothing(tiny_guard):
    adapter = GuardAdapter(tiny_guard.session())
    adapter.moderate_prompt("Hi")
    adapter.push_text("Hello there ")
    adapter.push_text("friend")
    length = adapter._retokenizer.text_length
    adapter.session.close()
    with pytest.raises(AdapterError, match="closed"):
        adapter.rollback(1)
    assert adapter.pushed == 2 and adapter._retokenizer.text_length == length


def test_rollback_out_of_range_is_refused(tiny_guard):
    adapter = GuardAdapter(tiny_guard.session())
    adapter.moderate_prompt("Hi")
    adapter.push_text("Hello")
    with pytest.raises(RollbackError):
        adapter.rollback(2)


def test_an_observer_that_raises_loses_no_verdict(tiny_guard):
    calls = []

    def flaky(tokens, verdicts):
        calls.append(len(tokens))
        if len(calls) == 1:
            raise RuntimeError("audit log unavailable")

    adapter = GuardAdapter(tiny_guard.session(), on_guard_tokens=flaky)
    adapter.moderate_prompt("Hi")
    with pytest.raises(RuntimeError, match="audit"):
        adapter.push_text("Hello there ")
    pieces = adapter.push_text("friend") + adapter.finish()
    assert "".join(piece.text for piece in pieces) == "Hello there friend"
    text = "Hello there friend"
    assert adapter.guard_tokens == len(guard_receives(tiny_guard, text))
    assert adapter.session.position == adapter.session.response_start + adapter.guard_tokens


def test_source_decoder_sees_tokens_added_to_the_same_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from adapter.bundled_tokenizers import GENERATORS, package_file

    requirement, package, relative, _ = GENERATORS["llama3"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(package_file(requirement, package, relative)))
    SourceDecoder(tokenizer)
    tokenizer.add_tokens(["<crossguard-new>"])
    new_id = tokenizer.convert_tokens_to_ids("<crossguard-new>")
    pieces = SourceDecoder(tokenizer).push([new_id])
    assert "".join(piece.text for piece in pieces) == tokenizer.decode([new_id], skip_special_tokens=True)


def test_retokenizers_for_the_same_tokenizer_share_one_stripped_copy(qwen):
    assert StableRetokenizer(qwen).ordinary is StableRetokenizer(qwen).ordinary
