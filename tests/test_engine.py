"""GuardEngine: batched sessions give a plain GuardSession's verdicts, and fail well.

Every engine session is checked against a plain ``GuardSession`` replaying the
same calls on the same (tiny, really loaded) checkpoint: risk levels,
categories and flags exactly, probabilities within 1e-4 (float32). Every wait
is bounded by a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import _thread
import asyncio
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard import (
    EngineCapacityError,
    EngineClosedError,
    EngineStepError,
    GuardEngine,
    SessionClosedError,
    SessionStateError,
    StreamGuard,
)

TOLERANCE = 1e-4
TIMEOUT = 30  # seconds; every wait in this file is bounded
ORDINARY = 151642  # ordinary Qwen3 BPE ids stop here


@pytest.fixture
def engine(tiny_guard):
    engine = GuardEngine(tiny_guard, max_batch_tokens=32, prefill_chunk=8, max_wait_ms=1)
    yield engine
    engine.close()


def assert_same(engine_verdicts, plain_verdicts) -> None:
    assert len(engine_verdicts) == len(plain_verdicts)
    for ours, theirs in zip(engine_verdicts, plain_verdicts, strict=True):
        assert (ours.position, ours.risk_level, ours.category, ours.unsafe, ours.flagged, ours.flagged_at) == (
            theirs.position, theirs.risk_level, theirs.category, theirs.unsafe, theirs.flagged, theirs.flagged_at,
        )  # fmt: skip
        assert abs(ours.risk_prob - theirs.risk_prob) <= TOLERANCE
        if theirs.category_prob is not None:
            assert abs(ours.category_prob - theirs.category_prob) <= TOLERANCE


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def script(seed: int, *, steps: int = 12) -> tuple[str, list[tuple]]:
    """A random conversation: a prompt of random length, then appends of 1-6
    ids, rollbacks and a finish at the end."""
    rng = random.Random(seed)
    prompt = " ".join(rng.choice(["how", "do", "I", "bake", "bread", "?"]) for _ in range(rng.randint(1, 40)))
    calls: list[tuple] = []
    for _ in range(steps):
        if calls and rng.random() < 0.25:
            calls.append(("rollback", rng.random()))  # a fraction of the response so far
        else:
            calls.append(("append", [rng.randrange(ORDINARY) for _ in range(rng.randint(1, 6))]))
    calls.append(("finish",))
    return prompt, calls


def play(session, prompt: str, calls: list[tuple]) -> list:
    """Run the calls on a session (engine or plain); return everything it said."""
    said = [[session.moderate_prompt(prompt)]]
    for call in calls:
        if call[0] == "append":
            said.append(session.append(call[1]))
        elif call[0] == "rollback":
            start = session.response_start
            target = start + int(call[1] * (session.position - start))
            session.rollback(target)
            said.append([])
            assert session.position == target
        else:
            said.append(session.finish())
    return said


def assert_replays(guard: StreamGuard, prompt: str, calls: list[tuple], said: list) -> None:
    plain = guard.session()
    for ours, theirs in zip(said, play(plain, prompt, calls), strict=True):
        assert_same(ours, theirs)


@pytest.fixture
def hold(tiny_guard):
    """``hold(engine)`` starts a step that blocks inside its first layer
    until released, so that calls made meanwhile are queued; it returns
    (release, the blocked call's future), and ``release()`` returns (or
    raises) what that call did. Released at teardown whatever happens, so a
    failing test cannot leave the shared guard patched or the worker stuck."""
    mlp = tiny_guard.model.model.layers[0].mlp
    gate = threading.Event()
    pool = ThreadPoolExecutor(1)

    def start(engine: GuardEngine) -> tuple[Callable[[], list], object]:
        blocker = engine.session()
        blocker.moderate_prompt("hi")
        entered = threading.Event()

        def held(x):
            entered.set()
            assert gate.wait(TIMEOUT), "the test never released the worker"
            return type(mlp).forward(mlp, x)

        mlp.forward = held
        future = pool.submit(blocker.append, [11])
        assert entered.wait(TIMEOUT), "the engine never ran the blocking step"

        def release() -> list:
            gate.set()
            try:
                return future.result(TIMEOUT)
            finally:
                mlp.__dict__.pop("forward", None)  # back to the class's forward

        return release, future

    yield start
    gate.set()
    mlp.__dict__.pop("forward", None)
    pool.shutdown(wait=False)


# --- same verdicts as plain sessions ------------------------------------------------


def test_threads_appending_concurrently_match_plain_sessions(tiny_guard, engine):
    scripts = [script(seed) for seed in range(8)]
    sessions = [engine.session() for _ in scripts]
    with ThreadPoolExecutor(len(scripts)) as pool:
        futures = [pool.submit(play, s, *sc) for s, sc in zip(sessions, scripts, strict=True)]
        results = [future.result(TIMEOUT) for future in futures]
    for (prompt, calls), said in zip(scripts, results, strict=True):
        assert_replays(tiny_guard, prompt, calls, said)
    assert engine.tokens > engine.steps  # several sessions' tokens shared steps


def test_asyncio_many_sessions_match_plain_sessions(tiny_guard, engine):
    streams = [[random.Random(seed).randrange(ORDINARY) for _ in range(12)] for seed in range(24)]

    async def stream(session, ids):
        said = [[await session.moderate_prompt_async(f"question {len(ids)}")]]
        for token_id in ids:
            said.append(await session.append_async(token_id))
        said.append(await session.finish_async())
        await session.close_async()
        return said

    async def main():
        sessions = [engine.session() for _ in streams]
        streaming = (stream(session, ids) for session, ids in zip(sessions, streams, strict=True))
        return await asyncio.wait_for(asyncio.gather(*streaming), TIMEOUT)

    results = asyncio.run(main())
    for ids, said in zip(streams, results, strict=True):
        calls = [("append", [token_id]) for token_id in ids] + [("finish",)]
        assert_replays(tiny_guard, f"question {len(ids)}", calls, said)
    assert engine.session_count == 0


# Rounds of one call per session, each round's calls made concurrently from
# threads so that they share engine steps; chunk sizes cross prefill_chunk.
call = st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, ORDINARY), min_size=1, max_size=12)),
    st.tuples(st.just("rollback"), st.floats(0, 1)),
)


@given(
    prompts=st.lists(st.text("ab ?", max_size=30), min_size=2, max_size=4),
    rounds=st.lists(st.lists(call, min_size=4, max_size=4), min_size=1, max_size=5),
)
def test_random_interleaved_calls_match_plain_sessions(tiny_guard, prompts, rounds):
    with GuardEngine(tiny_guard, max_batch_tokens=16, prefill_chunk=8, max_wait_ms=1) as engine:
        assert_rounds_match_plain_sessions(engine, prompts, rounds)


def assert_rounds_match_plain_sessions(engine: GuardEngine, prompts: list[str], rounds: list[list[tuple]]) -> None:
    """Play ``rounds`` (one call per session each, made concurrently) on engine
    sessions; each session's verdicts must be those of a plain session."""
    sessions = [engine.session() for _ in prompts]
    calls: list[list[tuple]] = [[] for _ in prompts]
    said: list[list] = [[[s.moderate_prompt(p)]] for s, p in zip(sessions, prompts, strict=True)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        for round_calls in rounds:
            futures = [pool.submit(play_one, s, c) for s, c in zip(sessions, round_calls, strict=False)]
            for index, future in enumerate(futures):
                said[index].append(future.result(TIMEOUT))
                calls[index].append(round_calls[index])
    for prompt, session_calls, session_said in zip(prompts, calls, said, strict=True):
        plain = engine.guard.session()
        assert_same(session_said[0], [plain.moderate_prompt(prompt)])
        for c, ours in zip(session_calls, session_said[1:], strict=True):
            assert_same(ours, play_one(plain, c))


def play_one(session, call: tuple) -> list:
    if call[0] == "append":
        return session.append(call[1])
    start = session.response_start
    session.rollback(start + int(call[1] * (session.position - start)))
    return []


# --- scheduling -----------------------------------------------------------------------


def test_long_prompt_is_chunked_and_decodes_are_served_meanwhile(tiny_guard):
    long_prompt = " word" * 600
    with GuardEngine(tiny_guard, max_batch_tokens=8, prefill_chunk=4, max_wait_ms=1) as engine:
        streamer, reader = engine.session(), engine.session()
        streamer.moderate_prompt("hello")
        with ThreadPoolExecutor(1) as pool:
            prompt_future = pool.submit(reader.moderate_prompt, long_prompt)
            poll(lambda: reader._kv.length > 0, "the long prompt to start")
            ids = [random.Random(1).randrange(ORDINARY) for _ in range(6)]
            decoded = [streamer.append(token_id) for token_id in ids]
            # Every decode was served while the prompt was still being prefilled.
            assert not prompt_future.done()
            query = prompt_future.result(TIMEOUT)
        assert engine.steps >= 600 // 4
    plain = tiny_guard.session()
    plain.moderate_prompt("hello")
    for token_id, ours in zip(ids, decoded, strict=True):
        assert_same(ours, plain.append(token_id))
    assert_same([query], [tiny_guard.session().moderate_prompt(long_prompt)])


def test_a_lone_stream_never_waits_and_streams_coming_back_share_steps(tiny_guard):
    # A long max_wait_ms: any wait for nobody would show.
    with GuardEngine(tiny_guard, max_wait_ms=3000) as engine:
        alone, other = engine.session(), engine.session()
        started = time.monotonic()
        alone.moderate_prompt("alone")
        for token_id in range(10):
            alone.append(100 + token_id)
        # One thread driving two sessions in turn: neither waits for the other.
        other.moderate_prompt("in turn")
        for token_id in range(10):
            (alone if token_id % 2 else other).append(100 + token_id)
        assert time.monotonic() - started < 1.5

    rounds, count = 8, 6
    with GuardEngine(tiny_guard, max_wait_ms=300) as engine:
        sessions = [engine.session() for _ in range(count)]
        for session in sessions:
            session.moderate_prompt("together")
        barrier = threading.Barrier(count)

        def stream(session):
            barrier.wait()
            said = [session.append(100 + token_id) for token_id in range(rounds)]
            session.close()  # done: the worker must not wait for it
            return said

        steps = engine.steps
        with ThreadPoolExecutor(count) as pool:
            said = [future.result(TIMEOUT) for future in [pool.submit(stream, s) for s in sessions]]
        # Each caller comes back after its verdicts, one after another: the
        # worker waits for them, so the rounds share steps (a few to line up).
        assert engine.steps - steps <= rounds + 3
    plain = tiny_guard.session()
    plain.moderate_prompt("together")
    for ours, token_id in zip(said[0], range(100, 100 + rounds), strict=True):
        assert_same(ours, plain.append(token_id))


def test_rollback_while_others_are_queued(tiny_guard, engine, hold):
    other = engine.session()
    other.moderate_prompt("queued")
    mine = engine.session()
    mine.moderate_prompt("mine")
    ids = [5, 6, 7, 8]
    first = mine.append(ids)
    release, _ = hold(engine)
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(other.append, [9, 10])
        poll(lambda: engine.pending == 1, "the queued append")
        mine.rollback(mine.response_start + 1)  # not blocked by the queue
        assert mine.position == mine.response_start + 1
        release()
        again = mine.append([42])
        other_said = queued.result(TIMEOUT)
    plain = tiny_guard.session()
    plain.moderate_prompt("mine")
    assert_same(first, plain.append(ids))
    plain.rollback(plain.response_start + 1)
    assert_same(again, plain.append([42]))
    plain_other = tiny_guard.session()
    plain_other.moderate_prompt("queued")
    assert_same(other_said, plain_other.append([9, 10]))


# --- failures ---------------------------------------------------------------------------


def test_a_failed_batch_fails_its_sessions_only_and_leaves_them_unchanged(tiny_guard, engine, hold):
    a, b, c = engine.session(), engine.session(), engine.session()
    for session, prompt in ((a, "one"), (b, "two"), (c, "three")):
        session.moderate_prompt(prompt)
    a.append([1, 2])
    before = {id(s): (s.position, s.kv_cache_bytes(), s._kv.length) for s in (a, b)}
    release, _ = hold(engine)
    mlp = tiny_guard.model.model.layers[1].mlp
    failures = []

    def fails_once(x):
        if not failures and x.shape[1] == 4:  # the step with a's 3 ids and b's 1
            failures.append(x.shape)
            raise RuntimeError("injected failure")
        return type(mlp).forward(mlp, x)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(a.append, [3, 4, 5]), pool.submit(b.append, [6])]
        poll(lambda: engine.pending == 2, "both appends queued in one batch")
        mlp.forward = fails_once  # the next step (a's and b's) fails, after layer 0 wrote their caches
        try:
            release()
            for future in futures:
                with pytest.raises(EngineStepError, match="retry the call") as caught:
                    future.result(TIMEOUT)
                assert isinstance(caught.value.__cause__, RuntimeError)
        finally:
            del mlp.forward
    assert failures and failures[0][1] == 4  # one step held both sessions' ids
    for s in (a, b):
        assert (s.position, s.kv_cache_bytes(), s._kv.length) == before[id(s)]
    # The engine keeps serving, and the failed sessions retry as if nothing happened.
    retried = a.append([3, 4, 5])
    later = c.append([7])
    plain = tiny_guard.session()
    plain.moderate_prompt("one")
    plain.append([1, 2])
    assert_same(retried, plain.append([3, 4, 5]))
    plain_c = tiny_guard.session()
    plain_c.moderate_prompt("three")
    assert_same(later, plain_c.append([7]))


