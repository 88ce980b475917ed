"""KVPool: regions keep their positions through every move, and the books balance.

A hypothesis state machine drives a pool with a tiny storage (so that regions
move, the storage grows, compacts and shrinks often) through new regions,
appends, rollbacks, closes, forks and trims, writing a distinct value at every
position it caches, against a plain model (a list of values per region).
After every operation each live region holds exactly its values, no two
regions overlap, slot 0 (the scratch slot) belongs to nobody, and every slot
is either in a region or free, once.
"""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule
from transformers import Qwen3Config

from guard.kv_pool import KVPool

CONFIG = Qwen3Config(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=2, num_hidden_layers=2)


def small_pool(min_growth: int = 4) -> KVPool:
    return KVPool(CONFIG, dtype=torch.float32, device=torch.device("cpu"), min_growth=min_growth)


def write(pool: KVPool, region, values: list[float]) -> None:
    """Cache ``values`` after the region's positions, as a step does."""
    pool.reserve(region, region.length + len(values))
    start = region.base + region.length
    column = torch.tensor(values)[None, None, :, None, None]
    pool.storage[:, :, start : start + len(values)] = column.expand(*pool.storage.shape[:2], -1, *pool.shape[2:])
    region.length += len(values)


def held(pool: KVPool, region) -> list[float]:
    cached = pool.storage[:, :, region.base : region.base + region.length]
    assert (cached == cached[:1, :1]).all(), "every layer, keys and values alike"
    return cached[0, 0, :, 0, 0].tolist()


class PoolMachine(RuleBasedStateMachine):
    regions = Bundle("regions")

    def __init__(self) -> None:
        super().__init__()
        self.pool = small_pool()
        self.model: dict[int, tuple[object, list[float]]] = {}
        self.values = itertools.count(1)

    @rule(target=regions)
    def new(self):
        region = self.pool.new_region()
        self.model[id(region)] = (region, [])
        return region

    @rule(region=regions, count=st.integers(1, 40))
    def append(self, region, count):
        if region.released:
            return
        values = [float(next(self.values)) for _ in range(count)]
        write(self.pool, region, values)
        self.model[id(region)][1].extend(values)

    @rule(region=regions, fraction=st.floats(0, 1))
    def rollback(self, region, fraction):
        if region.released:
            return
        kept = int(fraction * region.length)
        self.pool.truncate(region, kept)
        del self.model[id(region)][1][kept:]

    @rule(region=consumes(regions))
    def close(self, region):
        self.pool.release(region)
        self.model.pop(id(region), None)

    @rule(target=regions, source=regions)
    def fork(self, source):
        if source.released:
            return multiple()
        fresh = self.pool.new_region()
        self.pool.copy(source, fresh)
        self.model[id(fresh)] = (fresh, list(self.model[id(source)][1]))
        return fresh

    @rule()
    def trim(self):
        self.pool.trim()

    @invariant()
    def regions_hold_their_values(self):
        for region, values in self.model.values():
            assert region.length == len(values) <= region.reserved
            assert held(self.pool, region) == values

    @invariant()
    def every_slot_is_in_one_region_or_free(self):
        runs = [(region.base, region.base + region.reserved) for region, _ in self.model.values() if region.reserved]
        runs += [tuple(run) for run in self.pool._free]
        runs.sort()
        cursor = 1  # slot 0 is the scratch slot
        for start, end in runs:
            assert start == cursor and end > start, (runs, self.pool.capacity)
            cursor = end
        assert cursor == self.pool.capacity


TestPoolMachine = PoolMachine.TestCase


def test_a_failed_growth_changes_nothing(monkeypatch):
    pool = small_pool()
    first, second = pool.new_region(), pool.new_region()
    write(pool, first, [1.0, 2.0])
    write(pool, second, [3.0])
    before = (pool.storage, pool.generation, [list(run) for run in pool._free],
              [(r.base, r.reserved, r.length) for r in (first, second)])  # fmt: skip

    def out_of_memory(capacity):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pool, "_new_storage", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        pool.reserve(first, 1000)
    after = (pool.storage, pool.generation, [list(run) for run in pool._free],
             [(r.base, r.reserved, r.length) for r in (first, second)])  # fmt: skip
    assert after == before
    assert held(pool, first) == [1.0, 2.0] and held(pool, second) == [3.0]


def test_slots_of_a_closed_region_are_reused():
    pool = small_pool(min_growth=16)
    first = pool.new_region()
    write(pool, first, [1.0] * 10)
    base, capacity = first.base, pool.capacity
    pool.release(first)
    second = pool.new_region()
    write(pool, second, [2.0] * 10)
    assert second.base == base and pool.capacity == capacity  # the same slots, no growth
    assert held(pool, second) == [2.0] * 10


def test_rollback_keeps_the_region_in_place_and_gives_a_long_tail_back():
    pool = small_pool(min_growth=8)
    region = pool.new_region()
    write(pool, region, [float(n) for n in range(100)])
    base = region.base
    pool.truncate(region, 90)  # a short rollback: the room stays
    assert (region.base, region.length) == (base, 90) and region.reserved >= 100
    write(pool, region, [-1.0])
    assert region.base == base and held(pool, region) == [float(n) for n in range(90)] + [-1.0]
    pool.truncate(region, 3)  # a long one: the tail goes back to the free runs
    assert region.reserved == 3 + 8 and held(pool, region) == [0.0, 1.0, 2.0]


def test_a_dropped_region_is_freed_at_the_next_operation():
    pool = small_pool()

    class Session:
        pass

    import weakref

    session = Session()
    region = pool.new_region()
    write(pool, region, [1.0, 2.0])
    weakref.finalize(session, pool.release_later, region)
    del session
    gc.collect()
    assert not region.released  # queued only: a finalizer may run inside the pool's own methods
    pool.new_region()
    assert region.released and region not in pool._regions


def test_trim_gives_memory_back_after_a_burst_and_keeps_the_rest():
    pool = small_pool(min_growth=8)
    burst = [pool.new_region() for _ in range(20)]
    for index, region in enumerate(burst):
        write(pool, region, [float(index)] * 50)
    keeper = burst[7]
    peak = pool.capacity
    for region in burst:
        if region is not keeper:
            pool.release(region)
    assert pool.trim()
    assert pool.capacity < peak // 4 and held(pool, keeper) == [7.0] * 50
    assert not pool.trim()  # nothing more to give back
