"""The reference encoding of plain text: no added-token matching at all.

Generated text is ordinary text to the guard. If ``<|im_end|>`` in a response
became the control token, the generator could close the guard's turn; so we
drop every added token (special or not) from a private copy of the tokenizer
and keep its normalizer, pre-tokenizer and model exactly as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from adapter.errors import UnsupportedTokenizerError

__all__ = ["OrdinaryTokenizer", "cached_ordinary_tokenizer", "encode_ordinary", "ordinary_tokenizer"]

# The GPT-4-style pre-tokenizer patterns whose stability rules
# boundaries.stable_word_count proves, keyed by the longest digit run they
# match as one pre-token.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = _QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_MAX_DIGITS_BY_PATTERN = {_QWEN2_PATTERN: 1, _LLAMA3_PATTERN: 3}
_SUPPORTED = (
    "a byte-level BPE tokenizer whose pre-tokenizer is Split(<the Qwen2/Qwen3 or "
    "Llama 3 pattern>, 'Isolated') followed by ByteLevel(use_regex=False), with no "
    "normalizer or an NFC one (the Qwen3 tokenizer of Qwen3Guard-Stream is one)"
)


@dataclass(frozen=True, slots=True)
class OrdinaryTokenizer:
    """A tokenizer stripped of added tokens, plus what its pipeline implies."""

    tokenizer: Tokenizer
    normalizes_nfc: bool
    max_digits: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _backend(tokenizer: Any) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise UnsupportedTokenizerError(
        f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got "
        f"{type(tokenizer).__name__}; load the guard's tokenizer.json with "
        "tokenizers.Tokenizer.from_file(...)"
    )


def _normalizes_nfc(spec: dict[str, Any] | None) -> bool:
    if spec is None or (spec["type"] == "Sequence" and not spec["normalizers"]):
        return False
    if spec["type"] == "NFC":
        return True
    raise UnsupportedTokenizerError(f"normalizer {spec['type']} is not supported; need {_SUPPORTED}")


def _max_digits(spec: dict[str, Any] | None) -> int:
    steps = spec.get("pretokenizers", []) if spec and spec["type"] == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0]["type"] == "Split"
        and steps[0]["behavior"] == "Isolated"
        and not steps[0]["invert"]
        and steps[0]["pattern"].get("Regex") in _MAX_DIGITS_BY_PATTERN
        and steps[1]["type"] == "ByteLevel"
        and not steps[1]["use_regex"]
        and not steps[1]["add_prefix_space"]
    ):
        return _MAX_DIGITS_BY_PATTERN[steps[0]["pattern"]["Regex"]]
    raise UnsupportedTokenizerError(f"pre-tokenizer {json.dumps(spec)[:200]} is not supported; need {_SUPPORTED}")


def ordinary_tokenizer(tokenizer: Any) -> OrdinaryTokenizer:
    """Build the added-token-free copy of ``tokenizer`` (slow: do it once)."""
    spec = json.loads(_backend(tokenizer).to_str())
    if spec["model"]["type"] != "BPE":
        raise UnsupportedTokenizerError(f"model {spec['model']['type']} is not supported; need {_SUPPORTED}")
    normalizes_nfc = _normalizes_nfc(spec["normalizer"])
    max_digits = _max_digits(spec["pre_tokenizer"])
    spec["added_tokens"] = []
    # Offsets must stay raw character offsets and nothing may be cut or padded.
    spec["post_processor"] = None
    spec["truncation"] = None
    spec["padding"] = None
    return OrdinaryTokenizer(Tokenizer.from_str(json.dumps(spec)), normalizes_nfc, max_digits)


# Building the copy costs far more than encoding (a JSON round trip of the
# whole vocabulary), so keep the last few copies, with their originals, which
# keeps the id() keys valid.
_CACHE: dict[int, tuple[Any, OrdinaryTokenizer]] = {}
_CACHE_SIZE = 4


def cached_ordinary_tokenizer(tokenizer: Any) -> OrdinaryTokenizer:
    """``ordinary_tokenizer(tokenizer)``, built once per tokenizer object."""
    if isinstance(tokenizer, OrdinaryTokenizer):
        return tokenizer
    cached = _CACHE.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        cached = (tokenizer, ordinary_tokenizer(tokenizer))
        _CACHE[id(tokenizer)] = cached
    return cached[1]


def encode_ordinary(tokenizer: Any, text: str) -> list[int]:
    """``text`` in ``tokenizer``'s vocabulary as plain text: added-token strings
    such as ``<|im_end|>`` or ``<think>`` come out as ordinary BPE tokens.

    Equals ``tokenizer.encode(text, add_special_tokens=False).ids`` whenever the
    text contains no added-token string.
    """
    return cached_ordinary_tokenizer(tokenizer).encode(text)
