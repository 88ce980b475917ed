"""GuardEngine under stress: threads and asyncio tasks at random, on one engine.

Six threads and six asyncio tasks (on one event loop, in a thread of its own)
each play a seeded random script on engine sessions, all at once: prompts,
appends of 1 to 40 ids, rollbacks to random positions, a finish now and then,
sessions closed in the middle of a script (by their own caller, or by a timer
thread while a call may be queued or inside the running forward), and async
calls cancelled by ``asyncio.wait_for`` or ``task.cancel()`` at random
moments. Every call that took effect is recorded with what it returned; then
each session is replayed, call by call, on a lone plain ``GuardSession``, and
its verdicts must be the same (risk levels, categories and flags exactly,
probabilities and logits within 1e-4 in float32).

A cancelled call either never took effect or took effect whole (its forward
had finished, or a rollback had run, before the cancellation); which one is
read from the session once the call's thread is done, and recorded.
Afterwards the engine's books must balance: open sessions, nothing pending,
KV bytes equal to the positions held, and no engine thread left once closed.
Every wait is bounded, so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from guard import GuardEngine, SessionClosedError
from tests.test_engine import TOLERANCE, assert_same

TIMEOUT = 60  # seconds; every wait in this file is bounded
ORDINARY = 151642  # ordinary Qwen3 BPE ids stop here
THREADS = TASKS = 6
CALLS = 80  # per worker, over all its sessions
WORDS = ["how", "do", "I", "bake", "bread", "?", "the", "oven", "is", "hot"]


@dataclass
class Record:
    """One session's calls that took effect, and what each returned (None
    when a cancelled call took effect without returning)."""

    session: object = None
    prompt: str | None = None
    query: object = None
    scaffold: tuple[torch.Tensor, torch.Tensor] | None = None
    calls: list[tuple] = field(default_factory=list)  # (name, argument, verdicts or None, logits or None)


@dataclass
class Tally:
    cancelled_undone: int = 0  # cancelled calls that did not take effect
    cancelled_applied: int = 0  # cancelled calls that took effect whole
    closed_under_call: int = 0  # calls failed by a close from another thread


def logits_of(session) -> tuple[torch.Tensor, torch.Tensor]:
    return session.last_logits.risk_level.clone(), session.last_logits.category.clone()


class Script:
    """A worker's random choices (seeded), made as it goes: rollback targets
    depend on where the session is."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def prompt(self) -> str:
        words = 300 if self.rng.random() < 0.1 else self.rng.randint(1, 60)  # now and then a chunked prefill
        return " ".join(self.rng.choice(WORDS) for _ in range(words))

    def next_call(self, session) -> tuple:
        rng = self.rng
        if session.response_start is None:
            return ("moderate_prompt", self.prompt())
        roll = rng.random()
        if roll < 0.06:
            return ("close", None)
        start, end = session.response_start, session.position
        if session.finished or (roll < 0.3 and end > start):
            top = end - 2 if session.finished else end  # not inside the end of turn
            return ("rollback", rng.randint(start, top))
        if roll < 0.35:
            return ("finish", None)
        return ("append", [rng.randrange(ORDINARY) for _ in range(rng.randint(1, 40))])


def record_success(record: Record, session, name: str, argument, result) -> None:
    if name == "moderate_prompt":
        record.prompt, record.query, record.scaffold = argument, result, logits_of(session)
    elif name in ("append", "finish"):
        record.calls.append((name, argument, result, logits_of(session)))
    elif name == "rollback":
        record.calls.append((name, argument, None, None))


# --- the thread workers ------------------------------------------------------------


