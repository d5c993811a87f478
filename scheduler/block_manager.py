"""Block manager: reference-counted KV blocks, shared prefix blocks, copy-on-write, pinning and LRU eviction.

Every block has a reference count: one reference per block table that lists it, plus one for the prefix cache
when the block holds a materialized prefix. A block with more than one reference is never written in place:
the first append into it copies it (`_copy_on_write`).

A prefix is *pinned* while any sequence uses it. An unpinned prefix keeps its blocks ("cached") until a new block
is needed and no free one is left; then the least recently used unpinned prefix is evicted as a whole.

Block states, checked by `check_integrity`: free (no references), cached (held only by unpinned prefixes) and
used (everything else); free + cached + used = total.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class NoFreeBlocksError(RuntimeError):
    """Internal: the caller asked for more blocks than can be freed. The scheduler checks before it asks."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0


@dataclass
class PrefixEntry:
    """A prefix materialized on the device: its blocks and how many sequences use it."""

    name: str
    block_ids: list[int]
    num_tokens: int
    num_users: int = 0


@dataclass
class CopyOnWrite:
    src: int
    dst: int


@dataclass
class AppendResult:
    """What one `append_slots` changed: the table from `table_from` onwards is new, and `copies` must be made."""

    table_from: int
    copies: list[CopyOnWrite] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # A stack: the block freed last is handed out first. It is still warm in the processor's caches, and on
        # CPU the KV cache's pages are only ever touched (and counted in RSS) for as many blocks as were once in
        # use at the same time.
        self._free: list[int] = list(reversed(range(num_blocks)))
        self._prefixes: dict[str, PrefixEntry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # unpinned prefixes, least recently used first
        self._num_cached = 0  # blocks held by the prefixes in _lru, kept current so counting is O(1)
        self.tables: dict[int, list[int]] = {}
        self.num_evictions = 0

    # ---- counting -------------------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return self._num_cached

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks - self.num_cached_blocks

    def num_available_blocks(self, keep_prefix: str | None = None) -> int:
        """Blocks obtainable now by taking free ones and evicting unpinned prefixes (except `keep_prefix`)."""
        cached = self.num_cached_blocks
        if keep_prefix in self._lru:
            cached -= len(self._prefixes[keep_prefix].block_ids)
        return self.num_free_blocks + cached

    def usage(self) -> float:
        """Share of blocks held by running sequences or pinned prefixes (cached prefixes count as free)."""
        return self.num_used_blocks / self.num_blocks

    def prefix_blocks(self) -> int:
        return sum(len(e.block_ids) for e in self._prefixes.values())

    def resident_prefixes(self) -> list[str]:
        return list(self._prefixes)

    def is_resident(self, name: str) -> bool:
        return name in self._prefixes

    # ---- raw blocks -----------------------------------------------------------------------------------------
    def is_shared(self, block_id: int) -> bool:
        """Whether more than one block table or prefix holds the block: then it is never written in place."""
        return self.blocks[block_id].ref_count > 1

    def _take_block(self) -> int:
        while not self._free:
            if not self._lru:
                raise NoFreeBlocksError("no free block and no unpinned prefix to evict")
            self.evict_prefix(next(iter(self._lru)))
        block_id = self._free.pop()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released more often than referenced"
        if block.ref_count == 0:
            self._free.append(block_id)

    # ---- prefixes -------------------------------------------------------------------------------------------
    def acquire_prefix(self, name: str, num_tokens: int) -> tuple[PrefixEntry, bool]:
        """Pin a prefix for one more sequence. Returns (entry, newly_allocated): new blocks need the prefix KV."""
        entry = self._prefixes.get(name)
        if entry is not None:
            if entry.num_users == 0:
                self._unmark_cached(entry)
            entry.num_users += 1
            return entry, False
        block_ids = [self._take_block() for _ in range(self.blocks_for(num_tokens))]
        entry = PrefixEntry(name, block_ids, num_tokens, num_users=1)
        self._prefixes[name] = entry
        return entry, True

    def release_prefix(self, name: str) -> None:
        entry = self._prefixes[name]
        entry.num_users -= 1
        assert entry.num_users >= 0
        if entry.num_users == 0:
            self._lru[name] = None  # most recently used at the end
            self._num_cached += len(entry.block_ids)

    def _unmark_cached(self, entry: PrefixEntry) -> None:
        del self._lru[entry.name]
        self._num_cached -= len(entry.block_ids)

    def evict_prefix(self, name: str) -> bool:
        """Drop an unpinned prefix's blocks. Returns False (and keeps it) while sequences still use it."""
        entry = self._prefixes.get(name)
        if entry is None or entry.num_users > 0:
            return False
        self._unmark_cached(entry)
        del self._prefixes[name]
        for block_id in entry.block_ids:
            self._release(block_id)
        self.num_evictions += 1
        return True

    # ---- sequences ------------------------------------------------------------------------------------------
    def allocate(self, seq_id: int, prefix: PrefixEntry | None) -> None:
        """Start a block table; a prefixed sequence's table begins with the prefix blocks, shared."""
        assert seq_id not in self.tables
        table = list(prefix.block_ids) if prefix is not None else []
        for block_id in table:
            self.blocks[block_id].ref_count += 1
        self.tables[seq_id] = table

    def blocks_needed(self, seq_id: int | None, num_computed: int, num_new: int, prefix_blocks: int = 0) -> int:
        """New blocks that appending `num_new` tokens after `num_computed` would take, copy-on-write included."""
        table = self.tables.get(seq_id) if seq_id is not None else None
        have = len(table) if table is not None else prefix_blocks
        need = max(0, self.blocks_for(num_computed + num_new) - have)
        first = num_computed // self.block_size
        if table is not None and num_new > 0 and first < len(table) and self.is_shared(table[first]):
            need += 1
        elif table is None and num_new > 0 and num_computed % self.block_size and first < prefix_blocks:
            need += 1  # a new sequence will copy the prefix's partly filled tail block
        return need

    def has_room_in_place(self, seq_id: int, num_computed: int) -> bool:
        """Whether the next token's slot is in a block this sequence alone holds (the common decode case)."""
        table = self.tables[seq_id]
        index = num_computed // self.block_size
        return index < len(table) and not self.is_shared(table[index])

    def append_slots(self, seq_id: int, num_computed: int, num_new: int) -> AppendResult:
        """Make room for tokens num_computed .. num_computed+num_new-1 of a sequence."""
        table = self.tables[seq_id]
        first = num_computed // self.block_size
        result = AppendResult(table_from=len(table))
        if num_new > 0 and first < len(table) and self.is_shared(table[first]):
            result.copies.append(self._copy_on_write(table, first))
            result.table_from = first
        while len(table) < self.blocks_for(num_computed + num_new):
            table.append(self._take_block())
        return result

    def _copy_on_write(self, table: list[int], index: int) -> CopyOnWrite:
        """The one place a shared block is copied: the table gets a private copy, the original loses a ref."""
        src = table[index]
        dst = self._take_block()
        self._release(src)
        table[index] = dst
        return CopyOnWrite(src, dst)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (n > 1 samples); appends later copy on write."""
        table = list(self.tables[parent_id])
        for block_id in table:
            self.blocks[block_id].ref_count += 1
        self.tables[child_id] = table

    def free(self, seq_id: int) -> None:
        for block_id in self.tables.pop(seq_id):
            self._release(block_id)

    # ---- integrity ------------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """free + cached + used = total, and every refcount equals the references that exist."""
        expected = [0] * self.num_blocks
        for table in self.tables.values():
            for block_id in table:
                expected[block_id] += 1
        for entry in self._prefixes.values():
            for block_id in entry.block_ids:
                expected[block_id] += 1
            assert (entry.num_users == 0) == (entry.name in self._lru), f"prefix {entry.name} pin state is off"
        actual = [b.ref_count for b in self.blocks]
        assert actual == expected, f"refcounts {actual} != references {expected}"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert free == {i for i, n in enumerate(expected) if n == 0}, "free list does not match zero refcounts"
        cached = {b for name in self._lru for b in self._prefixes[name].block_ids}
        assert len(cached) == self._num_cached, "the cached-block counter is off"
        assert all(expected[b] == 1 for b in cached), "a cached prefix block is also in a block table"
        used = self.num_blocks - len(free) - len(cached)
        assert len(free) + len(cached) + used == self.num_blocks and used >= 0
