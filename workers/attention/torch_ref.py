"""Torch reference backend: paged attention with gathers and SDPA. Runs anywhere; the parity referee for kernels.

Decode rows (one new token each) are gathered into one padded batch; each prefill chunk runs on its own.
Gathers use `index_select` on flat slot lists (on CPU several times faster than advanced indexing with a 2-D
index), and decode folds each KV head's group of query heads into SDPA's query-length axis, so grouped-query
attention needs no repeated K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention.base import AttentionBackend, AttentionMetadata
from workers.kv_cache import slot_of


@dataclass
class _Plan:
    decode_rows: torch.Tensor | None  # [Bd] packed row of each decode token
    decode_slots: torch.Tensor | None  # [Bd * max_len] cache slots, row-major, padded with slot 0
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_len] True where a key is real
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (row_start, row_end, slots [L], mask [q, L])


def sequence_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of a sequence's first `length` tokens: [length] int64."""
    return slot_of(block_table.long(), torch.arange(length, device=block_table.device), block_size)


class TorchPagedAttention(AttentionBackend):
    name = "torch"

    @classmethod
    def is_supported(cls) -> bool:
        return True

    def plan(self, meta: AttentionMetadata) -> _Plan:
        decode_idx = [s for s, q_len in enumerate(meta.query_lens_list) if q_len == 1]
        prefills = self._plan_prefills(meta, [s for s, q_len in enumerate(meta.query_lens_list) if q_len > 1])
        if not decode_idx:
            return _Plan(None, None, None, prefills)
        # all decode rows at once: [Bd, max_len] slots from the padded block tables, masked past each length
        device = meta.slot_mapping.device
        rows = torch.tensor(decode_idx, dtype=torch.long, device=device)
        max_len = max(meta.seq_lens_list[s] for s in decode_idx)
        idx = torch.arange(max_len, device=device)
        slots = slot_of(meta.block_tables.long()[rows], idx, meta.block_size).view(-1)
        mask = (idx[None, :] < meta.seq_lens.long()[rows][:, None]).view(len(decode_idx), 1, 1, max_len)
        packed_rows = meta.query_start_loc.long()[rows]
        return _Plan(packed_rows, slots, mask, prefills)

    @staticmethod
    def _plan_prefills(meta: AttentionMetadata, sequences: list[int]) -> list:
        """Each listed sequence's chunk as (row_start, row_end, slots, causal mask)."""
        starts = meta.query_start_loc.tolist()
        prefills = []
        for s in sequences:
            q_len, seq_len = meta.query_lens_list[s], meta.seq_lens_list[s]
            slots = sequence_slots(meta.block_tables[s], seq_len, meta.block_size)
            key_pos = torch.arange(seq_len, device=slots.device)
            query_pos = seq_len - q_len + torch.arange(q_len, device=slots.device)
            prefills.append((starts[s], starts[s] + q_len, slots, key_pos[None, :] <= query_pos[:, None]))
        return prefills

    def forward(self, query, key_cache, value_cache, meta):
        out = torch.empty_like(query)
        self._decode(out, query, key_cache, value_cache, meta.plan)
        self._prefill(out, query, key_cache, value_cache, meta.plan.prefills)
        return out

    def _decode(self, out, query, key_cache, value_cache, plan: _Plan) -> None:
        if plan.decode_rows is None:
            return
        num_blocks, block_size, kv_heads, head_dim = key_cache.shape
        flat_k = key_cache.view(num_blocks * block_size, kv_heads, head_dim)
        flat_v = value_cache.view(num_blocks * block_size, kv_heads, head_dim)
        bd, max_len = plan.decode_mask.shape[0], plan.decode_mask.shape[-1]
        group = self.num_heads // self.num_kv_heads
        # [Bd, KVH, group, D]: query heads h = kv * group + g share KV head kv, as in transformers' GQA
        q = query.index_select(0, plan.decode_rows).view(bd, self.num_kv_heads, group, head_dim)
        k = flat_k.index_select(0, plan.decode_slots).view(bd, max_len, kv_heads, head_dim).transpose(1, 2)
        v = flat_v.index_select(0, plan.decode_slots).view(bd, max_len, kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.decode_mask, scale=self.scale)
        out.index_copy_(0, plan.decode_rows, o.reshape(bd, self.num_heads, head_dim))

    def _prefill(self, out, query, key_cache, value_cache, prefills) -> None:
        num_blocks, block_size, kv_heads, head_dim = key_cache.shape
        flat_k = key_cache.view(num_blocks * block_size, kv_heads, head_dim)
        flat_v = value_cache.view(num_blocks * block_size, kv_heads, head_dim)
        gqa = self.num_heads != self.num_kv_heads  # prefill chunks let SDPA group the heads
        for start, end, slots, mask in prefills:
            q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            k = flat_k.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
            v = flat_v.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            out[start:end] = o.squeeze(0).transpose(0, 1)