@pytest.mark.parametrize("where", ["queued", "in flight"])
def test_a_call_interrupted_while_it_waits_leaves_its_session_unchanged(tiny_guard, engine, hold, where):
    """A KeyboardInterrupt in the caller's thread while its ids wait for the
    engine (queued, or inside the step running now): the session undoes the
    call, so the engine must not cache those ids afterwards; the next call
    judges from the session's position, as a fresh session does."""
    session = engine.session()
    session.moderate_prompt("interrupted")
    first = session.append([5, 6])
    position = session.position
    mlp = tiny_guard.model.model.layers[0].mlp
    gate, entered = threading.Event(), threading.Event()
    if where == "queued":
        release, _ = hold(engine)
        arrived = lambda: engine.pending == 1  # noqa: E731
    else:

        def held(x):
            entered.set()
            assert gate.wait(TIMEOUT), "the test never released the worker"
            return type(mlp).forward(mlp, x)

        mlp.forward = held
        release, arrived = gate.set, entered.is_set

    def interrupt() -> None:
        poll(arrived, "the call to reach the engine")
        _thread.interrupt_main()  # as Ctrl-C does, in the thread that waits
        time.sleep(0.5)  # past the caller's next look at its request
        release()

    helper = threading.Thread(target=interrupt)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            session.append([7, 8, 9])
            time.sleep(TIMEOUT)  # the interrupt lands here if the call returned first: fails below
    finally:
        helper.join(TIMEOUT)
        gate.set()
        mlp.__dict__.pop("forward", None)
    poll(lambda: not engine._in_flight and engine.pending == 0, "the engine to go idle")
    assert (session.position, session._kv.length) == (position, position)
    again = session.append([10])
    plain = tiny_guard.session()
    plain.moderate_prompt("interrupted")
    assert_same(first, plain.append([5, 6]))
    assert_same(again, plain.append([10]))


