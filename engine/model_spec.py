"""ModelSpec: the shape facts of a base model that the cache, the prefix checks and the scheduler need.

A contract type: every layer reads it and it imports nothing else of the project.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def head_dim_of(config) -> int:
    """The attention head size of a Hugging Face config (Llama-family configs may state it; else hidden / heads)."""
    if config.model_type == "gpt2":
        return config.n_embd // config.n_head
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int  # positions, capped at the sliding window if there is one (see attention_window)
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None

    @staticmethod
    def from_config(config) -> "ModelSpec":
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"Model type {model_type!r} is not supported; prefix-serve supports {list(SUPPORTED_MODEL_TYPES)}.")
        if model_type == "gpt2":
            layers, heads, kv_heads, max_len = config.n_layer, config.n_head, config.n_head, config.n_positions
        else:
            layers, heads = config.num_hidden_layers, config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            max_len = config.max_position_embeddings
        window = attention_window(config)
        if window is not None:
            max_len = min(max_len, window)
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return ModelSpec(model_type, layers, heads, kv_heads, head_dim_of(config), config.vocab_size, max_len, eos_ids,
                         window)


def attention_window(config) -> int | None:
    """The sliding attention window of a model whose layers use one (Mistral v0.1; Qwen2 with
    use_sliding_window), else None.

    The attention kernels here attend to the whole context. Within the window that is exactly what the model does:
    with Hugging Face's mask a token sees the keys less than `sliding_window` positions back, so a context of at
    most `sliding_window` tokens (prefix included) never reaches the edge. The engine therefore caps its
    context length at the window instead of computing something the model does not."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
