"""How much text does the retokenizer hold back on real text, and what does a
run with no stable boundary cost?

1. Survey: streams real and real-looking text one character at a time through
   a StableRetokenizer with no bound, and prints the longest held text and the
   longest pre-token of each kind of text. This is what ``DEFAULT_MAX_HELD``
   (the bound past which a run is cut by force) is chosen from.
2. Long run: a 100,000-letter run with no space, pushed one character at a
   time with the default bound: cost per push in the first and last 10%, the
   number of forced cuts, and the unbounded bridge on the first few thousand
   letters of the same run (the cost it had before the bound), same run.
3. Construction: a second StableRetokenizer for the same tokenizer.

    python benchmarks/long_runs.py
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.bundled_tokenizers import qwen3_tokenizer
from adapter.retokenize import StableRetokenizer, ordinary_tokenizer
from adapter.retokenize.stable import DEFAULT_MAX_HELD
from benchmarks.corpus import mixed_text

GERMAN_COMPOUNDS = [
    "Donaudampfschifffahrtsgesellschaftskapitänsmütze",
    "Rindfleischetikettierungsüberwachungsaufgabenübertragungsgesetz",
    "Grundstücksverkehrsgenehmigungszuständigkeitsübertragungsverordnung",
    "Kraftfahrzeughaftpflichtversicherung",
    "Arbeiterunfallversicherungsgesetz",
    "Verkehrsinfrastrukturfinanzierungsgesellschaft",
    "Nahrungsmittelunverträglichkeitsdiagnostik",
]


def code_text(limit: int) -> str:
    """Python's own standard library source: real code, docstrings, URLs."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def urls_text(code: str) -> str:
    words = [word for word in code.split() if word.startswith(("http://", "https://"))]
    return "\n".join(words)


def base64_text(size: int) -> str:
    rng = random.Random(7)
    return base64.b64encode(bytes(rng.getrandbits(8) for _ in range(size))).decode()


def german_text(repeat: int) -> str:
    rng = random.Random(3)
    return " ".join(rng.choice(GERMAN_COMPOUNDS) for _ in range(repeat)) + "."


def markdown_table(columns: int) -> str:
    header = "| " + " | ".join(f"column {i}" for i in range(columns)) + " |\n"
    rule = "|" + "|".join("-" * 10 for _ in range(columns)) + "|\n"
    return header + rule + "| " + " | ".join("x" for _ in range(columns)) + " |\n"


def cjk_without_punctuation(chars: int) -> str:
    text = mixed_text(chars * 8, mix="scripts")
    return "".join(c for c in text if "\u4e00" <= c <= "\u9fff" or "\u3040" <= c <= "\u30ff")[:chars]


def survey(ordinary, name: str, text: str) -> tuple[int, int]:
    """(longest held text, longest pre-token) streaming ``text`` char by char."""
    retokenizer = StableRetokenizer(ordinary, max_held=10**9)
    longest_held = 0
    for char in text:
        retokenizer.push(char)
        longest_held = max(longest_held, len(retokenizer.held_text))
    words = ordinary.tokenizer.pre_tokenizer.pre_tokenize_str(text)
    longest_word = max((end - start for _, (start, end) in words), default=0)
    print(f"  {name:<34} {len(text):>9,} chars   longest held {longest_held:>4}   longest pre-token {longest_word:>4}")
    return longest_held, longest_word


def push_costs(ordinary, text: str, max_held: int) -> tuple[list[float], StableRetokenizer]:
    retokenizer = StableRetokenizer(ordinary, max_held=max_held)
    clock = time.perf_counter_ns
    costs = []
    for char in text:
        started = clock()
        retokenizer.push(char)
        costs.append((clock() - started) / 1000)
    return costs, retokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, default=100_000, help="letters in the long run")
    parser.add_argument("--unbounded", type=int, default=8_000, help="letters streamed without a bound")
    args = parser.parse_args()
    ordinary = ordinary_tokenizer(qwen3_tokenizer())

    print(f"1. held text and pre-tokens of real text (bound today: {DEFAULT_MAX_HELD} characters)")
    code = code_text(400_000)
    results = [
        survey(ordinary, "chat mix (benchmarks/corpus.py)", mixed_text(100_000, mix="chat")),
        survey(ordinary, "scripts mix", mixed_text(100_000, mix="scripts")),
        survey(ordinary, "Python stdlib source", code),
        survey(ordinary, "URLs from that source", urls_text(code)),
        survey(ordinary, "base64 (30 kB of random bytes)", base64_text(30_000)),
        survey(ordinary, "German compounds", german_text(500)),
        survey(ordinary, "CJK, punctuation removed", cjk_without_punctuation(3_000)),
        survey(ordinary, "Markdown table, 12 columns", markdown_table(12)),
    ]
    print(f"  longest held text over all: {max(held for held, _ in results)} characters")

    print(f"\n2. a run of {args.run:,} letters with no space, one character per push")
    run = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(args.run))
    costs, retokenizer = push_costs(ordinary, run, DEFAULT_MAX_HELD)
    tenth = len(costs) // 10
    early, late = statistics.median(costs[:tenth]), statistics.median(costs[-tenth:])
    print(
        f"  bounded ({DEFAULT_MAX_HELD}): {sum(costs) / 1e6:.2f} s in all, median µs per push first 10% {early:.1f}, "
        f"last 10% {late:.1f}: ratio {late / early:.2f}; forced cuts {retokenizer.forced_cuts}; "
        f"held at most {DEFAULT_MAX_HELD} characters"
    )
    unbounded, _ = push_costs(ordinary, run[: args.unbounded], 10**9)
    window = len(unbounded) // 10
    print(
        f"  unbounded (before the bound), first {args.unbounded:,} letters: {sum(unbounded) / 1e6:.2f} s, "
        f"median µs per push in the last 10% {statistics.median(unbounded[-window:]):.0f} "
        f"(grows with the run; the guard saw nothing of it)"
    )

    print("\n3. constructing a StableRetokenizer")
    fresh = qwen3_tokenizer.__wrapped__()  # a tokenizer object no cache has seen
    started = time.perf_counter()
    StableRetokenizer(fresh)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        StableRetokenizer(fresh)
    again = (time.perf_counter() - started) / 100
    print(f"  first for a tokenizer {first * 1e3:.0f} ms; later ones {again * 1e6:.0f} µs each")


if __name__ == "__main__":
    main()
