"""GuardEngine: many conversations, one guard, one batched forward per step.

A plain ``GuardSession`` runs a step for every call, so the guard's weights
are read once per token per conversation. The engine owns a
``guard.runner.ModelRunner`` (the model, one KV pool for all its sessions,
CUDA graphs) in one worker thread; sessions hand it their new ids and wait,
and at every step the worker runs **one** forward over the new tokens of
every waiting session (see ``guard.runner`` for the step itself):

* the batch is a single packed row (batch 1, T tokens in all), not a padded
  ``[sessions, longest, hidden]`` batch: sessions bring very different
  numbers of tokens (one decode id beside a 256-token prompt chunk), and
  padding would compute and mask the difference; the projections and the MLP
  (where the weights are read) see one ``[1, T, hidden]`` matrix either way;
* each token gets its own session's position (rotary); the attention of all
  short segments (decode tokens) is one batched call over the KV pool with
  per-row lengths; prompt chunks attend over their own slice of the pool;
* a long prompt is cut into ``prefill_chunk`` tokens per step, so other
  sessions' decode tokens go into the same steps instead of waiting behind it;
* both heads and the verdict arithmetic run once per step over every token,
  on the device, with one copy of the numbers to the host;
* after a step the worker waits for the sessions it served to come back
  (they do so one after another, as their callers take their verdicts), so
  that N streams make one step of N tokens, not a large and a small one.

``EngineSession`` is a ``GuardSession`` whose steps go through the engine's
queue, so the template, verdicts, debounce, rollback, fork, end of turn,
context-limit policy, atomic calls and per-session lock are GuardSession's
own, and its verdicts equal a plain session's (tested). A plain session is
the same thing with one stream: the same runner code, on the guard's own.

Monitoring: ``steps`` and ``tokens`` count forwards and tokens, and
``add_step_listener(callback)`` reports every forward's tokens, sessions and
duration.

Reliability: a forward that raises fails the calls in that batch (each gets
``EngineStepError`` with the cause, and its session stays as it was before the
call) while the engine keeps serving; a session closed, an ``*_async`` call
cancelled, or a caller interrupted (KeyboardInterrupt) while queued is dropped
without touching the others (inside the running forward: undone after it); sessions are
bounded by ``max_sessions`` and their KV cache by ``kv_budget_bytes``, both
refused at admission with ``EngineCapacityError``; every session has at most
one call queued (its lock), so the queue is bounded by ``max_sessions``;
``close()`` fails every pending call with ``EngineClosedError`` and stops the
worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from guard.errors import (
    EngineCapacityError,
    EngineClosedError,
    EngineStepError,
    GuardError,
    SessionClosedError,
    SessionStateError,
)
from guard.policy import Policy, Verdict
from guard.runner import AttentionMode, FusedMode, GraphMode, Judged, ModelRunner, Segment, StepOutput
from guard.session import GuardSession
from guard.template import Prompt

if TYPE_CHECKING:
    from guard.stream_guard import StreamGuard

__all__ = ["EngineSession", "GuardEngine", "StepListener"]

logger = logging.getLogger(__name__)

#: ``callback(tokens, sessions, seconds)``: after each batched forward, the
#: tokens it judged, the sessions they belong to and its duration in seconds.
StepListener = Callable[[int, int, float], object]

# How often a waiting caller checks that the worker is still alive: a bug
# that killed the worker must not leave callers waiting forever.
_LIVENESS_POLL_S = 0.25


class _CallCancelled(GuardError):
    """An ``*_async`` call was cancelled; raised in its (abandoned) thread only."""


class _CallToken:
    """Identifies one ``*_async`` call, so that cancelling it cancels its own
    request and not another thread's call on the same session."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


_current_call = threading.local()


def _mark_pool_thread() -> None:
    """The engine's call threads serve any session's next call: which thread
    made a call says nothing about which session it will call for next."""
    _current_call.pool = True


def _run_with_token(token: _CallToken, method: Callable[..., Any], args: tuple) -> Any:
    _current_call.token = token
    try:
        return method(*args)
    finally:
        _current_call.token = None


