"""Benchmark the moderating gateway against the same upstream, reached directly.

The upstream is the vLLM-like server of the tests (``tests/upstream_server.py``:
uvicorn streaming what a tiny real Llama 3 generates, one forward per token)
and the gateway is ``integrations.gateway`` served by uvicorn, each in its own
process (spawned), so neither shares a GIL with the other or with the
clients, which run here: raw httpx streaming, asyncio. The guard has the
width of ``benchmarks/guard_session.py``'s realistic-width guard (hidden 1024,
16 query / 8 key-value heads of 128, the real 151,936-row vocabulary, 2
layers by default) with its verdict heads wired like the gateway tests' tiny
guard (Safe on every text but " dynamite"), so that the safe answers are
never cut; ``--tiny`` takes the tests' tiny guard instead. The gateway judges
the generator's token ids (vLLM's ``return_token_ids``) unless
``--token-ids off``. Every answer is a scripted safe text of ``--tokens``
Llama 3 tokens, which the upstream takes from the script without running its
model (``test_skip_forward``: on a small shared CPU the tiny Llama's forwards
would otherwise bound every figure, where a real upstream runs elsewhere);
``--model-upstream`` runs them. Measured in one run:

* one guard step: the median duration of the engine's batched forward for a
  lone stream appending one guard token at a time (step listener), and the
  lone ``append`` call around it;
* latency, at 1 stream and at ``--streams`` streams, the upstream pacing its
  tokens ``--pace-ms`` apart: time to first token (request sent to first
  content chunk) and per-chunk latency, directly from the upstream and
  through the gateway. The upstream stamps every chunk with its
  ``time.monotonic()`` right before writing it (``test_timestamps``; the
  clock is system-wide on Linux, so it compares across processes), the
  gateway passes the field on, and a chunk's latency is the client's
  ``time.monotonic()`` when its line arrives minus that stamp. "added" is
  the gateway's p50 (p99) minus the direct p50 (p99). At 1 stream the
  requests alternate direct / gateway;
* throughput at ``--streams`` streams, the upstream unpaced: content chunks
  per second at the clients, directly from the upstream ("upstream alone")
  and through the gateway; and "engine alone": the same answers' token ids
  judged by the same GuardEngine code path the gateway runs (``GuardStreams``:
  the prompt, then ``push_ids`` one generator token at a time, then
  ``finish_all``), one thread per stream, no HTTP. Each stream runs
  ``--rounds`` requests back to back; a request's prompt is judged in every
  measure that includes the guard. The three run in turn ``--repeats``
  times and the best run of each counts (on a shared machine, other load
  only ever slows a run down).

Also measured: the CPU time the gateway process spends per relayed chunk
(``/proc``), split into the guard's forwards (the engine's step listener) and
the rest, against the same for the engine alone; the difference is the
gateway's own work per chunk (HTTP, SSE, JSON, rebuilding chunks). The
latency measures fetch the upstream's stamps afterwards
(``GET /test/stamps/{tag}``): the gateway relays only the fields it knows.

Targets (from the issues): the added p50 per chunk at 1 stream is at most one
guard step plus 1 ms; the gateway's throughput at ``--streams`` streams is at
least 85% of the engine's alone, and with ``--tiny`` at least 3,000 chunks/s.

    python benchmarks/gateway.py [--quick] [--tiny | --layers 2] [--streams 32] [--pace-ms 30] [--tokens 64]
                                 [--model-upstream] [--token-ids request|off] [--max-wait-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine import percentile

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me something interesting, in a short paragraph."},
]

# Safe answers, each cut to --tokens Llama 3 tokens.
TEXTS = [
    "Paris is the capital of France, and it is lovely in spring. The chestnut trees along the boulevards bloom in "
    "April, the cafes put their tables back on the pavements, and the light on the Seine turns soft and golden in "
    "the evening. Many visitors start at the Louvre, then walk through the Tuileries garden towards the Place de la "
    "Concorde, stopping for a coffee on the way and watching the city go by.",
    "Honeybees communicate the location of food with a waggle dance. A forager returning to the hive walks in a "
    "figure of eight, and the angle of the straight run relative to vertical tells the other bees the direction of "
    "the flowers relative to the sun, while the length of the run tells them how far away the flowers are. The "
    "dance was decoded by Karl von Frisch, who received a Nobel Prize for the work in 1973.",
    "A good loaf of bread needs only flour, water, salt and yeast, but time is the secret ingredient. A slow, cool "
    "rise lets the yeast and the bacteria in the dough develop flavour, and a well developed gluten network traps "
    "the gas so the crumb is light and open. Bake it in a very hot oven with some steam for the first minutes, and "
    "let it cool completely before you slice it, however tempting the smell may be.",
    "The Voyager probes, launched in 1977, are the most distant objects ever made by people. They flew past "
    "Jupiter and Saturn, and Voyager 2 went on to Uranus and Neptune, sending back the first close pictures of "
    "those worlds. Both probes have now left the heliosphere and still send faint signals home, powered by "
    "radioisotope generators that lose a little power every year.",
]


# --- the guard ------------------------------------------------------------------


def write_guard(folder: Path, args: argparse.Namespace) -> str:
    """Write the benchmark's guard checkpoint into ``folder``; its description."""
    from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
    from adapter.retokenize import encode_ordinary
    from guard.testing import write_tiny_checkpoint
    from tests.gateway_harness import UNSAFE_ANSWER, UNSAFE_PROMPT, write_gateway_guard

    if args.tiny:
        write_gateway_guard(folder)
        return "the tests' tiny guard (hidden 64, 2 layers)"
    tokenizer = qwen3_tokenizer()
    # benchmarks/guard_session.py's realistic width, verdicts wired as in tests/gateway_harness.py.
    write_tiny_checkpoint(
        folder, tokenizer_json=qwen3_tokenizer_path(), hidden_size=1024, layers=args.layers, heads=16, kv_heads=8,
        head_dim=128, intermediate=3072, inner=512, unsafe_token_ids=encode_ordinary(tokenizer, UNSAFE_ANSWER),
        unsafe_prompt_token_ids=encode_ordinary(tokenizer, UNSAFE_PROMPT),
    )  # fmt: skip
    return f"realistic width (hidden 1024, 16/8 heads of 128, intermediate 3072), {args.layers} layers"


