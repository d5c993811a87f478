"""xformers paged attention: one `memory_efficient_attention_forward` call over a step's whole mixed batch.

The step is described to xformers by a paged causal bias (`build_paged_bias`, a pure function that tests can
materialize on CPU): query lengths, context lengths and the block tables. The cache is viewed as one long
key sequence of pages, [1, num_blocks * block_size, kv_heads, (group,) head_dim], without copies.

Which xformers kernel runs is xformers' choice, and not every build has one for our inputs:
- mixed batches (any query length > 1) need flash-attn 2 (2.7.1-2.8.4) or flash-attn 3 installed next to
  an xformers built for the installed torch + CUDA;
- `triton_splitk` alone handles decode-only batches, and only with a page size that is a multiple of 64;
- the PyPI xformers 0.0.35 wheel is built for torch 2.10+cu128, and on other torch/CUDA versions its CUDA
  extension does not load, so every fmha op refuses.
So `is_supported()` runs a tiny mixed paged batch on CUDA and checks it against the torch reference; the
backend refuses to construct (or to plan a step at an untested block size) when that fails, with the reason.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from workers.attention.base import AttentionBackend, AttentionMetadata

BUILD_ADVICE = (
    "Install an xformers build that matches your torch and CUDA versions (the PyPI 0.0.35 wheel is built for "
    "torch 2.10+cu128 only) together with flash-attn 2.7.1-2.8.4 or flash-attn 3 for paged prefill, "
    "or choose attention backend 'triton'.")


class XFormersUnavailableError(RuntimeError):
    """xformers cannot run paged attention for this setup; the message says why and what to install."""


def build_paged_bias(query_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int):
    """The step's xformers bias: sequence s's queries see its first seq_lens[s] cache positions, causally
    from the bottom right (its j-th new token sees positions 0 .. seq_lens[s] - query_lens[s] + j).

    Pure and device-agnostic: the bias lives on block_tables' device. Only the table columns any sequence
    uses are kept; padded entries past a sequence's length are never read by the kernels.
    """
    from xformers.ops.fmha.attn_bias import PagedBlockDiagonalCausalWithOffsetPaddedKeysMask

    pages = math.ceil(max(seq_lens) / block_size)
    tables = block_tables[:, :pages].to(torch.int32).contiguous()
    return PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=list(query_lens), kv_seqlen=list(seq_lens), block_tables=tables, page_size=block_size,
        device=tables.device)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, bias,
                    scale: float) -> torch.Tensor:
    """query [N, H, D] against the whole paged cache under `bias` -> [N, H, D]."""
    from xformers.ops import fmha

    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    keys = num_blocks * block_size
    if num_heads == kv_heads:
        q = query.reshape(1, num_tokens, num_heads, head_dim)
        k = key_cache.view(1, keys, kv_heads, head_dim)
        v = value_cache.view(1, keys, kv_heads, head_dim)
    else:  # GQA as xformers' BMGHK layout: query head h = kv_head * group + i; K/V broadcast over the group
        group = num_heads // kv_heads
        q = query.reshape(1, num_tokens, kv_heads, group, head_dim)
        k = key_cache.view(1, keys, kv_heads, 1, head_dim).expand(1, keys, kv_heads, group, head_dim)
        v = value_cache.view(1, keys, kv_heads, 1, head_dim).expand(1, keys, kv_heads, group, head_dim)
    out = fmha.memory_efficient_attention_forward(q, k, v, attn_bias=bias, scale=scale)
    return out.reshape(num_tokens, num_heads, head_dim)


@lru_cache(maxsize=None)
def probe(block_size: int = 16) -> str | None:
    """None when xformers runs a tiny mixed (decode + prefill) paged batch on CUDA and matches the torch
    reference at this block size; otherwise the reason it cannot. Cached per block size."""
    try:
        import xformers.ops.fmha  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure (missing, ABI mismatch) rules xformers out
        return f"xformers does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        return _probe_mixed_batch(block_size)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable paged path
        return f"a paged test batch failed ({type(exc).__name__}: {str(exc).strip()[:2000]})"


def _probe_mixed_batch(block_size: int) -> str | None:
    from workers.attention.torch_ref import TorchPagedAttention

    heads, kv_heads, head_dim, device, dtype = 4, 2, 64, torch.device("cuda"), torch.bfloat16
    query_lens, seq_lens = [1, 3], [5, 2 * block_size + 3]
    pages = [math.ceil(n / block_size) for n in seq_lens]
    ids = torch.randperm(sum(pages), device=device).to(torch.int32)
    tables = torch.zeros(2, max(pages), dtype=torch.int32, device=device)
    tables[0, : pages[0]], tables[1, : pages[1]] = ids[: pages[0]], ids[pages[0]:]
    cache_shape = (sum(pages), block_size, kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    value_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    query = torch.randn(sum(query_lens), heads, head_dim, device=device, dtype=dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.long, device=device),
        query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=tables,
        query_lens_list=query_lens, seq_lens_list=seq_lens, block_size=block_size, max_query_len=3,
        max_seq_len=max(seq_lens))
    reference = TorchPagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    meta.plan = reference.plan(meta)
    expected = reference.forward(query, key_cache, value_cache, meta).float()
    bias = build_paged_bias(query_lens, seq_lens, tables, block_size)
    got = paged_attention(query, key_cache, value_cache, bias, head_dim ** -0.5).float()
    err = (got - expected).abs().max().item()
    return None if err < 5e-2 else f"a paged test batch gave wrong results (max error {err:.3g})"


class XFormersPagedAttention(AttentionBackend):
    """Paged attention through xformers' fmha dispatcher; refuses to construct where no kernel fits."""

    name = "xformers"

    @classmethod
    def is_supported(cls) -> bool:
        return probe(16) is None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        _require(probe(16))

    def plan(self, meta: AttentionMetadata):
        _require(probe(meta.block_size), f" at block size {meta.block_size}")
        return build_paged_bias(meta.query_lens_list, meta.seq_lens_list, meta.block_tables, meta.block_size)

    def forward(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise XFormersUnavailableError(f"xformers' paged kernels take float16 or bfloat16, not {query.dtype}; "
                                           "choose attention backend 'triton' or 'torch' for float32.")
        from xformers.ops.fmha.attn_bias import PagedBlockDiagonalCausalWithOffsetPaddedKeysMask

        bias = meta.plan if isinstance(meta.plan, PagedBlockDiagonalCausalWithOffsetPaddedKeysMask) else self.plan(meta)
        try:
            return paged_attention(query, key_cache, value_cache, bias, self.scale)
        except NotImplementedError as exc:  # xformers' dispatcher found no kernel for these inputs
            raise XFormersUnavailableError(f"xformers has no kernel for this batch: {exc}\n{BUILD_ADVICE}") from exc


def _require(reason: str | None, where: str = "") -> None:
    if reason is not None:
        raise XFormersUnavailableError(f"xformers cannot run paged attention{where}: {reason}. {BUILD_ADVICE}")


__all__ = ["XFormersPagedAttention", "XFormersUnavailableError", "build_paged_bias", "paged_attention", "probe"]