class _Request:
    """One session's ids waiting for (or inside) the batched forward."""

    __slots__ = ("cancel_error", "consumed", "done", "error", "failure", "ids", "in_flight", "parts", "query",
                 "session", "thread", "token")  # fmt: skip

    def __init__(self, session: EngineSession, ids: list[int], token: _CallToken | None, query: bool) -> None:
        self.session = session
        self.ids = ids
        self.token = token
        self.query = query  # a prompt: the query heads' verdicts too
        # The caller's thread, blocked in this call until it completes (None on a pool thread).
        self.thread = None if getattr(_current_call, "pool", False) else threading.get_ident()
        self.consumed = 0  # ids already through the model (chunked prefill)
        self.parts: list[Judged] = []  # what each step said about its chunk
        self.in_flight = False  # inside the forward that runs now: its cache is being written
        self.cancel_error: BaseException | None = None  # cancelled while in flight: fail it after the step
        self.error: BaseException | None = None  # raised as it is (closed, cancelled)
        self.failure: BaseException | None = None  # the forward raised: raised as EngineStepError from it
        self.done = threading.Event()


class _SessionLock:
    """An engine session's lock (every call of the session takes it), which
    refuses the engine's own worker thread: a call from a step listener would
    wait for the step the worker is in, a hang, so it fails loudly instead."""

    def __init__(self, engine: GuardEngine) -> None:
        self._engine = engine
        self._lock = threading.RLock()

    def __enter__(self) -> _SessionLock:
        self.refuse_the_worker()
        self._lock.acquire()
        return self

    def refuse_the_worker(self) -> None:
        if threading.current_thread() is self._engine._worker:
            raise SessionStateError(
                "an engine session was called from the engine's worker thread (a step listener?); it would wait "
                "for itself: call sessions from your own threads, and keep step listeners to recording figures"
            )

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


class EngineSession(GuardSession):
    """A ``GuardSession`` served by a ``GuardEngine`` (made by ``engine.session()``).

    Same methods and verdicts as ``GuardSession``; its forwards are batched
    with the other sessions' by the engine's worker. The ``*_async`` methods
    run the call on the engine's pool of call threads and await it, so they
    never block the event loop; cancelling one drops its queued ids (or, if
    they are inside the forward running now, undoes them once it ends). A
    call whose forward had already ended when it was cancelled (or a
    ``rollback_async`` already running) still completes, in its thread: a
    cancelled call takes effect whole or not at all (``position`` tells which).
    """

    def __init__(self, engine: GuardEngine, policy: Policy | None = None) -> None:
        super().__init__(engine.guard, policy, runner=engine._runner)
        self._engine = engine
        self._closing = False
        self._lock = _SessionLock(engine)

    @property
    def engine(self) -> GuardEngine:
        return self._engine

    def _run(self, ids: list[int], query: bool = False) -> Judged:
        # Atomic like GuardSession._run: if the engine fails, closes or
        # cancels the request, _step rewinds the chunks the worker cached.
        with self._step():
            request = self._engine._submit(self, list(ids), query)
            parts = self._engine._wait(request)
            self._position += len(ids)
        return Judged.concat(parts)

    def _spawn(self) -> EngineSession:
        return self._engine._admit(self.policy, parent=self)

    def close(self) -> None:
        """Free the KV cache and the engine slot. A call of this session that
        waits in the engine's queue fails with ``SessionClosedError`` (and is
        undone); one inside the running forward is undone when it ends."""
        self._lock.refuse_the_worker()  # before anything changes
        self._closing = True
        self._engine._cancel(
            lambda request: request.session is self,
            lambda: SessionClosedError(
                "the session was closed while this call waited for the guard engine; nothing was appended. "
                "Start a new session with engine.session()"
            ),
        )
        super().close()  # takes the lock: waits for a call in flight to end
        self._engine._release(self)

    # --- asyncio ------------------------------------------------------------

    async def append_async(self, ids: int | Iterable[int]) -> list[Verdict]:
        """``append`` without blocking the event loop."""
        return await self._engine._call_async(self.append, ids if isinstance(ids, int) else list(ids))

    async def moderate_prompt_async(self, prompt: Prompt) -> Verdict:
        """``moderate_prompt`` without blocking the event loop (a long prompt is
        chunked across engine steps)."""
        return await self._engine._call_async(self.moderate_prompt, prompt)

    async def finish_async(self) -> list[Verdict]:
        return await self._engine._call_async(self.finish)

    async def end_reasoning_async(self) -> list[Verdict]:
        return await self._engine._call_async(self.end_reasoning)

    async def rollback_async(self, position: int) -> None:
        """``rollback`` (itself cheap) without waiting on the event loop for a
        call of this session that holds its lock."""
        await self._engine._call_async(self.rollback, position)

    async def fork_async(self) -> EngineSession:
        """``fork`` (it waits for the step running now) without blocking the event loop."""
        return await self._engine._call_async(self.fork)

    async def close_async(self) -> None:
        await self._engine._call_async(self.close)