def test_closing_a_queued_session_drops_it_without_touching_others(tiny_guard, engine, hold):
    closing, staying = engine.session(), engine.session()
    closing.moderate_prompt("bye")
    staying.moderate_prompt("stay")
    release, _ = hold(engine)
    with ThreadPoolExecutor(2) as pool:
        dropped = pool.submit(closing.append, [1, 2, 3])
        kept = pool.submit(staying.append, [4])
        poll(lambda: engine.pending == 2, "both appends queued")
        closing.close()  # while the worker is busy: the queued append fails at once
        with pytest.raises(SessionClosedError, match="closed while this call waited"):
            dropped.result(TIMEOUT)
        assert engine.pending == 1
        release()
        staying_said = kept.result(TIMEOUT)
    plain = tiny_guard.session()
    plain.moderate_prompt("stay")
    assert_same(staying_said, plain.append([4]))
    with pytest.raises(SessionClosedError):
        closing.append([5])
    assert closing.kv_cache_bytes() == (0, 0)


def test_cancelling_append_async_while_queued_drops_it(tiny_guard, engine, hold):
    cancelled, staying = engine.session(), engine.session()
    cancelled.moderate_prompt("cancel me")
    staying.moderate_prompt("stay")
    position = cancelled.position

    async def main():
        release, _ = await asyncio.to_thread(hold, engine)
        doomed = asyncio.create_task(cancelled.append_async([1, 2, 3]))
        kept = asyncio.create_task(staying.append_async([4]))
        while engine.pending < 2:
            await asyncio.wait_for(asyncio.sleep(0.001), TIMEOUT)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await asyncio.to_thread(poll, lambda: engine.pending == 1, "the cancelled append dropped")
        await asyncio.to_thread(release)
        return await asyncio.wait_for(kept, TIMEOUT), await asyncio.wait_for(cancelled.append_async([8]), TIMEOUT)

    staying_said, after = asyncio.run(main())
    plain = tiny_guard.session()
    plain.moderate_prompt("stay")
    assert_same(staying_said, plain.append([4]))
    plain = tiny_guard.session()
    plain.moderate_prompt("cancel me")
    assert plain.position == position
    assert_same(after, plain.append([8]))  # the cancelled ids never reached the session


