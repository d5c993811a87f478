"""Decode steps replayed as CUDA graphs: one captured graph per padded batch size, with an eager fallback.

A pure-decode step (every sequence brings one new token) with B sequences runs as the graph captured for the
smallest bucket b >= B (1, 2, 4, ..., 512). The step's inputs are packed on the host into one int32 buffer, sent
with one host-to-device copy into a static staging buffer, and the graph replays the whole forward (embedding,
every layer's K/V write and paged attention, final norm, LM head) from there. Nothing a graph launches depends
on per-step host values: attention reads its loop bounds from `seq_lens` on the device, and its launch grid
depends only on b (`static_decode_plan` of the attention backend). So a graph captured once is valid for any
contexts up to `max_blocks_per_seq` blocks.

Rows B .. b-1 are padding. They write their K/V into the runner's scratch block (a KV block the engine never
hands out) and attend only to that slot, so they never touch a real sequence's blocks.

Layout of the staging buffer for bucket b (int32), with stride = max(b, 16) so every field is 64-byte aligned:
    [input_ids | positions | slot_mapping | seq_lens], each `stride` long, then block_tables [b, width] flattened.

Anything that fails while capturing a size is logged once and that size runs eagerly from then on. On a CPU,
`mode="on"` replays by re-running the captured function (`_EagerReplay`), which tests everything but the
capture itself.
"""

from __future__ import annotations

import array
import logging
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Callable

import torch

from workers.attention import AttentionMetadata

logger = logging.getLogger("prefix_serve.cuda_graphs")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_ALIGN = 16  # int32 elements: 64 bytes


@dataclass(frozen=True)
class CudaGraphConfig:
    """EngineConfig's cuda_graphs, cuda_graph_sizes and cuda_graph_memory_mb (checked there), for the runner.

    mode: "auto" (graphs on CUDA devices only), "on" (also emulated on CPU, for tests) or "off"."""

    mode: str
    batch_sizes: tuple[int, ...] | None  # None: DEFAULT_BATCH_SIZES
    memory_cap_mb: float  # stop capturing new sizes once the graphs hold this much device memory
    capture_at_start: bool = True  # CUDA: capture every size at start-up (largest first); else on first use

    def enabled_for(self, device: torch.device) -> bool:
        return self.mode == "on" or (self.mode == "auto" and device.type == "cuda")


def host_int32(values: list[int]) -> torch.Tensor:
    """A CPU int32 tensor of `values`, about four times faster than torch.tensor(values) for long lists."""
    return torch.frombuffer(array.array("i", values), dtype=torch.int32)


