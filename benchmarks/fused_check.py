"""The fused layers (``guard.fused``) against transformers' modules, on the realistic width.

``check(device, layers=28)`` loads the realistic-width checkpoint of
``benchmarks/guard_session.py`` (hidden 1024, 16 query / 8 key-value heads
of 128, intermediate 3072, the real vocabulary; ``layers`` layers) and runs
two ``ModelRunner``s over it, ``fused="on"`` and ``fused="off"``, each with
its CUDA graphs (on the CPU: the graphs' eager path, under Triton's
interpreter). Printed:

1. kernels per decode step and per layer (one row, counted: torch's
   operators that launch work, views and allocations aside, plus Triton
   launches), fused and not;
2. agreement, in float32 (the same checkpoint) and bfloat16: prefills of
   100 ids, 20 decode steps of one stream, one step of 16 streams; the
   largest difference of the risk logits and how many risk labels agree.
   Passes when float32 agrees on every label with logits within 1e-2 and
   bfloat16 agrees on at least 98% of the labels;
3. a decode step of 1, 16 and 64 rows at ~100 positions, bf16, fused and
   not: the graph's replay alone (CUDA events) and the whole ``run`` (host
   work, upload, replay, the verdicts' copy back), medians of 20 after
   warm-up, and their ratio.

A Triton compile error (or any other) is printed, not raised: ``check``
returns False. About 30 s on an H200 with the checkpoint written (pass
``checkpoint=FOLDER`` to reuse one; ``benchmarks/gpu_check.py`` writes one).

    python benchmarks/fused_check.py [--device cuda] [--layers 28] [--checkpoint FOLDER]
    python benchmarks/fused_check.py --device cpu --quick   # the script itself, in Triton's interpreter

``--device cpu`` sets ``TRITON_INTERPRET=1`` (before anything imports
Triton); its figures mean nothing but the kernel counts.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ORDINARY = 151_642


def check(device: str, layers: int = 28, checkpoint: str | None = None, *, quick: bool = False) -> bool:
    """Print the fused path's kernel counts, agreement and decode-step times on ``device``; True if it agrees."""
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as temporary:
            folder = checkpoint or temporary
            ok = _check(device, layers, folder, quick)
    except Exception:
        traceback.print_exc()
        print("  FAIL the fused check raised (above): a Triton compile error shows there")
        ok = False
    print(f"  fused check: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s)")
    return ok


def _check(device: str, layers: int, folder: str, quick: bool) -> bool:
    import torch

    from benchmarks.guard_session import realistic_width_guard

    guard = realistic_width_guard(layers, device, "bfloat16", folder)
    runners = _runners(guard)
    print(f"  bf16, {layers} layers on {guard.device}, torch {torch.__version__}")
    counts = {name: kernels_per_step(guard, fused) for name, fused in (("fused", "on"), ("unfused", "off"))}
    for name, (step, per_layer) in counts.items():
        print(f"  {name:>7}: {step} kernels per 1-row decode step, {per_layer} per layer (attention included)")

    reference = realistic_width_guard(layers, device, "float32", folder)
    prompt = 8 if quick else 100  # the interpreter walks every program of every row in numpy
    agreed32, logit32 = agreement(_runners(reference), quick, prompt)
    del reference
    agreed16, logit16 = agreement(runners, quick, prompt)
    ok = agreed32 == 1.0 and logit32 <= 1e-2 and agreed16 >= 0.98
    print(f"  {'PASS' if ok else 'FAIL'} fused vs unfused: float32 {agreed32:.1%} of risk labels agree, max |dlogit| "
          f"{logit32:.2e}; bfloat16 {agreed16:.1%}, max |dlogit| {logit16:.2e}")  # fmt: skip

    for rows in (1, 4) if quick else (1, 16, 64):
        times = {name: decode_step_times(runner, rows, 3 if quick else 20, prompt) for name, runner in runners.items()}
        (fused_replay, fused_run), (plain_replay, plain_run) = times["fused"], times["unfused"]
        replay = (
            f"replay {fused_replay * 1e3:.3f} ms fused, {plain_replay * 1e3:.3f} ms unfused "
            f"({plain_replay / fused_replay:.2f}x); "
            if fused_replay is not None
            else ""
        )
        print(f"  {rows:>2} rows: {replay}run {fused_run * 1e3:.3f} ms fused, {plain_run * 1e3:.3f} ms unfused "
              f"({plain_run / fused_run:.2f}x)")  # fmt: skip
    return ok


def _runners(guard) -> dict:
    from guard.runner import ModelRunner

    # Both built before either runs: the first stacks the model's projections (``guard.fused``).
    graphs = "auto" if guard.device.type == "cuda" else "eager"
    runners = {"fused": ModelRunner(guard, graphs=graphs, fused="on")}
    runners["unfused"] = ModelRunner(guard, graphs=graphs, fused="off")
    for runner in runners.values():
        runner.in_place_from = None  # every decode row in the batched attention, as on CUDA
    return runners


def _prefilled(runner, streams: int, seed: int, prompt: int) -> list:
    from guard.runner import Segment

    rng = random.Random(seed)
    regions = [runner.pool.new_region() for _ in range(streams)]
    for first in range(0, streams, 4):  # four prompts per step
        runner.run([Segment(region, [rng.randrange(ORDINARY) for _ in range(prompt)], True)
                    for region in regions[first : first + 4]])  # fmt: skip
    return regions