# --- the servers, each in its own process ---------------------------------------------


def _wait_for_parent(conn: Any) -> None:
    """Block until the parent says stop or goes away (its end of the pipe closes)."""
    with contextlib.suppress(EOFError, OSError):
        conn.recv()


def _serve_upstream(conn: Any, threads: int, workers: int) -> None:
    try:
        torch.set_num_threads(threads)
        from tests.upstream_server import UpstreamServer

        server = UpstreamServer(workers=workers, startup_timeout=60).start()
    except BaseException as error:
        conn.send(("error", repr(error)))
        raise
    conn.send(("ready", server.url))
    _wait_for_parent(conn)
    server.stop()


def _serve_gateway(conn: Any, folder: str, upstream: str, options: dict[str, Any]) -> None:
    try:
        logging.basicConfig(level=logging.WARNING)
        torch.set_num_threads(options["threads"])
        from adapter.bundled_tokenizers import generator_tokenizer
        from guard import StreamGuard
        from integrations.gateway import GatewayConfig, create_app
        from tests.gateway_harness import AppServer

        guard = StreamGuard.from_pretrained(folder, device=options["device"], dtype=options["dtype"])
        by_ids = options["token_ids"] != "off"
        config = GatewayConfig(
            upstream=upstream, generator="llama3" if by_ids else None, token_ids=options["token_ids"],
            max_wait_ms=options["max_wait_ms"], device=options["device"],
        )  # fmt: skip
        app = create_app(config, guard=guard, generator=generator_tokenizer("llama3") if by_ids else None)
        server = AppServer(app, startup_timeout=300).start()
    except BaseException as error:
        conn.send(("error", repr(error)))
        raise
    conn.send(("ready", server.url))
    _wait_for_parent(conn)
    server.stop()


