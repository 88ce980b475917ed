"""The bridge from a generator's tokens to the guard's vocabulary.

``SourceDecoder`` turns generator ids into text with exact spans;
``adapter.retokenize`` turns that text into stable Qwen3 ids.
"""

from adapter.errors import (
    AdapterError,
    RollbackError,
    StreamFinishedError,
    TokenIdError,
    UnsupportedTokenizerError,
)
from adapter.guard_adapter import Flag, GuardAdapter, JudgedPiece
from adapter.reasoning import ThinkMarkers
from adapter.source import SourceDecoder, SourcePiece

__all__ = [
    "AdapterError",
    "Flag",
    "GuardAdapter",
    "JudgedPiece",
    "RollbackError",
    "SourceDecoder",
    "SourcePiece",
    "StreamFinishedError",
    "ThinkMarkers",
    "TokenIdError",
    "UnsupportedTokenizerError",
]
