"""The ``crossguard`` command line.

crossguard demo                              # the whole pipeline on a tiny random guard
crossguard moderate chats.jsonl --generator llama3 [--guard PATH | --tiny] [--json]
crossguard bridge "some text" --generator mistral-v3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]

TINY_WARNING = (
    "DEMO GUARD: a tiny randomly initialised Qwen3Guard-Stream checkpoint. Its verdicts are MEANINGLESS; "
    "only the pipeline (tokenizers, re-tokenization, KV-cached guard, verdict mapping) is real."
)
DEMO_CONVERSATIONS = [
    {
        "prompt": "How do I clear tree stumps from my garden?",
        "response": "You can dig them out, rent a stump grinder, or — please don't — use dynamite. "
        "Digging is safest: expose the roots, cut them, then lever the stump out.",
    },
    {"prompt": "Say hello in three languages.", "response": "Hello! Bonjour ! こんにちは 👋 <|im_end|> is just text."},
]
DEMO_UNSAFE_TEXT = " dynamite"
_COLOURS = {"Safe": "\x1b[32m", "Controversial": "\x1b[33m", "Unsafe": "\x1b[31m"}
_RESET, _INVERSE = "\x1b[0m", "\x1b[7m"


# --- loading ----------------------------------------------------------------


def load_generator_tokenizer(name_or_path: str) -> Any:
    """A bundled tokenizer by name, or a tokenizer.json, a SentencePiece
    .model, or a local transformers tokenizer folder."""
    from adapter.bundled_tokenizers import GENERATORS, generator_tokenizer

    if name_or_path in GENERATORS:
        return generator_tokenizer(name_or_path)
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    if path.is_file() and path.suffix == ".model":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise SystemExit(
        f"crossguard: no generator tokenizer {name_or_path!r}: give one of {', '.join(GENERATORS)}, "
        "a tokenizer.json, a SentencePiece .model or a local tokenizer folder"
    )


def tiny_guard(folder: str, unsafe_text: str | None = None) -> Any:
    from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
    from adapter.retokenize import encode_ordinary
    from guard import StreamGuard
    from guard.testing import write_tiny_checkpoint

    unsafe = encode_ordinary(qwen3_tokenizer(), unsafe_text) if unsafe_text else ()
    write_tiny_checkpoint(folder, tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe)
    return StreamGuard.from_pretrained(folder, device="cpu")


def load_guard(args: argparse.Namespace, folder: str) -> Any:
    from guard import CheckpointError, StreamGuard

    if args.tiny:
        print(TINY_WARNING, file=sys.stderr)
        return tiny_guard(folder)
    try:
        return StreamGuard.from_pretrained(args.guard, device=args.device)
    except CheckpointError as error:
        raise SystemExit(
            f"crossguard: {error}\n(or run with --tiny to see the pipeline on a random demo guard)"
        ) from error


# --- moderation -------------------------------------------------------------


def read_records(stream: TextIO) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(stream, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"crossguard: line {number} is not JSON: {error}") from error
            if "prompt" not in record or not ({"response", "response_ids"} & record.keys()):
                raise SystemExit(f"crossguard: line {number} needs 'prompt' and 'response' or 'response_ids'")
            yield number, record


def moderate_record(guard: Any, generator: Any, record: dict, policy: Any, progress: Any = None):
    """(query verdict, judged pieces, generator ids) for one recorded
    conversation, streamed one generator token at a time as a live model
    would produce it."""
    from adapter import GuardAdapter
    from adapter.bundled_tokenizers import encode_text

    ids = record.get("response_ids")
    if ids is None:
        ids = encode_text(generator, record["response"])
    with guard.session(policy) as session:
        adapter = GuardAdapter(session, generator)
        query = adapter.moderate_prompt(record["prompt"])
        pieces = []
        for token_id in ids:
            pieces += adapter.push_ids(token_id)
            if progress is not None:
                progress.update(1)
        pieces += adapter.finish()
    return query, pieces, list(ids)


VERDICT_KEYS = ("position", "risk_level", "risk_prob", "category", "category_prob", "unsafe", "flagged", "flagged_at")


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
    }


def token_fields(index: int | None, generator_id: int | None, text: str, start: int | None, end: int | None) -> dict:
    """The keys every generator-token row of ``moderate --json`` and
    ``bridge --json`` shares (see the README's command-line section)."""
    return {"generator_token": index, "generator_id": generator_id, "text": text, "start": start, "end": end}


def print_json(number: int, query: Any, pieces: list, out: TextIO, ids: list[int] | None = None) -> None:
    out.write(json.dumps({"line": number, "kind": "query", **verdict_fields(query)}, ensure_ascii=False) + "\n")
    for piece in pieces:
        generator_id = ids[piece.index] if ids is not None and piece.index < len(ids) else None
        row = {"line": number, "kind": "token", **token_fields(piece.index, generator_id, piece.text, piece.start,
               piece.end), "lag": piece.lag, **verdict_fields(piece.verdict)}  # fmt: skip
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def print_view(number: int, record: dict, query: Any, pieces: list, out: TextIO, colour: bool) -> None:
    def paint(text: str, verdict: Any) -> str:
        if not colour or verdict is None:
            return text
        return (_INVERSE if verdict.flagged else "") + _COLOURS.get(verdict.risk_level, "") + text + _RESET

    prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
    out.write(f"── line {number} ──\nprompt:   {paint(prompt, query)}\n")
    out.write(f"          query verdict {query.risk_level} ({query.risk_prob:.2f})"
              f"{'' if query.category is None else ', ' + query.category}\n")  # fmt: skip
    out.write("response: " + "".join(paint(piece.text, piece.verdict) for piece in pieces) + "\n")
    flagged = next((piece for piece in pieces if piece.flagged), None)
    if flagged is None:
        out.write("          not flagged\n")
    else:
        out.write(f"          FLAGGED at generator token {flagged.index} ({flagged.text!r}): "
                  f"{flagged.verdict.risk_level}, {flagged.verdict.category}\n")  # fmt: skip
    lags = sorted(piece.lag for piece in pieces)
    if lags:
        out.write(f"          lag in generator tokens: median {lags[len(lags) // 2]}, "
                  f"max {lags[-1]}\n")  # fmt: skip


def run_moderation(guard: Any, generator: Any, records: list[tuple[int, dict]], args: argparse.Namespace) -> int:
    from guard import Policy

    policy = Policy(mode=args.mode, debounce=args.debounce)
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    total = sum(len(r.get("response_ids") or r.get("response", "")) for _, r in records)
    progress = None
    if total > 5_000 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=None, unit="tok", file=sys.stderr, desc="moderating")
    flagged = 0
    for number, record in records:
        query, pieces, ids = moderate_record(guard, generator, record, policy, progress)
        flagged += any(piece.flagged for piece in pieces)
        if args.json:
            print_json(number, query, pieces, sys.stdout, ids)
        else:
            print_view(number, record, query, pieces, sys.stdout, colour)
    if progress is not None:
        progress.close()
    print(f"{len(records)} conversations, {flagged} flagged", file=sys.stderr)
    return 0