class Child:
    """A server in a spawned process; ``stop()`` ends it (and it ends by itself
    when this process goes away: its pipe closes)."""

    def __init__(self, name: str, target: Any, *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
        self.process.start()
        child_conn.close()
        self.url: str | None = None

    def ready(self, timeout: float) -> str:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"the {self.name} did not start within {timeout:.0f} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.name} exited before it was ready (see its traceback above)") from None
        if kind != "ready":
            raise RuntimeError(f"the {self.name} failed to start: {value}")
        self.url = value
        return value

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


# --- guard alone ------------------------------------------------------------------


def guard_step(guard: Any, args: argparse.Namespace) -> tuple[float, float, str]:
    """(median forward seconds of a lone 1-token step, median lone append seconds, how the step was timed)."""
    from guard import GuardEngine

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_643, (96,), generator=generator).tolist()
    steps: list[float] = []
    with GuardEngine(guard, max_wait_ms=args.max_wait_ms) as engine:
        listen = getattr(engine, "add_step_listener", None)
        if listen is not None:
            listen(lambda tokens, sessions, seconds: steps.append(seconds) if tokens == 1 else None)
        with engine.session() as session:
            session.moderate_prompt(MESSAGES)
            steps.clear()
            appends = []
            for token_id in ids:
                started = time.perf_counter()
                session.append(token_id)
                appends.append(time.perf_counter() - started)
    append = statistics.median(appends[32:])
    if listen is None:
        return append, append, "lone session.append (the engine has no step listener)"
    return statistics.median(steps[32:]), append, "engine step listener"


def engine_alone(guard: Any, answers: list[list[int]], args: argparse.Namespace) -> tuple:
    """(seconds, generator tokens, guard tokens, steps, CPU seconds of this
    process, seconds in forwards) for ``--streams`` threads
    each judging ``--rounds`` answers as the gateway does: GuardStreams (the
    prompt, push_ids one generator token at a time, finish_all), as an id
    stream when the gateway judges ids, else as text deltas."""
    from adapter.bundled_tokenizers import generator_tokenizer
    from guard import GuardEngine, Policy
    from integrations.streams import GuardStreams, StreamKey

    llama3 = generator_tokenizer("llama3")
    by_ids = args.token_ids != "off"
    policy = Policy(mode="strict")
    key = StreamKey(0)
    errors: list[BaseException] = []

    def judge(engine: GuardEngine, answer: list[int]) -> None:
        with GuardStreams(engine, MESSAGES, policy=policy, source_tokenizer=llama3 if by_ids else None) as streams:
            streams.judge_prompt()
            for token_id in answer:
                if by_ids:
                    streams.push_ids(key, [token_id])
                else:
                    streams.push(key, llama3.decode([token_id]))
            streams.finish_all()
            if streams.flagged:
                raise RuntimeError("the guard flagged a safe answer")

    with GuardEngine(guard, max_wait_ms=args.max_wait_ms, max_sessions=max(4 * args.streams, 16)) as engine:
        judge(engine, answers[0])  # warm up
        barrier = threading.Barrier(args.streams + 1)

        def run(stream: int) -> None:
            barrier.wait()
            try:
                for round_ in range(args.rounds):
                    judge(engine, answers[(stream + round_) % len(answers)])
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=run, args=(stream,)) for stream in range(args.streams)]
        for thread in threads:
            thread.start()
        forwards: list[float] = []
        engine.add_step_listener(lambda tokens, sessions, seconds: forwards.append(seconds))
        steps, tokens = engine.steps, engine.tokens
        barrier.wait()
        started, cpu = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.join()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        steps, tokens = engine.steps - steps, engine.tokens - tokens
    if errors:
        raise RuntimeError(f"engine alone: {len(errors)} streams failed, first: {errors[0]!r}")
    generated = sum(len(answers[(s + r) % len(answers)]) for s in range(args.streams) for r in range(args.rounds))
    return elapsed, generated, tokens, steps, cpu, sum(forwards)


# --- the clients --------------------------------------------------------------------


@dataclass
class Answer:
    ttft: float | None = None
    latencies: list[float] = field(default_factory=list)  # per content chunk: receipt - its own stamp
    after_next: list[float] = field(default_factory=list)  # per content chunk: receipt - the next chunk's stamp
    chunks: int = 0
    text: str = ""
    finish: str | None = None
    error: str | None = None