def bucket_for(batch: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest captured size that holds `batch` rows (sizes sorted ascending), or None when none does."""
    i = bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


def field_stride(bucket: int) -> int:
    return -(-bucket // _ALIGN) * _ALIGN


def pack_decode_step(input_ids: list[int], positions: list[int], slot_mapping: list[int], seq_lens: list[int],
                     block_tables: list[list[int]], bucket: int, width: int, scratch_block: int,
                     block_size: int) -> list[int]:
    """A decode step's inputs, padded to `bucket` rows, in the staging layout (see the module docstring).

    Padding rows: token 0 at position 0, writing to and reading only the scratch block's first slot.
    """
    stride = field_stride(bucket)
    n = len(input_ids)
    pad = stride - n
    flat = input_ids + [0] * pad
    flat += positions + [0] * pad
    flat += slot_mapping + [scratch_block * block_size] * pad
    flat += seq_lens + [1] * pad
    for table in block_tables:
        flat += table
        flat += [0] * (width - len(table))
    flat += ([scratch_block] + [0] * (width - 1)) * (bucket - n)
    return flat


@dataclass
class GraphStats:
    graph_steps: int = 0
    eager_steps: int = 0
    captured: list[tuple[int, bool]] = field(default_factory=list)  # (bucket, long_context) in capture order
    failed: dict[tuple[int, bool], str] = field(default_factory=dict)  # key -> first error
    capture_seconds: float = 0.0
    graph_memory_bytes: int = 0


class PinnedRing:
    """A few page-locked host buffers, used in turn, for the step inputs' host-to-device copy.

    A copy from pageable memory may make the driver wait for the stream to drain before it stages the bytes, so
    the device idles while the host issues the next forward. From page-locked memory the copy is queued like a
    kernel. A buffer is refilled only after the copy that last read it has run (its event), so the host can run
    up to `slots` forwards ahead of the device.
    """

    def __init__(self, numel: int, slots: int = 4):
        self.buffers = [torch.empty(numel, dtype=torch.int32, pin_memory=True) for _ in range(slots)]
        self.events = [torch.cuda.Event() for _ in range(slots)]  # an event never recorded is complete
        self.next = 0

    def copy_to(self, dest: torch.Tensor, values: torch.Tensor) -> None:
        """dest[:len(values)] = values (a CPU int32 tensor), asynchronously, on dest's device's current stream."""
        slot = self.next
        self.next = (slot + 1) % len(self.buffers)
        self.events[slot].synchronize()
        buffer = self.buffers[slot][: values.numel()]
        buffer.copy_(values)
        dest[: values.numel()].copy_(buffer, non_blocking=True)
        self.events[slot].record(torch.cuda.current_stream(dest.device))


class _EagerReplay:
    """Stands in for a CUDA graph on CPU: replay re-runs the function, which reads the same static buffers, and
    writes its result into one output buffer, as a graph does (so a caller that holds logits across steps reads
    overwritten values on CPU too, where the parity tests catch it)."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn
        self.output = fn()

    def replay(self) -> torch.Tensor:
        self.output.copy_(self.fn())
        return self.output


class _CapturedGraph:
    def __init__(self, fn: Callable[[], torch.Tensor], pool):
        stream = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, cuBLAS picks kernels
            fn()
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = fn()
        finally:
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class DecodeGraphs:
    """Static buffers plus one graph per (bucket, long_context) key; runs eligible decode steps.

    `forward(input_ids [b] int32, positions [b] int32, meta)` must return fp32 logits [b, vocab] for every row.
    """

    def __init__(self, config: CudaGraphConfig, forward: ForwardFn, backend, device: torch.device,
                 block_size: int, scratch_block: int, max_blocks_per_seq: int):
        self.config = config
        self.forward = forward
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.sizes = tuple(sorted(config.batch_sizes or DEFAULT_BATCH_SIZES))
        self.max_batch = self.sizes[-1]
        self.width = max_blocks_per_seq
        stride = field_stride(self.max_batch)
        self.staging = torch.zeros(4 * stride + self.max_batch * self.width, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(self.max_batch, self.width, dtype=torch.int32, device=device)
        self.seq_index = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)  # also query_start_loc
        self.graphs: dict[tuple[int, bool], _CapturedGraph | _EagerReplay] = {}
        self.stats = GraphStats()
        self.on_cuda = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.on_cuda else None
        self.pinned = PinnedRing(self.staging.numel()) if self.on_cuda else None

    @staticmethod
    def supported(backend) -> bool:
        return hasattr(backend, "static_decode_plan") and hasattr(backend, "decode_variant")

    # ---- the step -------------------------------------------------------------------------------------------
    def key_for(self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]]):
        """The graph key for a step, or None when it must run eagerly (not pure decode, too big, too long)."""
        n = len(query_lens)
        if n > self.max_batch or sum(query_lens) != n:
            return None
        if max(map(len, block_tables)) > self.width:
            return None
        key = (bucket_for(n, self.sizes), self.backend.decode_variant(max(seq_lens)))
        return None if key in self.stats.failed else key

    def run(self, key, input_ids: list[int], positions: list[int], slot_mapping: list[int], seq_lens: list[int],
            block_tables: list[list[int]], device_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replay the graph for `key` on this step; fp32 logits [n, vocab], or None if the graph is unavailable.
        `device_ids`, when given, are the step's token ids already on the device (`input_ids` is then ignored).

        The logits are a view of the graph's output buffer. The graphs share one memory pool, so the next replay
        of any graph may overwrite them: a caller reads them, or queues the kernels that do on the same stream,
        before its next call. Not copying them saves a pass over B x vocab floats per decode forward."""
        graph = self.graphs.get(key) or self._capture(key)
        if graph is None:
            return None
        bucket, n = key[0], len(input_ids)
        width = max(map(len, block_tables))
        flat = pack_decode_step(input_ids, positions, slot_mapping, seq_lens, block_tables, bucket, width,
                                self.scratch_block, self.block_size)
        host = host_int32(flat)
        if self.pinned is not None:
            self.pinned.copy_to(self.staging, host)
        else:
            self.staging[: host.numel()].copy_(host)
        if device_ids is not None:
            self.staging[:n].copy_(device_ids)
        tables_at = 4 * field_stride(bucket)
        self.block_tables[:bucket, :width].copy_(self.staging[tables_at: tables_at + bucket * width]
                                                 .view(bucket, width))
        logits = graph.replay()
        self.stats.graph_steps += 1
        return logits[:n]

    # ---- capture --------------------------------------------------------------------------------------------
    def capture_all(self) -> None:
        """Capture the short-context graph of every size, largest first so smaller ones reuse its memory."""
        for bucket in reversed(self.sizes):
            self._capture((bucket, self.backend.decode_variant(0)))

    def _body(self, key) -> Callable[[], torch.Tensor]:
        bucket, long_context = key
        stride = field_stride(bucket)
        staging, tables, seq_index = self.staging, self.block_tables[:bucket], self.seq_index
        backend, forward, block_size = self.backend, self.forward, self.block_size

        def body() -> torch.Tensor:
            seq_lens = staging[3 * stride: 3 * stride + bucket]
            meta = AttentionMetadata(
                slot_mapping=staging[2 * stride: 2 * stride + bucket].long(),
                query_start_loc=seq_index[: bucket + 1], seq_lens=seq_lens, block_tables=tables,
                query_lens_list=[1] * bucket, seq_lens_list=[], block_size=block_size, max_query_len=1,
                max_seq_len=0)  # host lengths are unknown inside a graph; the static plan does not use them
            meta.plan = backend.static_decode_plan(seq_index[:bucket], long_context)
            return forward(staging[:bucket], staging[stride: stride + bucket], meta)

        return body

    def _fill_padding(self, bucket: int) -> None:
        """Make every row of `bucket` a padding row, so warm-up and capture touch only the scratch block."""
        flat = pack_decode_step([], [], [], [], [], bucket, 1, self.scratch_block, self.block_size)
        self.staging[: len(flat)].copy_(host_int32(flat))
        self.block_tables[:bucket, 0] = self.scratch_block

    def _capture(self, key):
        if key in self.stats.failed:
            return None
        if self.stats.graph_memory_bytes >= self.config.memory_cap_mb * 2**20:
            self._fail(key, f"graph memory cap of {self.config.memory_cap_mb:g} MiB reached")
            return None
        start = time.perf_counter()
        try:
            self._fill_padding(key[0])
            if self.on_cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # so the free-memory difference is what the graph holds
                before = torch.cuda.mem_get_info()[0]
                graph = _CapturedGraph(self._body(key), self.pool)
                torch.cuda.synchronize()
                self.stats.graph_memory_bytes += max(0, before - torch.cuda.mem_get_info()[0])
            else:
                graph = _EagerReplay(self._body(key))
        except Exception as exc:  # noqa: BLE001 - any capture failure means eager for this size, not a crash
            self._fail(key, f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.stats.capture_seconds += time.perf_counter() - start
        self.graphs[key] = graph
        self.stats.captured.append(key)
        return graph

    def _fail(self, key, reason: str) -> None:
        self.stats.failed[key] = reason
        logger.warning("CUDA graph for decode batch %d (long_context=%s) unavailable, running it eagerly: %s",
                       key[0], key[1], reason.splitlines()[0][:300] if reason else "")


__all__ = ["CudaGraphConfig", "DecodeGraphs", "GraphStats", "bucket_for", "pack_decode_step", "field_stride",
           "DEFAULT_BATCH_SIZES", "host_int32", "PinnedRing"]
