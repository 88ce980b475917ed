"""Verdict lag per generator tokenizer: how many generator tokens after a
token its verdict comes (the guard must wait until the text it judges is
final, see StableRetokenizer).

    python benchmarks/lag.py [--chars 10000]

The lag depends on tokenization only, not on the guard's weights, so a tiny
random guard is used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter import GuardAdapter
from adapter.bundled_tokenizers import GENERATORS, encode_text, generator_tokenizer, qwen3_tokenizer_path
from benchmarks.corpus import MIXES, mixed_text
from guard import StreamGuard
from guard.testing import write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=10_000)
    parser.add_argument("--mix", default="chat", choices=sorted(MIXES))
    args = parser.parse_args()
    text = mixed_text(args.chars, mix=args.mix)
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_checkpoint(folder, tokenizer_json=qwen3_tokenizer_path())
        guard = StreamGuard.from_pretrained(folder, device="cpu")
    print(f"{len(text):,} characters, {args.mix} mix")
    print(f"{'generator':<15}{'tokens':>8}{'median lag':>12}{'mean':>7}{'max':>5}  lag histogram (0, 1, 2, ...)")
    for name in sorted(GENERATORS):
        generator = generator_tokenizer(name)
        ids = encode_text(generator, text)
        adapter = GuardAdapter(guard.session(), generator)
        adapter.moderate_prompt("Tell me everything.")
        lags = [piece.lag for token_id in ids for piece in adapter.push_ids(token_id)]
        lags += [piece.lag for piece in adapter.finish()]
        counts = Counter(lags)
        histogram = " ".join(str(counts.get(lag, 0)) for lag in range(max(lags) + 1))
        print(f"{name:<15}{len(ids):>8}{statistics.median(lags):>12.0f}{statistics.fmean(lags):>7.2f}{max(lags):>5}  "
              f"{histogram}")  # fmt: skip


if __name__ == "__main__":
    main()