async def ask(client: Any, base: str, script: str, *, pace_ms: float, gateway: bool, args: Any) -> Answer:
    """One streamed chat request; with ``pace_ms`` (the latency measures), per
    content chunk its latency from the upstream's stamp."""
    body: dict[str, Any] = {"model": "tiny-llama3", "messages": MESSAGES, "stream": True, "test_script": script}
    tag = uuid.uuid4().hex if pace_ms else None
    if tag is not None:
        # The gateway relays only the fields it knows (no "sent_at"): the stamps
        # are fetched from the upstream afterwards, in the order of its chunks.
        body["test_timestamps"] = tag
    body["max_tokens"] = args.tokens + 16  # room for the script and its <|eot_id|>
    if pace_ms:
        body["test_fail"] = {"delay_ms": pace_ms}
    if not args.model_upstream:
        body["test_skip_forward"] = True
    if not gateway and args.token_ids == "request":
        body["return_token_ids"] = True  # what the gateway asks the upstream for
    answer = Answer()
    received: list[tuple[float, bool]] = []  # (receipt, carries content) per chunk the upstream sent
    started = time.monotonic()
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return answer
            async for line in response.aiter_lines():
                now = time.monotonic()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    answer.error = str(chunk["error"])[:200]
                    break
                if "prompt_filter_results" in chunk:
                    continue  # the gateway's own first chunk
                content = False
                for choice in chunk.get("choices") or ():
                    answer.finish = choice.get("finish_reason") or answer.finish
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        content = True
                        answer.text += text
                        answer.chunks += 1
                        if answer.ttft is None:
                            answer.ttft = now - started
                received.append((now, content))
        if tag is not None:
            stamps = (await client.get(f"{args.upstream_url}/test/stamps/{tag}")).json()
            if len(stamps) != len(received):
                answer.error = f"{len(received)} chunks arrived for the upstream's {len(stamps)}"
                return answer
            for number, ((now, content), sent_at) in enumerate(zip(received, stamps, strict=True)):
                if content:
                    answer.latencies.append(now - sent_at)
                    if number + 1 < len(stamps):
                        answer.after_next.append(now - stamps[number + 1])
    except Exception as error:  # counted and reported, the run goes on
        answer.error = f"{type(error).__name__}: {error}"
    return answer


async def metrics(client: Any, base: str) -> dict[str, float]:
    """The gateway's guard counters from /metrics."""
    text = (await client.get(f"{base}/metrics")).text
    wanted = ("crossguard_guard_step_seconds_sum", "crossguard_guard_step_seconds_count",
              "crossguard_guard_tokens_total", "crossguard_guard_step_tokens_sum")  # fmt: skip
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def steps_between(before: dict[str, float], after: dict[str, float]) -> str:
    count = after.get("crossguard_guard_step_seconds_count", 0) - before.get("crossguard_guard_step_seconds_count", 0)
    if not count:
        return "no step counts (the engine has no step listener)"
    seconds = after["crossguard_guard_step_seconds_sum"] - before["crossguard_guard_step_seconds_sum"]
    tokens = after["crossguard_guard_step_tokens_sum"] - before["crossguard_guard_step_tokens_sum"]
    return f"{count:.0f} steps, {seconds / count * 1e3:.1f} ms and {tokens / count:.1f} guard tokens per step"


@dataclass
class Phase:
    answers: list[Answer]
    seconds: float
    steps: str = ""
    cpu_seconds: float = 0.0  # the gateway process's CPU time (user + system) during the phase
    forward_seconds: float = 0.0  # of which the guard's batched forwards (the engine's step listener)

    @property
    def chunks(self) -> int:
        return sum(answer.chunks for answer in self.answers)

    def latencies(self) -> list[float]:
        return [latency for answer in self.answers for latency in answer.latencies]

    def after_next(self) -> list[float]:
        return [latency for answer in self.answers for latency in answer.after_next]

    def ttfts(self) -> list[float]:
        return [answer.ttft for answer in self.answers if answer.ttft is not None]