class GuardEngine:
    """Serve many guard sessions with one batched forward per step.

    ``max_batch_tokens``: tokens per forward, all sessions together.
    ``prefill_chunk``: tokens one session contributes per step (a long prompt
    or a big append is cut into chunks of this size, round robin with the
    others). ``max_wait_ms``: after a step, the worker waits for the sessions
    it just served to come back with their next ids, and runs as soon as they
    all have (a lone stream never waits: it is the whole batch, and a thread
    now calling for another session is not waited for); it runs the batch it
    has once none of them arrived for ``max_wait_ms`` (or a quarter of the
    last forward's duration, if longer), and never waits longer in all than
    the last forward took.
    ``max_sessions``: open sessions at once. ``kv_budget_bytes``: the KV
    cache of all sessions together, counted as positions held (and queued)
    × ``guard.kv_bytes_per_token()``; ``None`` for no budget.
    ``graphs``: ``"auto"`` captures the step as CUDA graphs on CUDA (nothing
    elsewhere); ``"eager"`` runs the graphs' fixed-shape code without
    capturing (to test or debug it on any device); ``"off"`` never.
    ``attention``: the batched decode attention over the KV pool, ``"triton"``
    (a kernel that reads the pool in place), ``"gather"`` (gathered slots and
    one masked SDPA) or ``"auto"`` (the gather, until the kernel has run on
    a GPU: ``guard.runner.TRITON_BY_DEFAULT``).
    ``fused``: ``"on"`` runs the layers' pointwise work as Triton kernels and
    the projections stacked (``guard.fused``; CUDA); ``"off"`` transformers'
    modules; ``"auto"`` (default) is ``"off"`` until the kernels have run on
    a GPU (``TRITON_BY_DEFAULT``).
    """

    def __init__(
        self,
        guard: StreamGuard,
        *,
        max_batch_tokens: int = 1024,
        max_wait_ms: float = 2.0,
        max_sessions: int = 256,
        kv_budget_bytes: int | None = None,
        prefill_chunk: int = 256,
        graphs: GraphMode = "auto",
        attention: AttentionMode = "auto",
        fused: FusedMode = "auto",
    ) -> None:
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_sessions", max_sessions),
            ("prefill_chunk", prefill_chunk),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if prefill_chunk > max_batch_tokens:
            raise ValueError(
                f"prefill_chunk ({prefill_chunk}) must not exceed max_batch_tokens ({max_batch_tokens}): "
                "a chunk must fit in one step"
            )
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms!r}")
        if kv_budget_bytes is not None and kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes must be positive (or None for no budget), got {kv_budget_bytes!r}")
        layer_types = getattr(guard.config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                "GuardEngine runs full-attention layers only and this checkpoint has sliding-window layers; "
                "use plain sessions (guard.session()) for it"
            )
        self._guard = guard
        self._runner = ModelRunner(guard, graphs=graphs, attention=attention, fused=fused)
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.max_sessions = max_sessions
        self.kv_budget_bytes = kv_budget_bytes
        self.prefill_chunk = prefill_chunk
        self._kv_bytes_per_token = guard.kv_bytes_per_token()
        self._condition = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._in_flight: list[_Request] = []
        # Weak: a session dropped without close() gives its slot back when collected.
        self._sessions: weakref.WeakSet[EngineSession] = weakref.WeakSet()
        self._closed = False
        # Batching: the sessions of the last step that have not come back yet,
        # each with the thread that made its call (weak: a session dropped
        # without close() is not waited for), when the last call arrived, and
        # when the last forward ended and how long it took.
        self._awaited: weakref.WeakKeyDictionary[EngineSession, int] = weakref.WeakKeyDictionary()
        self._last_arrival = 0.0
        self._last_step_s = 0.0
        self._step_end = 0.0
        self._step_listeners: tuple[StepListener, ...] = ()
        #: Forwards run and tokens judged since the start (for monitoring and tests).
        self.steps = 0
        self.tokens = 0
        # Threads for the *_async methods: a waiting call parks one; calls of
        # one session serialize on its lock, so max_sessions threads suffice.
        self._executor = ThreadPoolExecutor(
            max_workers=max_sessions, thread_name_prefix="guard-engine-call", initializer=_mark_pool_thread
        )
        self._worker = threading.Thread(target=self._run, name="guard-engine", daemon=True)
        self._worker.start()

    # --- public -------------------------------------------------------------

    @property
    def guard(self) -> StreamGuard:
        return self._guard

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def pending(self) -> int:
        """Calls waiting for a step (not counting those inside the running forward)."""
        return len(self._queue)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The thread pool the async methods run their calls on (at most one
        thread per session), for callers that wrap engine sessions in their own
        async methods (``GuardAdapter``'s)."""
        return self._executor

    def kv_bytes(self) -> int:
        """KV bytes the engine counts against ``kv_budget_bytes``: positions
        held and queued × bytes per token."""
        with self._condition:
            return self._kv_tokens() * self._kv_bytes_per_token

    def add_step_listener(self, callback: StepListener) -> None:
        """Call ``callback(tokens, sessions, seconds)`` from the worker after
        each batched forward (one that raised too), before the calls it served
        return: the tokens it ran, the sessions they belong to, and its
        duration in seconds (for a step latency histogram, say). Keep it quick:
        those calls and the next step wait for it. An exception it raises is
        logged (``logging.getLogger("guard.engine")``) and ignored. It must not
        call the engine's sessions (it runs in the worker they would wait for):
        such a call raises ``SessionStateError``."""
        if not callable(callback):
            raise TypeError(f"a step listener must be callable, got {callback!r}")
        with self._condition:
            self._step_listeners = (*self._step_listeners, callback)

    def remove_step_listener(self, callback: StepListener) -> None:
        """Stop calling ``callback`` (added by ``add_step_listener``); a callback
        that is not registered is ignored."""
        with self._condition:
            listeners = list(self._step_listeners)
            if callback in listeners:
                listeners.remove(callback)
            self._step_listeners = tuple(listeners)

    def session(self, policy: Policy | None = None) -> EngineSession:
        """A new conversation served by this engine; refused with
        ``EngineCapacityError`` at ``max_sessions`` or when the KV budget is spent."""
        return self._admit(policy)

    def close(self, timeout: float = 30.0) -> None:
        """Fail every pending call with ``EngineClosedError`` and stop the
        worker (waiting up to ``timeout`` seconds for the forward running now)."""
        with self._condition:
            if self._closed:
                return
            self._closed = True
            error = self._closed_error
            while self._queue:
                self._complete(self._queue.popleft(), error=error())
            for request in self._in_flight:
                request.cancel_error = error()
            self._condition.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        # Call threads end by themselves once their calls fail; do not wait here
        # (close() may be called from one of them).
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GuardEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- what sessions call -------------------------------------------------

    @staticmethod
    def _closed_error() -> EngineClosedError:
        return EngineClosedError("the guard engine was closed; make a new GuardEngine (and new sessions) to go on")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _kv_tokens(self) -> int:
        # Positions are read without the sessions' locks: int reads, and a
        # budget check only needs to be conservative, never short. A session's
        # cache may hold more than its position says: a call's ids from the
        # step that cached them until its caller's thread takes the verdicts,
        # the chunks of a prompt being prefilled (those are not counted again),
        # a failed call's until the session undoes them.
        held = sum(max(session.position, session._kv.length) for session in self._sessions)
        return held + sum(len(request.ids) - request.consumed for request in (*self._queue, *self._in_flight))

    def _admit(self, policy: Policy | None, parent: EngineSession | None = None) -> EngineSession:
        """A new session, or a fork of ``parent`` (its state, its positions
        counted against the budget from now on), or ``EngineCapacityError``."""
        with self._condition:
            self._check_open()
            if len(self._sessions) >= self.max_sessions:
                raise EngineCapacityError(
                    f"the guard engine already serves {len(self._sessions)} sessions (max_sessions="
                    f"{self.max_sessions}); close finished sessions (session.close(), or `with engine.session() "
                    "as session:`), retry later, or make the engine with a larger max_sessions"
                )
            budget = self.kv_budget_bytes
            if budget is not None:
                used = self._kv_tokens() * self._kv_bytes_per_token
                if parent is None and used >= budget:
                    raise EngineCapacityError(self._budget_message("a new session needs room"))
                if parent is not None and used + parent.position * self._kv_bytes_per_token > budget:
                    raise EngineCapacityError(self._budget_message(f"a fork of {parent.position} positions needs room"))
            session = EngineSession(self, policy)
            if parent is not None:
                session._adopt(parent)  # before anyone else is admitted: its positions count at once
            self._sessions.add(session)
            return session

    def _budget_message(self, what: str) -> str:
        used = self._kv_tokens() * self._kv_bytes_per_token
        return (
            f"{what}, but the guard engine's KV cache holds {used} bytes of its kv_budget_bytes="
            f"{self.kv_budget_bytes} ({self._kv_bytes_per_token} bytes per token); close finished sessions or roll "
            "back long ones, retry when others have finished, or make the engine with a larger kv_budget_bytes"
        )

    def _submit(self, session: EngineSession, ids: list[int], query: bool) -> _Request:
        token = getattr(_current_call, "token", None)
        with self._condition:
            self._check_open()
            if token is not None and token.cancelled:
                raise _CallCancelled("the call was cancelled before it reached the engine")
            if session._closing:
                raise SessionClosedError("this session is being closed; start a new one with engine.session()")
            if self.kv_budget_bytes is not None:
                needed = (self._kv_tokens() + len(ids)) * self._kv_bytes_per_token
                if needed > self.kv_budget_bytes:
                    raise EngineCapacityError(self._budget_message(f"judging {len(ids)} more tokens needs room"))
            request = _Request(session, ids, token, query)
            idle = not self._queue
            self._queue.append(request)
            self._last_arrival = time.monotonic()
            awaited = self._awaited.pop(session, None) is not None
            if not awaited and self._awaited and request.thread is not None:
                # A thread that calls for this session cannot come back for
                # another one until this call returns (one thread driving
                # several sessions in turn): do not wait for those.
                me = request.thread
                for other in [other for other, thread in self._awaited.items() if thread == me]:
                    del self._awaited[other]
            # Wake the worker unless it is waiting for other sessions of the
            # last step to come back (it wakes itself when they are late).
            if idle or not awaited or not self._awaited:
                self._condition.notify_all()
            return request

    def _wait(self, request: _Request) -> list[Judged]:
        """What the steps that ran the request's ids said about them, in order."""
        try:
            self._wait_done(request)
        except BaseException:
            # The caller was interrupted while it waited (a KeyboardInterrupt):
            # its session undoes the call, so no step may cache the ids later.
            self._withdraw(request)
            raise
        if request.error is not None:
            raise request.error
        if request.failure is not None:
            raise EngineStepError(
                f"the guard's batched forward failed ({type(request.failure).__name__}: {request.failure}); "
                "nothing was appended to this session: retry the call, or close the session"
            ) from request.failure
        return request.parts

    def _wait_done(self, request: _Request) -> None:
        while not request.done.wait(_LIVENESS_POLL_S):
            if not self._worker.is_alive():
                with self._condition:
                    if not request.done.is_set():
                        self._complete(request, error=EngineClosedError(
                            "the guard engine's worker stopped (see the log for why); make a new GuardEngine"
                        ))  # fmt: skip

    def _withdraw(self, request: _Request) -> None:
        """Take an abandoned request out of the queue, or, if it is inside the
        running forward, wait for that forward to end (it writes the session's
        cache), so that the session's undo comes after every change."""
        self._cancel(
            lambda queued: queued is request,
            lambda: _CallCancelled("the call was interrupted while it waited for the guard engine"),
        )
        self._wait_done(request)

    def _cancel(self, matches: Callable[[_Request], bool], error: Callable[[], BaseException]) -> None:
        """Fail the matching requests: at once if queued; after the running
        forward if inside it (its cache is being written)."""
        with self._condition:
            for request in [request for request in self._queue if matches(request)]:
                self._queue.remove(request)
                self._complete(request, error=error())
            for request in self._in_flight:
                if matches(request):
                    request.cancel_error = error()

    def _release(self, session: EngineSession) -> None:
        with self._condition:
            self._sessions.discard(session)
            if self._awaited.pop(session, None) is not None:  # the worker must not wait for it
                self._condition.notify_all()

    async def _call_async(self, method: Callable[..., Any], *args: Any) -> Any:
        self._check_open()
        loop = asyncio.get_running_loop()
        token = _CallToken()
        try:
            future = loop.run_in_executor(self._executor, _run_with_token, token, method, args)
        except RuntimeError as error:  # the executor shut down: the engine closed meanwhile
            raise self._closed_error() from error
        try:
            return await future
        except asyncio.CancelledError:
            token.cancelled = True
            self._cancel(
                lambda request: request.token is token,
                lambda: _CallCancelled("the call was cancelled while it waited for the guard engine"),
            )
            raise

    # --- the worker -----------------------------------------------------------

    @staticmethod
    def _complete(request: _Request, *, error: BaseException | None = None) -> None:
        request.error = error
        request.in_flight = False
        request.done.set()

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run_step(batch)
        except BaseException:  # a bug in the engine: fail everyone rather than leave them waiting
            with self._condition:
                self._closed = True
                for request in (*self._queue, *self._in_flight):
                    if not request.done.is_set():
                        self._complete(request, error=EngineClosedError(
                            "the guard engine's worker failed (see the chained exception in the log); "
                            "make a new GuardEngine"
                        ))  # fmt: skip
                self._queue.clear()
                self._in_flight = []
            raise

    def _next_batch(self) -> list[tuple[_Request, int]] | None:
        """Wait for work; return (request, token count) pairs for one step.

        Continuous batching: the sessions just served usually come straight
        back with their next ids, one after another as their callers finish
        with the verdicts. The worker runs as soon as all of them are back (a
        lone stream at once), or a batch's worth of tokens waits; otherwise it
        waits for the next of them while they keep arriving less than
        ``max_wait_ms`` (or a quarter of the last forward) apart, never longer
        in all than the last forward took: waiting at most doubles a step's
        latency, and makes one full step instead of a full and a tiny one."""
        with self._condition:
            cap = self._step_end + max(self.max_wait_s, self._last_step_s)
            gap = max(self.max_wait_s, self._last_step_s / 4)
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self._condition.wait()
                    continue
                if not self._awaited:
                    break
                now = time.monotonic()
                # The sessions of the last step only start back when it ends.
                deadline = min(cap, max(self._last_arrival, self._step_end) + gap)
                if now >= deadline:
                    break
                waiting = 0
                for request in self._queue:
                    waiting += min(len(request.ids) - request.consumed, self.prefill_chunk)
                if waiting >= self.max_batch_tokens:
                    break
                self._condition.wait(deadline - now)
            batch, budget = [], self.max_batch_tokens
            while self._queue and budget > 0:
                request = self._queue.popleft()
                count = min(len(request.ids) - request.consumed, self.prefill_chunk, budget)
                request.in_flight = True
                batch.append((request, count))
                budget -= count
            self._in_flight = [request for request, _ in batch]
            self._awaited = weakref.WeakKeyDictionary()
            return batch

    def _run_step(self, batch: list[tuple[_Request, int]]) -> None:
        segments = []
        for request, count in batch:
            session = request.session
            chunk = request.ids[request.consumed : request.consumed + count]
            segments.append(Segment(session._kv, chunk, session._upstream, request.query))
        tokens = sum(count for _request, count in batch)
        started = time.perf_counter()
        try:
            output = self._forward(segments)
            failure = None
        except Exception as error:  # fail this batch's calls; their sessions undo the step themselves
            output, failure = None, error
        seconds = time.perf_counter() - started
        # Before the calls return: once a call has returned, its step was reported.
        for listener in self._step_listeners:
            try:
                listener(tokens, len(segments), seconds)
            except Exception:
                logger.exception("a GuardEngine step listener raised; ignored")
        with self._condition:
            self._in_flight = []
            self.steps += 1
            self.tokens += tokens
            self._last_step_s = seconds
            self._step_end = time.monotonic()
            awaited = self._awaited
            for index, (request, count) in enumerate(batch):
                if request.done.is_set():
                    continue
                if request.cancel_error is not None:
                    self._complete(request, error=request.cancel_error)
                elif failure is not None:
                    request.failure = failure
                    self._complete(request)
                else:
                    request.parts.append(output.part(index))
                    request.consumed += count
                    if request.consumed == len(request.ids):
                        self._complete(request)
                        if not request.session._closing:
                            awaited[request.session] = request.thread  # its caller will likely be back soon
                    else:  # the rest of a long prompt: back of the queue, round robin
                        request.in_flight = False
                        self._queue.append(request)

    def _forward(self, segments: list[Segment]) -> StepOutput:
        """One step over every segment (``guard.runner``): caches their ids and judges them."""
        return self._runner.run(segments)
