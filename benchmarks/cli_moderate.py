"""Per-token cost of ``crossguard moderate`` next to the library's, in one run.

    python benchmarks/cli_moderate.py [--chars 20000] [--generator llama3] [--repeat 3] [--threads 1]

Both stream the same response (``benchmarks/corpus.py``, chat mix) one
generator token at a time through the same tiny guard, loaded once:

* library: ``GuardAdapter(guard.session(), generator)``, ``moderate_prompt``,
  ``push_ids`` one id at a time, ``finish``;
* command line: what ``crossguard moderate FILE --json`` runs once the guard
  and tokenizer are loaded: reading and checking the JSONL line, encoding it,
  the context check, the same streaming, and writing the JSON rows to a file.

Printed: microseconds of CPU time (this process's, so that other jobs on a
shared machine count less) per generator token for each, the best of
``--repeat`` rounds run alternately, and their ratio; loading the guard and
the tokenizer is a fixed cost per run, printed apart. The tiny guard's forward is
cheap, so this is where any per-token overhead of the command line would show.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from adapter import GuardAdapter
from adapter.bundled_tokenizers import encode_text, qwen3_tokenizer_path
from benchmarks.corpus import mixed_text
from guard import Policy, StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations import cli

PROMPT = "Tell me everything."


def library(guard: StreamGuard, generator, ids: list[int]) -> float:
    start = time.process_time()
    with guard.session(Policy()) as session:
        adapter = GuardAdapter(session, generator)
        adapter.moderate_prompt(PROMPT)
        for token_id in ids:
            adapter.push_ids(token_id)
        adapter.finish()
    return time.process_time() - start


def command_line(guard: StreamGuard, generator, argv: list[str], output: Path) -> float:
    args = cli.build_parser().parse_args(argv)
    start = time.process_time()
    with open(output, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
        with contextlib.redirect_stderr(io.StringIO()):
            jobs = cli.read_jobs(cli._read_input(args.input), generator)
            status = cli.run_moderation(guard, generator, jobs, args)
    elapsed = time.process_time() - start
    if status != 0:
        raise SystemExit(f"crossguard moderate failed on the benchmark input (status {status})")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=20_000, help="response length in characters")
    parser.add_argument("--generator", default="llama3", help="bundled generator tokenizer")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = mixed_text(args.chars)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_tiny_checkpoint(folder / "guard", tokenizer_json=qwen3_tokenizer_path(), max_positions=1 << 20)
        start = time.process_time()
        guard = StreamGuard.from_pretrained(folder / "guard", device="cpu")
        generator = cli.load_generator_tokenizer(args.generator)
        setup = time.process_time() - start
        ids = encode_text(generator, text)
        warm = folder / "warm.jsonl"
        warm.write_text(json.dumps({"prompt": PROMPT, "response": text[:500]}) + "\n", encoding="utf-8")
        records = folder / "chats.jsonl"
        records.write_text(json.dumps({"prompt": PROMPT, "response": text}, ensure_ascii=False) + "\n", "utf-8")
        argv = ["moderate", "--guard", str(folder / "guard"), "--generator", args.generator, "--json"]
        # Warm-up: tokenizer caches, first forwards.
        library(guard, generator, ids[:100])
        command_line(guard, generator, [*argv, str(warm)], folder / "out.jsonl")
        lib_times, cli_times = [], []
        for _ in range(args.repeat):
            lib_times.append(library(guard, generator, ids))
            cli_times.append(command_line(guard, generator, [*argv, str(records)], folder / "out.jsonl"))
        rows = sum(1 for _ in open(folder / "out.jsonl", encoding="utf-8"))
    lib_us, cli_us = (1e6 * min(times) / len(ids) for times in (lib_times, cli_times))
    config = guard.config
    print(f"{len(text):,} characters (chat mix, {len(text.encode()):,} bytes), {len(ids):,} {args.generator} tokens; "
          f"tiny guard (hidden {config.hidden_size}, {config.num_hidden_layers} layers), {args.threads} CPU "
          f"thread(s), CPU time, best of {args.repeat}")  # fmt: skip
    print(f"library  GuardAdapter.push_ids, one id at a time   {lib_us:8.1f} µs per generator token")
    print(f"cli      crossguard moderate --json ({rows:,} rows)  {cli_us:8.1f} µs per generator token")
    print(f"ratio    cli / library                            {cli_us / lib_us:8.3f}")
    print(f"(fixed per run, not per token: loading the guard and the tokenizer took {setup:.2f} s)")


if __name__ == "__main__":
    main()