async def concurrent(client: Any, base: str, scripts: list[str], *, streams: int, rounds: int, pace_ms: float,
                     gateway: bool, args: Any) -> Phase:  # fmt: skip
    before = await metrics(client, base) if gateway else {}

    async def worker(stream: int) -> list[Answer]:
        answers = []
        for round_ in range(rounds):
            script = scripts[(stream + round_) % len(scripts)]
            answers.append(await ask(client, base, script, pace_ms=pace_ms, gateway=gateway, args=args))
        return answers

    cpu = process_cpu(args.gateway_pid) if gateway else 0.0
    started = time.monotonic()
    results = await asyncio.gather(*(worker(stream) for stream in range(streams)))
    phase = Phase([answer for answers in results for answer in answers], time.monotonic() - started)
    if gateway:
        phase.cpu_seconds = process_cpu(args.gateway_pid) - cpu
        after = await metrics(client, base)
        phase.steps = steps_between(before, after)
        phase.forward_seconds = after.get("crossguard_guard_step_seconds_sum", 0) - before.get(
            "crossguard_guard_step_seconds_sum", 0)
    return phase


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux's /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def alternating(client: Any, upstream: str, gateway: str, scripts: list[str], *, requests: int,
                      pace_ms: float, args: Any) -> tuple[Phase, Phase]:  # fmt: skip
    """``requests`` lone requests each way, alternating which goes first."""
    direct, through = Phase([], 0.0), Phase([], 0.0)
    before = await metrics(client, gateway)
    for number in range(requests):
        script = scripts[number % len(scripts)]
        order = [(upstream, False, direct), (gateway, True, through)]
        for base, is_gateway, phase in order if number % 2 == 0 else order[::-1]:
            started = time.monotonic()
            phase.answers.append(await ask(client, base, script, pace_ms=pace_ms, gateway=is_gateway, args=args))
            phase.seconds += time.monotonic() - started
    through.steps = steps_between(before, await metrics(client, gateway))
    return direct, through


@dataclass
class Engine:
    seconds: float
    generated: int  # generator tokens (the chunks the gateway would relay)
    guard_tokens: int
    steps: int
    cpu_seconds: float  # this process's CPU time while the engine alone ran
    forward_seconds: float  # of which the guard's batched forwards

    @property
    def rate(self) -> float:
        return self.generated / self.seconds


async def measure(upstream: str, gateway: str, scripts: list[str], guard: Any, answers: list[list[int]],
                  args: Any) -> dict[str, Any]:  # fmt: skip
    """Every measure after the guard step, in turn; the engine alone runs in a
    thread of this process while the servers idle."""
    import httpx

    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        # Warm up both paths (connections, first-call overheads), a few streams at once.
        await concurrent(client, upstream, scripts, streams=4, rounds=1, pace_ms=0, gateway=False, args=args)
        await concurrent(client, gateway, scripts, streams=4, rounds=1, pace_ms=0, gateway=True, args=args)
        results: dict[str, Any] = {}
        results["lone"] = await alternating(client, upstream, gateway, scripts, requests=args.requests,
                                            pace_ms=args.pace_ms, args=args)  # fmt: skip
        many = dict(streams=args.streams, rounds=1, pace_ms=args.pace_ms, args=args)
        results["many"] = (await concurrent(client, upstream, scripts, gateway=False, **many),
                           await concurrent(client, gateway, scripts, gateway=True, **many))  # fmt: skip
        # Throughput: the three in turn, --repeats times (the best run of each
        # counts: on a shared machine the others' load only ever slows a run).
        flat = dict(streams=args.streams, rounds=args.rounds, pace_ms=0, args=args)
        loop = asyncio.get_running_loop()
        results["throughput"] = []
        for _ in range(args.repeats):
            direct = await concurrent(client, upstream, scripts, gateway=False, **flat)
            engine = Engine(*await loop.run_in_executor(None, engine_alone, guard, answers, args))
            through = await concurrent(client, gateway, scripts, gateway=True, **flat)
            results["throughput"].append((direct, engine, through))
    return results


# --- the report -----------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p99(values: list[float]) -> float | None:
    return percentile(values, 0.99) if values else None


