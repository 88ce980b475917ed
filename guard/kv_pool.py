"""KVPool: the keys and values of every session of one model runner, in one tensor.

``storage`` is ``[layers, 2, capacity, kv_heads, head_dim]``: per layer, keys
and values of every cached position of every session, token-major (one
position's heads are contiguous), so that a step writes its new tokens with
one ``index_copy_`` per layer and a session's positions are one slice.

A session holds a ``KVRegion``: a contiguous run ``[base, base + reserved)``
of token slots, of which the first ``length`` are its cached positions.
Contiguous rather than paged, for two reasons measured on the 2-core CPU: a
long row attends in place over its own slice, reading its cache once, where
a gather through a page table copies it first (4x slower at 2,000 positions);
and batched attention finds row r's keys at ``base[r] + arange(span)``,
arithmetic the device does inside a CUDA graph, with no page table to upload.

* ``reserve`` makes room for more positions: the region takes the free run
  right after it, or moves (a copy of its positions) to a free run with an
  eighth more room (at least ``min_growth`` positions, amortised O(1) per
  position as a growing buffer is), or the storage grows and is compacted.
  It either succeeds or raises with nothing changed.
* ``truncate`` lowers the length (rollback), and gives the tail back when it
  leaves much room; it never allocates, so undoing a failed step cannot fail.
* ``release`` frees the region (close); a region whose session was dropped
  without ``close()`` is freed by the session's finalizer, deferred to the
  pool's next operation (a finalizer may run inside one).
* ``trim`` gives memory back when most of the storage is free.

Token slot 0 is a scratch slot owned by no region: the padding rows of a
fixed-shape step (``guard.step_graphs``) write and read there. The storage
starts zeroed and only finite keys and values are written, so a masked
position read past a region's end is finite, as masked attention needs
(a NaN there would turn the whole row's softmax into NaN).

Two locks: bookkeeping (regions, free runs) takes the pool's own short lock,
so a rollback or close never waits for a step; moving data (``reserve``,
``copy``, ``trim``) happens only in the thread that runs steps, under the
runner's lock, so no step ever reads a storage tensor that is being replaced.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch
from transformers import Qwen3Config

__all__ = ["KVPool", "KVRegion"]

_SCRATCH = 1  # token slots before the first region: slot 0, the scratch slot


@dataclass(slots=True, eq=False)
class KVRegion:
    """One session's run of token slots in a pool: ``[base, base + reserved)``,
    the first ``length`` holding its cached positions."""

    base: int = _SCRATCH
    reserved: int = 0
    length: int = 0
    released: bool = False


class KVPool:
    def __init__(
        self, config: Qwen3Config, *, dtype: torch.dtype, device: torch.device, min_growth: int = 256
    ) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = (config.num_hidden_layers, 2, config.num_key_value_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.min_growth = min_growth
        self.storage = self._new_storage(_SCRATCH)
        #: Bumped whenever ``storage`` is replaced (CUDA graphs hold its address).
        self.generation = 0
        self._free: list[list[int]] = []  # [start, end) runs, sorted, never adjacent
        self._regions: set[KVRegion] = set()
        self._dropped: deque[KVRegion] = deque()  # released by finalizers, freed at the next operation
        self._gave_back = False  # slots were freed since the last trim()
        self._lock = threading.Lock()

    # --- sizes ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.storage.shape[2]

    @property
    def bytes_per_token(self) -> int:
        layers, pair, kv_heads, head_dim = self.shape
        return layers * pair * kv_heads * head_dim * self.storage.element_size()

    def allocated_bytes(self) -> int:
        return self.storage.nbytes

    # --- bookkeeping: any thread --------------------------------------------------

    def new_region(self) -> KVRegion:
        """An empty region (no slots yet: the first ``reserve`` places it)."""
        region = KVRegion()
        with self._lock:
            self._drain_dropped()
            self._regions.add(region)
        return region

    def truncate(self, region: KVRegion, length: int) -> None:
        """Keep the first ``length`` positions; give the tail back when it
        leaves more than ``max(min_growth, length / 4)`` spare slots."""
        with self._lock:
            self._drain_dropped()
            region.length = length
            spare = region.reserved - length
            if spare > max(self.min_growth, length // 4):
                keep = length + self.min_growth
                self._give_back(region.base + keep, region.base + region.reserved)
                region.reserved = keep

    def release(self, region: KVRegion) -> None:
        with self._lock:
            self._drain_dropped()
            self._release(region)

    def release_later(self, region: KVRegion) -> None:
        """For finalizers: may run at any point of any thread, even inside
        this pool's own methods, so it only queues the region."""
        self._dropped.append(region)

    # --- moving data: the stepping thread only ------------------------------------

    def reserve(self, region: KVRegion, length: int) -> None:
        """Room for ``length`` positions in ``region``; all or nothing."""
        if length <= region.reserved:
            return
        with self._lock:
            self._drain_dropped()
            wanted = max(length, region.reserved + max(self.min_growth, region.reserved // 8))
            if region.reserved and self._extend(region, length, wanted):
                return
            start = self._first_fit(wanted)
            if start is None:
                # Compact the others into new storage, with room for this one at the end.
                self._rebuild(self._needed(extra=wanted, growth=True), moving_last=region)
                start = self._first_fit(wanted)
            if region.length and start != region.base:
                self._copy(region.base, start, region.length)  # into free slots: a failure here changes nothing
            self._take(start, start + wanted)
            self._give_back(region.base, region.base + region.reserved)
            region.base, region.reserved = start, wanted

    def copy(self, source: KVRegion, target: KVRegion) -> None:
        """Give ``target`` (empty) the positions ``source`` holds (a fork)."""
        self.reserve(target, source.length)
        self._copy(source.base, target.base, source.length)
        target.length = source.length

    def trim(self) -> bool:
        """Shrink the storage when more than three quarters of it hold no
        region (after a burst of sessions closed); True if it did. Keeps
        room to spare, so that a busy pool does not shrink and grow in turn."""
        if not (self._gave_back or self._dropped):  # nothing freed since the last look: the usual step
            return False
        with self._lock:
            self._drain_dropped()
            self._gave_back = False
            needed = self._needed()
            if self.capacity <= max(4 * needed, _SCRATCH + 4 * self.min_growth):
                return False
            self._rebuild(2 * needed)
            return True

    # --- internals (the caller holds self._lock) ----------------------------------

    def _new_storage(self, capacity: int) -> torch.Tensor:
        layers, pair, kv_heads, head_dim = self.shape
        return torch.zeros((layers, pair, capacity, kv_heads, head_dim), dtype=self.dtype, device=self.device)

    def _copy(self, source: int, target: int, count: int) -> None:
        self.storage[:, :, target : target + count] = self.storage[:, :, source : source + count]

    def _drain_dropped(self) -> None:
        while self._dropped:
            self._release(self._dropped.popleft())

    def _release(self, region: KVRegion) -> None:
        if region.released:
            return
        region.released = True
        self._regions.discard(region)
        self._give_back(region.base, region.base + region.reserved)
        region.reserved = region.length = 0

    def _needed(self, extra: int = 0, growth: bool = False) -> int:
        live = _SCRATCH + sum(region.reserved for region in self._regions) + extra
        if not growth:
            return live
        # Grow by a quarter at least, so that n sessions growing in turn
        # rebuild the storage O(log n) times, not n times.
        return max(live, self.capacity + self.capacity // 4)

    def _extend(self, region: KVRegion, length: int, wanted: int) -> bool:
        """Take (part of) the free run right after the region, if it gives ``length``."""
        end = region.base + region.reserved
        for run in self._free:
            if run[0] == end:
                available = run[1] - end
                if region.reserved + available < length:
                    return False
                grow = min(wanted - region.reserved, available)
                self._take(end, end + grow)
                region.reserved += grow
                return True
        return False

    def _first_fit(self, size: int) -> int | None:
        for start, end in self._free:
            if end - start >= size:
                return start
        return None

    def _take(self, start: int, end: int) -> None:
        for index, run in enumerate(self._free):
            if run[0] <= start and end <= run[1]:
                pieces = [piece for piece in ([run[0], start], [end, run[1]]) if piece[1] > piece[0]]
                self._free[index : index + 1] = pieces
                return
        raise AssertionError(f"slots {start}..{end} are not free")

    def _give_back(self, start: int, end: int) -> None:
        if end <= start:
            return
        self._gave_back = True
        runs = self._free
        index = 0
        while index < len(runs) and runs[index][0] < start:
            index += 1
        runs.insert(index, [start, end])
        # Coalesce with the neighbours.
        if index + 1 < len(runs) and runs[index][1] == runs[index + 1][0]:
            runs[index][1] = runs.pop(index + 1)[1]
        if index > 0 and runs[index - 1][1] == runs[index][0]:
            runs[index - 1][1] = runs.pop(index)[1]

    def _rebuild(self, capacity: int, moving_last: KVRegion | None = None) -> None:
        """New storage of ``capacity`` slots holding every region packed from
        slot 1 (``moving_last`` left out: ``reserve`` places it next). The
        old storage stays in use until the new one is complete, so an
        out-of-memory here changes nothing."""
        storage = self._new_storage(capacity)
        placed: list[tuple[KVRegion, int]] = []
        cursor = _SCRATCH
        for region in sorted(self._regions, key=lambda region: region.base):
            if region is moving_last or not region.reserved:
                continue
            old = self.storage[:, :, region.base : region.base + region.length]
            storage[:, :, cursor : cursor + region.length] = old
            placed.append((region, cursor))
            cursor += region.reserved
        if moving_last is not None and moving_last.length:
            # Its positions go to the end, where reserve() will find them free.
            length = moving_last.length
            storage[:, :, cursor : cursor + length] = self.storage[:, :, moving_last.base : moving_last.base + length]
        # Nothing above changed the pool: commit.
        self.storage = storage
        self.generation += 1
        for region, base in placed:
            region.base = base
        if moving_last is not None:
            moving_last.base, moving_last.reserved = cursor, 0
        self._free = [[cursor, capacity]] if cursor < capacity else []
