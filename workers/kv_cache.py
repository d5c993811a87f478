"""The paged KV cache of one worker, the slot arithmetic of paged access, and prefix reads into it.

Layout: `data` is [num_layers, 2 (key, value), num_blocks, block_size, num_kv_heads, head_dim]; layer l's key
cache is data[l, 0] and its value cache data[l, 1], each in the attention-backend layout.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import torch

from engine.errors import InvalidConfigError
from engine.model_spec import ModelSpec
from engine.peft_format import ADAPTER_WEIGHTS, TENSOR_NAME, prefix_to_kv


def read_prefix_kv(path: str, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """Load an adapter's prefix from safetensors (never pickle) as [L, 2, P, kv_heads, head_dim]."""
    from safetensors.torch import load_file

    tensor = load_file(str(Path(path) / ADAPTER_WEIGHTS))[TENSOR_NAME]
    return prefix_to_kv(tensor.to(dtype), spec.num_layers, spec.num_kv_heads, spec.head_dim).contiguous()


def slot_of(block_table, index, block_size: int):
    """The cache slot of KV-stream index `index` of a sequence with this block table: the slot arithmetic of
    every paged read and write. Ints with a list table, or a tensor of indices with a tensor table of shape
    [..., blocks] (several sequences' tables at once give [..., len(index)])."""
    if isinstance(block_table, torch.Tensor):
        return block_table[..., index // block_size] * block_size + index % block_size
    return block_table[index // block_size] * block_size + index % block_size


def extend_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    """Append the cache slots of KV-stream indices start .. end - 1: one range per block, not one `slot_of` per
    token (a long prefill chunk has thousands of tokens and a handful of blocks)."""
    while start < end:
        block = start // block_size
        stop = min(end, (block + 1) * block_size)
        first = slot_of(table, start, block_size)
        slots.extend(range(first, first + stop - start))
        start = stop


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_available(nbytes: int) -> None:
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise InvalidConfigError(
            f"The CPU KV cache needs {nbytes / (1 << 30):.2f} GiB, but only {available / (1 << 30):.2f} GiB of memory "
            "is available: lower cpu_kv_cache_gb (or num_kv_blocks), or turn kv_cache_prefault off.")


class HostPrefixCache:
    """Prefix KV tensors in host memory under a budget in bytes, least recently used out first, so an evicted
    prefix comes back without a disk read. With `pin`, copies are page-locked, so the copy to the GPU is a DMA
    that does not hold the host back."""

    def __init__(self, capacity_bytes: int, pin: bool = False):
        self.capacity_bytes = capacity_bytes
        self.pin = pin
        self.nbytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str, load) -> torch.Tensor:
        value = self.lookup(key)
        return value if value is not None else self.put(key, load())

    def lookup(self, key: str) -> torch.Tensor | None:
        """The kept copy (now the most recently used), or None."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Keep a copy if the budget allows, evicting the least recently used; returns it (pinned with `pin`)."""
        if key in self._entries:
            return self.lookup(key)
        size = value.numel() * value.element_size()
        if size <= self.capacity_bytes:  # a prefix larger than the whole budget is not kept
            if self.pin and not value.is_pinned():
                value = value.pin_memory()
            self._entries[key] = value
            self.nbytes += size
            while self.nbytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.numel() * evicted.element_size()
        return value

    def discard(self, key: str) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.nbytes -= value.numel() * value.element_size()


def _anonymous_memory(nbytes: int) -> mmap.mmap:
    """Zero pages, each taken on its first write. A private mapping where there is one: Python's default is a
    shared one, backed by shmem, whose first write of a page took 2.1-2.7 us here against 1.4-1.5 us."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, nbytes)  # Windows: anonymous memory of its own kind


class KVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: str,
                 prefault: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        if torch.device(device).type == "cpu":
            # An anonymous mapping reads as zeros and takes memory only as pages are first written, so RSS
            # follows the blocks in use, not the configured cache size. (Zeros matter: a backend may read a
            # masked-out slot, and a NaN there would survive being multiplied by a zero weight.)
            nbytes = math.prod(shape) * dtype.itemsize
            if prefault:
                _check_available(nbytes)
            self._buffer = _anonymous_memory(nbytes)
            self.data = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
            if prefault:  # every page written now (by torch's threads), not on a block's first use
                self.data.zero_()
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        # each layer's (K, V) views, made once: indexing the cache took about 12 us a call (cProfile), twice a
        # layer and step
        self._layers = [(self.data[i, 0], self.data[i, 1]) for i in range(spec.num_layers)]
        self._copy_stream = None  # GPU only: the stream prefix writes run on (write_prefix), made on first use

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * dtype.itemsize

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[layer_idx]

    def _flat(self) -> torch.Tensor:
        layers, _, blocks, size, heads, dim = self.data.shape
        return self.data.view(layers, 2, blocks * size, heads, dim)

    def write_prefix(self, kv: torch.Tensor, block_ids: list[int]) -> None:
        """Write a prefix's KV ([L, 2, P, kv_heads, head_dim]) into its blocks, token i at block i // size.

        On a GPU the copy runs on a stream of its own: the host-to-device transfer (a DMA from page-locked
        memory) overlaps whatever the compute stream still runs, and the compute stream waits for the write
        before its next kernel, so the first forward that reads these blocks sees them."""
        slots = slot_of(torch.tensor(block_ids, dtype=torch.long), torch.arange(kv.shape[2]), self.block_size)
        if self.data.device.type != "cuda":  # the CPU path: a plain copy, nothing to overlap
            self._flat().index_copy_(2, slots.to(self.data.device), kv.to(self.data.device, self.data.dtype))
            return
        compute = torch.cuda.current_stream(self.data.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.data.device)
        with torch.cuda.stream(self._copy_stream):
            pinned = kv.is_pinned()
            kv = kv.to(self.data.device, self.data.dtype, non_blocking=pinned)
            slots = slots.to(self.data.device, non_blocking=False)
            # These blocks were free, so a forward queued before (that still holds them) may not have run yet:
            # the write into the cache waits for it; only the transfer above runs ahead.
            self._copy_stream.wait_stream(compute)
            self._flat().index_copy_(2, slots, kv)
        compute.wait_stream(self._copy_stream)  # ordered before the first forward that reads the blocks
        # kv and slots were allocated on the copy stream and are used only there, so freeing them is safe; the
        # caching host allocator keeps the page-locked source until its transfer is done

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers, keys and values) from src to dst."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.data.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]
