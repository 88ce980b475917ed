"""The text a tool sees in its call's arguments, for the guard to judge.

Tool-call arguments stream as raw JSON text (``{"q": "use \\u0064ynamite"}``),
and the tool runs on the decoded string values (``use dynamite``). Judging the
raw text would let escapes hide words from the guard, whole or split across
deltas (``\\u00`` | ``64ynamite``). ``ArgumentsText`` turns raw deltas into the
same JSON with every escape inside strings undone, as they arrive:

    text = ArgumentsText()
    text.push('{"q": "use \\\\u00')      # '{"q": "use '   (an escape still open: held)
    text.push('64ynamite"}')            # 'dynamite"}'
    text.finish()                       # ''

The structure (braces, keys, numbers) stays, so the guard reads the call as a
tool does. Escapes are undone wherever they stand: in valid JSON only strings
hold them, and in broken arguments (a model can write those) a lenient parser
might read them too, so the guard reads them decoded. Anything else passes as
it came. A surrogate pair escape becomes its character; a lone surrogate
becomes U+FFFD (the guard reads text).
"""

from __future__ import annotations

import re

__all__ = ["ArgumentsText", "arguments_text"]

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")


class ArgumentsText:
    """Incremental: ``push(raw)`` returns the decoded text that no later delta
    can change (an escape that is not complete yet waits), ``finish()`` the
    rest. For every way of cutting a text, the pushes and the finish join to
    ``arguments_text(text)``."""

    __slots__ = ("_pending", "_surrogate")

    def __init__(self) -> None:
        self._pending = ""  # an escape not complete yet (starts with a backslash)
        self._surrogate = ""  # a high surrogate waiting for its low half

    def push(self, raw: str) -> str:
        out: list[str] = []
        text = self._pending + raw
        self._pending = ""
        position = 0
        while position < len(text):
            at = text.find("\\", position)
            if at < 0:
                out.append(self._flush_surrogate() + text[position:])
                break
            if at > position:
                out.append(self._flush_surrogate() + text[position:at])
            escape = self._escape(text, at)
            if escape is None:  # not complete yet: wait for the next delta
                self._pending = text[at:]
                break
            decoded, position = escape
            out.append(decoded)
        return "".join(out)

    def finish(self) -> str:
        """The end of the arguments: an escape left open is text as it came."""
        rest, self._pending = self._pending, ""
        return self._flush_surrogate() + rest

    def _escape(self, text: str, at: int) -> tuple[str, int] | None:
        """(decoded text, position after the escape), or None if it may not be complete yet."""
        if at + 1 >= len(text):
            return None
        kind = text[at + 1]
        if kind != "u":
            simple = _SIMPLE_ESCAPES.get(kind)
            # An unknown escape is not JSON: the guard reads it as it came.
            return self._flush_surrogate() + (simple if simple is not None else text[at : at + 2]), at + 2
        digits = text[at + 2 : at + 6]
        if len(digits) < 4 and all(c in "0123456789abcdefABCDEF" for c in digits):
            return None
        if not _HEX4.fullmatch(digits):
            return self._flush_surrogate() + text[at : at + 2], at + 2
        code = int(digits, 16)
        if 0xD800 <= code <= 0xDBFF:
            held, self._surrogate = self._flush_surrogate(), chr(code)
            return held, at + 6
        if 0xDC00 <= code <= 0xDFFF and self._surrogate:
            pair = (self._surrogate + chr(code)).encode("utf-16-le", "surrogatepass").decode("utf-16-le")
            self._surrogate = ""
            return pair, at + 6
        return self._flush_surrogate() + ("\ufffd" if 0xDC00 <= code <= 0xDFFF else chr(code)), at + 6

    def _flush_surrogate(self) -> str:
        if not self._surrogate:
            return ""
        self._surrogate = ""
        return "\ufffd"


def arguments_text(raw: str) -> str:
    """The text a tool sees in ``raw`` arguments (``ArgumentsText`` all at once)."""
    decoder = ArgumentsText()
    return decoder.push(raw) + decoder.finish()
