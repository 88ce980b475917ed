"""What more than one integration needs: loading a generator tokenizer by name
or path, and a verdict as JSON fields.

The command line and the gateway both use these; they live here, below both,
so that neither imports the other to get them (the CLI starts the gateway,
the gateway never imports the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["VERDICT_KEYS", "SetupError", "load_generator_tokenizer", "one_line", "verdict_fields"]


class SetupError(Exception):
    """The run cannot start (one sentence for the user; exit status 2)."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def load_generator_tokenizer(name_or_path: str) -> Any:
    """A bundled tokenizer by name, or a tokenizer.json, a SentencePiece
    .model, or a local transformers tokenizer folder."""
    from adapter.bundled_tokenizers import GENERATORS, generator_tokenizer

    path = Path(name_or_path)
    try:
        if name_or_path in GENERATORS:
            return generator_tokenizer(name_or_path)
        if path.is_file() and path.suffix == ".json":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path))
        if path.is_file() and path.suffix == ".model":
            try:
                import sentencepiece
            except ImportError as error:
                from integrations.extras import install_hint

                raise SetupError(f"{name_or_path} is a SentencePiece model: {install_hint('sentencepiece')}") from error

            return sentencepiece.SentencePieceProcessor(model_file=str(path))
        if path.is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except SetupError:
        raise
    except Exception as error:  # tokenizers and sentencepiece raise bare exceptions for damaged files
        raise SetupError(f"could not load the generator tokenizer {name_or_path!r}: {one_line(error)}") from error
    raise SetupError(
        f"no generator tokenizer {name_or_path!r}: give one of {', '.join(GENERATORS)}, "
        "a tokenizer.json, a SentencePiece .model or a local tokenizer folder"
    )


VERDICT_KEYS = (
    "position", "risk_level", "risk_prob", "category", "category_prob", "unsafe", "flagged", "flagged_at",
    "past_trained_length",
)  # fmt: skip


def verdict_fields(verdict: Any) -> dict:
    """The verdict keys of a JSON row: every key always present, all null
    when there is no verdict (a token with no text before any guard token)."""
    if verdict is None:
        return dict.fromkeys(VERDICT_KEYS)
    return {
        "position": verdict.position,
        "risk_level": verdict.risk_level,
        "risk_prob": round(verdict.risk_prob, 4),
        "category": verdict.category,
        "category_prob": None if verdict.category_prob is None else round(verdict.category_prob, 4),
        "unsafe": verdict.unsafe,
        "flagged": verdict.flagged,
        "flagged_at": getattr(verdict, "flagged_at", None),
        "past_trained_length": getattr(verdict, "past_trained_length", False),
    }
