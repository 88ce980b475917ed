"""Where a response's reasoning ends and its answer begins, as the guard must see them.

Upstream's thinking-mode evaluation renders the last assistant turn as the
Qwen3 chat template does::

    <think>\\n{reasoning.strip("\\n")}\\n</think>\\n\\n{answer.lstrip("\\n")}<|im_end|>\\n

``ResponseSplitter`` reads a response's text as it streams (and the markers a
generator sends as hidden special tokens) and says, in order, what goes where:
``Open`` (a think block begins), ``Text`` for the think block or the answer,
``Close`` (it ends). It strips what the template strips (newlines at both
ends of the reasoning, at the start of the answer) and holds back text that
may still turn out to be a marker or a stripped newline. It is a pure
function of the text: feeding the same text in any cuts gives the same
output, so a rollback replays the kept text into a fresh splitter.

Markers are recognised where a reasoning generator puts them: the opening
one only at the start of the response (after whitespace), the closing one
only inside an open block (the first one closes it). A marker anywhere else
is text, and so is everything without ``ThinkMarkers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Close", "Open", "ResponseSplitter", "Text", "ThinkMarkers"]

Channel = Literal["reasoning", "answer"]
Stream = Literal["main", "reasoning"]


@dataclass(frozen=True, slots=True)
class ThinkMarkers:
    """How a generator delimits its reasoning in its one output stream.

    ``open``/``close``: the marker strings; a marker may arrive as text (one
    token or several, e.g. DeepSeek R1 and its distills, Qwen3, QwQ write
    ``<think>`` as a token that decodes to its text) or as a special token
    that decoding hides (pass its token string, e.g. ``"[THINK]"``, and give
    the adapter generator ids). ``opened_in_prompt``: the generation prompt
    already opened the block (DeepSeek R1 distills' and QwQ's chat templates
    end with ``<think>\\n``), so the response starts inside the reasoning.
    """

    open: str = "<think>"
    close: str = "</think>"
    opened_in_prompt: bool = False

    def __post_init__(self) -> None:
        for name in ("open", "close"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or value != value.strip():
                raise ValueError(
                    f"ThinkMarkers.{name} must be a non-empty string without outer whitespace, got {value!r}"
                )
        if self.open == self.close:
            raise ValueError(f"ThinkMarkers needs two different markers, got {self.open!r} twice")


@dataclass(frozen=True, slots=True)
class Open:
    """A think block begins; its text starts at ``end`` (``start``: the marker's start)."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Text:
    """Text of the think block or the answer, at ``offset`` in the response text."""

    channel: Channel
    text: str
    offset: int


@dataclass(frozen=True, slots=True)
class Close:
    """The think block ends; ``[start, end)`` is the closing marker (empty
    when it was a hidden token, the end of a separate reasoning stream, or
    the end of the response)."""

    start: int
    end: int


Op = Open | Text | Close


class ResponseSplitter:
    """Response text in, think-block and answer text out (see the module docstring).

    Offsets index the response text as fed (``length`` characters so far).
    ``stream="reasoning"`` text is reasoning without markers (a server's
    ``reasoning_content``); it must come before any main text, and main text
    after it closes the block.
    """

    def __init__(self, markers: ThinkMarkers | None = None) -> None:
        self.markers = markers
        self.length = 0
        self.phase: Literal["start", "reasoning", "answer"] = "start"
        self.opened_by: Literal["marker", "prompt", "stream"] | None = None
        self.open_span: tuple[int, int] | None = None
        self.close_span: tuple[int, int] | None = None
        self.finished = False
        # Held for marker detection: undecided text at the start, or a tail
        # of the reasoning that may begin the closing marker.
        self.hold = ""
        self.hold_start = 0
        # The think block's text: leading newlines dropped, trailing ones held.
        self.reasoning_started = False
        self.reasoning_text_start = 0
        self.reasoning_pushed = 0
        self.newlines_held = 0
        self.newlines_start = 0
        # The answer's text: leading newlines dropped.
        self.answer_started = False
        self.answer_text_start = 0
        self.answer_pushed = 0

    # --- state ------------------------------------------------------------

    @property
    def has_block(self) -> bool:
        """Whether the response has a think block (open or closed)."""
        return self.open_span is not None

    @property
    def block_open(self) -> bool:
        return self.open_span is not None and self.close_span is None

    @property
    def held_from(self) -> int | None:
        """Offset of the first character held back here (None: nothing held)."""
        starts = []
        if self.hold:
            starts.append(self.hold_start)
        if self.newlines_held:
            starts.append(self.newlines_start)
        return min(starts) if starts else None

    def reasoning_offset(self, channel_offset: int) -> int:
        """Where a character of the think block's text (``"\\n" + reasoning +
        "\\n"`` as fed to the guard) stands in the response text; the
        template's newlines stand where the block's text begins and ends."""
        if channel_offset <= 0:
            return self.open_span[1]
        base = self.reasoning_text_start if self.reasoning_started else self.open_span[1]
        return base + min(channel_offset - 1, self.reasoning_pushed)

    def answer_offset(self, channel_offset: int) -> int:
        return (self.answer_text_start if self.answer_started else self.length) + channel_offset

    # --- input --------------------------------------------------------------

    def text(self, text: str, stream: Stream = "main") -> list[Op]:
        """Feed the next text of the response."""
        ops: list[Op] = []
        self._begin(ops)
        offset = self.length
        self.length += len(text)
        if stream == "reasoning":
            if self.phase == "answer" or (self.phase == "reasoning" and self.opened_by == "marker"):
                raise ValueError("reasoning-stream text must come before any answer text")
            if self.phase == "start":
                self._open("stream", offset, offset, ops)
            self.opened_by = "stream"
            self._reasoning(text, offset, ops)
            return ops
        if self.phase == "reasoning" and self.opened_by == "stream":
            self._close(offset, offset, ops)
        self._main(text, offset, ops)
        return ops

    def marker(self, kind: Literal["open", "close"]) -> list[Op]:
        """A marker that decoding hid (a special token), at the current offset."""
        ops: list[Op] = []
        self._begin(ops)
        if kind == "open" and self.phase == "start" and not self.hold.strip():
            self.hold = ""
            self._open("marker", self.length, self.length, ops)
        elif kind == "close" and self.phase == "reasoning" and self.opened_by != "stream":
            self._flush_hold(ops)
            self._close(self.length, self.length, ops)
        return ops

    def finish(self) -> list[Op]:
        """End of the response: decide what is held; close an open block."""
        ops: list[Op] = []
        self._begin(ops)
        if self.phase == "start":
            held, start = self.hold, self.hold_start
            self.hold = ""
            self.phase = "answer"
            self._answer(held, start, ops)
        elif self.phase == "reasoning":
            self._flush_hold(ops)
            self._close(self.length, self.length, ops)
        self.finished = True
        return ops

    # --- internals ------------------------------------------------------------

    def _begin(self, ops: list[Op]) -> None:
        if self.finished:
            raise ValueError("the response was finished")
        if self.phase == "start" and self.markers is not None and self.markers.opened_in_prompt:
            self._open("prompt", 0, 0, ops)

    def _open(self, by: Literal["marker", "prompt", "stream"], start: int, end: int, ops: list[Op]) -> None:
        self.phase = "reasoning"
        self.opened_by = by
        self.open_span = (start, end)
        ops.append(Open(start, end))

    def _close(self, start: int, end: int, ops: list[Op]) -> None:
        self.newlines_held = 0  # trailing newlines of the reasoning: stripped
        self.phase = "answer"
        self.close_span = (start, end)
        ops.append(Close(start, end))

    def _flush_hold(self, ops: list[Op]) -> None:
        if self.hold:
            held, start = self.hold, self.hold_start
            self.hold = ""
            self._reasoning(held, start, ops)

    def _main(self, text: str, offset: int, ops: list[Op]) -> None:
        if self.phase == "start" and self.markers is None:
            self.phase = "answer"
        if self.phase == "answer":
            self._answer(text, offset, ops)
            return
        if self.hold:
            text, offset = self.hold + text, self.hold_start
            self.hold = ""
        if self.phase == "start":
            marker = self.markers.open
            space = len(text) - len(text.lstrip())
            rest = text[space:]
            if rest.startswith(marker):
                end = offset + space + len(marker)
                self._open("marker", offset + space, end, ops)
                self._main(rest[len(marker) :], end, ops)
            elif marker.startswith(rest):  # whitespace, then perhaps the start of the marker
                self.hold, self.hold_start = text, offset
            else:
                self.phase = "answer"
                self._answer(text, offset, ops)
            return
        marker = self.markers.close
        found = text.find(marker)
        if found >= 0:
            self._reasoning(text[:found], offset, ops)
            end = offset + found + len(marker)
            self._close(offset + found, end, ops)
            self._answer(text[found + len(marker) :], end, ops)
            return
        # Hold the longest tail that may still become the marker.
        keep = next((size for size in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:size])), 0)
        self._reasoning(text[: len(text) - keep], offset, ops)
        if keep:
            self.hold, self.hold_start = text[len(text) - keep :], offset + len(text) - keep

    def _reasoning(self, text: str, offset: int, ops: list[Op]) -> None:
        if not self.reasoning_started:
            stripped = text.lstrip("\n")
            offset += len(text) - len(stripped)
            text = stripped
            if not text:
                return
            self.reasoning_started = True
            self.reasoning_text_start = offset
        if not text:
            return
        if self.newlines_held:
            text, offset = "\n" * self.newlines_held + text, self.newlines_start
            self.newlines_held = 0
        body = text.rstrip("\n")
        if len(body) < len(text):
            self.newlines_held, self.newlines_start = len(text) - len(body), offset + len(body)
        if body:
            ops.append(Text("reasoning", body, offset))
            self.reasoning_pushed += len(body)

    def _answer(self, text: str, offset: int, ops: list[Op]) -> None:
        if not self.answer_started:
            stripped = text.lstrip("\n")
            offset += len(text) - len(stripped)
            text = stripped
            if not text:
                return
            self.answer_started = True
            self.answer_text_start = offset
        if text:
            ops.append(Text("answer", text, offset))
            self.answer_pushed += len(text)
