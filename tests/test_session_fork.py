"""``fork()``: a session whose state equals its parent's, with no forward.

The gateway opens one guard stream per generated text of an answer (each
choice, each tool call); each is a fork of the session that judged the prompt,
so the prompt is judged once per request."""

from __future__ import annotations

import random

import pytest

from guard import EngineCapacityError, GuardEngine, Policy


def _ids(seed: int, count: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(1000, 150_000) for _ in range(count)]


def _same(left, right) -> None:
    assert [(v.position, v.risk_level, v.category, v.flagged, v.flagged_at) for v in left] == [
        (v.position, v.risk_level, v.category, v.flagged, v.flagged_at) for v in right
    ]
    for a, b in zip(left, right, strict=True):
        assert a.risk_prob == pytest.approx(b.risk_prob, abs=1e-5)


PROMPT = "Tell me about trees."


def _judged(maker, policy, ids):
    """Verdicts of ``ids`` appended after the prompt, then of the end of turn, in a fresh session."""
    with maker.session(policy) as session:
        session.moderate_prompt(PROMPT)
        return session.append(ids), session.finish()


@pytest.mark.parametrize("on_engine", [False, True])
def test_a_fork_judges_on_as_its_parent_would_and_runs_no_forward(tiny_guard, on_engine):
    engine = GuardEngine(tiny_guard) if on_engine else None
    maker = engine or tiny_guard
    policy = Policy(mode="strict")
    head, tail, other = _ids(0, 5), _ids(1, 7), _ids(2, 4)
    try:
        with maker.session(policy) as parent:
            query = parent.moderate_prompt(PROMPT)
            parent.append(head)
            steps = engine.steps if engine else None
            with parent.fork() as twin:
                if engine is not None:
                    assert engine.steps == steps and engine.session_count == 2
                assert (twin.position, twin.response_start, twin.query_verdict) == (
                    parent.position, parent.response_start, query)  # fmt: skip
                appended, finished = _judged(maker, policy, head + tail)
                _same(twin.append(tail), appended[len(head) :])
                _same(twin.finish(), finished)
                # The parent goes on from where it was, untouched by its twin.
                appended, finished = _judged(maker, policy, head + other)
                _same(parent.append(other), appended[len(head) :])
                twin.rollback(twin.response_start)
                parent.rollback(parent.response_start)
                _same(twin.append(other), parent.append(other))
    finally:
        if engine is not None:
            engine.close()


def test_a_fork_counts_against_max_sessions_and_the_kv_budget(tiny_guard):
    with GuardEngine(tiny_guard, max_sessions=2) as engine, engine.session() as parent:
        parent.moderate_prompt(PROMPT)
        with parent.fork():
            with pytest.raises(EngineCapacityError, match="max_sessions"):
                parent.fork()
        positions = parent.position
    # A budget that holds the prompt once but not a second copy of it.
    budget = int(positions * 1.5) * tiny_guard.kv_bytes_per_token()
    with GuardEngine(tiny_guard, kv_budget_bytes=budget) as engine, engine.session() as parent:
        parent.moderate_prompt(PROMPT)
        with pytest.raises(EngineCapacityError, match="a fork of"):
            parent.fork()
