"""Benchmark the tokenizer bridge: generator ids → SourceDecoder → StableRetokenizer.

Streams a long mixed-script text one generator token at a time and prints
the cost per generator token (and whether it stays flat as the text grows),
the speed-up over a naive bridge that re-decodes and re-encodes everything at
every step (measured in the same run, on the same machine), how many Qwen ids
are held back against the unavoidable minimum, and peak memory.

    python benchmarks/bridge.py                    # llama3, 100,000 characters
    python benchmarks/bridge.py --generator mistral-v3 --chars 200000
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter import SourceDecoder
from adapter.bundled_tokenizers import GENERATORS, decode_ids, encode_text, generator_tokenizer, qwen3_tokenizer
from adapter.retokenize import StableRetokenizer, encode_ordinary, ordinary_tokenizer
from benchmarks.corpus import MIXES, mixed_text


def last_pre_token_ids(ordinary, held_text: str) -> int:
    """Tokens of the last pre-token of the text so far: some continuation can
    always change them, so no bridge can emit them early. The held text starts
    on a pre-token boundary, so its last pre-token is the text's."""
    encoding = ordinary.tokenizer.encode(held_text, add_special_tokens=False)
    words = encoding.word_ids
    return sum(1 for word in words if word == words[-1]) if words else 0


def stream(generator, ordinary, ids: list[int], *, measure: bool):
    """Push ids one at a time; return (µs per id, text length after each id,
    held ids after each id, minimum after each id, ids out)."""
    decoder, retokenizer = SourceDecoder(generator), StableRetokenizer(ordinary)
    costs, lengths, held, minimum, out = [], [], [], [], []
    clock = time.perf_counter_ns
    for token_id in ids:
        started = clock()
        for piece in decoder.push(token_id):
            out += retokenizer.push(piece.text)
        costs.append((clock() - started) / 1000)
        if measure:  # outside the timed region
            lengths.append(retokenizer.text_length)
            held.append(len(retokenizer.held_ids()))
            minimum.append(last_pre_token_ids(ordinary, retokenizer.held_text))
    for piece in decoder.flush():
        out += retokenizer.push(piece.text)
    out += retokenizer.flush()
    return costs, lengths, held, minimum, [token.id for token in out]


def naive_costs(generator, ordinary, ids: list[int], up_to_chars: int) -> tuple[list[float], list[int]]:
    """The naive bridge: at every step decode all ids so far and re-encode all
    the text (what upstream-style code does); stops at ``up_to_chars``."""
    costs, lengths = [], []
    clock = time.perf_counter_ns
    for step in range(1, len(ids) + 1):
        started = clock()
        text = decode_ids(generator, ids[:step])
        encode_ordinary(ordinary, text)
        costs.append((clock() - started) / 1000)
        lengths.append(len(text))
        if len(text) >= up_to_chars:
            break
    return costs, lengths


def window(values: list[float], lengths: list[int], low: int, high: int) -> list[float]:
    return [value for value, length in zip(values, lengths, strict=False) if low <= length < high]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="llama3", choices=sorted(GENERATORS))
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--mix", default="chat", choices=sorted(MIXES), help="see benchmarks/corpus.py")
    parser.add_argument("--naive-chars", type=int, default=12_000, help="where the naive baseline stops")
    args = parser.parse_args()

    generator = generator_tokenizer(args.generator)
    ordinary = ordinary_tokenizer(qwen3_tokenizer())
    text = mixed_text(args.chars, mix=args.mix)
    ids = encode_text(generator, text)
    response = decode_ids(generator, ids)
    print(f"generator {args.generator}, {args.mix} mix: {len(text):,} characters, {len(ids):,} generator tokens")

    stream(generator, ordinary, ids[:2000], measure=False)  # warm caches
    costs, _, _, _, out = stream(generator, ordinary, ids, measure=False)
    assert out == encode_ordinary(ordinary, response), "bridge output differs from encode_ordinary"
    _, lengths, held, minimum, _ = stream(generator, ordinary, ids, measure=True)
    naive, naive_lengths = naive_costs(generator, ordinary, ids, args.naive_chars)

    median = statistics.median(costs)
    early = statistics.median(window(costs, lengths, 0, len(response) // 10))
    late = statistics.median(window(costs, lengths, len(response) * 9 // 10, len(response) + 1))
    near = (args.naive_chars * 9 // 10, args.naive_chars + 1)
    ours_there = statistics.median(window(costs, lengths, *near))
    naive_there = statistics.median(window(naive, naive_lengths, *near))
    print(f"bridge, µs per generator token (median): {median:.1f}")
    print(f"  first 10% of the text {early:.1f}, last 10% {late:.1f}: ratio {late / early:.2f} (flat = 1)")
    print(
        f"naive re-decode + re-encode at ~{args.naive_chars:,} characters: {naive_there:.0f} µs per token, "
        f"bridge {ours_there:.1f} µs: {naive_there / ours_there:.0f}x faster"
    )
    mean_held, mean_min = statistics.fmean(held), statistics.fmean(minimum)
    print(
        f"Qwen ids held back: mean {mean_held:.3f}, max {max(held)}; unavoidable minimum (last pre-token): "
        f"mean {mean_min:.3f}, max {max(minimum)}; excess {100 * (mean_held / mean_min - 1):+.1f}%"
    )

    gc.collect()
    tracemalloc.start()
    decoder, retokenizer = SourceDecoder(generator), StableRetokenizer(ordinary)
    for token_id in ids:
        for piece in decoder.push(token_id):
            retokenizer.push(piece.text)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"peak memory while streaming: {peak / 1e6:.2f} MB = {peak / len(ids):.0f} bytes per generator token "
        f"(rollback records, pushed text and ids; the text itself is {len(response.encode()) / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()
