"""Check every available paged-attention backend against the torch reference on CUDA, then time decode.

    PYTHONPATH=. python3 benchmarks/gpu_kernels_check.py            # checks + decode timing, well under 60 s
    PYTHONPATH=. python3 benchmarks/gpu_kernels_check.py --sweep    # also times Triton tile configs

Correctness: bf16 (and one fp16 / fp32 case) against TorchPagedAttention computed in fp32 from the same inputs,
on random paged caches with shuffled block tables. Timing: one decode step of one layer (forward only; the
per-step plan is timed apart), batch 256, H=32, KVH=8, D=64, block 16, contexts 160-300. The torch reference
is the baseline; every row prints its speedup over it. A backend that fails prints FAIL and the reason.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata, get_backend_class
from workers.attention.torch_ref import TorchPagedAttention

BACKENDS = ["torch", "triton", "xformers"]


@dataclass(frozen=True)
class Shape:
    name: str
    query_lens: list[int]
    seq_lens: list[int]
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


def decode_shape(batch: int = 256, lo: int = 160, hi: int = 300, seed: int = 0, **kw) -> Shape:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    return Shape(f"decode b{batch} ctx{lo}-{hi}", [1] * batch, seq_lens, **kw)


def mixed_shape(name: str, **kw) -> Shape:
    """40 decodes plus chunked prefills: fresh, after a 32-token prefix, and a late chunk of a long prompt."""
    decode = decode_shape(40, 50, 400, seed=1)
    return Shape(name, decode.query_lens + [100, 37, 256, 2], decode.seq_lens + [100, 69, 700, 35], **kw)


CHECKS = [
    decode_shape(),
    mixed_shape("mixed bs16 D64"),
    mixed_shape("mixed bs64 D64 fp16", block_size=64, dtype=torch.float16),
    mixed_shape("mixed bs128 D128", head_dim=128, block_size=128),
    mixed_shape("mixed bs16 D64 fp32", dtype=torch.float32),
]


def random_step(shape: Shape, seed: int = 0):
    """(query, key_cache, value_cache, meta) on CUDA with shuffled, non-contiguous block tables."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bs = shape.block_size
    pages = [math.ceil(n / bs) for n in shape.seq_lens]
    num_blocks = sum(pages) + 8
    ids = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = torch.zeros(len(pages), max(pages), dtype=torch.int32, device="cuda")
    offsets = [0]
    for n in pages:
        offsets.append(offsets[-1] + n)
    for s, n in enumerate(pages):
        tables[s, :n] = ids[offsets[s]: offsets[s + 1]]
    cache_shape = (num_blocks, bs, shape.num_kv_heads, shape.head_dim)
    key_cache = torch.randn(cache_shape, device="cuda", generator=gen).to(shape.dtype)
    value_cache = torch.randn(cache_shape, device="cuda", generator=gen).to(shape.dtype)
    num_tokens = sum(shape.query_lens)
    query = torch.randn(num_tokens, shape.num_heads, shape.head_dim, device="cuda", generator=gen).to(shape.dtype)
    starts = [0]
    for q in shape.query_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.long, device="cuda"),  # unused by attention backends
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(shape.seq_lens, dtype=torch.int32, device="cuda"), block_tables=tables,
        query_lens_list=list(shape.query_lens), seq_lens_list=list(shape.seq_lens), block_size=bs,
        max_query_len=max(shape.query_lens), max_seq_len=max(shape.seq_lens))
    return query, key_cache, value_cache, meta


def make_backend(name: str, shape: Shape):
    cls = get_backend_class(name)
    if not cls.is_supported():
        raise RuntimeError("is_supported() is False on this machine")
    return cls(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5)


def reference(shape: Shape, query, key_cache, value_cache, meta) -> torch.Tensor:
    ref = TorchPagedAttention(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5)
    meta.plan = ref.plan(meta)
    return ref.forward(query.float(), key_cache.float(), value_cache.float(), meta)


