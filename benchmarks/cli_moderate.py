"""Per-token cost of ``crossguard moderate`` next to the library's, in one run;
or, with ``--concurrency N``, its wall time with ``--concurrency N`` against
``--concurrency 1``.

    python benchmarks/cli_moderate.py [--chars 20000] [--generator llama3] [--repeat 3] [--threads 1]
    python benchmarks/cli_moderate.py --concurrency 16 [--conversations 64] [--chars 300] [--quick]

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

``--concurrency N``: what ``crossguard moderate FILE --json --concurrency N``
runs once the guard is loaded, on ``--conversations`` lines (each a prompt and
a ``--chars``-character response, cut from the chat mix at different places),
with the realistic-width guard of ``benchmarks/guard_session.py`` (hidden
1024, the real vocabulary, 2 layers), where one forward is costly enough for
batching to matter; against ``--concurrency 1`` (one session at a time), in
the same run. Printed: wall seconds and generator tokens per second of each,
and the speed-up; both outputs must hold the same verdicts.
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


def concurrency(args: argparse.Namespace) -> None:
    """Wall time of ``crossguard moderate --concurrency N`` against ``--concurrency 1``."""
    from benchmarks.guard_session import realistic_width_guard

    guard = realistic_width_guard(2, "cuda" if torch.cuda.is_available() else "cpu", "float32")
    generator = cli.load_generator_tokenizer(args.generator)
    text = mixed_text(args.chars * (args.conversations + 1))
    step = max(1, (len(text) - args.chars) // args.conversations)
    records = [
        {"prompt": f"{PROMPT} ({n})", "response": text[n * step : n * step + args.chars]}
        for n in range(args.conversations)
    ]
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    tokens = sum(len(encode_text(generator, record["response"])) for record in records)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        chats, warm = folder / "chats.jsonl", folder / "warm.jsonl"
        chats.write_text("\n".join(lines) + "\n", encoding="utf-8")
        short = [{**record, "response": record["response"][:50]} for record in records[: args.concurrency]]
        warm.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in short), encoding="utf-8")
        argv = ["moderate", "--guard", "unused", "--generator", args.generator, "--json", "--concurrency"]
        seconds, outputs = {}, {}
        for level in (1, args.concurrency):  # warm-up: allocator, first forwards
            command_line(guard, generator, [*argv, str(level), str(warm)], folder / "out.jsonl")
        for level in (1, args.concurrency):
            output = folder / f"out-{level}.jsonl"
            start = time.perf_counter()
            command_line(guard, generator, [*argv, str(level), str(chats)], output)
            seconds[level] = time.perf_counter() - start
            outputs[level] = [json.loads(row) for row in output.read_text(encoding="utf-8").splitlines()]
    rows = outputs[1]
    same = len(rows) == len(outputs[args.concurrency]) and all(
        _without_probabilities(a) == _without_probabilities(b)
        for a, b in zip(rows, outputs[args.concurrency], strict=True)
    )
    print(f"{args.conversations} conversations of {args.chars} characters ({tokens:,} {args.generator} tokens); "
          f"realistic-width guard (hidden 1024, 2 layers, fp32) on {guard.device}, {torch.get_num_threads()} "
          "torch threads, wall time")  # fmt: skip
    for level in (1, args.concurrency):
        print(f"crossguard moderate --concurrency {level:<3} {seconds[level]:8.2f} s  "
              f"{tokens / seconds[level]:8.1f} generator tokens/s")  # fmt: skip
    speedup = seconds[1] / seconds[args.concurrency]
    print(f"speed-up  --concurrency {args.concurrency} over --concurrency 1  {speedup:6.2f}x   "
          f"({len(rows):,} rows; same verdicts: {'yes' if same else 'NO'})")  # fmt: skip
    if not same:
        raise SystemExit("the two runs disagree")


def _without_probabilities(row: dict) -> dict:
    """A JSON row but its probabilities (rounded to 4 places, they may differ
    in the last place: batched forwards round differently in the last bits)."""
    return {key: value for key, value in row.items() if not key.endswith("prob")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=None, help="response length in characters")
    parser.add_argument("--generator", default="llama3", help="bundled generator tokenizer")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--concurrency", type=int, default=None, help="time --concurrency N against 1")
    parser.add_argument("--conversations", type=int, default=64, help="lines, with --concurrency")
    parser.add_argument("--quick", action="store_true", help="with --concurrency: 32 lines of 200 characters")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.concurrency is not None:
        if args.quick:
            args.conversations, args.chars = 32, args.chars or 200
        args.chars = args.chars or 300
        concurrency(args)
        return
    if args.threads is None:
        torch.set_num_threads(1)
        args.threads = 1
    args.chars = args.chars or 20_000
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