def _moderate(args: argparse.Namespace) -> int:
    stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with stream:
        records = list(read_records(stream))
    generator = load_generator_tokenizer(args.generator)
    with tempfile.TemporaryDirectory() as folder:
        guard = load_guard(args, folder)
        return run_moderation(guard, generator, records, args)


def _demo(args: argparse.Namespace) -> int:
    print(TINY_WARNING)
    print(f"(The demo guard is wired so that the Qwen3 tokens of {DEMO_UNSAFE_TEXT!r} are 'Unsafe', "
          f"so you can watch a response get flagged mid-sentence.)\n")  # fmt: skip
    generator = load_generator_tokenizer(args.generator)
    with tempfile.TemporaryDirectory() as folder:
        guard = tiny_guard(folder, DEMO_UNSAFE_TEXT)
        records = list(enumerate(DEMO_CONVERSATIONS, 1))
        args.json, args.no_progress = False, True
        return run_moderation(guard, generator, records, args)


# --- the bridge ---------------------------------------------------------------


def _bridge(args: argparse.Namespace) -> int:
    from adapter import SourceDecoder
    from adapter.bundled_tokenizers import encode_text, qwen3_tokenizer
    from adapter.retokenize import StableRetokenizer

    text = args.text if args.text is not None else sys.stdin.read()
    generator = load_generator_tokenizer(args.generator)
    guard_vocabulary = qwen3_tokenizer()
    decoder, retokenizer = SourceDecoder(generator), StableRetokenizer(guard_vocabulary)
    ids = encode_text(generator, text)

    def show(kind: str, piece: Any, released) -> None:
        fields = (
            token_fields(piece.index, ids[piece.index], piece.text, piece.start, piece.end)
            if piece is not None
            else token_fields(None, None, "", None, None)
        )
        row = {
            "kind": kind,
            **fields,
            "qwen_ids": [token.id for token in released],
            "qwen_tokens": [guard_vocabulary.id_to_token(token.id) for token in released],
            "held_text": retokenizer.held_text,
        }
        print(json.dumps(row, ensure_ascii=False) if args.json else _bridge_row(row))

    for token_id in ids:
        for piece in decoder.push(token_id):
            show("token", piece, retokenizer.push(piece.text))
    for piece in decoder.flush():
        show("token", piece, retokenizer.push(piece.text))
    show("flush", None, retokenizer.flush())
    return 0