def test_engine_close_fails_pending_calls_and_stops_the_worker(tiny_guard, hold):
    engine = GuardEngine(tiny_guard, max_wait_ms=1)
    try:
        queued = engine.session()
        queued.moderate_prompt("waiting")
        release, _running = hold(engine)
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(queued.append, [1])
            poll(lambda: engine.pending == 1, "the queued append")
            closing = pool.submit(engine.close)
            with pytest.raises(EngineClosedError, match="make a new GuardEngine"):
                waiting.result(TIMEOUT)
            with pytest.raises(EngineClosedError):  # the call inside the running step fails too
                release()
            closing.result(TIMEOUT)
        assert not engine._worker.is_alive()
        with pytest.raises(EngineClosedError):
            engine.session()
        with pytest.raises(EngineClosedError):
            queued.append([2])
        assert queued.position == queued.response_start  # unchanged by the failed calls
    finally:
        engine.close()  # no-op when the test got that far; frees the worker when it did not


# --- monitoring -----------------------------------------------------------------------------


def test_a_session_called_from_a_step_listener_fails_loudly_instead_of_hanging(engine, caplog):
    """A step listener runs in the engine's worker: a session call from there
    would wait for the step the worker is in. It raises, changes nothing, and
    the engine goes on serving."""
    session = engine.session()
    session.moderate_prompt("one")
    position = session.position
    raised = []

    def misuse(tokens, sessions, seconds):
        for call in (lambda: session.append([5]), lambda: session.rollback(position), session.close):
            try:
                call()
            except SessionStateError as error:
                raised.append(str(error))

    engine.add_step_listener(misuse)
    verdicts = session.append([1, 2])  # returns: no hang
    engine.remove_step_listener(misuse)
    assert len(verdicts) == 2 and session.position == position + 2
    assert len(raised) == 3 and all("worker thread (a step listener?)" in message for message in raised)
    assert session.append([3])[0].risk_level is not None  # still open, still served
    session.close()


