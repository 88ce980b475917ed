"""Benchmark GuardEngine: N concurrent streams on one guard, in one run.

The realistic-width checkpoint of ``benchmarks/guard_session.py`` (hidden
1024, 16 query / 8 key-value heads of 128, the real 151,936-row vocabulary,
2 layers by default) is written in the real layout and loaded through
``StreamGuard.from_pretrained``. One ``GuardEngine`` serves every stream:

* streams at mixed positions: stream i's prompt is about
  ``100 + 3900 × frac(0.5 + i × 0.618…)`` tokens (a low-discrepancy spread of
  100 to 4000, so every N has a mix; N=1 sits at about 2050), all prefilled
  on the engine before timing;
* for each N (default 1, 4, 16, 64), the first N streams append one id per
  call, each from its own thread, ``--rounds`` calls each (at least
  ``--tokens`` ids in all); then every stream rolls back to its prompt.

Printed per N: aggregate tokens judged per second and its ratio to N=1, the
per-append latency p50 and p99 (and the p99 over N=1's median), forwards and
tokens per forward. Then, at ``--arrival-streams`` streams, the same run again
while a ``--arrival``-token prompt arrives on a new session mid-run: the
p99 of the appends that overlapped its prefill, beside the p99 of the run
without it, for each ``--arrival-chunks`` prefill chunk size. Last, KV-cache
bytes per stream, measured, beside 2 × layers × kv_heads × head_dim × bytes ×
positions. ``--serial`` adds N plain sessions judged round robin (one
forward per token per stream) for comparison.

    python benchmarks/engine.py [--streams 1,4,16,64] [--shortest 100 --longest 4000] [--quick]
                                [--layers 2] [--dtype float32] [--threads N] [--serial] [--checkpoint FOLDER]
                                [--graphs auto|eager|off] [--attention auto|triton|gather]

On the 2-core CI machine the default run takes about 2 minutes (most of it
prefilling 130,000 prompt tokens), ``--quick`` about 30 seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guard_session import realistic_width_guard
from guard import EngineSession, GuardEngine, StreamGuard

GOLDEN = 0.6180339887498949
ORDINARY = 151_643  # ordinary Qwen3 BPE ids stop here


def prompt_lengths(count: int, shortest: int, longest: int) -> list[int]:
    return [round(shortest + (longest - shortest) * ((0.5 + i * GOLDEN) % 1.0)) for i in range(count)]


def prompt_of(tokens: int) -> str:
    return " word" * max(1, tokens - 20)  # the chat template adds about 20 tokens


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def prefill(sessions: list[EngineSession], lengths: list[int]) -> None:
    """Every prompt at once, from threads: the engine batches their chunks."""
    threads = [
        threading.Thread(target=session.moderate_prompt, args=(prompt_of(length),))
        for session, length in zip(sessions, lengths, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def streams(
    engine: GuardEngine, sessions: list[EngineSession], rounds: int, during=None
) -> tuple[float, list[tuple[float, float]], int, int]:
    """Each session appends one id per call from its own thread: ``rounds``
    calls each, or, with ``during``, until ``during()`` (run meanwhile in the
    calling thread) returns. Returns (seconds, [(start, latency)] of every
    append, forwards, tokens); the sessions roll back to where they started."""
    generator = torch.Generator().manual_seed(len(sessions))
    ids = torch.randint(0, ORDINARY, (len(sessions), rounds), generator=generator).tolist()
    starts = [session.position for session in sessions]
    timings: list[list[tuple[float, float]]] = [[] for _ in sessions]
    barrier = threading.Barrier(len(sessions) + 1)
    stop = threading.Event()

    def run(index: int) -> None:
        session, own, mine = sessions[index], timings[index], ids[index]
        barrier.wait()
        for call in range(rounds if during is None else 1 << 30):
            if stop.is_set():
                break
            started = time.perf_counter()
            session.append(mine[call % rounds])  # the verdicts are on the host when this returns
            own.append((started, time.perf_counter() - started))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    steps, tokens = engine.steps, engine.tokens
    barrier.wait()
    started = time.perf_counter()
    if during is not None:
        try:
            during()
        finally:
            stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    steps, tokens = engine.steps - steps, engine.tokens - tokens
    for session, start in zip(sessions, starts, strict=True):
        session.rollback(start)
    return elapsed, [timing for own in timings for timing in own], steps, tokens


def serial(guard: StreamGuard, lengths: list[int], rounds: int) -> float:
    """Tokens per second of plain sessions judged round robin (one forward per token per stream)."""
    sessions = [guard.session() for _ in lengths]
    for session, length in zip(sessions, lengths, strict=True):
        session.moderate_prompt(prompt_of(length))
    generator = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for _ in range(rounds):
        for session in sessions:
            session.append(int(torch.randint(0, ORDINARY, (1,), generator=generator)))
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.close()
    return len(lengths) * rounds / elapsed


def arrival(engine: GuardEngine, sessions: list[EngineSession], rounds: int, tokens: int) -> tuple[list, list, float]:
    """The streams run twice: ``rounds`` appends each alone; then again while
    a ``tokens``-token prompt arrives on a new session (after about a fifth
    of that run's length) and until a while after it was judged. Returns
    (latencies alone, latencies of the appends that overlapped the prompt's
    prefill, seconds the prefill took)."""
    elapsed, alone, _, _ = streams(engine, sessions, rounds)
    window: list[float] = []
    newcomer = engine.session()

    def during() -> None:
        time.sleep(0.2 * elapsed)
        window.append(time.perf_counter())
        newcomer.moderate_prompt(prompt_of(tokens))
        window.append(time.perf_counter())
        time.sleep(0.2 * elapsed)

    _, timings, _, _ = streams(engine, sessions, rounds, during)
    newcomer.close()
    begin, end = window
    overlapping = [latency for start, latency in timings if start < end and start + latency > begin]
    return [latency for _, latency in alone], overlapping, end - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", default="1,4,16,64", help="comma-separated stream counts")
    parser.add_argument("--shortest", type=int, default=100, help="shortest prompt, tokens")
    parser.add_argument("--longest", type=int, default=4000, help="longest prompt, tokens")
    parser.add_argument("--rounds", type=int, default=16, help="appends per stream, at least")
    parser.add_argument("--tokens", type=int, default=512, help="appends per N, all streams together, at least")
    parser.add_argument("--arrival", type=int, default=2000, help="tokens of the prompt arriving mid-run")
    parser.add_argument("--arrival-streams", type=int, default=16)
    parser.add_argument("--arrival-chunks", default="256,32", help="prefill_chunk values for the arrival run")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--serial", action="store_true", help="also time plain sessions round robin")
    parser.add_argument("--quick", action="store_true", help="streams 1,4,16, prompts of 100 to 1000, fewer appends")
    parser.add_argument("--checkpoint", default=None, help="write the checkpoint here once and reuse it")
    parser.add_argument("--graphs", default="auto", choices=["auto", "eager", "off"], help="CUDA graphs (GuardEngine)")
    parser.add_argument(
        "--attention", default="auto", choices=["auto", "triton", "gather"], help="batched attention (GuardEngine)"
    )
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused layers (GuardEngine)")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.longest, args.tokens, args.arrival = "1,4,16", 1000, 256, 500
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    counts = [int(count) for count in args.streams.split(",")]
    chunks = [int(chunk) for chunk in args.arrival_chunks.split(",") if chunk]  # "" for no arrival run
    lengths = prompt_lengths(max(*counts, args.arrival_streams), args.shortest, args.longest)

    guard = realistic_width_guard(args.layers, args.device, args.dtype, args.checkpoint)
    engine = GuardEngine(
        guard,
        max_sessions=len(lengths) + 1,
        max_wait_ms=args.max_wait_ms,
        graphs=args.graphs,
        attention=args.attention,
        fused=args.fused,
    )
    print(
        f"model: hidden 1024, {args.layers} layers, vocab {guard.config.vocab_size}, {args.dtype} on {guard.device}, "
        f"{torch.get_num_threads()} torch threads, graphs={args.graphs}, attention={engine._runner.attention}, "
        f"fused={engine._runner.fused is not None}; "
        f"prompts of {args.shortest} to {args.longest} tokens {'(mixed)' if args.shortest < args.longest else ''}, "
        f"one id per append, max_wait_ms={args.max_wait_ms}"
    )
    with engine:
        sessions = [engine.session() for _ in lengths]
        started = time.perf_counter()
        prefill(sessions, lengths)
        positions = [session.position for session in sessions]
        print(f"prefilled {sum(positions):,} prompt tokens of {len(sessions)} streams in "
              f"{time.perf_counter() - started:.1f} s (not timed below)")  # fmt: skip
        streams(engine, sessions[: max(counts)], 2)  # warm-up

        header = (
            f"{'streams':>7} | {'mean pos':>8} | {'tok/s':>7} | {'vs N=1':>6} | {'p50 ms':>7} | {'p99 ms':>7} | "
            f"{'p99 / N=1 p50':>13} | {'steps':>5} | {'tok/step':>8}" + (" | serial tok/s" if args.serial else "")
        )
        print(header)
        print("-" * len(header))
        base_rate = base_median = None
        for count in counts:
            rounds = max(args.rounds, -(-args.tokens // count))
            elapsed, timings, steps, tokens = streams(engine, sessions[:count], rounds)
            latencies = [latency for _, latency in timings]
            rate, median, p99 = len(latencies) / elapsed, statistics.median(latencies), percentile(latencies, 0.99)
            if base_rate is None:
                base_rate, base_median = rate, median
            line = (
                f"{count:>7} | {statistics.mean(positions[:count]):>8.0f} | {rate:>7.1f} | {rate / base_rate:>5.2f}x | "
                f"{median * 1e3:>7.2f} | {p99 * 1e3:>7.2f} | {p99 / base_median:>12.2f}x | {steps:>5} | "
                f"{tokens / max(steps, 1):>8.1f}"
            )
            if args.serial:
                line += f" | {serial(guard, lengths[:count], max(2, 64 // count)):>13.1f}"
            print(line, flush=True)

        count = args.arrival_streams
        rounds = max(args.rounds, 48)
        for chunk in chunks:
            engine.prefill_chunk = chunk
            alone, overlapping, seconds = arrival(engine, sessions[:count], rounds, args.arrival)
            before, during = percentile(alone, 0.99), percentile(overlapping, 0.99)
            print(
                f"{count} streams, a {args.arrival}-token prompt arriving (prefill_chunk={chunk}, prefilled in "
                f"{seconds:.2f} s): append p99 {before * 1e3:.1f} ms without it, {during * 1e3:.1f} ms over its "
                f"prefill ({len(overlapping)} appends): {during / before:.2f}x",
                flush=True,
            )

        used = [session.kv_cache_bytes() for session in sessions]
        config = guard.config
        per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        per_position *= guard.dtype.itemsize
        mean_positions = statistics.mean(positions)
        measured = statistics.mean(held for held, _ in used)
        print(
            f"KV cache per stream (mean over {len(sessions)} streams, {mean_positions:.0f} positions): measured "
            f"{measured / 1e6:.2f} MB in use ({measured / mean_positions:.0f} bytes per position), formula 2 × "
            f"{config.num_hidden_layers} layers × {config.num_key_value_heads} kv_heads × {config.head_dim} × "
            f"{guard.dtype.itemsize} bytes × positions = {per_position * mean_positions / 1e6:.2f} MB "
            f"({per_position} per position); {statistics.mean(held for _, held in used) / 1e6:.2f} MB allocated "
            "with growth room"
        )
    print("tok/s: ids judged per second, all streams together; p99 / N=1 p50: append p99 over N=1's median")
    if hasattr(os, "getloadavg"):  # other jobs on a shared machine show here
        print("load average (1, 5, 15 min) at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
