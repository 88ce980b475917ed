"""Debounce-aware withholding, with the tiny guard wired Unsafe on chosen Qwen3 tokens.

The official debounce flags a response at the second of two consecutive
Unsafe tokens, so the first one's text must wait for the next verdict."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import GuardAdapter
from adapter.bundled_tokenizers import encode_text, generator_tokenizer, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations.streams import GuardStreams, StreamKey
from integrations.withhold import StreamGate, Withholder


def qwen(text: str) -> list[int]:
    return encode_ordinary(qwen3_tokenizer(), text)


DYNAM, ITE = qwen(" dynamite")
assert qwen(" dynam") == [DYNAM] and qwen("Use dynam now") == [*qwen("Use"), DYNAM, *qwen(" now")]
IM_END = qwen3_tokenizer().token_to_id("<|im_end|>")


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    """Wired Unsafe on " dynam", "ite" and the end of turn, Safe elsewhere:
    " dynamite" is two Unsafe tokens in a row (flagged at "ite"), the word
    " dynam" alone one isolated Unsafe token, and a response that ends in
    " dynam" is flagged by the end of turn where ``finish()`` judges it."""
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("dynamite"),
        tokenizer_json=qwen3_tokenizer_path(),
        unsafe_token_ids=[DYNAM, ITE, IM_END],
    )
    return StreamGuard.from_pretrained(folder, device="cpu")


def run(guard, deltas: list[str], flagged_at_finish: bool | None = None):
    """Stream text deltas through a GuardAdapter and a Withholder; per push,
    (the pieces the adapter judged, the texts released). The last entry is
    the end: ``adapter.finish()``, then ``Withholder.finish`` with the final
    state (or ``flagged_at_finish`` when given)."""
    adapter = GuardAdapter(guard.session())
    adapter.moderate_prompt("How do I remove a stump?")
    withholder = Withholder()
    steps = []
    for delta in deltas:
        pieces = adapter.push_text(delta)
        steps.append((pieces, [piece.text for piece in withholder.push(pieces)]))
    pieces = adapter.finish()
    released = withholder.push(pieces)
    final = adapter.flagged if flagged_at_finish is None else flagged_at_finish
    released += withholder.finish(final)
    steps.append((pieces, [piece.text for piece in released]))
    return steps, withholder, adapter


def released_text(steps) -> str:
    return "".join(text for _, texts in steps for text in texts)


def test_a_single_unsafe_token_is_held_until_the_next_verdict_is_clean(guard):
    steps, withholder, adapter = run(guard, ["Use", " dyn", "am", " now", " please", "."])
    judged = {piece.text: piece for pieces, _ in steps for piece in pieces}
    assert judged["am"].verdict.unsafe and not judged["am"].verdict.flagged
    # " dynam" is judged at the push of " now" (the word is final only then) and held...
    at_now = steps[3]
    assert [piece.text for piece in at_now[0]] == [" dyn", "am"] and at_now[1] == []
    # ...until " now" is judged Safe at the next push: released, in order, before it.
    assert steps[4][1] == [" dyn", "am", " now"]
    assert released_text(steps) == "Use dynam now please."
    assert not adapter.flagged and not withholder.withheld and not withholder.held


def test_two_unsafe_tokens_in_a_row_are_withheld_with_everything_after(guard):
    steps, withholder, adapter = run(guard, ["Use", " dynam", "ite", " now", " please", "."])
    assert adapter.flagged
    assert released_text(steps) == "Use"  # not even " dynam", whose own verdict is not flagged yet
    assert [piece.text for piece in withholder.withheld] == [" dynam", "ite", " now", " please", "."]
    dynam = withholder.withheld[0]
    assert dynam.verdict.unsafe and not dynam.verdict.flagged
    assert withholder.flag.position == withholder.flag.flagged_at == dynam.verdict.position + 1


def test_one_generator_token_per_guard_token(guard):
    # Llama 3 splits " dynamite" as the guard does (" dynam", "ite"): the demo's case.
    llama3 = generator_tokenizer("llama3")
    for text, expected in [("Use dynamite now, or dig.", "Use"), ("Use dynam now, or dig.", "Use dynam now, or dig.")]:
        ids = encode_text(llama3, text)
        adapter = GuardAdapter(guard.session(), llama3)
        adapter.moderate_prompt("How?")
        withholder = Withholder()
        shown = [piece.text for token_id in ids for piece in withholder.push(adapter.push_ids(token_id))]
        shown += [piece.text for piece in withholder.push(adapter.finish()) + withholder.finish(adapter.flagged)]
        assert "".join(shown) == expected


def test_a_held_piece_the_flag_does_not_cover_is_released(guard):
    # " dynam" (Unsafe) is cleared by " now" (Safe), a token no piece of its
    # own carries; then " dynamite" flags. The flag starts after " dynam".
    steps, withholder, adapter = run(guard, ["Use", " dynam", " now dynamite", " home"])
    assert adapter.flagged
    assert released_text(steps) == "Use dynam"
    assert [piece.text for piece in withholder.withheld] == [" now dynamite", " home"]
    assert withholder.flag.flagged_at == withholder.withheld[0].verdict.flagged_at


def test_at_the_end_held_text_follows_the_final_state(guard):
    # " dynam" is judged (the word is final once the space comes) and held:
    # nothing after it has a verdict yet. The stream's final state decides.
    for final, released in [(False, [" dynam"]), (True, [])]:
        adapter = GuardAdapter(guard.session())
        adapter.moderate_prompt("How?")
        withholder = Withholder()
        shown = [piece.text for delta in ["Use", " dynam", " "] for piece in withholder.push(adapter.push_text(delta))]
        assert shown == ["Use"] and [piece.text for piece in withholder.held] == [" dynam"]
        assert [piece.text for piece in withholder.finish(final)] == released
        assert [piece.text for piece in withholder.withheld] == ([" dynam"] if final else [])
        with pytest.raises(RuntimeError, match="finished"):
            withholder.push([])


def test_a_response_flagged_by_the_end_of_turn_shows_nothing_held(guard):
    # The last word is Unsafe and waits for the end. GuardAdapter.finish()
    # judges the end of the turn (<|im_end|>, Unsafe here, as upstream's
    # evaluation judges it): read the final state after it.
    steps, withholder, adapter = run(guard, ["Use", " dynam"])
    if adapter.flagged:  # flagged by " dynam" + <|im_end|>: the held word never comes out
        assert released_text(steps) == "Use"
        assert [piece.text for piece in withholder.withheld] == [" dynam"]
    else:  # a guard that does not judge the end of turn: the stream ended clean
        assert released_text(steps) == "Use dynam"


WORDS = [" dynamite", " dynam", "ite", "am", " dyn", " now", " and", " stumps", ".", " ", "\n", "Use", "屌"]


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), data=st.data())
def test_released_text_is_a_prefix_cleared_by_the_debounce(guard, words, data):
    text = "".join(words)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=6)))
    deltas = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True) if text[start:end]]
    steps, withholder, adapter = run(guard, deltas)
    judged = [piece for pieces, _ in steps for piece in pieces]
    released = released_text(steps)
    withheld = "".join(piece.text for piece in withholder.withheld)
    assert released + withheld == text  # in order, nothing lost, nothing twice
    if not adapter.flagged:
        assert released == text
    else:
        flagged_at = withholder.flag.flagged_at if withholder.flag else None
        count = len(released)
        shown = [piece for piece in judged if piece.end <= count]
        if flagged_at is not None:  # nothing shown was judged by the flagged stretch
            assert all(piece.verdict is None or piece.verdict.position < flagged_at - 1 for piece in shown)


def test_stream_gate_releases_chunks_in_order_once_all_their_text_is(guard):
    with GuardStreams(guard, "Plan") as streams:
        gate: StreamGate[str] = StreamGate(streams)
        text, call = StreamKey(), StreamKey(0, 0)
        assert gate.push("a", [(text, "Looking")]) == []  # the word is not final yet
        assert gate.push("b", [(call, '{"q": "rent')]) == []
        assert gate.push("c", []) == []  # carries nothing judged: waits for those before it
        assert gate.push("d", [(text, " up"), (call, ' a grinder"}')]) == ["a", "b", "c"]
        assert gate.finish() == ["d"] and gate.flag is None
    with GuardStreams(guard, "Plan") as streams:
        gate = StreamGate(streams)
        assert gate.push("a", [(text, "Use")]) == []
        assert gate.push("b", [(call, '{"q": "dynamite dynamite"}')]) == []
        key, verdict = gate.flag  # the response is flagged: nothing more comes out, not even "a"
        assert gate.push("c", [(text, " a grinder")]) == [] and gate.finish() == []
        assert key == call and verdict.position == verdict.flagged_at
