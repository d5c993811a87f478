"""Triton paged attention: one kernel for mixed batches of decode rows and chunked-prefill rows.

Each program owns one KV head of one sequence and a tile of that sequence's new tokens. The query heads that
share the KV head are packed into the tile's M dimension (row = token * group + head_in_group), so a decode
row (one token) still fills an MMA tile with its whole head group and reads each K/V block once per KV head.
The kernel walks the sequence's block table BLOCK_N logical positions at a time, gathers K/V from the paged
cache, and keeps an online softmax in fp32 (exp2 with the scale folded in). Causality is per row:
the j-th new token of a sequence with q_len new tokens and seq_len context sits at index seq_len - q_len + j
and sees indices 0 .. that index, prefix included.

`plan()` lays the step's tiles out once on the host (decode tiles and prefill tiles get different tile
shapes, so a mixed step is two launches per layer); every layer reuses them.

Setting TRITON_INTERPRET=1 before triton is imported runs the same kernel on CPU tensors (tests do this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workers.attention.base import AttentionBackend, AttentionMetadata

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the backend then reports itself unsupported
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


class TritonAttentionConfigError(ValueError):
    """The Triton backend cannot run this configuration (dtype, head size, device); the message says why."""


@dataclass(frozen=True)
class _TileConfig:
    block_m: int  # rows per tile: tokens_per_tile * group, padded to a power of two
    block_n: int  # cache positions per inner-loop step
    num_warps: int
    num_stages: int


@dataclass
class _TileSet:
    """Tiles of one launch: tile i covers tokens tile_tok[i] .. + tokens_per_tile of sequence tile_seq[i]."""

    config: _TileConfig
    tokens_per_tile: int
    tile_seq: torch.Tensor  # [T] int32
    tile_tok: torch.Tensor  # [T] int32


@dataclass
class TritonPlan:
    tile_sets: list[_TileSet]  # at most two: decode tiles, prefill tiles


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


if triton is not None:

    # Triton compiles a variant per value class of an integer argument (1, a multiple of 16, other) and per
    # 16-byte alignment of a pointer. The block-table width and the prefill tile table change from step to step,
    # so specializing on them would compile new variants while serving (a stall of a few hundred ms each).
    @triton.jit(do_not_specialize=["stride_bt"], do_not_specialize_on_alignment=["tile_seq_ptr", "tile_tok_ptr"])
    def _paged_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
        block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, tile_seq_ptr, tile_tok_ptr,
        scale_log2e,
        stride_qn, stride_qh, stride_qd,
        stride_on, stride_oh, stride_od,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_bt,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(tile_seq_ptr + tile)
        tok0 = tl.load(tile_tok_ptr + tile)
        q_begin = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len  # cache positions before this step's tokens

        rows = tl.arange(0, BLOCK_M)
        row_tok = tok0 + rows // GROUP  # token index within this step's tokens of the sequence
        row_head = kv_head * GROUP + rows % GROUP
        row_valid = (rows // GROUP < TOKENS_PER_TILE) & (row_tok < q_len)
        row_pos = context_len + row_tok  # the row's token index in the sequence: it sees 0 .. row_pos
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < HEAD_DIM

        q_rows = (q_begin + row_tok).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qn + row_head[:, None] * stride_qh + dims[None, :] * stride_qd,
                    mask=row_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

        last_tok = tl.minimum(tok0 + TOKENS_PER_TILE, q_len) - 1
        kv_end = context_len + last_tok + 1  # the tile's last token sees positions < kv_end
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so fully masked chunks give exp2(-inf) = 0
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        kv_head_off = kv_head.to(tl.int64)
        for start in range(0, kv_end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_valid = pos < kv_end
            block = tl.load(block_table + pos // PAGE_SIZE, mask=pos_valid, other=0).to(tl.int64)
            in_page = (pos % PAGE_SIZE).to(tl.int64)
            k_off = block * stride_kb + in_page * stride_ks + kv_head_off * stride_kh  # [BLOCK_N]
            k_t = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None] * stride_kd,
                          mask=pos_valid[None, :] & dim_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * scale_log2e  # [BLOCK_M, BLOCK_N], log2 units
            visible = pos_valid[None, :] & (pos[None, :] <= row_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_off = block * stride_vb + in_page * stride_vs + kv_head_off * stride_vh
            v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :] * stride_vd,
                        mask=pos_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_on + row_head[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonPagedAttention(AttentionBackend):
    """Paged attention in one Triton kernel; matches TorchPagedAttention (the referee) up to float rounding."""

    name = "triton"
    # Decode: one token per sequence, so a tile is just the head group (padded to the 16-row MMA minimum).
    # Prefill: 64-row tiles of tokens x heads; a sequence's later tiles see more keys, so they are launched first.
    # Values from `benchmarks/gpu_kernels_check.py --sweep` on an H200 (H=32, KVH=8, D=64, block 16, bf16):
    # BLOCK_N 64 is best at batch 256 / contexts 160-300, BLOCK_N 128 with 3 stages at batch 32 / contexts ~2k.
    DECODE_SHORT = (64, 4, 2)  # (BLOCK_N, num_warps, num_stages) while the longest context <= LONG_CONTEXT
    DECODE_LONG = (128, 4, 3)
    LONG_CONTEXT = 512
    PREFILL = (64, 64, 4, 2)  # (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M grows to fit a head group

    @classmethod
    def is_supported(cls) -> bool:
        return triton is not None and torch.cuda.is_available()

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        if triton is None:
            raise TritonAttentionConfigError("The triton attention backend needs the `triton` package "
                                             "(pip install triton), or choose attention backend 'torch'.")
        if num_heads % num_kv_heads:
            raise TritonAttentionConfigError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                                             f"({num_kv_heads}).")
        if head_dim > 256:
            raise TritonAttentionConfigError(f"head_dim {head_dim} is larger than the 256 this kernel supports; "
                                             "choose attention backend 'torch'.")
        self.group = num_heads // num_kv_heads
        self.block_d = max(16, _next_pow2(head_dim))  # non-power-of-two head dims are padded and masked

    def decode_variant(self, max_seq_len: int) -> bool:
        """Which decode tile config a batch whose longest context is `max_seq_len` uses (True: the long one)."""
        return max_seq_len > self.LONG_CONTEXT

    def static_decode_plan(self, seq_index: torch.Tensor, long_context: bool) -> TritonPlan:
        """The plan of a pure-decode batch (row i is sequence i; seq_index = arange(B) int32 on the device).

        It is built from device tensors alone and its launch grid depends only on B: the kernel reads its loop
        bounds from seq_lens on the device. So a CUDA graph captured with it is valid for any contexts; both tile
        configs are exact, `long_context` only picks the faster one."""
        config = _TileConfig(max(16, _next_pow2(self.group)), *(self.DECODE_LONG if long_context
                                                                else self.DECODE_SHORT))
        return TritonPlan([_TileSet(config, 1, seq_index, torch.zeros_like(seq_index))])

    def plan(self, meta: AttentionMetadata) -> TritonPlan:
        if meta.max_query_len == 1:  # pure decode: no host loop, no copy
            seq_index = torch.arange(len(meta.query_lens_list), dtype=torch.int32, device=meta.seq_lens.device)
            return self.static_decode_plan(seq_index, self.decode_variant(meta.max_seq_len))
        decode_cfg = self.DECODE_LONG if meta.max_seq_len > self.LONG_CONTEXT else self.DECODE_SHORT
        decode = _TileConfig(max(16, _next_pow2(self.group)), *decode_cfg)
        prefill_block_m, *prefill_cfg = self.PREFILL
        prefill_block_m = max(prefill_block_m, _next_pow2(self.group))
        prefill = _TileConfig(prefill_block_m, *prefill_cfg)
        decode_seqs: list[int] = []
        prefill_tiles: list[tuple[int, int, int]] = []  # (keys seen by the tile's last token, seq, first token)
        prefill_tokens = prefill_block_m // self.group
        for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            if q_len == 1:
                decode_seqs.append(s)
                continue
            for tok in range(0, q_len, prefill_tokens):
                prefill_tiles.append((seq_len - q_len + min(tok + prefill_tokens, q_len), s, tok))
        prefill_tiles.sort(reverse=True)  # longest tiles first, so the tail of the launch is short work
        device = meta.seq_lens.device
        tile_sets = []
        if decode_seqs:
            seqs = torch.tensor(decode_seqs, dtype=torch.int32).to(device, non_blocking=True)
            tile_sets.append(_TileSet(decode, 1, seqs, torch.zeros_like(seqs)))
        if prefill_tiles:
            table = torch.tensor([[s for _, s, _ in prefill_tiles], [tok for _, _, tok in prefill_tiles]],
                                 dtype=torch.int32).to(device, non_blocking=True)  # [2, T], rows contiguous
            tile_sets.append(_TileSet(prefill, prefill_tokens, table[0], table[1]))
        return TritonPlan(tile_sets)

    def forward(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self._check_inputs(query, key_cache, value_cache)
        plan = meta.plan if isinstance(meta.plan, TritonPlan) else self.plan(meta)
        out = torch.empty_like(query)
        precision = "ieee" if query.dtype == torch.float32 else None  # no silent TF32 for fp32 parity
        for tiles in plan.tile_sets:
            cfg = tiles.config
            grid = (tiles.tile_seq.numel(), self.num_kv_heads)
            _paged_attention_kernel[grid](
                out, query, key_cache, value_cache,
                meta.block_tables, meta.query_start_loc, meta.seq_lens, tiles.tile_seq, tiles.tile_tok,
                self.scale * _LOG2E,
                *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(),
                meta.block_tables.stride(0),
                HEAD_DIM=self.head_dim, GROUP=self.group, PAGE_SIZE=meta.block_size,
                TOKENS_PER_TILE=tiles.tokens_per_tile, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_D=self.block_d, INPUT_PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        return out

    def _check_inputs(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TritonAttentionConfigError(f"Unsupported dtype {query.dtype}; use float32, float16 or bfloat16.")
        if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
            raise TritonAttentionConfigError(f"query ({query.dtype}) and KV cache ({key_cache.dtype}) dtypes differ.")
        if query.shape[1:] != (self.num_heads, self.head_dim) or key_cache.shape[2:] != (self.num_kv_heads,
                                                                                         self.head_dim):
            raise TritonAttentionConfigError(
                f"Shapes do not match the backend: query {tuple(query.shape)}, key_cache {tuple(key_cache.shape)}, "
                f"expected heads {self.num_heads}/{self.num_kv_heads} and head_dim {self.head_dim}.")
        if query.device.type != "cuda" and not _interpreting():
            raise TritonAttentionConfigError(
                f"The triton backend needs CUDA tensors (got {query.device}); set TRITON_INTERPRET=1 before "
                "importing triton to run it on CPU for tests, or choose attention backend 'torch'.")


__all__ = ["TritonPagedAttention", "TritonAttentionConfigError", "TritonPlan"]
