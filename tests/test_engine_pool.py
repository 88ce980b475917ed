"""The engine's KV pool and batched step, as sessions meet them.

Slots of a closed session are reused and leak nothing; a rollback rewrites
the session's own slots in place; admission is exact at the KV budget; a
plain session is the engine with one stream (the same numbers, bit for bit);
``fork`` gives a session in the same state that then judges as a fresh one
fed the same ids; the fixed-shape graph path (run eagerly on the CPU) and
the two attention paths give the verdicts of the plain path; one step may
mix sessions of different verdict arithmetic.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.bundled_tokenizers import qwen3_tokenizer_path
from guard import EngineCapacityError, GuardEngine, Policy, SessionClosedError, StreamGuard
from guard.runner import ModelRunner
from guard.session import GuardSession
from guard.testing import write_tiny_checkpoint
from tests.test_engine import ORDINARY, assert_rounds_match_plain_sessions, assert_same, call

BOMB = 12764  # the Qwen3 id of " bomb"


def ids(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(ORDINARY) for _ in range(count)]


def replay(guard: StreamGuard, prompt: str, appended: list[int], **policy) -> tuple[GuardSession, list]:
    """A fresh plain session fed the prompt and ``appended``; its verdicts."""
    session = guard.session(Policy(**policy))
    session.moderate_prompt(prompt)
    return session, session.append(appended) if appended else []


@pytest.fixture(scope="module")
def wired_guard(tmp_path_factory):
    """" bomb" is Unsafe: two in a row flag the stream."""
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("bomb"), tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=[BOMB]
    )
    return StreamGuard.from_pretrained(folder, device="cpu", dtype="float32")


# --- the pool as sessions use it -------------------------------------------------------------------


def test_slots_of_a_closed_session_are_reused_and_hold_nothing_of_it(tiny_guard):
    with GuardEngine(tiny_guard) as engine:
        first = engine.session()
        first.moderate_prompt("a first conversation, long enough to leave keys behind " * 4)
        first.append(ids(1, 40))
        base, capacity = first._kv.base, engine._runner.pool.capacity
        first.close()
        second = engine.session()
        said = [second.moderate_prompt("another"), *second.append(ids(2, 30))]
        assert second._kv.base == base and engine._runner.pool.capacity == capacity  # the same slots
    plain = tiny_guard.session()
    assert_same(said, [plain.moderate_prompt("another"), *plain.append(ids(2, 30))])


def test_rollback_inside_a_slot_rewrites_the_same_slots(tiny_guard):
    with GuardEngine(tiny_guard) as engine:
        session = engine.session()
        session.moderate_prompt("roll me back")
        start = session.response_start
        session.append(ids(3, 50))
        base, reserved = session._kv.base, session._kv.reserved
        for keep in (49, 30, 1, 0):  # every rollback stays in the region; appends overwrite its slots
            session.rollback(start + keep)
            again = session.append(ids(4 + keep, 5))
            assert (session._kv.base, session._kv.reserved) == (base, reserved)
            plain, expected = replay(tiny_guard, "roll me back", ids(3, 50)[:keep] + ids(4 + keep, 5))
            assert_same(again, expected[keep:])
            assert torch.allclose(session.last_logits.risk_level, plain.last_logits.risk_level[-5:], atol=1e-5)
            session.rollback(start + keep + 5)


def test_admission_at_the_kv_budget_is_exact(tiny_guard):
    per_token = tiny_guard.kv_bytes_per_token()
    with GuardEngine(tiny_guard, kv_budget_bytes=100 * per_token, max_sessions=4) as engine:
        session = engine.session()
        session.moderate_prompt("budget")
        held = session.position
        session.append(ids(5, 100 - held - 10))  # 90 positions held
        with pytest.raises(EngineCapacityError, match="a fork of 90 positions needs room"):
            session.fork()  # another 90 would pass 100
        assert engine.session_count == 1 and engine.kv_bytes() == 90 * per_token
    with GuardEngine(tiny_guard, kv_budget_bytes=100 * per_token, max_sessions=4) as engine:
        session = engine.session()
        session.moderate_prompt("budget")
        session.append(ids(5, 50 - session.position))  # 50 held
        fork = session.fork()  # 50 more: exactly the budget, admitted
        assert engine.kv_bytes() == 100 * per_token
        with pytest.raises(EngineCapacityError, match="judging 1 more tokens needs room"):
            fork.append([7])
        with pytest.raises(EngineCapacityError, match="a new session needs room"):
            engine.session()
        with pytest.raises(EngineCapacityError, match="a fork of 50 positions needs room"):
            session.fork()
        session.rollback(session.response_start)
        fork.append([7])  # room again
        assert engine.kv_bytes() == (session.position + fork.position) * per_token


def test_the_kv_budget_counts_a_call_between_its_step_and_its_return(tiny_guard):
    """Once the worker has judged a call's ids, they are cached, whether or not
    the caller's thread has taken the verdicts yet: the budget counts them
    all the while, so no session is admitted past it meanwhile."""
    per_token = tiny_guard.kv_bytes_per_token()
    with GuardEngine(tiny_guard, kv_budget_bytes=60 * per_token, max_sessions=4) as engine:
        session = engine.session()
        session.moderate_prompt("budget")
        wait, seen = engine._wait, []

        def wait_then_look(request):
            parts = wait(request)  # the step ran; the caller has not taken its verdicts yet
            seen.append((session._kv.length, engine.kv_bytes()))
            with pytest.raises(EngineCapacityError, match="a new session needs room"):
                engine.session()
            return parts

        engine._wait = wait_then_look
        session.append(ids(6, 60 - session.position))
        assert seen == [(60, 60 * per_token)]
        assert engine.session_count == 1


def test_a_fork_counts_against_max_sessions(tiny_guard):
    with GuardEngine(tiny_guard, max_sessions=2) as engine:
        session = engine.session()
        session.moderate_prompt("two at most")
        fork = session.fork()
        with pytest.raises(EngineCapacityError, match="max_sessions=2"):
            session.fork()
        fork.close()
        session.fork().close()
        session.close()
        with pytest.raises(SessionClosedError):
            session.fork()


def test_fork_async_on_the_event_loop(tiny_guard):
    async def main():
        with GuardEngine(tiny_guard) as engine:
            parent = engine.session()
            await parent.moderate_prompt_async("async")
            await parent.append_async(ids(30, 4))
            children = await asyncio.gather(*(parent.fork_async() for _ in range(3)))
            said = await asyncio.gather(*(child.append_async(ids(31 + n, 2)) for n, child in enumerate(children)))
            assert engine.session_count == 4
            return said

    said = asyncio.run(main())
    for n, ours in enumerate(said):
        _, theirs = replay(tiny_guard, "async", ids(30, 4) + ids(31 + n, 2))
        assert_same(ours, theirs[4:])


# --- a session is the engine with one stream ------------------------------------------------------------


def test_a_plain_session_is_the_engine_with_one_stream(tiny_guard):
    """The same runner code, the same steps: the same numbers, bit for bit."""
    prompt = " word" * 300  # two steps of 256
    appended = [ids(6, 1), ids(7, 12), ids(8, 300)]
    with GuardEngine(tiny_guard, prefill_chunk=256, max_batch_tokens=256) as engine:
        sessions = [tiny_guard.session(), engine.session()]
        logits = []
        for session in sessions:
            said = [[session.moderate_prompt(prompt)]] + [session.append(batch) for batch in appended]
            said.append(session.finish())
            logits.append((session.last_logits.risk_level, session.last_logits.category))
            session.said = said
        for ours, theirs in zip(*(session.said for session in sessions), strict=True):
            assert [(v.risk_level, v.risk_prob, v.category_prob) for v in ours] == [
                (v.risk_level, v.risk_prob, v.category_prob) for v in theirs
            ]
        assert all(torch.equal(a, b) for a, b in zip(*logits, strict=True))


# --- fork ---------------------------------------------------------------------------------------------------


def test_a_fork_judges_as_a_fresh_session_fed_the_same_ids(wired_guard):
    for make in ("plain", "engine"):
        with GuardEngine(wired_guard) as engine:
            open_session = wired_guard.session if make == "plain" else engine.session
            parent = open_session()
            parent.moderate_prompt("tell me")
            head = [*ids(9, 6), BOMB, BOMB]  # flagged at the second bomb
            parent.append(head)
            assert parent.flagged
            child = parent.fork()
            assert type(child) is type(parent)
            assert (child.position, child.response_start, child.flagged_at, child.query_verdict) == (
                parent.position, parent.response_start, parent.flagged_at, parent.query_verdict,
            )  # fmt: skip
            assert child.kv_cache_bytes()[0] == parent.kv_cache_bytes()[0]
            # They go on independently: the child rolls back before the flag, the parent goes on.
            child.rollback(child.response_start + 6)
            assert not child.flagged and parent.flagged
            child_said = child.append(ids(10, 7)) + child.finish()
            parent_said = parent.append(ids(11, 3))
            _, expected_child = replay(wired_guard, "tell me", ids(9, 6) + ids(10, 7))
            _fresh, expected_parent = replay(wired_guard, "tell me", head + ids(11, 3))
            assert_same(child_said[:-2], expected_child[6:])
            assert_same(parent_said, expected_parent[-3:])
            fresh_child = wired_guard.session()
            fresh_child.moderate_prompt("tell me")
            fresh_child.append(ids(9, 6) + ids(10, 7))
            assert_same(child_said[-2:], fresh_child.finish())


def test_a_fork_keeps_the_reasoning_state(tiny_guard):
    with GuardEngine(tiny_guard) as engine:
        parent = engine.session()
        parent.moderate_prompt("think first")
        parent.begin_reasoning()
        parent.append([198, *ids(12, 5)])
        child = parent.fork()
        assert child.reasoning_open and child.response_start == parent.response_start
        child.append([198])
        child_said = child.end_reasoning() + child.append(ids(13, 4)) + child.finish()
    fresh = tiny_guard.session()
    fresh.moderate_prompt("think first")
    fresh.begin_reasoning()
    fresh.append([198, *ids(12, 5), 198])
    assert_same(child_said, fresh.end_reasoning() + fresh.append(ids(13, 4)) + fresh.finish())


# --- paths that must agree -----------------------------------------------------------------------------------

@settings(max_examples=15)
@given(
    prompts=st.lists(st.text("ab ?", max_size=30), min_size=1, max_size=4),
    rounds=st.lists(st.lists(call, min_size=4, max_size=4), min_size=1, max_size=3),
    path=st.sampled_from(["graph", "gathered", "in place"]),
)
def test_every_step_path_gives_the_plain_sessions_verdicts(tiny_guard, prompts, rounds, path):
    """The fixed-shape graph path (eager on the CPU: buckets, padding rows,
    static buffers), every row gathered, and every row in place: each gives
    what a plain session gives, with sessions sharing steps."""
    with GuardEngine(tiny_guard, graphs="eager" if path == "graph" else "off", max_wait_ms=1) as engine:
        engine._runner.in_place_from = 0 if path == "in place" else None
        assert_rounds_match_plain_sessions(engine, prompts, rounds)


def assert_graph_streams_match_plain_sessions(engine: GuardEngine, reference_guard, streams: list[list[int]]) -> None:
    """Streams appending one id per call from threads, on ``engine``'s graph
    path (every row batched, rows padded to a bucket), each equal to a plain
    session of ``reference_guard``."""
    runner = engine._runner
    runner.in_place_from = None
    sessions = [engine.session() for _ in streams]
    for n, session in enumerate(sessions):
        session.moderate_prompt(f"stream {n}")

    def stream(session, appended):
        return [verdict for token in appended for verdict in session.append(token)]

    with ThreadPoolExecutor(len(sessions)) as pool:
        said = list(pool.map(stream, sessions, streams))
    assert runner.graphs.captured > 0
    for n, (appended, ours) in enumerate(zip(streams, said, strict=True)):
        plain = reference_guard.session()
        plain.moderate_prompt(f"stream {n}")
        assert_same(ours, [verdict for token in appended for verdict in plain.append(token)])


def test_streams_on_the_graph_path(tiny_guard):
    """Decode steps of several streams (rows padded to a bucket) on the graph path."""
    with GuardEngine(tiny_guard, graphs="eager", max_wait_ms=20) as engine:
        assert_graph_streams_match_plain_sessions(engine, tiny_guard, [ids(20 + n, 12) for n in range(5)])


def test_a_plain_session_on_the_graph_path(tiny_guard):
    runner = ModelRunner(tiny_guard, graphs="eager")
    runner.in_place_from = None
    on_graphs, plain = GuardSession(tiny_guard, runner=runner), tiny_guard.session()
    for session in (on_graphs, plain):
        session.said = [session.moderate_prompt("graphs")] + [v for i in ids(14, 20) for v in session.append(i)]
        session.rollback(session.response_start + 3)
        session.said += session.append(ids(15, 3)) + session.finish()
    assert_same(on_graphs.said, plain.said)
    assert runner.graphs.captured >= 2  # one bucket pair per span it met, at least


def test_one_step_mixes_sessions_of_different_arithmetic(tiny_guard):
    policies = [Policy(arithmetic="upstream"), Policy(arithmetic="float32"), Policy()]
    streams = [ids(16 + n, 10) for n in range(len(policies))]
    with GuardEngine(tiny_guard, max_wait_ms=50) as engine:
        sessions = [engine.session(policy) for policy in policies]
        for session in sessions:
            session.moderate_prompt("mixed")

        def stream(session, appended):
            return [verdict for token in appended for verdict in session.append(token)]

        steps = engine.steps
        with ThreadPoolExecutor(len(sessions)) as pool:
            said = list(pool.map(stream, sessions, streams))
        assert engine.steps - steps < sum(map(len, streams))  # they shared steps
    for policy, appended, ours in zip(policies, streams, said, strict=True):
        plain = tiny_guard.session(policy)
        plain.moderate_prompt("mixed")
        theirs = plain.append(appended)
        assert_same(ours, theirs)
        # Each row of the shared steps took its own session's arithmetic: bf16-rounded probabilities or not.
        in_bf16 = [torch.tensor(v.risk_prob).bfloat16().item() == v.risk_prob for v in ours]
        assert all(in_bf16) if policy.arithmetic == "upstream" else not any(in_bf16)
