"""The attention-backend contract: paged attention over each sequence's block table.

Cache layout, per layer: key_cache and value_cache are each [num_blocks, block_size, num_kv_heads, head_dim].
A token's K/V lives at flat slot `block_id * block_size + offset`. A sequence's token i (prefix tokens first,
then prompt, then output) lives at slot `block_table[i // block_size] * block_size + i % block_size`.

A step packs the new tokens of every scheduled sequence into one batch of N tokens. Sequence s owns packed rows
query_start_loc[s] : query_start_loc[s+1]. Its context after the step holds seq_lens[s] tokens, so its j-th new
token sits at sequence index `seq_lens[s] - query_len[s] + j` and attends causally to sequence indices
0 .. that index (the prefix always included). The new tokens' K/V are already written to the cache (see
`write_kv`) before any backend runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step batch description, built once per step and shared by all layers."""

    slot_mapping: torch.Tensor  # [N] int64: cache slot for each new token's K/V
    query_start_loc: torch.Tensor  # [B+1] int32: packed-row offsets
    seq_lens: torch.Tensor  # [B] int32: context length per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens_list: list[int]  # host copies, for planning without device syncs
    seq_lens_list: list[int]
    block_size: int
    max_query_len: int
    max_seq_len: int
    plan: object = None  # backend-specific precomputation, filled by AttentionBackend.plan()

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's new K/V ([N, kv_heads, head_dim]) into their cache slots."""
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    key_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slot_mapping, value)


class AttentionBackend(ABC):
    """Computes attention for packed queries against a paged KV cache. Backends hold no per-step state."""

    name: str = ""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @classmethod
    def is_supported(cls) -> bool:
        """Whether this backend can run here (its dependencies import and its kernels work)."""
        return True

    def plan(self, meta: AttentionMetadata) -> object:
        """Precompute whatever all layers of one step can share. Called once per step."""
        return None

    @abstractmethod
    def forward(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """query [N, num_heads, head_dim] -> output [N, num_heads, head_dim]."""
