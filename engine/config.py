"""Engine configuration: one frozen dataclass; each component takes only the fields it needs."""

from __future__ import annotations

from dataclasses import dataclass


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

    def resolved_decode_steps(self) -> int:
        if self.decode_steps is not None:
            if not isinstance(self.decode_steps, int) or isinstance(self.decode_steps, bool) or self.decode_steps < 1:
                raise ValueError(f"decode_steps must be an integer of at least 1 (or None), got {self.decode_steps!r}.")
            return self.decode_steps
        return 16 if str(self.device).startswith("cuda") else 1

    def resolved_host_prefix_cache_size(self) -> int:
        if self.host_prefix_cache_size is not None:
            return self.host_prefix_cache_size
        return 1024 if str(self.device).startswith("cuda") else 0

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            if self.dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
            return self.dtype
        return "bfloat16" if str(self.device).startswith("cuda") else "float32"
