"""StepGraphs: a runner's step at fixed shapes, captured as CUDA graphs.

A step whose rows all take the batched attention is a fixed sequence of
kernels once its shapes are fixed: ``rows`` (tokens, rounded up to a bucket
1, 2, 4, ..., 256) and ``span`` (positions each row reads, rounded up to a
bucket 64, 96, 128, 192, 256, ..., at most 1.5x apart). Per bucket pair the
step is captured once, on static buffers, and replayed with the step's
integers copied into them (the pattern of torch's CUDA-graph notes, vLLM's
and SGLang's decode graphs, and gpt-fast):

* the inputs live in one static ``[6, max_rows]`` integer buffer (ids,
  positions, KV slots, region bases, lengths, arithmetic flags), filled by
  one host-to-device copy from a pinned buffer; rows past the step's own are
  padding (id 0, position 0, the pool's scratch slot 0, length 1): they write
  and read only the scratch slot, and their outputs are dropped;
* the KV pool's storage and the weights are read where they are; a rebuilt
  pool storage (``KVPool.generation``) drops every graph, which is captured
  again on first use;
* every graph allocates from one shared memory pool (safe: replays never run
  concurrently, one step at a time under the runner's lock, and each replay
  writes its intermediates before it reads them); outputs are copied out
  (verdict numbers to the host, logits cloned) before the next replay
  overwrites them;
* capture runs after two warm-up runs on a side stream (lazy initialisations
  such as cuBLAS workspaces must not happen inside a capture), with the
  padding inputs, and in "thread_local" error mode, so that other threads'
  CUDA calls (a user's, another runner's) are not errors during a capture;
  one capture at a time in the process (torch allows no more), under a lock
  that is taken last, so it cannot deadlock with the runners' own locks.

With ``capture=False`` (``graphs="eager"``) the same buckets, buffers and
padding run without capturing: on the CPU the tests exercise every line
below except the three marked CUDA.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from guard.model import GuardLogits

if TYPE_CHECKING:
    from guard.runner import ModelRunner, StepPlan

__all__ = ["StepGraphs", "row_bucket", "span_bucket"]

_CAPTURE_LOCK = threading.Lock()

#: Padding values of each integer row (``guard.runner``'s order): id 0, position 0, slot 0, base 0, length 1, flag 0.
_PADDING = (0, 0, 0, 0, 1, 0)


def row_bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def span_bucket(positions: int) -> int:
    """The smallest of 64, 96, 128, 192, 256, 384, ... that holds ``positions``."""
    bucket = 64
    while bucket < positions:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return bucket


class _Captured:
    """One bucket's step: a CUDA graph and its static outputs, or (eager) the step itself."""

    def __init__(self, step, capture: bool, pool) -> None:
        self.step = step
        self.graph = None
        self.outputs = None
        if capture:
            self._capture(pool)

    def _capture(self, pool) -> None:
        # CUDA: warm up on a side stream, then capture into the shared pool.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = self.step()
        self.graph = graph

    def run(self):
        if self.graph is None:
            return self.step()
        self.graph.replay()  # CUDA
        return self.outputs


class StepGraphs:
    def __init__(self, runner: ModelRunner, *, capture: bool, max_rows: int) -> None:
        self.runner = runner
        self.capture = capture
        self.max_rows = max_rows
        device = runner.device
        self.static = torch.zeros((len(_PADDING), max_rows), dtype=torch.long, device=device)
        self.host = torch.zeros((len(_PADDING), max_rows), dtype=torch.long, pin_memory=capture)
        self.padding = torch.tensor(_PADDING, dtype=torch.long)[:, None]
        self._steps: dict[tuple[int, int], _Captured] = {}
        self._generation = runner.pool.generation
        self._memory = None  # the graphs' shared memory pool, once one graph was captured

    @property
    def captured(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        """Drop every captured step (they are captured again on first use)."""
        self._steps.clear()
        self._memory = None

    def run(self, plan: StepPlan) -> tuple[list[list[float]], GuardLogits, GuardLogits]:
        """The step's verdict numbers (on the host) and logits (cloned out of the graph's buffers)."""
        pool = self.runner.pool
        if pool.generation != self._generation:  # the storage moved: the graphs read the old one
            self.clear()
            self._generation = pool.generation
        rows, span = row_bucket(plan.total), span_bucket(plan.longest)
        step = self._steps.get((rows, span))
        if step is None:
            self._fill(rows, None)  # capture with padding rows only: the warm-up runs write the scratch slot alone
            step = self._steps[rows, span] = _Captured(self._step(rows, span), self.capture, self._memory)
            if step.graph is not None and self._memory is None:
                self._memory = step.graph.pool()
        self._fill(rows, plan)
        packed, response, query = step.run()
        total = plan.total
        # The one device-to-host copy; the logits are cloned before the next replay overwrites them.
        return (
            packed[:total].tolist(),
            GuardLogits(response.risk_level[:total].clone(), response.category[:total].clone()),
            GuardLogits(query.risk_level[:total].clone(), query.category[:total].clone()),
        )

    def _fill(self, rows: int, plan: StepPlan | None) -> None:
        host = self.host[:, :rows]
        host.copy_(self.padding.expand_as(host))
        if plan is not None:
            host[:, : plan.total] = plan.integers.view(len(_PADDING), plan.total)
        # The whole buffer (a few kB), contiguous on both sides: one plain copy; columns past ``rows`` go unread.
        self.static.copy_(self.host, non_blocking=True)

    def _step(self, rows: int, span: int):
        runner, static, capacity = self.runner, self.static, self.runner.pool.capacity
        ids, positions, slots, bases, lengths, upstream = (static[index, :rows] for index in range(len(_PADDING)))
        batched_attention = runner.batched_attention

        def step() -> tuple[torch.Tensor, GuardLogits, GuardLogits]:
            attention = batched_attention(bases, lengths, span, capacity)
            hidden = runner.layers(ids, positions, slots, attention)
            return runner.judge(hidden, upstream.bool(), query=True)  # fixed shapes: both heads, always

        return step
