"""CPU backend: decode rows through prefix-serve's C++ kernel (`workers.cpu_kernels.decode_attention`), which
reads each sequence's keys and values straight from the cache blocks; prefill chunks through SDPA, all of a
step's chunks in one padded call while padding at most doubles the work (their attention is a small part of a
prefill step, which the projections dominate).

In a decode step of SmolLM2 at batch 64 on 2 cores, the torch reference spent about a third of the step in
attention: gathering every sequence's K/V into a padded copy (`index_select`), SDPA over it, and copying the
result back. Here each sequence is one task: the scores of every query head (grouped heads share their KV head),
a softmax, and the weighted sum of values, with no copy of the cache. A dtype other than fp32 takes the torch
reference's decode path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers import cpu_kernels
from workers.attention.base import AttentionMetadata
from workers.attention.torch_ref import TorchPagedAttention


@dataclass
class _BatchedPrefill:
    """Every prefill chunk of a step in one padded SDPA call: P chunks, each padded to Q queries and K keys."""
    query_rows: torch.Tensor  # [P * Q] packed row of each padded query (row 0 for padding)
    slots: torch.Tensor  # [P * K] cache slot of each padded key (slot 0 for padding)
    mask: torch.Tensor  # [P, 1, Q, K] True where a query may attend to a key
    valid: torch.Tensor  # [n] positions in the padded [P * Q] queries that are real
    rows: torch.Tensor  # [n] their packed rows


@dataclass
class _CpuPlan:
    prefills: list  # each prefill chunk, as the torch reference plans it
    batched: _BatchedPrefill | None  # the same chunks as one call, when padding wastes little
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
        batched = _batch_prefills(prefills)
        if not decode:
            return _CpuPlan(prefills, batched, None, meta, None, None, None)
        if len(decode) == meta.num_seqs:
            rows, tables, lens = meta.query_start_loc[:-1].long(), meta.block_tables, meta.seq_lens
        else:
            index = torch.tensor(decode, dtype=torch.long)
            rows = meta.query_start_loc.long().index_select(0, index)
            tables, lens = meta.block_tables.index_select(0, index), meta.seq_lens.index_select(0, index)
        return _CpuPlan(prefills, batched, None, meta, rows.contiguous(), tables.int().contiguous(),
                        lens.int().contiguous())

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
        if plan.batched is not None:
            self._batched_prefill(out, query, key_cache, value_cache, plan.batched)
        else:
            self._prefill(out, query, key_cache, value_cache, plan.prefills)
        return out

    def _batched_prefill(self, out, query, key_cache, value_cache, batch: _BatchedPrefill) -> None:
        kv_heads, head_dim = key_cache.shape[2:]
        chunks, _, width, keys = batch.mask.shape
        q = query.index_select(0, batch.query_rows).view(chunks, width, self.num_heads, head_dim).transpose(1, 2)
        k = key_cache.view(-1, kv_heads, head_dim).index_select(0, batch.slots)
        v = value_cache.view(-1, kv_heads, head_dim).index_select(0, batch.slots)
        k = k.view(chunks, keys, kv_heads, head_dim).transpose(1, 2)
        v = v.view(chunks, keys, kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        o = o.transpose(1, 2).reshape(chunks * width, self.num_heads, head_dim)
        out.index_copy_(0, batch.rows, o.index_select(0, batch.valid))


# Batch the prefill chunks into one call only while padding at most doubles the attention work: one SDPA call
# per chunk splits poorly over threads (a chunk of 40 tokens is one query tile per head), but a long chunk beside
# short ones would pad every short one to its length.
MAX_PADDING_FACTOR = 2.0


def _batch_prefills(prefills: list) -> _BatchedPrefill | None:
    if len(prefills) < 2:
        return None
    widths = [end - start for start, end, _, _ in prefills]
    lengths = [len(slots) for _, _, slots, _ in prefills]
    width, keys = max(widths), max(lengths)
    if len(prefills) * width * keys > MAX_PADDING_FACTOR * sum(w * n for w, n in zip(widths, lengths)):
        return None
    chunks = len(prefills)
    query_rows = torch.zeros(chunks, width, dtype=torch.long)
    slots = torch.zeros(chunks, keys, dtype=torch.long)
    mask = torch.zeros(chunks, 1, width, keys, dtype=torch.bool)
    mask[..., 0] = True  # padded query rows see one key, so no row is all masked (SDPA would give NaN)
    valid, rows = [], []
    for c, (start, end, chunk_slots, chunk_mask) in enumerate(prefills):
        w, n = end - start, len(chunk_slots)
        query_rows[c, :w] = torch.arange(start, end)
        slots[c, :n] = chunk_slots
        mask[c, 0, :w, :] = False
        mask[c, 0, :w, :n] = chunk_mask
        valid.append(torch.arange(c * width, c * width + w))
        rows.append(torch.arange(start, end))
    return _BatchedPrefill(query_rows.view(-1), slots.view(-1), mask, torch.cat(valid), torch.cat(rows))