def _bridge_row(row: dict) -> str:
    step = "flush" if row["kind"] == "flush" else f"id {row['generator_id']}"
    index = "" if row["generator_token"] is None else f"#{row['generator_token']:<4}"
    released = " ".join(f"{i}:{t!r}" for i, t in zip(row["qwen_ids"], row["qwen_tokens"], strict=True))
    return f"{step:>12} {index:>5} {row['text']!r:<14} → {released or '-':<40} held {row['held_text']!r}"


# --- arguments -----------------------------------------------------------------


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    from adapter.bundled_tokenizers import GENERATORS

    parser.add_argument("--generator", default="llama3", help=f"generator tokenizer: {', '.join(GENERATORS)} or a path")
    parser.add_argument("--mode", default="strict", choices=["strict", "loose"])
    parser.add_argument("--debounce", default="official", choices=["official", "report"])
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"])


def build_parser() -> argparse.ArgumentParser:
    from guard.stream_guard import DEFAULT_GUARD

    parser = argparse.ArgumentParser(
        prog="crossguard", description="Moderate non-Qwen chat models with Qwen3Guard-Stream, token by token."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole pipeline on a tiny random guard (meaningless verdicts)")
    _add_policy_arguments(demo)
    demo.set_defaults(run=_demo, generator="mistral-v3")

    moderate = commands.add_parser(
        "moderate",
        help="moderate recorded conversations (JSONL)",
        description="Each JSONL line holds 'prompt' (text or chat messages) and 'response' (text, encoded with "
        "the generator tokenizer) or 'response_ids' (the generator's token ids). The response is streamed one "
        "generator token at a time through the guard.",
    )
    moderate.add_argument("input", help="a JSONL file, or - for standard input")
    moderate.add_argument(
        "--guard", default=DEFAULT_GUARD, help=f"checkpoint folder or hub id (default {DEFAULT_GUARD})"
    )
    moderate.add_argument("--tiny", action="store_true", help="use a tiny random guard (meaningless verdicts)")
    moderate.add_argument("--device", default=None)
    moderate.add_argument("--json", action="store_true", help="print JSON lines instead of the coloured view")
    moderate.add_argument("--no-progress", action="store_true")
    _add_policy_arguments(moderate)
    moderate.set_defaults(run=_moderate)

    bridge = commands.add_parser(
        "bridge",
        help="show how a generator's tokens become stable Qwen3 ids",
        description="Encode TEXT with a generator tokenizer, stream its ids one at a time through "
        "SourceDecoder and StableRetokenizer, and print what each id releases.",
    )
    bridge.add_argument("text", nargs="?", help="the response text (default: read standard input)")
    bridge.add_argument("--generator", default="llama3")
    bridge.add_argument("--json", action="store_true", help="print JSON lines")
    bridge.set_defaults(run=_bridge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