def agreement(runners: dict, quick: bool, prompt: int) -> tuple[float, float]:
    """(share of risk labels that agree, largest |dlogit|) of the fused runner against the unfused one."""
    import torch

    from guard.runner import Segment

    logits = {}
    for name, runner in runners.items():
        rng = random.Random(1)
        outputs = []
        (alone,) = _prefilled(runner, 1, seed=2, prompt=prompt)
        for _ in range(4 if quick else 20):
            outputs.append(runner.run([Segment(alone, [rng.randrange(ORDINARY)], True)]).response.risk_level)
        regions = _prefilled(runner, 4 if quick else 16, seed=3, prompt=prompt)
        outputs.append(runner.run([Segment(region, [rng.randrange(ORDINARY)], True) for region in regions])
                       .response.risk_level)  # fmt: skip
        for region in [alone, *regions]:
            runner.pool.release(region)
        logits[name] = torch.cat(outputs).float().cpu()
    ours, theirs = logits["fused"], logits["unfused"]
    agreed = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return agreed, (ours - theirs).abs().max().item()


def decode_step_times(runner, rows: int, repeats: int, prompt: int) -> tuple[float | None, float]:
    """(the graph's replay alone, or None without CUDA graphs; the whole ``run``), medians, in seconds."""
    import torch

    from guard.runner import Segment
    from guard.step_graphs import row_bucket, span_bucket

    cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    regions = _prefilled(runner, rows, seed=4, prompt=prompt)
    segments = [Segment(region, [100 + n], True) for n, region in enumerate(regions)]
    runs = []
    for step in range(repeats + 3):  # three warm-up steps: the first captures the graph
        sync()
        begun = time.perf_counter()
        runner.run(segments)  # ends with the verdicts' copy to the host
        if step >= 3:
            runs.append(time.perf_counter() - begun)
        for region in regions:
            runner.pool.truncate(region, prompt)
    replay = None
    if cuda and runner.graphs is not None and runner.graphs.capture:
        graph = runner.graphs._steps[row_bucket(rows), span_bucket(prompt + 1)].graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = []
        for _ in range(repeats):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end) / 1e3)
        replay = statistics.median(replays)
    for region in regions:
        runner.pool.release(region)
    return replay, statistics.median(runs)


def kernels_per_step(guard, fused: str) -> tuple[int, int]:
    """Kernels of one 1-row decode step's ``layers`` (attention included), and per layer: the
    difference between the model run with all its layers and with one fewer."""
    import copy

    from guard.runner import ModelRunner

    counts = []
    for layers in (guard.config.num_hidden_layers, guard.config.num_hidden_layers - 1):
        runner = ModelRunner(guard, graphs="off", fused=fused)
        runner.config = copy.copy(runner.config)
        runner.config.num_hidden_layers = layers  # this throwaway runner only
        counts.append(_count_kernels(runner))
    return counts[0], counts[0] - counts[1]


def _count_kernels(runner) -> int:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from guard import fused
    from guard.attention import GatheredAttention

    kernels = [getattr(fused, name) for name in dir(fused) if name.endswith("_kernel")]
    launches = 0
    in_triton = False  # the interpreter's own copies are no kernels of the step

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal launches
            out = func(*args, **(kwargs or {}))
            if not in_triton and func.__name__.split(".")[0] not in _NO_KERNEL:
                # A view launches nothing, unless it had to copy (``to(float32)`` of a bf16 tensor).
                launches += not func.is_view or not _aliases(out, args)
            return out

    def counted(original):
        def run(*args, **kwargs):
            nonlocal launches, in_triton
            launches, in_triton = launches + 1, True
            try:
                return original(*args, **kwargs)
            finally:
                in_triton = False

        return run

    region = runner.pool.new_region()
    runner.pool.reserve(region, 2)
    device = runner.device
    ids, positions = torch.tensor([7], device=device), torch.tensor([1], device=device)
    slots = torch.tensor([region.base + 1], device=device)
    originals = [kernel.run for kernel in kernels]
    try:
        for kernel, original in zip(kernels, originals, strict=True):
            kernel.run = counted(original)
        with torch.inference_mode():
            base = torch.tensor([region.base], device=device)
            attend = GatheredAttention(base, positions + 1, 64, runner.pool.capacity)
            with Counting():
                runner.layers(ids, positions, slots, attend)
    finally:
        for kernel, original in zip(kernels, originals, strict=True):
            kernel.run = original
    runner.pool.release(region)
    return launches


#: Operators that allocate or read metadata: no kernel.
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "detach_",
              "lift_fresh"}  # fmt: skip


def _aliases(out, args) -> bool:
    import torch

    storages = {arg.untyped_storage().data_ptr() for arg in args if isinstance(arg, torch.Tensor)}
    return isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() in storages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="28 (2 with --quick)")
    parser.add_argument("--checkpoint", default=None, help="write the checkpoint here once and reuse it")
    parser.add_argument("--quick", action="store_true", help="small sizes: to check the script, not to measure")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when guard.fused's kernels are decorated, on first use
    layers = args.layers or (2 if args.quick else 28)
    sys.exit(0 if check(args.device, layers, args.checkpoint, quick=args.quick) else 1)


if __name__ == "__main__":
    main()
