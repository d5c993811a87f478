"""Engine configuration: one frozen dataclass; each component takes only the fields it needs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from engine.errors import InvalidConfigError


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _batch_sizes(sizes) -> tuple[int, ...]:
    """`sizes` (any iterable of integers of at least 1) as a sorted tuple of distinct ints, or InvalidConfigError."""
    items = None if isinstance(sizes, (str, bytes)) else list(sizes) if isinstance(sizes, Iterable) else None
    if not items or not all(_is_int(size) and size >= 1 for size in items):
        raise _bad("cuda_graph_sizes", f"must be a non-empty list of integers of at least 1 (or None: the default "
                                       f"sizes), got {sizes!r}.")
    return tuple(sorted({int(size) for size in items}))


def _bad(field: str, message: str) -> InvalidConfigError:
    error = InvalidConfigError(f"{field} {message}")
    error.field = field  # the server names its option instead
    return error


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a Hugging Face model directory; None: the embedded SmolLM2-135M-Instruct
    device: str = "cpu"
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: size the KV cache from memory
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    # where the model workers run: "inprocess" (one worker in this process), "mp" (one local process per rank) or
    # "ray" (one Ray actor per rank). None: inprocess for one rank, mp for several
    executor: str | None = None
    tensor_parallel_size: int = 1  # ranks that split one model by attention head (workers/parallel.py)
    # how the Ray executor places its ranks (a Ray placement-group strategy); ignored inside a caller's group
    placement_strategy: str = "STRICT_PACK"
    attention_backend: str | None = None  # None: the best available for the device
    skip_tokenizer_init: bool = False
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 2.0
    # CPU: write every page of the KV cache at startup, as a zero-filled cache is. Serving then never pays the
    # first write of a block's pages (about 1-2 us per 4 KiB page here, a few percent of workload 1), and a cache
    # larger than the memory available fails at startup instead of under load. Off: memory is taken only as
    # blocks are first used, so RSS follows the blocks in use
    kv_cache_prefault: bool = False
    # GiB of host memory for prefix KV (page-locked on GPUs), so a prefix evicted from the device comes back
    # without a disk read; least recently used prefixes leave first. None: on GPUs a quarter of the worker's host
    # memory, at most 64 GiB; on CPU 0 (there the KV cache is host memory already, and a copy would double it)
    prefix_host_cache_gb: float | None = None
    allowed_prefix_roots: tuple[str, ...] = ()  # where prefix paths from requests may point
    # decode forwards run back to back on the device per engine step, when nothing waiting could start and no
    # running sequence samples with a seed (scheduler/scheduler.py). None: 16 on GPUs, where it hides the host's
    # per-step work (docs/gpu.md has the measurements); 1 on CPU
    decode_steps: int | None = None
    # schedule and send step k+1 to the workers while they run step k; the host reads step k's tokens one step late,
    # with the same tokens as one step at a time (engine/llm_engine.py, docs/architecture.md). Off by default: on
    # CPU it cannot help, and it has not been measured on a GPU yet
    async_scheduling: bool = False
    # pure-decode steps replayed as CUDA graphs (workers/cuda_graphs.py). "auto": on CUDA devices; "on": also on a
    # CPU, where a stand-in re-runs the captured function (for tests); "off": every step eager
    cuda_graphs: str = "auto"
    # the batch sizes captured, one graph each; a batch runs as the smallest size that holds it.
    # None: workers.cuda_graphs.DEFAULT_BATCH_SIZES (1, 2, 4, ..., 512)
    cuda_graph_sizes: tuple[int, ...] | None = None
    cuda_graph_memory_mb: float = 1024  # no further size is captured once the graphs hold this much device memory
    # the fused forward of Llama-family layers (workers/fused_decoder.py). "auto": on CUDA devices, and on CPUs
    # where prefix-serve's C++ kernels build (workers/cpu_kernels.py); "on": also elsewhere, with the torch
    # formulas (for tests); "off": Hugging Face's forward
    fused_layers: str = "auto"

    def __post_init__(self):
        """Every setting is checked here, so a bad one fails at once with a message, not later in a worker
        (a max_num_batched_tokens of 0, for one, would schedule nothing and hang every request)."""
        self._check_numbers()
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise _bad("dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.executor not in (None, "inprocess", "mp", "ray"):
            raise _bad("executor", f"must be 'inprocess', 'mp' or 'ray' (or None: chosen from "
                                   f"tensor_parallel_size), got {self.executor!r}.")
        if self.executor == "inprocess" and self.tensor_parallel_size > 1:
            raise _bad("executor", f"'inprocess' runs one worker; tensor_parallel_size {self.tensor_parallel_size} "
                                   "needs 'mp' (local processes) or 'ray'.")
        for name in ("async_scheduling", "kv_cache_prefault"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be True or False, got {getattr(self, name)!r}.")
        if self.placement_strategy not in ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"):
            raise _bad("placement_strategy", "must be STRICT_PACK, PACK, SPREAD or STRICT_SPREAD, got "
                                             f"{self.placement_strategy!r}.")
        for name in ("cuda_graphs", "fused_layers"):
            mode = getattr(self, name)
            if not (isinstance(mode, str) and mode in ("auto", "on", "off")):
                raise _bad(name, f"must be auto, on or off, got {mode!r}.")
        if self.attention_backend is not None:
            from workers.attention import available_backends

            if self.attention_backend not in available_backends():
                raise _bad("attention_backend", f"{self.attention_backend!r} is not one of {available_backends()}.")

    def _check_numbers(self) -> None:
        """Checks the numeric settings and stores them as plain int and float: a numpy integer would reach the
        workers' msgpack messages (a chunk size, a decode run's length), which refuse it."""
        for name, least, optional in (("block_size", 1, False), ("max_num_seqs", 1, False),
                                      ("max_num_batched_tokens", 1, False), ("num_kv_blocks", 1, True),
                                      ("max_model_len", 1, True), ("decode_steps", 1, True),
                                      ("tensor_parallel_size", 1, False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not (_is_int(value) and value >= least):
                raise _bad(name, f"must be an integer of at least {least}{' (or None)' if optional else ''}, "
                                 f"got {value!r}.")
            self._store(name, int(value))
        if not (_is_real(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1):
            raise _bad("gpu_memory_utilization", f"must be a number in (0, 1], got {self.gpu_memory_utilization!r}.")
        if not (_is_real(self.cpu_kv_cache_gb) and self.cpu_kv_cache_gb > 0):
            raise _bad("cpu_kv_cache_gb", f"must be a finite number above 0, got {self.cpu_kv_cache_gb!r}.")
        if not (_is_real(self.cuda_graph_memory_mb) and self.cuda_graph_memory_mb >= 0):
            raise _bad("cuda_graph_memory_mb", "must be a finite number of at least 0 (0 captures no graph), "
                                               f"got {self.cuda_graph_memory_mb!r}.")
        if self.prefix_host_cache_gb is not None:
            if not (_is_real(self.prefix_host_cache_gb) and self.prefix_host_cache_gb >= 0):
                raise _bad("prefix_host_cache_gb", "must be a finite number of at least 0 (0 keeps no host copy) or "
                                                   f"None, got {self.prefix_host_cache_gb!r}.")
            self._store("prefix_host_cache_gb", float(self.prefix_host_cache_gb))
        for name in ("gpu_memory_utilization", "cpu_kv_cache_gb", "cuda_graph_memory_mb"):
            self._store(name, float(getattr(self, name)))
        if self.cuda_graph_sizes is not None:
            self._store("cuda_graph_sizes", _batch_sizes(self.cuda_graph_sizes))

    def _store(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen; only __post_init__ normalizes

    def resolved_executor(self) -> str:
        if self.executor is not None:
            return self.executor
        return "inprocess" if self.tensor_parallel_size == 1 else "mp"

    def resolved_decode_steps(self) -> int:
        if self.decode_steps is not None:
            return self.decode_steps
        return 16 if str(self.device).startswith("cuda") else 1

    def prefix_host_cache_bytes(self) -> int | None:
        """The budget in bytes, or None: sized by the worker from its own host's memory (see the field)."""
        if self.prefix_host_cache_gb is not None:
            return int(self.prefix_host_cache_gb * (1 << 30))
        return None if str(self.device).startswith("cuda") else 0

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if str(self.device).startswith("cuda") else "float32"
