"""CPU backend: prefix-serve's C++ kernel (`workers.cpu_kernels.decode_attention`) for decode rows and short
prefill chunks, SDPA for long prefill chunks.

The kernel takes one query row per task and reads that row's keys and values straight from the cache blocks: the
scores of every query head (grouped heads read their shared KV head), a softmax, and the weighted sum of values,
with no copy of the cache, no padding and no mask. A prefill chunk becomes one row per token, each with the
sequence's block table and its own causal length, so a step's decode rows and short prompts are one call.

In a decode step of SmolLM2 at batch 64 on 2 cores, the torch reference spent about a third of the step in
attention (gathering every sequence's K/V into a padded copy, SDPA over it, copying the result back). Workload 1's
prefill (64 prompts of 20-60 tokens) took 17 ms per layer as one padded SDPA call and 2.1 ms through the kernel.
A long chunk re-reads its keys once per query row, though, where SDPA's tiles reuse them: a chunk of 2,048 tokens
took 84 ms through the kernel and 60 ms through SDPA. So a chunk of more than `KERNEL_MAX_PAIRS` (query, key)
pairs goes through SDPA on its own; a decode row always takes the kernel. A dtype other than fp32 takes the torch
reference's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers import cpu_kernels
from workers.attention.base import AttentionMetadata
from workers.attention.torch_ref import TorchPagedAttention

# A chunk of query_len * seq_len (query, key) pairs up to this runs through the kernel. Measured on 2 cores
# (SmolLM2's 9 query and 3 KV heads of 64): at 128 x 128 pairs the kernel took 0.25 ms and SDPA 0.33 ms, at
# 256 x 256 1.11 and 0.98 ms, at 64 queries on 2,048 keys 3.6 and 3.1 ms.
KERNEL_MAX_PAIRS = 48 * 1024


@dataclass
class _CpuPlan:
    meta: AttentionMetadata
    rows: torch.Tensor | None  # [R] int64: the packed rows that go through the kernel
    table_rows: torch.Tensor | None  # [R] int64: each row's sequence, its row in `block_tables`
    block_tables: torch.Tensor | None  # [B, W] int32: the step's block tables (one per sequence, not per row)
    seq_lens: torch.Tensor | None  # [R] int32: the keys each row attends to (causal, its own included)
    prefills: list  # the longer prefill chunks, as the torch reference plans them
    reference: object = None  # the torch reference's whole plan, for a dtype the kernel does not take; lazily


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    @classmethod
    def is_supported(cls) -> bool:
        return cpu_kernels.load() is not None

    def plan(self, meta: AttentionMetadata) -> _CpuPlan:
        # a decode row always takes the kernel, however long its sequence
        long = [s for s, (q, n) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list))
                if q > 1 and q * n > KERNEL_MAX_PAIRS]
        prefills = self._plan_prefills(meta, long)
        skip = set(long)
        short = [s for s in range(meta.num_seqs) if s not in skip]
        if not short:
            return _CpuPlan(meta, None, None, None, None, prefills)
        if meta.max_query_len == 1:  # a decode step (every row short): the tensors as they are
            rows, sequence, lens = meta.query_start_loc[:-1].long(), torch.arange(meta.num_seqs), meta.seq_lens
        else:
            index = torch.tensor(short, dtype=torch.long)
            counts = torch.tensor([meta.query_lens_list[s] for s in short], dtype=torch.long)
            # row j of a chunk that starts at packed row r and ends with its sequence at n keys: r + j, n - q + 1 + j
            first_row = meta.query_start_loc.long().index_select(0, index)
            first_len = meta.seq_lens.long().index_select(0, index) - counts + 1
            within = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts).repeat_interleave(counts)
            rows = first_row.repeat_interleave(counts) + within
            lens = first_len.repeat_interleave(counts) + within
            sequence = index.repeat_interleave(counts)
        return _CpuPlan(meta, rows.contiguous(), sequence, meta.block_tables.int().contiguous(),
                        lens.int().contiguous(), prefills)

    def forward(self, query, key_cache, value_cache, meta):
        plan: _CpuPlan = meta.plan
        out = torch.empty_like(query)
        if query.dtype != torch.float32 or key_cache.dtype != torch.float32:
            if plan.reference is None:
                plan.reference = super().plan(plan.meta)
            self._decode(out, query, key_cache, value_cache, plan.reference)
            self._prefill(out, query, key_cache, value_cache, plan.reference.prefills)
            return out
        if plan.rows is not None:
            cpu_kernels.load().decode_attention(out, query, key_cache, value_cache, plan.block_tables,
                                                plan.seq_lens, plan.rows, plan.table_rows, self.scale)
        self._prefill(out, query, key_cache, value_cache, plan.prefills)
        return out
