"""Block manager: exact block ids for sharing, copy-on-write, eviction order and refcount release."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler.block_manager import BlockManager, CopyOnWrite, NoFreeBlocksError


def test_sequences_of_one_prefix_share_its_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    entry, new = bm.acquire_prefix("sql", num_tokens=8)
    assert (entry.block_ids, new) == ([0, 1], True)
    bm.allocate(seq_id=1, prefix=entry)
    again, new = bm.acquire_prefix("sql", num_tokens=8)
    assert again is entry and not new
    bm.allocate(seq_id=2, prefix=again)
    assert bm.tables == {1: [0, 1], 2: [0, 1]}
    assert [bm.blocks[i].ref_count for i in (0, 1)] == [3, 3]  # two tables + the prefix cache
    bm.append_slots(1, num_computed=8, num_new=1)
    bm.append_slots(2, num_computed=8, num_new=1)
    assert bm.tables == {1: [0, 1, 2], 2: [0, 1, 3]}
    bm.check_integrity()


def test_partial_prefix_block_is_copied_on_first_append():
    bm = BlockManager(num_blocks=10, block_size=4)
    entry, _ = bm.acquire_prefix("p", num_tokens=6)  # blocks 0 (full) and 1 (2 of 4 slots)
    bm.allocate(7, entry)
    result = bm.append_slots(7, num_computed=6, num_new=3)  # writes slots 6, 7 (block 1) and 8 (new block)
    assert result.copies == [CopyOnWrite(src=1, dst=2)]
    assert result.table_from == 1
    assert bm.tables[7] == [0, 2, 3]
    assert bm.blocks[1].ref_count == 1  # only the prefix cache still holds the original
    result = bm.append_slots(7, num_computed=9, num_new=1)
    assert result.copies == [] and bm.tables[7] == [0, 2, 3]  # private now: written in place
    bm.check_integrity()


def test_block_aligned_prefix_needs_no_copy():
    bm = BlockManager(num_blocks=10, block_size=4)
    entry, _ = bm.acquire_prefix("p", num_tokens=8)
    bm.allocate(1, entry)
    assert bm.blocks_needed(1, 8, 1) == 1
    result = bm.append_slots(1, 8, 1)
    assert result.copies == [] and bm.tables[1] == [0, 1, 2]


def test_fork_shares_blocks_and_copies_the_shared_tail_on_write():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate(1, None)
    bm.append_slots(1, 0, 6)  # blocks 0, 1; block 1 half full
    bm.fork(1, 2)
    assert bm.tables[2] == [0, 1] and bm.blocks[1].ref_count == 2
    assert bm.append_slots(1, 6, 1).copies == [CopyOnWrite(1, 2)]
    assert bm.append_slots(2, 6, 1).copies == []  # sole owner of block 1 now
    assert bm.tables == {1: [0, 2], 2: [0, 1]}
    bm.check_integrity()


def test_unpinned_prefixes_are_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    for name in ("a", "b", "c"):
        entry, _ = bm.acquire_prefix(name, 8)  # a: [0,1], b: [2,3], c: [4,5]
    bm.release_prefix("b")
    bm.release_prefix("a")
    bm.release_prefix("c")  # LRU order now b, a, c
    assert bm.num_free_blocks == 0 and bm.num_cached_blocks == 6
    d, new = bm.acquire_prefix("d", 4)
    assert new and d.block_ids == [3]  # b went first; the free list is a stack, so its block 2 stays free
    assert bm.resident_prefixes() == ["a", "c", "d"]
    e, _ = bm.acquire_prefix("e", 8)
    assert e.block_ids == [2, 1]  # the free block, then one of a's blocks once a is evicted
    assert not bm.is_resident("a") and bm.is_resident("c")
    bm.check_integrity()


def test_pinned_prefix_is_never_evicted():
    bm = BlockManager(num_blocks=2, block_size=4)
    entry, _ = bm.acquire_prefix("p", 8)
    bm.allocate(1, entry)
    assert bm.num_available_blocks() == 0
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(1, 8, 1)
    assert bm.is_resident("p")


def test_freeing_releases_every_reference():
    bm = BlockManager(num_blocks=8, block_size=4)
    entry, _ = bm.acquire_prefix("p", 6)
    bm.allocate(1, entry)
    bm.append_slots(1, 6, 5)
    bm.free(1)
    bm.release_prefix("p")
    assert [b.ref_count for b in bm.blocks] == [1, 1, 0, 0, 0, 0, 0, 0]  # only the cached prefix remains
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2 and bm.num_used_blocks == 0
    assert bm.evict_prefix("p")
    assert bm.num_free_blocks == 8
    bm.check_integrity()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / prefix sequences; the integrity check runs after every step."""

    @initialize(num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.lengths: dict[int, int] = {}
        self.prefix_of: dict[int, str] = {}
        self.next_id = 0

    def _fits(self, seq_id, computed, new, prefix=None):
        keep = prefix
        return self.bm.blocks_needed(seq_id, computed, new) <= self.bm.num_available_blocks(keep)

    @rule(prefix=st.sampled_from([None, "a", "b", "c"]), prefix_len=st.integers(1, 6), prompt=st.integers(1, 6))
    def start_sequence(self, prefix, prefix_len, prompt):
        bm = self.bm
        plen = {"a": 3, "b": 4, "c": 5}.get(prefix, 0) if prefix else 0
        blocks = bm.blocks_for(plen)
        cost = (0 if prefix is None or bm.is_resident(prefix) else blocks)
        cost += bm.blocks_needed(None, plen, prompt, prefix_blocks=blocks if prefix else 0)
        if cost > bm.num_available_blocks(keep_prefix=prefix):
            return
        entry = bm.acquire_prefix(prefix, plen)[0] if prefix else None
        seq_id = self.next_id
        self.next_id += 1
        bm.allocate(seq_id, entry)
        bm.append_slots(seq_id, plen, prompt)
        self.lengths[seq_id] = plen + prompt
        if prefix:
            self.prefix_of[seq_id] = prefix

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), count=st.integers(1, 3))
    def append(self, data, count):
        seq_id = data.draw(st.sampled_from(sorted(self.lengths)))
        if self._fits(seq_id, self.lengths[seq_id], count):
            self.bm.append_slots(seq_id, self.lengths[seq_id], count)
            self.lengths[seq_id] += count

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.lengths)))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(parent, child)
        self.lengths[child] = self.lengths[parent]
        if parent in self.prefix_of:
            self.prefix_of[child] = self.prefix_of[parent]
            self.bm.acquire_prefix(self.prefix_of[parent], 0)

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.lengths)))
        self.bm.free(seq_id)
        del self.lengths[seq_id]
        if seq_id in self.prefix_of:
            self.bm.release_prefix(self.prefix_of.pop(seq_id))

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def evict(self, name):
        pinned = name in self.prefix_of.values()
        evicted = self.bm.evict_prefix(name)
        assert not (pinned and evicted)

    @invariant()
    def integrity(self):
        if hasattr(self, "bm"):
            self.bm.check_integrity()
            for seq_id, length in self.lengths.items():
                assert len(self.bm.tables[seq_id]) >= self.bm.blocks_for(length)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_worker_slots_of_a_token_range_follow_the_block_table():
    """The worker turns KV-stream indices into cache slots one block at a time (workers/worker.py)."""
    import random

    from workers.kv_cache import extend_slots

    rng = random.Random(0)
    for _ in range(500):
        block_size = rng.choice([1, 4, 16, 64])
        length = rng.randrange(1, 300)
        table = rng.sample(range(1000), -(-length // block_size))
        start = rng.randrange(length)
        end = rng.randrange(start, length + 1)
        slots = [-1]
        extend_slots(slots, table, start, end, block_size)
        assert slots == [-1] + [table[i // block_size] * block_size + i % block_size for i in range(start, end)]
