"""PEFT's prefix-tuning format, in one place: the adapter's files, its tensor layout, and where a request's own
tokens start.

A saved adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose one tensor
`prompt_embeddings` is [P, L * 2 * kv_heads * head_dim]: PEFT reads it as view(P, 2L, kv_heads, head_dim), entry
2l holding layer l's keys and 2l+1 its values. The keys are used exactly as stored (no rotary embedding).

A sequence's KV stream is the P virtual tokens, then the prompt, then the output. PEFT numbers a request's own
tokens from P, so a token's index in that stream is also its position id.

A contract module: it imports nothing else of the project (torch only through the tensors it is given).
"""

from __future__ import annotations

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TENSOR_NAME = "prompt_embeddings"


def prefix_tensor_shape(num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int) -> list[int]:
    """The shape of `prompt_embeddings` for a model of this shape: [P, L * 2 * kv_heads * head_dim]."""
    return [num_virtual_tokens, num_layers * 2 * num_kv_heads * head_dim]


def prefix_to_kv(prompt_embeddings, num_layers: int, num_kv_heads: int, head_dim: int):
    """PEFT's saved prefix [P, L*2*kv_heads*head_dim] -> per-layer KV [L, 2, P, kv_heads, head_dim] (a view where
    it can be)."""
    num_tokens = prompt_embeddings.shape[0]
    kv = prompt_embeddings.view(num_tokens, 2 * num_layers, num_kv_heads, head_dim)
    kv = kv.permute(1, 0, 2, 3)  # [2L, P, kv_heads, head_dim]
    return kv.reshape(num_layers, 2, num_tokens, num_kv_heads, head_dim)


def kv_to_prefix(kv):
    """The inverse of `prefix_to_kv`: [L, 2, P, kv_heads, head_dim] -> [P, L*2*kv_heads*head_dim]."""
    num_layers, _, num_tokens, num_kv_heads, head_dim = kv.shape
    return kv.reshape(2 * num_layers, num_tokens, num_kv_heads, head_dim).permute(1, 0, 2, 3).reshape(num_tokens, -1)


def stream_index(num_prefix_tokens: int, token_index: int) -> int:
    """The KV-stream index, and so the position id, of a sequence's token `token_index` (0: the prompt's first)."""
    return num_prefix_tokens + token_index


def token_index(num_prefix_tokens: int, stream_index: int) -> int:
    """The inverse of `stream_index`: which of the sequence's own tokens sits at this KV-stream index."""
    return stream_index - num_prefix_tokens