def check(phases: dict[str, Phase], expected: dict[str, str]) -> list[str]:
    """Warnings for answers that failed, were cut or differ from their script."""
    warnings = []
    for name, phase in phases.items():
        bad = [a for a in phase.answers if a.error or a.finish != "stop" or a.text not in expected.values()]
        if bad:
            first = bad[0]
            why = first.error or f"finish_reason {first.finish!r}, {len(first.text)} characters"
            warnings.append(f"WARNING: {name}: {len(bad)} of {len(phase.answers)} answers failed or differ ({why})")
    return warnings


def subtract(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests (about a minute)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny guard instead of the realistic width")
    parser.add_argument("--layers", type=int, default=2, help="layers of the realistic-width guard")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process (guard and upstream)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams of the many-stream measures")
    parser.add_argument("--tokens", type=int, default=64, help="Llama 3 tokens per scripted answer")
    parser.add_argument("--pace-ms", type=float, default=30.0, help="upstream delay before each token (latency)")
    parser.add_argument("--requests", type=int, default=8, help="lone requests each way (1-stream latency)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream back to back (throughput)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each throughput measure (the best counts)")
    parser.add_argument(
        "--token-ids",
        default="request",
        choices=["request", "off"],
        help="request: the gateway judges generator ids (vLLM's return_token_ids); off: text deltas",
    )
    parser.add_argument("--model-upstream", action="store_true",
                        help="the upstream runs its tiny Llama's forward for every token (by default it takes the "
                        "scripted tokens without it: test_skip_forward, so that the upstream costs next to nothing "
                        "on the CPU the gateway shares)")  # fmt: skip
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the engine's max_wait_ms")
    parser.add_argument("--upstream-workers", type=int, default=4, help="the upstream's forward threads")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.requests, args.rounds, args.repeats = min(args.tokens, 32), min(args.requests, 3), 1, 1
    command = "python benchmarks/gateway.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])

    torch.set_num_threads(args.threads)
    # A SIGTERM ends the run through the finally below (the servers are stopped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = Path(tempfile.mkdtemp(prefix="crossguard-gateway-bench-"))
    children: list[Child] = []
    run_started = time.monotonic()
    try:
        from adapter.bundled_tokenizers import generator_tokenizer
        from guard import StreamGuard
        from tests.upstream_server import EOT

        described = write_guard(folder, args)
        upstream = Child("upstream", _serve_upstream, args.threads, args.upstream_workers)
        children.append(upstream)
        options = {"threads": args.threads, "device": args.device, "dtype": args.dtype, "token_ids": args.token_ids,
                   "max_wait_ms": args.max_wait_ms}  # fmt: skip
        upstream_url = upstream.ready(120).removesuffix("/v1")
        args.upstream_url = upstream_url
        gateway = Child("gateway", _serve_gateway, str(folder), upstream_url + "/v1", options)
        children.append(gateway)
        args.gateway_pid = gateway.process.pid
        guard = StreamGuard.from_pretrained(folder, device=args.device, dtype=args.dtype)
        gateway_url = gateway.ready(300)

        llama3 = generator_tokenizer("llama3")
        scripts = [llama3.decode(llama3.encode(text, add_special_tokens=False).ids[: args.tokens]) for text in TEXTS]
        answers = [[*llama3.encode(script, add_special_tokens=False).ids, EOT] for script in scripts]

        step, append, step_how = guard_step(guard, args)
        results = asyncio.run(measure(upstream_url, gateway_url, scripts, guard, answers, args))
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report(args, results, scripts, answers, described, command, run_started, step=step, append=append,
           step_how=step_how)  # fmt: skip


def report(args: argparse.Namespace, results: dict[str, Any], scripts: list[str], answers: list[list[int]],
           described: str, command: str, run_started: float, *, step: float, append: float,
           step_how: str) -> None:  # fmt: skip
    lone_direct, lone_gateway = results["lone"]
    many_direct, many_gateway = results["many"]
    runs = results["throughput"]
    many = f"{args.streams} streams"
    phases = {"1 stream, direct": lone_direct, "1 stream, gateway": lone_gateway, f"{many}, direct": many_direct,
              f"{many}, gateway": many_gateway}  # fmt: skip
    for number, (direct, _, through) in enumerate(runs, 1):
        phases |= {f"throughput run {number}, direct": direct, f"throughput run {number}, gateway": through}
    warnings = check(phases, {script: script for script in scripts})
    flat_direct = max((run[0] for run in runs), key=lambda phase: phase.chunks / phase.seconds)
    engine = max((run[1] for run in runs), key=lambda engine: engine.rate)
    flat_gateway = max((run[2] for run in runs), key=lambda phase: phase.chunks / phase.seconds)
    engine_rate = engine.rate
    direct_rate, gateway_rate = flat_direct.chunks / flat_direct.seconds, flat_gateway.chunks / flat_gateway.seconds

    mean_tokens = statistics.mean(len(answer) - 1 for answer in answers)
    print(f"guard: {described}, vocab 151936, {args.dtype} on {args.device}; {args.threads} torch thread(s) per "
          f"process; {os.cpu_count()} CPU cores on this machine")  # fmt: skip
    judged = "generator token ids (return_token_ids)" if args.token_ids == "request" else "text deltas"
    forward = (
        "runs its tiny Llama's forward per token" if args.model_upstream else "skips the forward (test_skip_forward)"
    )
    print(
        f"upstream: tests/upstream_server.py in its own process, {forward}; the gateway (own process) judges "
        f"{judged}; answers: {len(scripts)} safe scripts of {mean_tokens:.0f} Llama 3 tokens + <|eot_id|>"
    )
    print(f"one guard step (1 token, lone stream, {step_how}): {step * 1e3:.2f} ms median; lone append "
          f"{append * 1e3:.2f} ms")  # fmt: skip
    print()
    offered = args.streams / (args.pace_ms / 1000) if args.pace_ms else float("inf")
    print(
        f"latency, upstream paced {args.pace_ms:g} ms/token (at {args.streams} streams it offers {offered:.0f} "
        f"tokens/s; measured below: upstream alone {direct_rate:.0f}/s, engine alone {engine_rate:.0f}/s)"
    )
    if offered > engine_rate:
        print(f"  at {args.streams} streams the pace offers more than the engine alone sustains: the gateway falls "
              "behind, and its latency grows along each answer (a queue, not a per-chunk cost)")  # fmt: skip
    header = (f"{'streams':>7} | {'path':<12} | {'TTFT p50 ms':>11} | {'TTFT p99':>8} | {'chunk p50 ms':>12} | "
              f"{'chunk p99':>9} | {'chunks':>6} | {'requests':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))

    def row(streams: Any, name: str, values: list[float | None], chunks: Any = "", requests: Any = "") -> None:
        cells = " | ".join(f"{ms(value):>{width}}" for value, width in zip(values, (11, 8, 12, 9), strict=True))
        print(f"{streams:>7} | {name:<12} | {cells} | {chunks:>6} | {requests:>8}")

    added_lone = after_next_lone = None
    for streams, direct, through in ((1, lone_direct, lone_gateway), (args.streams, many_direct, many_gateway)):
        figures = {}
        for name, phase in (("direct", direct), ("gateway", through)):
            lat, ttft = phase.latencies(), phase.ttfts()
            figures[name] = [p50(ttft), p99(ttft), p50(lat), p99(lat)]
            row(streams, name, figures[name], len(lat), len(phase.answers))
        added = [subtract(g, d) for g, d in zip(figures["gateway"], figures["direct"], strict=True)]
        row(streams, "added", added)
        after = through.after_next()
        row(streams, "gw from next", [None, None, p50(after), p99(after)], len(after))
        print(f"{'':>7}   the gateway's guard: {through.steps}")
        if streams == 1:
            added_lone, after_next_lone = added[2], p50(after)
    print("TTFT: request sent to first content chunk. chunk: the client's receipt minus the upstream's stamp on the "
          "chunk (gw from next: on the chunk after it, the one that lets the guard's tokenizer settle the chunk's "
          "text). added: gateway minus direct. p99 is the maximum below 100 samples.")  # fmt: skip
    print()
    print(f"throughput at {args.streams} streams, upstream unpaced, {args.rounds} request(s) per stream "
          f"(content chunks = generator tokens; every request's prompt judged too); the three in turn, "
          f"{args.repeats} time(s): the best run of each")  # fmt: skip
    header = f"{'path':<58} | {'chunks/s':>9} | {'every run':<17} | {'seconds':>7} | {'chunks':>6}"
    print(header)
    print("-" * len(header))

    def every(rates: list[float]) -> str:
        return ", ".join(f"{rate:.0f}" for rate in rates)

    how = "GuardStreams.push_ids" if args.token_ids == "request" else "GuardStreams.push (text)"
    print(f"{'upstream alone (direct HTTP)':<58} | {direct_rate:>9.1f} | "
          f"{every([run[0].chunks / run[0].seconds for run in runs]):<17} | {flat_direct.seconds:>7.2f} | "
          f"{flat_direct.chunks:>6}")  # fmt: skip
    print(f"{f'engine alone ({how}, a thread per stream)':<58} | {engine_rate:>9.1f} | "
          f"{every([run[1].rate for run in runs]):<17} | {engine.seconds:>7.2f} | {engine.generated:>6}")  # fmt: skip
    print(f"{'gateway (HTTP: upstream, gateway, guard)':<58} | {gateway_rate:>9.1f} | "
          f"{every([run[2].chunks / run[2].seconds for run in runs]):<17} | {flat_gateway.seconds:>7.2f} | "
          f"{flat_gateway.chunks:>6}")  # fmt: skip
    print(f"engine alone: {engine.steps} steps, {engine.guard_tokens / max(engine.steps, 1):.1f} guard tokens per "
          f"step; the gateway's guard: {flat_gateway.steps}")  # fmt: skip
    ratio = gateway_rate / engine_rate
    print(f"gateway / engine alone: {ratio:.2f}x; gateway / upstream alone: {gateway_rate / direct_rate:.2f}x")
    # CPU per relayed chunk: the gateway process against the engine alone on the same answers.
    chunks = max(flat_gateway.chunks, 1)
    gateway_cpu, gateway_forward = flat_gateway.cpu_seconds / chunks, flat_gateway.forward_seconds / chunks
    engine_cpu, engine_forward = engine.cpu_seconds / engine.generated, engine.forward_seconds / engine.generated
    print(f"CPU per relayed chunk (the best throughput runs): gateway process {gateway_cpu * 1e6:.0f} us (guard "
          f"forwards {gateway_forward * 1e6:.0f}, the rest {(gateway_cpu - gateway_forward) * 1e6:.0f}); engine "
          f"alone {engine_cpu * 1e6:.0f} us per generator token (forwards {engine_forward * 1e6:.0f}, the rest "
          f"{(engine_cpu - engine_forward) * 1e6:.0f}); the gateway's own work (HTTP, SSE, JSON, rebuilding): "
          f"{(gateway_cpu - gateway_forward - engine_cpu + engine_forward) * 1e6:.0f} us per chunk")  # fmt: skip
    print()
    for warning in warnings:
        print(warning)
    limit = step + 1e-3
    met = added_lone is not None and added_lone <= limit
    print(f"target: added p50 per chunk at 1 stream {ms(added_lone)} ms <= one guard step + 1 ms = "
          f"{limit * 1e3:.2f} ms: {'met' if met else 'NOT met'}")  # fmt: skip
    met = after_next_lone is not None and after_next_lone <= limit
    print(f"  (counted from the next chunk's stamp, i.e. without the one-token hold of the guard's tokenizer: "
          f"{ms(after_next_lone)} ms: {'within' if met else 'over'} it)")  # fmt: skip
    print(f"target: gateway throughput at {args.streams} streams {gateway_rate:.1f} chunks/s >= 85% of the engine "
          f"alone ({0.85 * engine_rate:.1f}): {'met' if ratio >= 0.85 else 'NOT met'} ({ratio:.0%})")  # fmt: skip
    if args.tiny:
        print(f"target (tiny guard): gateway throughput {gateway_rate:.0f} chunks/s >= 3,000: "
              f"{'met' if gateway_rate >= 3000 else 'NOT met'}")  # fmt: skip
    print(f"run took {time.monotonic() - run_started:.0f} s; command: {command}")


if __name__ == "__main__":
    main()
