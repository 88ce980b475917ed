"""The ``crossguard`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _bridge(args: argparse.Namespace) -> int:
    from adapter import SourceDecoder
    from adapter.bundled_tokenizers import generator_tokenizer, qwen3_tokenizer
    from adapter.retokenize import StableRetokenizer

    text = args.text if args.text is not None else sys.stdin.read()
    generator = generator_tokenizer(args.generator)
    guard_vocabulary = qwen3_tokenizer()
    if hasattr(generator, "is_byte"):
        ids = generator.encode(text)
    elif hasattr(generator, "backend_tokenizer"):
        ids = generator.encode(text, add_special_tokens=False)
    else:
        ids = generator.encode(text, add_special_tokens=False).ids
    decoder, retokenizer = SourceDecoder(generator), StableRetokenizer(guard_vocabulary)

    def show(source: str, index: int | None, piece_text: str, released) -> None:
        row = {
            "step": source,
            "generator_token": index,
            "text": piece_text,
            "qwen_ids": [token.id for token in released],
            "qwen_tokens": [guard_vocabulary.id_to_token(token.id) for token in released],
            "held_text": retokenizer.held_text,
        }
        print(json.dumps(row, ensure_ascii=False) if args.json else _human(row))

    for token_id in ids:
        for piece in decoder.push(token_id):
            show(f"id {token_id}", piece.index, piece.text, retokenizer.push(piece.text))
    for piece in decoder.flush():
        show("end of ids", piece.index, piece.text, retokenizer.push(piece.text))
    show("flush", None, "", retokenizer.flush())
    return 0


def _human(row: dict) -> str:
    index = "" if row["generator_token"] is None else f"#{row['generator_token']:<4}"
    released = " ".join(f"{i}:{t!r}" for i, t in zip(row["qwen_ids"], row["qwen_tokens"], strict=True))
    return f"{row['step']:>12} {index:>5} {row['text']!r:<14} → {released or '-':<40} held {row['held_text']!r}"


def build_parser() -> argparse.ArgumentParser:
    from adapter.bundled_tokenizers import GENERATORS

    parser = argparse.ArgumentParser(
        prog="crossguard",
        description="Moderate non-Qwen chat models with Qwen3Guard-Stream, token by token.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bridge = commands.add_parser(
        "bridge",
        help="show how a generator's tokens become stable Qwen3 ids",
        description="Encode TEXT with a real generator tokenizer, stream its ids one at a time through "
        "SourceDecoder and StableRetokenizer, and print what each id releases.",
    )
    bridge.add_argument("text", nargs="?", help="the response text (default: read standard input)")
    bridge.add_argument("--generator", default="llama3", choices=sorted(GENERATORS))
    bridge.add_argument("--json", action="store_true", help="print JSON lines")
    bridge.set_defaults(run=_bridge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