def thread_worker(engine: GuardEngine, seed: int, records: list[Record], tally: Tally, lock: threading.Lock) -> None:
    script = Script(seed)
    calls = 0
    while calls < CALLS:
        session = engine.session()
        record = Record(session)
        with lock:
            records.append(record)
        while calls < CALLS:
            name, argument = script.next_call(session)
            calls += 1
            if name == "close":
                session.close()
                break
            closer = None
            if name in ("append", "moderate_prompt") and script.rng.random() < 0.08:
                # Close the session from another thread while this call may be
                # queued, inside the running forward, or already done.
                closer = threading.Timer(script.rng.uniform(0, 0.004), session.close)
                closer.start()
            before = session.position
            try:
                result = getattr(session, name)(argument) if argument is not None else getattr(session, name)()
            except SessionClosedError:
                assert closer is not None, "SessionClosedError without a close"
                closer.join(TIMEOUT)
                assert session.closed and session.position == before  # undone
                with lock:
                    tally.closed_under_call += 1
                break
            record_success(record, session, name, argument, result)
            if closer is not None:
                closer.join(TIMEOUT)
                if session.closed:
                    break


# --- the asyncio workers -----------------------------------------------------------------


class Gate:
    """Tracks the one call of a session running on the engine's call threads,
    so that after a cancellation the test knows when that call is over (or
    that it will never start)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = "pending"  # -> running -> done, or -> abandoned
        self.done = threading.Event()


class Abandoned(Exception):
    pass


def gated(session) -> None:
    """Route the session's methods (as its *_async twins call them) through its current gate."""
    for name in ("moderate_prompt", "append", "rollback", "finish", "close"):
        method = getattr(session, name)

        def call(*args, _method=method):
            gate = session.gate
            with gate.lock:
                if gate.state == "abandoned":
                    raise Abandoned
                gate.state = "running"
            try:
                return _method(*args)
            finally:
                gate.state = "done"
                gate.done.set()

        setattr(session, name, call)


async def settle(gate: Gate) -> None:
    """After a cancellation: wait until the call is over, or make sure it never starts."""
    with gate.lock:
        if gate.state == "pending":
            gate.state = "abandoned"
            return
    assert await asyncio.to_thread(gate.done.wait, TIMEOUT), "a cancelled call never ended"


async def task_worker(engine: GuardEngine, seed: int, records: list[Record], tally: Tally, lock: threading.Lock):
    script = Script(seed)
    calls = 0
    while calls < CALLS:
        session = engine.session()
        record = Record(session)
        session.gate = Gate()
        gated(session)
        with lock:
            records.append(record)
        while calls < CALLS:
            name, argument = script.next_call(session)
            calls += 1
            coroutine = getattr(session, f"{name}_async")
            session.gate = gate = Gate()
            if name == "close":
                await asyncio.wait_for(coroutine(), TIMEOUT)
                break
            call = coroutine(argument) if argument is not None else coroutine()
            before = session.position
            how = script.rng.random() if name != "finish" else 1.0
            try:
                if how < 0.1:
                    result = await asyncio.wait_for(call, script.rng.uniform(0, 0.003))
                elif how < 0.2:
                    task = asyncio.create_task(call)
                    await asyncio.sleep(script.rng.uniform(0, 0.003))
                    task.cancel()
                    result = await task
                else:
                    result = await asyncio.wait_for(call, TIMEOUT)
            except (asyncio.CancelledError, TimeoutError):
                await settle(gate)
                applied = took_effect(session, name, argument, before)
                with lock:
                    if applied:
                        tally.cancelled_applied += 1
                    else:
                        tally.cancelled_undone += 1
                if applied:
                    # Its verdicts were lost with the cancelled call, but its logits are the session's last.
                    verdicts = session.query_verdict if name == "moderate_prompt" else None
                    record_success(record, session, name, argument, verdicts)
                continue
            record_success(record, session, name, argument, result)


def took_effect(session, name: str, argument, position: int) -> bool:
    """Whether a cancelled call took effect; anything in between fails the test."""
    if name == "moderate_prompt":
        applied = session.response_start is not None
        assert applied or (session.position, session.response_start) == (0, None)
        return applied
    if name == "append":
        assert session.position in (position, position + len(argument)), "a cancelled append half applied"
        return session.position == position + len(argument)
    if name == "rollback":
        assert session.position in (position, argument)
        return session.position == argument
    raise AssertionError(f"{name} is never cancelled here")


