"""prefix-serve's C++ CPU kernels (`workers/csrc/cpu_kernels.cpp`), built on first use with PyTorch's extension
builder and cached (under $TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), so only the first engine
on a machine pays the build (about 20 s on 2 cores).

- `decode_attention`: each query row (a decode token, or a token of a short prefill chunk) attends over its
  sequence's keys up to its own position, read straight from the cache blocks, one task per row, instead of
  gathering every sequence's K/V into a padded copy for SDPA;
- `add_rmsnorm`, `rope_write`, `silu_mul`: the element-wise parts of a Llama-family layer, one pass over their
  rows each (the fused decoder's `CppOps`);
- `argmax_rows`: the greedy tokens of a batch's logits, torch.argmax's answer 3-4x faster
  (`workers.sampler.greedy_tokens`).

They are compiled for the vector width PyTorch uses on this CPU (AVX-512, AVX2, or plain C++ elsewhere) and take
fp32 only. When the build fails (no compiler, no `ninja`), `load()` returns None once with the reason logged, and
the torch formulations run instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger("prefix_serve.cpu_kernels")

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# PyTorch's CPU capability -> the macros its vector headers select on, and the compiler flags they need
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
_PLAIN_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]  # at::vec's portable C++ (ARM, or ATEN_CPU_CAPABILITY=default)
_lock = threading.Lock()
_state: dict[str, object] = {}


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX2", "DEFAULT"
    return "AVX512" if capability.startswith("AVX512") or "AMX" in capability else capability


def load():
    """The compiled kernels module, or None when they cannot be built here (the reason is in `failure()`).
    Builds at most once per process; PREFIX_SERVE_CPU_KERNELS=0 in the environment turns them off."""
    if "module" in _state:  # every kernel call asks: no lock once the answer is known
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module, reason = None, None
        if os.environ.get("PREFIX_SERVE_CPU_KERNELS", "1") == "0":
            reason = "turned off by PREFIX_SERVE_CPU_KERNELS=0"
        else:
            try:
                module = _build()
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch formulations
                reason = f"{type(exc).__name__}: {_first_error(str(exc))}"
        if reason:
            logger.warning("prefix-serve's C++ CPU kernels are unavailable, so the torch formulations run "
                           "(slower): %s", reason)
        _state["failure"] = reason
        _state["module"] = module
        return module


def _first_error(message: str) -> str:
    """The compiler's first error line from a build failure's message, else its last line."""
    lines = message.strip().splitlines() or [""]
    return next((line for line in lines if "error:" in line), lines[-1])[:300]


def failure() -> str | None:
    """Why `load()` returned None (None when it has not run or succeeded)."""
    return _state.get("failure")


def _build():
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:  # the `ninja` package's binary, for a virtualenv's interpreter run without activating it
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        except (ImportError, AttributeError):
            pass  # cpp_extension then names what is missing
    capability = _capability()
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", *_CAPABILITY_FLAGS.get(capability, _PLAIN_FLAGS)]
    name = f"prefix_serve_cpu_kernels_{capability.lower()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not (build_dir / f"{name}.so").exists():
        logger.warning("Building prefix-serve's C++ CPU kernels for %s (once per machine, about 20 s on 2 cores)...",
                       capability)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              verbose=False)
