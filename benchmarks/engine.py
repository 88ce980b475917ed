"""Benchmark GuardEngine (one batched forward per step) against separate sessions.

The realistic-width checkpoint of ``benchmarks/guard_session.py`` (hidden
1024, 16 query / 8 key-value heads of 128, the real 151,936-row vocabulary,
2 layers by default) is written in the real layout and loaded through
``StreamGuard.from_pretrained``. For N concurrent streams (default 1, 8, 32,
64), each holding a prompt of about ``--position`` tokens and then appending
one id per call, it measures in the same run:

* serial: N plain ``GuardSession``s, one id each in turn (one forward per
  token per stream: the weights are read N times per round);
* engine: N ``GuardEngine`` sessions, one thread per stream appending one id
  per call (the engine packs the waiting streams into one forward per step).

Printed per N: tokens judged per second both ways and the ratio, the
engine's per-append latency (p50/p99), its steps and mean tokens per step.

    python benchmarks/engine.py [--streams 1,8,32,64] [--tokens 256] [--position 200] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guard_session import realistic_width_guard
from guard import GuardEngine, StreamGuard


def serial(guard: StreamGuard, prompt: str, streams: list[list[int]], sync) -> float:
    """Seconds to judge every stream's ids with separate sessions, round robin."""
    sessions = [guard.session() for _ in streams]
    for session in sessions:
        session.moderate_prompt(prompt)
    sync()
    started = time.perf_counter()
    for step in range(len(streams[0])):
        for session, ids in zip(sessions, streams, strict=True):
            session.append(ids[step])
    sync()
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.close()
    return elapsed


def batched(engine: GuardEngine, prompt: str, streams: list[list[int]]) -> tuple[float, list[float], int, int]:
    """(seconds, per-append latencies, steps, tokens) with one thread per stream."""
    sessions = [engine.session() for _ in streams]
    prompted = [threading.Thread(target=session.moderate_prompt, args=(prompt,)) for session in sessions]
    for thread in prompted:
        thread.start()
    for thread in prompted:
        thread.join()
    latencies: list[list[float]] = [[] for _ in streams]
    barrier = threading.Barrier(len(streams) + 1)

    def run(index: int) -> None:
        session, ids, own = sessions[index], streams[index], latencies[index]
        barrier.wait()
        for token_id in ids:
            started = time.perf_counter()
            session.append(token_id)  # the verdicts are on the host when this returns
            own.append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(streams))]
    for thread in threads:
        thread.start()
    steps, tokens = engine.steps, engine.tokens
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    steps, tokens = engine.steps - steps, engine.tokens - tokens
    for session in sessions:
        session.close()
    return elapsed, [latency for own in latencies for latency in own], steps, tokens


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", default="1,8,32,64", help="comma-separated stream counts")
    parser.add_argument("--tokens", type=int, default=256, help="ids judged per N, all streams together (min 4 each)")
    parser.add_argument("--position", type=int, default=200, help="prompt length in tokens, about")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()
    counts = [int(count) for count in args.streams.split(",")]

    guard = realistic_width_guard(args.layers, args.device, args.dtype)
    sync = torch.cuda.synchronize if guard.device.type == "cuda" else (lambda: None)
    print(
        f"model: hidden 1024, {args.layers} layers, vocab {guard.config.vocab_size}, {args.dtype} on {guard.device}, "
        f"{torch.get_num_threads()} torch threads; prompt ~{args.position} tokens, one id per append"
    )
    prompt = " word" * args.position
    generator = torch.Generator().manual_seed(0)
    header = (
        f"{'streams':>7} | {'serial tok/s':>12} | {'engine tok/s':>12} | {'ratio':>6} | "
        f"{'append p50 ms':>13} | {'p99 ms':>8} | {'steps':>6} | {'tokens/step':>11}"
    )
    print(header)
    print("-" * len(header))
    with GuardEngine(guard, max_sessions=max(counts), max_wait_ms=args.max_wait_ms) as engine:
        # Warm both paths up (allocator, first-call overheads).
        warm = [torch.randint(0, 151_643, (4,), generator=generator).tolist() for _ in range(2)]
        serial(guard, prompt, warm, sync)
        batched(engine, prompt, warm)
        for count in counts:
            per_stream = max(4, args.tokens // count)
            streams = [torch.randint(0, 151_643, (per_stream,), generator=generator).tolist() for _ in range(count)]
            alone = serial(guard, prompt, streams, sync)
            together, latencies, steps, tokens = batched(engine, prompt, streams)
            total = count * per_stream
            print(
                f"{count:>7} | {total / alone:>12.1f} | {total / together:>12.1f} | {alone / together:>5.2f}x | "
                f"{statistics.median(latencies) * 1e3:>13.2f} | {percentile(latencies, 0.99) * 1e3:>8.2f} | "
                f"{steps:>6} | {tokens / max(steps, 1):>11.1f}"
            )
    print("tok/s: response tokens judged per second, all streams together; ratio: engine over serial")


if __name__ == "__main__":
    main()