def test_step_listeners_see_every_forward_and_a_failing_one_harms_nothing(tiny_guard, engine, hold, caplog):
    steps = []
    failures = []

    def failing(tokens, sessions, seconds):
        failures.append(tokens)
        raise RuntimeError("a broken metrics exporter")

    def record(tokens, sessions, seconds):
        steps.append((tokens, sessions, seconds))

    engine.add_step_listener(failing)
    engine.add_step_listener(record)
    with pytest.raises(TypeError, match="callable"):
        engine.add_step_listener("not a function")
    a, b = engine.session(), engine.session()
    a.moderate_prompt("one")
    b.moderate_prompt("two")
    # Reported before the call returns: the books are complete at once.
    assert len(steps) == engine.steps and sum(tokens for tokens, _, _ in steps) == engine.tokens
    assert all(seconds > 0 for _, _, seconds in steps)
    assert "step listener raised" in caplog.text and len(failures) == len(steps)

    release, _ = hold(engine)  # one step (the blocker's) runs; a's and b's appends queue behind it
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(a.append, [1, 2, 3]), pool.submit(b.append, [4])]
        poll(lambda: engine.pending == 2, "both appends queued")
        engine.remove_step_listener(failing)
        engine.remove_step_listener(failing)  # not registered any more: ignored
        release()
        for future in futures:
            future.result(TIMEOUT)
    assert steps[-1][:2] == (4, 2)  # a's 3 ids and b's 1, one forward
    assert len(failures) == len(steps) - 2  # removed before the last two steps
    assert len(steps) == engine.steps and engine._worker.is_alive()
    engine.remove_step_listener(record)
    a.append([5])
    assert len(steps) == engine.steps - 1


# --- limits -------------------------------------------------------------------------------


def test_max_sessions_is_refused_at_admission(tiny_guard):
    with GuardEngine(tiny_guard, max_sessions=2) as engine:
        first, _second = engine.session(), engine.session()
        with pytest.raises(EngineCapacityError, match=r"max_sessions=2.*close finished sessions"):
            engine.session()
        first.close()
        engine.session().moderate_prompt("room again")