def check(name: str, shape: Shape) -> str:
    if not get_backend_class(name).is_supported():
        return "n/a (not supported here)"
    try:
        backend = make_backend(name, shape)
        query, key_cache, value_cache, meta = random_step(shape)
        expected = reference(shape, query, key_cache, value_cache, meta)
        meta.plan = backend.plan(meta)
        got = backend.forward(query, key_cache, value_cache, meta).float()
        err = (got - expected).abs().max().item()
        tol = 1e-4 if shape.dtype == torch.float32 else 2e-2
        return f"ok (max err {err:.1e})" if err <= tol else f"FAIL: max err {err:.3g} > {tol}"
    except Exception as exc:  # noqa: BLE001 - one backend's failure must not stop the others
        return f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def cuda_ms(fn, iters: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_backend(backend, shape: Shape) -> tuple[float, float]:
    """(plan ms, forward ms) for one step of `shape`."""
    query, key_cache, value_cache, meta = random_step(shape)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    meta.plan = backend.plan(meta)
    torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    return plan_ms, cuda_ms(lambda: backend.forward(query, key_cache, value_cache, meta))


def dense_sdpa_ms(shape: Shape) -> float:
    """Anchor, not a backend: SDPA over the same contexts stored unpaged and padded to the longest."""
    batch, max_len = len(shape.seq_lens), max(shape.seq_lens)
    q = torch.randn(batch, shape.num_heads, 1, shape.head_dim, device="cuda", dtype=shape.dtype)
    k = torch.randn(batch, shape.num_kv_heads, max_len, shape.head_dim, device="cuda", dtype=shape.dtype)
    lens = torch.tensor(shape.seq_lens, device="cuda")
    mask = (torch.arange(max_len, device="cuda")[None, :] < lens[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return cuda_ms(lambda: sdpa(q, k, k, attn_mask=mask, enable_gqa=True))


def kv_bytes(shape: Shape) -> int:
    return sum(shape.seq_lens) * shape.num_kv_heads * shape.head_dim * 2 * shape.dtype.itemsize


def timing_table(shape: Shape) -> None:
    print(f"\nDecode attention, one layer: {shape.name}, H={shape.num_heads} KVH={shape.num_kv_heads} "
          f"D={shape.head_dim} block {shape.block_size} {str(shape.dtype).replace('torch.', '')}")
    print(f"{'backend':<34}{'plan ms':>9}{'forward ms':>12}{'KV GB/s':>10}{'vs torch':>10}")
    baseline = None
    for name in BACKENDS:
        if not get_backend_class(name).is_supported():
            print(f"{name:<34}n/a (not supported here)")
            continue
        try:
            plan_ms, fwd_ms = time_backend(make_backend(name, shape), shape)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:<34}FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
            continue
        baseline = baseline or fwd_ms
        print(f"{name:<34}{plan_ms:>9.2f}{fwd_ms:>12.4f}{kv_bytes(shape) / fwd_ms / 1e6:>10.0f}"
              f"{baseline / fwd_ms:>9.2f}x")
    try:
        ms = dense_sdpa_ms(shape)
        ratio = f"{baseline / ms:>9.2f}x" if baseline else ""
        print(f"{'(anchor) dense padded SDPA':<34}{'':>9}{ms:>12.4f}{kv_bytes(shape) / ms / 1e6:>10.0f}{ratio}")
    except Exception as exc:  # noqa: BLE001
        print(f"(anchor) dense padded SDPA FAIL: {exc}")


def sweep_triton() -> None:
    """Time Triton tile configs on decode and prefill shapes; the defaults live in TritonPagedAttention."""
    cls = get_backend_class("triton")
    decode = [(n, w, s) for n in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)]
    long_decode = [(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    prefill = [(m, n, w, s) for m in (64, 128) for n in (32, 64) for w in (4, 8) for s in (2, 3)]
    cases = [
        (decode_shape(), "DECODE_SHORT", decode),
        (decode_shape(32, 1800, 2200), "DECODE_LONG", long_decode),
        (Shape("prefill 4x512 after 256", [512] * 4, [768] * 4), "PREFILL", prefill),
    ]
    for shape, attribute, configs in cases:
        print(f"\nTriton sweep, {shape.name}: ms per forward by {attribute} "
              f"(default {getattr(cls, attribute)})")
        results = []
        for config in configs:
            backend = cls(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5)
            setattr(backend, attribute, config)
            try:
                results.append((time_backend(backend, shape)[1], config))
            except Exception as exc:  # noqa: BLE001
                print(f"  {config}: FAIL {type(exc).__name__}: {str(exc)[:100]}")
        for ms, config in sorted(results)[:6]:
            print(f"  {config}: {ms:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time Triton tile configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to check (the CPU tests cover the interpreter path).")
        return 0
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name in BACKENDS[1:]:
        try:
            print(f"{name}: is_supported() = {get_backend_class(name).is_supported()}")
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: import failed: {type(exc).__name__}: {exc}")
    try:
        from workers.attention.xformers_paged import probe
        print(f"xformers probe: {probe(16) or 'ok'}")
    except Exception as exc:  # noqa: BLE001
        print(f"xformers probe failed: {type(exc).__name__}: {exc}")
    print(f"\n{'check':<26}" + "".join(f"{name:<32}" for name in BACKENDS[1:]))
    for shape in CHECKS:
        print(f"{shape.name:<26}" + "".join(f"{check(name, shape):<32}" for name in BACKENDS[1:]), flush=True)
    timing_table(CHECKS[0])
    timing_table(decode_shape(32, 1800, 2200))
    if args.sweep:
        try:
            sweep_triton()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
