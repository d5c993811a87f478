"""CPU backend: decode rows through prefix-serve's C++ kernel (`workers.cpu_kernels.decode_attention`), which
reads each sequence's keys and values straight from the cache blocks; prefill chunks as in the torch reference
(their attention is a small part of a prefill step, which the projections dominate).

In a decode step of SmolLM2 at batch 64 on 2 cores, the torch reference spent about a third of the step in
attention: gathering every sequence's K/V into a padded copy (`index_select`), SDPA over it, and copying the
result back. Here each (sequence, KV head) is one task: scores for the group of query heads that share the KV
head, a softmax, and the weighted sum of values, with no copy of the cache. A dtype other than fp32 runs the
torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers import cpu_kernels
from workers.attention.base import AttentionMetadata
from workers.attention.torch_ref import TorchPagedAttention


@dataclass
class _CpuPlan:
    prefills: list  # each prefill chunk, as the torch reference plans it
    reference: object  # the torch reference's whole plan, for a dtype the kernel does not take; built lazily
    meta: AttentionMetadata
    rows: torch.Tensor | None  # [Bd] int64: packed row of each decode token
    block_tables: torch.Tensor | None  # [Bd, W] int32
    seq_lens: torch.Tensor | None  # [Bd] int32


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    @classmethod
    def is_supported(cls) -> bool:
        return cpu_kernels.load() is not None

    def plan(self, meta: AttentionMetadata) -> _CpuPlan:
        decode, prefills = self._plan_prefills(meta)
        if not decode:
            return _CpuPlan(prefills, None, meta, None, None, None)
        if len(decode) == meta.num_seqs:
            rows, tables, lens = meta.query_start_loc[:-1].long(), meta.block_tables, meta.seq_lens
        else:
            index = torch.tensor(decode, dtype=torch.long)
            rows = meta.query_start_loc.long().index_select(0, index)
            tables, lens = meta.block_tables.index_select(0, index), meta.seq_lens.index_select(0, index)
        return _CpuPlan(prefills, None, meta, rows.contiguous(), tables.int().contiguous(), lens.int().contiguous())

    def forward(self, query, key_cache, value_cache, meta):
        plan: _CpuPlan = meta.plan
        out = torch.empty_like(query)
        if plan.rows is not None:
            if query.dtype == torch.float32 and key_cache.dtype == torch.float32:
                cpu_kernels.load().decode_attention(out, query, key_cache, value_cache, plan.block_tables,
                                                    plan.seq_lens, plan.rows, self.scale)
            else:
                if plan.reference is None:
                    plan.reference = super().plan(plan.meta)
                self._decode(out, query, key_cache, value_cache, plan.reference)
        self._prefill(out, query, key_cache, value_cache, plan.prefills)
        return out
