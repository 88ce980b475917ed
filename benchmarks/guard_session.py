"""Benchmark GuardSession against the upstream-style full re-run.

A Qwen3Guard-Stream of realistic width but few layers (hidden 1024, 16 query
and 8 key/value heads of 128, the real 151,936-row vocabulary, 2 layers by
default) is written in the real checkpoint layout and loaded through
``StreamGuard.from_pretrained``. Printed, all measured in this run:

* per-token cost of ``append`` one id at a time near position ~100 and ~4000;
* the upstream ``stream_generate`` method (re-run the whole sequence for
  every new token) at the same positions, and the speed-up;
* per-token cost when appending chunks of 1, 4 and 16 ids;
* KV-cache bytes per token, measured, beside 2 × layers × kv_heads × head_dim × bytes.

    python benchmarks/guard_session.py [--layers 2] [--dtype float32] [--device cuda] [--far 4000]
                                       [--checkpoint FOLDER] [--graphs auto|eager|off] [--attention auto|triton|gather]

``--checkpoint FOLDER`` writes the checkpoint there once and reuses it (a
28-layer one takes a while to write); by default it goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.bundled_tokenizers import qwen3_tokenizer_path
from guard import GuardSession, StreamGuard
from guard.runner import ModelRunner
from guard.testing import write_tiny_checkpoint


def write_realistic_width_checkpoint(folder: str | Path, layers: int) -> Path:
    """Qwen3Guard-Stream-0.6B's width (hidden 1024, 16 query and 8 key/value
    heads of 128, the real vocabulary) with ``layers`` layers, random weights,
    in the real layout; kept if ``folder`` already holds one of ``layers`` layers."""
    config = Path(folder) / "config.json"
    if config.is_file() and json.loads(config.read_text())["num_hidden_layers"] == layers:
        return Path(folder)
    return write_tiny_checkpoint(
        folder, tokenizer_json=qwen3_tokenizer_path(), hidden_size=1024, layers=layers, heads=16,
        kv_heads=8, head_dim=128, intermediate=3072, inner=512,
    )  # fmt: skip


def realistic_width_guard(layers: int, device: str, dtype: str, folder: str | None = None) -> StreamGuard:
    """That checkpoint, loaded through ``from_pretrained`` (written to a temporary folder unless ``folder``)."""
    if folder is not None:
        return StreamGuard.from_pretrained(write_realistic_width_checkpoint(folder, layers), device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as temporary:
        write_realistic_width_checkpoint(temporary, layers)
        return StreamGuard.from_pretrained(temporary, device=device, dtype=dtype)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--far", type=int, default=4000, help="the far position")
    parser.add_argument("--checkpoint", default=None, help="write the checkpoint here once and reuse it")
    parser.add_argument("--graphs", default="auto", choices=["auto", "eager", "off"], help="CUDA graphs (GuardEngine)")
    parser.add_argument("--attention", default="auto", choices=["auto", "triton", "gather"], help="batched attention")
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused layers (guard.fused)")
    args = parser.parse_args()

    guard = realistic_width_guard(args.layers, args.device, args.dtype, args.checkpoint)
    sync = torch.cuda.synchronize if guard.device.type == "cuda" else (lambda: None)
    runner = ModelRunner(guard, graphs=args.graphs, attention=args.attention, fused=args.fused)
    print(
        f"model: hidden 1024, {args.layers} layers, vocab {guard.config.vocab_size}, {args.dtype} on {guard.device}, "
        f"{torch.get_num_threads()} threads, graphs={args.graphs}, attention={runner.attention}, "
        f"fused={runner.fused is not None}"
    )
    generator = torch.Generator().manual_seed(0)
    response = torch.randint(0, 151_643, (args.far + 64,), generator=generator).tolist()

    # One id at a time, timing every append.
    session = GuardSession(guard, runner=runner)  # guard.session(), graphs and attention chosen
    session.moderate_prompt("Write me a long story.")
    start = session.response_start
    cost_at: dict[int, float] = {}
    for token_id in response:
        position = session.position

        def append(token_id=token_id):
            session.append([token_id])
            sync()

        cost_at[position] = timed(append)
    near = [cost_at[p] for p in range(90, 130)]
    far = [cost_at[p] for p in range(args.far - 20, args.far + 20)]
    near_ms, far_ms = statistics.median(near) * 1e3, statistics.median(far) * 1e3
    print(f"session, one id per append: {near_ms:.2f} ms at ~100, {far_ms:.2f} ms at ~{args.far}: "
          f"ratio {far_ms / near_ms:.2f}")  # fmt: skip

    used, allocated = session.kv_cache_bytes()
    print(
        f"KV cache: {used / session.position:.0f} bytes per token in use (formula "
        f"{guard.kv_bytes_per_token()}), {allocated / session.position:.0f} allocated with growth room, "
        f"{session.position} positions"
    )

    # Upstream style: the whole sequence again for every new token.
    prefix = session.position - len(response)
    ids = torch.tensor([[0] * prefix + response], device=guard.device)
    for position in sorted({100, min(2000, args.far), args.far}):  # positions the session was timed at

        def rerun(position=position):
            with torch.inference_mode():
                guard.model(ids[:, : position + 1])
            sync()

        rerun()
        upstream = statistics.median(timed(rerun) for _ in range(5)) * 1e3
        ours = statistics.median(cost_at[p] for p in range(position - 10, position + 10)) * 1e3
        print(f"upstream re-run at {position}: {upstream:.2f} ms per token, session {ours:.2f} ms: "
              f"{upstream / ours:.1f}x faster")  # fmt: skip

    # Chunked appends around position 1000 (or the end of a shorter response).
    around = min(1000, len(response))
    for size in (1, 4, 16):
        session.rollback(start + around)
        chunks = [response[i : i + size] for i in range(0, 512, size)]
        total = 0.0
        for chunk in chunks:

            def append(chunk=chunk):
                session.append(chunk)
                sync()

            total += timed(append)
        print(f"chunks of {size:>2}: {total / 512 * 1e3:.2f} ms per token")
    session.close()


if __name__ == "__main__":
    main()
