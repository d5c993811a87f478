"""The CPU worker's malloc settings (workers/host_allocator.py): in force on glibc, and the user's own kept."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from workers.host_allocator import why_not_tuned

ROOT = Path(__file__).resolve().parents[1]

# Whether a 30 MiB tensor comes from the heap (kept and reused after it is freed) or from a mapping of its own
# (unmapped when freed, so the next one faults every page in again).
FROM_HEAP = """
import ctypes, sys, torch
if sys.argv[1] == "engine":
    sys.path.insert(0, "tests")
    from tiny_models import make_tiny_model
    from engine import LLM
    LLM(model=str(make_tiny_model("llama", sys.argv[2])), skip_tokenizer_init=True, num_kv_blocks=8)
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
x = torch.empty(30 << 20, dtype=torch.uint8)
print(x.data_ptr() < libc.sbrk(0))
"""

glibc_only = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")


def _from_heap(*args: str, **env: str) -> bool:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", FROM_HEAP, *args], cwd=ROOT, env={**environ, **env},
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


@glibc_only
def test_a_cpu_engine_keeps_large_tensors_on_the_heap(tmp_path):
    assert not _from_heap("bare")  # glibc's default: a mapping of its own
    assert _from_heap("engine", str(tmp_path / "model"))


@glibc_only
def test_the_users_own_malloc_settings_win(tmp_path):
    assert not _from_heap("engine", str(tmp_path / "model"), MALLOC_MMAP_THRESHOLD_=str(1 << 20))


def test_why_not_tuned():
    assert why_not_tuned({"MALLOC_TRIM_THRESHOLD_": "0"}) == "the user's own malloc thresholds (MALLOC_TRIM_THRESHOLD_)"
    assert why_not_tuned({"MALLOC_TOP_PAD_": "0", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}).endswith(
        "(MALLOC_TOP_PAD_, glibc.malloc.mmap_threshold)")
    assert why_not_tuned({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "another allocator is preloaded"
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert why_not_tuned({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "MALLOC_ARENA_MAX": "2"}) is None
