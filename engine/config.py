"""Engine configuration: one frozen dataclass; each component takes only the fields it needs."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from engine.errors import InvalidConfigError


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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
    executor: str = "inprocess"  # or "ray"
    attention_backend: str | None = None  # None: the best available for the device
    skip_tokenizer_init: bool = False
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 2.0
    # prefix KV kept in host memory, so a prefix evicted from the device comes back without a disk read.
    # None: 1024 on GPUs, 0 on CPU (there the KV cache is host memory already; a copy would double it)
    host_prefix_cache_size: int | None = None
    allowed_prefix_roots: tuple[str, ...] = ()  # where prefix paths from requests may point
    # decode forwards run back to back on the device per engine step, when nothing waiting could start and no
    # running sequence samples with a seed (scheduler/scheduler.py). None: 16 on GPUs, where it hides the host's
    # per-step work (docs/gpu.md has the measurements); 1 on CPU
    decode_steps: int | None = None

    def __post_init__(self):
        """Every setting is checked here, so a bad one fails at once with a message, not later in a worker
        (a max_num_batched_tokens of 0, for one, would schedule nothing and hang every request)."""
        for name, optional in (("block_size", False), ("max_num_seqs", False), ("max_num_batched_tokens", False),
                               ("num_kv_blocks", True), ("max_model_len", True), ("decode_steps", True)):
            value = getattr(self, name)
            if (value is not None or not optional) and not (_is_int(value) and value >= 1):
                raise _bad(name, f"must be an integer of at least 1{' (or None)' if optional else ''}, got {value!r}.")
        size = self.host_prefix_cache_size
        if size is not None and not (_is_int(size) and size >= 0):
            raise _bad("host_prefix_cache_size", f"must be an integer of at least 0 (or None), got {size!r}.")
        if not (_is_real(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1):
            raise _bad("gpu_memory_utilization", f"must be a number in (0, 1], got {self.gpu_memory_utilization!r}.")
        if not (_is_real(self.cpu_kv_cache_gb) and self.cpu_kv_cache_gb > 0):
            raise _bad("cpu_kv_cache_gb", f"must be a finite number above 0, got {self.cpu_kv_cache_gb!r}.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise _bad("dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.executor not in ("inprocess", "ray"):
            raise _bad("executor", f"must be 'inprocess' or 'ray', got {self.executor!r}.")
        if self.attention_backend is not None:
            from workers.attention import available_backends

            if self.attention_backend not in available_backends():
                raise _bad("attention_backend", f"{self.attention_backend!r} is not one of {available_backends()}.")

    def resolved_decode_steps(self) -> int:
        if self.decode_steps is not None:
            return self.decode_steps
        return 16 if str(self.device).startswith("cuda") else 1

    def resolved_host_prefix_cache_size(self) -> int:
        if self.host_prefix_cache_size is not None:
            return self.host_prefix_cache_size
        return 1024 if str(self.device).startswith("cuda") else 0

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if str(self.device).startswith("cuda") else "float32"
