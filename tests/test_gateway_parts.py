"""The gateway's pure parts, each against a plain statement of its rule: the
text a tool sees in its arguments (every cut point, and JSON's own decoding),
the SSE reader (every cut point, every line ending), and StreamGate's batched
push (the same releases and flag as pushing chunk by chunk)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.bundled_tokenizers import generator_tokenizer
from guard import GuardEngine, Policy, StreamGuard
from integrations.gateway.sse import EventReader
from integrations.streams import GuardStreams, StreamKey
from integrations.tool_arguments import ArgumentsText, arguments_text
from integrations.withhold import StreamGate
from tests.gateway_harness import UNSAFE_ANSWER, write_gateway_guard

# --- the text a tool sees ----------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _reference(text: str) -> str:
    """Valid JSON with every string literal replaced by its value (lone surrogates as U+FFFD)."""

    def value(match: re.Match) -> str:
        decoded = json.loads(match.group())
        return '"' + decoded.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") + '"'

    return _STRING.sub(value, text)


EXAMPLES = [
    r'{"q": "use \u0064ynamite", "n": 3}',
    r'{"emoji": "\ud83d\ude00", "lone": "\ud800x", "low": "\udc00", "esc": "\"\\\/\b\f\n\r\t"}',
    r'{"nested": {"a": ["x\u0041y", 1.5e3, true, null]}, "k\u0065y": "v"}',
    r'not json at all \u0064 "\u0064" \q "\q" "\u12G4"',
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_arguments_text_is_the_same_for_every_cut(text):
    whole = arguments_text(text)
    for cut in range(len(text) + 1):
        decoder = ArgumentsText()
        assert decoder.push(text[:cut]) + decoder.push(text[cut:]) + decoder.finish() == whole, cut
    for first in range(len(text) + 1):  # and in three pieces, wherever they fall
        for second in range(first, len(text) + 1, 3):
            decoder = ArgumentsText()
            parts = [decoder.push(piece) for piece in (text[:first], text[first:second], text[second:])]
            assert "".join(parts) + decoder.finish() == whole


def test_arguments_text_of_json_is_the_strings_a_tool_reads():
    for text in EXAMPLES[:3]:
        assert arguments_text(text) == _reference(text)
    assert arguments_text(EXAMPLES[0]) == '{"q": "use dynamite", "n": 3}'


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(_json_values, st.booleans(), st.data())
def test_arguments_text_matches_json_for_any_value_and_cut(value, ascii_only, data):
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert arguments_text(text) == _reference(text)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=4)))
    decoder = ArgumentsText()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert "".join(decoder.push(piece) for piece in pieces) + decoder.finish() == arguments_text(text)


# --- the SSE reader ------------------------------------------------------------------------


class _Body:
    """What EventReader reads: a response's bytes, in the parts given."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def aiter_bytes(self):
        for part in self.parts:
            yield part


def _events(parts: list[bytes]) -> list[tuple[str, bytes]]:
    async def read():
        reader = EventReader(_Body(parts), max_line_bytes=1 << 20, max_bytes=1 << 20)
        found = []
        while batch := await reader.batch():
            found += batch
        return found

    return asyncio.run(read())


STREAM = (
    ': ping\n\ndata: {"a": 1}\n\nevent: message\nid: 7\ndata: {"b":\ndata:  2}\n\n'
    "data:no-space\n\nretry: 10\n\nerror: {\"message\": \"x\"}\n\nevent: error\ndata: {\"e\": 1}\n\n"
    "data: [DONE]\n\n"
)
EXPECTED = [("data", b'{"a": 1}'), ("data", b'{"b":\n 2}'), ("data", b"no-space"),
            ("error", b'{"message": "x"}'), ("error", b'{"e": 1}'), ("data", b"[DONE]")]  # fmt: skip


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
def test_the_sse_reader_gives_the_same_events_for_every_cut_and_line_end(line_end):
    raw = ("\ufeff" + STREAM.replace("\n", line_end)).encode()
    assert _events([raw]) == EXPECTED
    for cut in range(len(raw) + 1):
        assert _events([raw[:cut], raw[cut:]]) == EXPECTED, (line_end, cut)


def test_the_sse_reader_ends_an_event_the_body_cut_short_and_bounds_lines():
    assert _events([b'data: {"a": 1}']) == [("data", b'{"a": 1}')]
    from integrations.gateway.wire import BadChunk

    async def read():
        reader = EventReader(_Body([b"data: " + b"x" * 100]), max_line_bytes=50, max_bytes=1 << 20)
        await reader.batch()

    with pytest.raises(BadChunk, match="longer than"):
        asyncio.run(read())


# --- StreamGate.push_many -------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    guard = StreamGuard.from_pretrained(write_gateway_guard(tmp_path_factory.mktemp("parts-guard")))
    with GuardEngine(guard) as engine:
        yield engine


SCRIPTS = ["Hello there, this is a calm answer about gardens and trees.",
           f"Sure. To make{UNSAFE_ANSWER} at home you need a few things, first of all",
           f"Fine: no{UNSAFE_ANSWER} here? Yes{UNSAFE_ANSWER}."]  # fmt: skip


@given(st.sampled_from(SCRIPTS), st.lists(st.integers(1, 4), min_size=1, max_size=30), st.integers(1, 6))
def test_push_many_releases_what_pushing_one_by_one_releases(engine, script, sizes, batch):
    llama3 = generator_tokenizer("llama3")
    ids = llama3.encode(script, add_special_tokens=False).ids
    chunks, at = [], 0
    for size in sizes:
        if at >= len(ids):
            break
        chunks.append(ids[at : at + size])
        at += size
    if at < len(ids):
        chunks.append(ids[at:])
    key = StreamKey(0)

    def run(many: bool) -> tuple[list[int], object]:
        with GuardStreams(engine, "Tell me.", policy=Policy(), source_tokenizer=llama3) as streams:
            gate, released = StreamGate(streams), []
            entries = [(number, [(key, chunk, False)]) for number, chunk in enumerate(chunks)]
            for start in range(0, len(entries), batch if many else 1):
                group = entries[start : start + (batch if many else 1)]
                released += gate.push_many(group) if many else gate.push(*group[0])
                if gate.flag is not None:
                    break
            released += gate.finish()
            flag = gate.flag
            return released, (flag[0], flag[1].flagged_at) if flag and flag[1] is not None else flag

    assert run(True) == run(False)
