"""One small exception hierarchy for the tokenizer bridge.

Every error says what went wrong and what to do about it; none leaves the
object that raised it in a changed state.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "RollbackError",
    "StreamFinishedError",
    "TokenIdError",
    "UnsupportedTokenizerError",
]


class AdapterError(Exception):
    """Base class of every error raised by ``adapter``."""


class UnsupportedTokenizerError(AdapterError, TypeError):
    """The tokenizer's pipeline is not one whose stability rules we know."""


class TokenIdError(AdapterError, ValueError):
    """A generator token id is outside the tokenizer's vocabulary."""


class StreamFinishedError(AdapterError, RuntimeError):
    """``push`` after ``flush``/``finish``; roll back or start a new stream."""


class RollbackError(AdapterError, ValueError):
    """A rollback target outside what the stream holds."""