def run_tasks(engine: GuardEngine, records: list[Record], tally: Tally, lock: threading.Lock) -> None:
    async def main():
        workers = (task_worker(engine, 1000 + n, records, tally, lock) for n in range(TASKS))
        await asyncio.wait_for(asyncio.gather(*workers), TIMEOUT)

    asyncio.run(main())


# --- the replay ------------------------------------------------------------------------------


def assert_close(ours: tuple[torch.Tensor, torch.Tensor], session) -> None:
    for mine, plain in zip(ours, (session.last_logits.risk_level, session.last_logits.category), strict=True):
        assert mine.shape == plain.shape
        assert torch.allclose(mine, plain, rtol=0, atol=TOLERANCE), (mine - plain).abs().max()


def replay(guard, record: Record) -> int:
    """Replay a session's calls on a lone plain session; the number compared."""
    if record.prompt is None:
        assert not record.calls
        return 0
    plain = guard.session()
    assert_same([record.query], [plain.moderate_prompt(record.prompt)])
    assert_close(record.scaffold, plain)
    for name, argument, verdicts, logits in record.calls:
        if name == "rollback":
            plain.rollback(argument)
            continue
        theirs = plain.append(argument) if name == "append" else plain.finish()
        if verdicts is not None:
            assert_same(verdicts, theirs)
        assert_close(logits, plain)
    if not record.session.closed:
        assert plain.position == record.session.position
    plain.close()
    return len(record.calls) + 1


def engine_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("guard-engine")}


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_batch_tokens=64, prefill_chunk=16, max_wait_ms=1),
        dict(max_batch_tokens=24, prefill_chunk=8, max_wait_ms=0),
    ],
    ids=["chunks-of-16", "chunks-of-8-no-wait"],
)
def test_threads_and_tasks_at_random_match_lone_sessions(tiny_guard, settings):
    before = engine_threads()
    engine = GuardEngine(tiny_guard, **settings)
    records: list[Record] = []
    tally, lock = Tally(), threading.Lock()
    errors: list[BaseException] = []

    def guarded(target, *args) -> None:
        try:
            target(*args)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    try:
        workers = [
            threading.Thread(target=guarded, args=(thread_worker, engine, n, records, tally, lock), name=f"stress-{n}")
            for n in range(THREADS)
        ]
        workers.append(threading.Thread(target=guarded, args=(run_tasks, engine, records, tally, lock)))
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(TIMEOUT)
            assert not worker.is_alive(), f"{worker.name} hung"
        if errors:
            raise errors[0]

        # The books balance.
        open_sessions = [record.session for record in records if not record.session.closed]
        assert engine.session_count == len(open_sessions)
        assert engine.pending == 0
        per_token = tiny_guard.kv_bytes_per_token()
        assert engine.kv_bytes() == sum(session.position for session in open_sessions) * per_token
        for session in open_sessions:
            assert session.kv_cache_bytes()[0] == session.position * per_token
        assert engine.steps > 0 and engine.tokens > engine.steps  # steps were shared
    finally:
        engine.close()

    # No engine thread outlives close(): the worker is joined, call threads end by themselves.
    deadline = time.monotonic() + TIMEOUT
    while engine_threads() - before:
        assert time.monotonic() < deadline, f"threads left after close(): {engine_threads() - before}"
        time.sleep(0.01)

    compared = sum(replay(tiny_guard, record) for record in records)
    assert compared > THREADS + TASKS
    assert tally.cancelled_undone + tally.cancelled_applied > 0, "no async call was cancelled"
    print(f"{len(records)} sessions, {compared} calls replayed, {engine.steps} steps; {tally}")