def test_kv_budget_is_refused_before_anything_changes(tiny_guard):
    per_token = tiny_guard.kv_bytes_per_token()
    with GuardEngine(tiny_guard, kv_budget_bytes=60 * per_token) as engine:
        session = engine.session()
        session.moderate_prompt("short")
        position = session.position
        with pytest.raises(EngineCapacityError, match=r"kv_budget_bytes.*roll back"):
            session.append(list(range(100, 160)))
        assert session.position == position and engine.kv_bytes() == position * per_token
        session.append(list(range(100, 100 + 60 - position)))  # exactly the budget
        with pytest.raises(EngineCapacityError, match="a new session needs room"):
            engine.session()
        session.rollback(session.response_start)
        engine.session().moderate_prompt("hi")


def test_guard_adapter_async_push_on_engine_sessions_matches_the_sync_adapter(tiny_guard):
    """GuardAdapter's async methods: many streams on one event loop share the
    engine's batched forwards and give the pieces a sync adapter gives."""
    import asyncio

    from adapter import GuardAdapter
    from adapter.bundled_tokenizers import generator_tokenizer
    from tests.test_source import encode

    llama3 = generator_tokenizer("llama3")
    answers = [f"Answer {n}: dig around the roots, then lift the stump out." for n in range(6)]

    def strip(pieces):
        return [(p.index, p.text, p.verdict.risk_level if p.verdict else None, p.flagged) for p in pieces]

    expected = []
    for answer in answers:
        adapter = GuardAdapter(tiny_guard.session(), llama3)
        adapter.moderate_prompt("How do I remove a stump?")
        pieces = [piece for token_id in encode(llama3, answer) for piece in adapter.push_ids(token_id)]
        expected.append(strip(pieces + adapter.finish()))

    async def stream(engine, answer):
        adapter = GuardAdapter(engine.session(), llama3)
        await adapter.moderate_prompt_async("How do I remove a stump?")
        pieces = []
        for token_id in encode(llama3, answer):
            pieces += await adapter.push_ids_async(token_id)
        return strip(pieces + await adapter.finish_async())

    async def main():
        with GuardEngine(tiny_guard, max_sessions=8) as engine:
            results = await asyncio.wait_for(asyncio.gather(*(stream(engine, a) for a in answers)), timeout=60)
            return results, engine.steps

    results, steps = asyncio.run(main())
    assert results == expected
    tokens = sum(len(encode(llama3, answer)) for answer in answers)
    assert steps < tokens  # forwards were shared between streams


def test_a_cancelled_async_push_loses_no_verdict(tiny_guard):
    """A forward cannot be interrupted: the cancelled call completes and its
    pieces come out first from the next call."""
    import asyncio

    from adapter import GuardAdapter
    from adapter.bundled_tokenizers import generator_tokenizer
    from tests.test_source import encode

    llama3 = generator_tokenizer("llama3")
    ids = encode(llama3, "Dig around the roots, cut them, and lift the stump out of the ground. " * 8)
    reference = GuardAdapter(tiny_guard.session(), llama3)
    reference.moderate_prompt("Hi")
    expected = [(p.index, p.text) for p in reference.push_ids(ids) + reference.finish()]

    async def main():
        adapter = GuardAdapter(tiny_guard.session(), llama3)
        await adapter.moderate_prompt_async("Hi")
        task = asyncio.create_task(adapter.push_ids_async(ids))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [(p.index, p.text) for p in await asyncio.wait_for(adapter.finish_async(), timeout=60)]

    assert asyncio.run(main()) == expected


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_matches_a_cpu_session(tiny_checkpoint):
    # CUDA attention kernels may hand back other memory layouts than the CPU's.
    cpu = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    cuda = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype="float32")
    ids = [random.Random(3).randrange(ORDINARY) for _ in range(40)]
    with GuardEngine(cuda, max_batch_tokens=32, prefill_chunk=8) as engine:
        sessions = [engine.session() for _ in range(3)]
        plain = cpu.session()
        expected = [plain.moderate_prompt("How do I remove a stump?")]
        expected += [verdict for token in ids for verdict in plain.append(token)]
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(
                lambda s: [s.moderate_prompt("How do I remove a stump?")] + [v for t in ids for v in s.append(t)],
                sessions,
            ))  # fmt: skip
    for verdicts in results:
        assert [v.risk_level for v in verdicts] == [v.risk_level for v in expected]
        assert max(abs(a.risk_prob - b.risk_prob) for a, b in zip(verdicts, expected, strict=True)) <= 1e-3
