"""Model runner: one packed forward per step over a Hugging Face model whose attention reads a paged KV cache.

We keep transformers' model classes for weights and layers and register our own attention function
("prefix_serve"). The whole step runs as one batch of shape [1, num_tokens] with explicit position ids; the
attention function finds the step's metadata in the forward kwargs, writes the new K/V into the cache and
attends over each sequence's block table, prefix blocks included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model_loader import ModelSpec
from workers.attention import AttentionBackend, AttentionMetadata, get_backend_class, write_kv
from workers.kv_cache import KVCache

ATTN_IMPLEMENTATION = "prefix_serve"
_STEP_KWARG = "prefix_serve_step"
_registered = False


@dataclass
class StepContext:
    """Everything the attention function needs for one step; passed through the model's forward kwargs."""

    meta: AttentionMetadata
    kv_cache: KVCache
    backend: AttentionBackend


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention hook. query [1, H, N, D], key/value [1, KVH, N, D] -> ([1, N, H, D], None)."""
    step: StepContext = kwargs[_STEP_KWARG]
    key_cache, value_cache = step.kv_cache.layer(module.layer_idx)
    write_kv(key_cache, value_cache, key[0].transpose(0, 1), value[0].transpose(0, 1), step.meta.slot_mapping)
    out = step.backend.forward(query[0].transpose(0, 1), key_cache, value_cache, step.meta)  # [N, H, D]
    return out.unsqueeze(0), None


def register_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention)
    # Masks come from block tables and sequence lengths; transformers must not build a dense one.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)
    _registered = True


@dataclass
class StepInputs:
    """A step's packed batch, built by the worker from its sequence states."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]  # packed rows whose logits are sampled (a sequence's last token, when it has all)


def load_model(model_path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        from engine.errors import UnsupportedModelError

        raise UnsupportedModelError("GPT-2 models with scale_attn_by_inverse_layer_idx are not supported.")
    return model.to(device).eval()


class ModelRunner:
    def __init__(self, model, spec: ModelSpec, kv_cache: KVCache, backend_name: str):
        self.model = model
        self.spec = spec
        self.kv_cache = kv_cache
        self.device = kv_cache.data.device
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        scale = spec.head_dim ** -0.5
        self.backend = get_backend_class(backend_name)(spec.num_heads, spec.num_kv_heads, spec.head_dim, scale)

    def _metadata(self, step: StepInputs) -> AttentionMetadata:
        device = self.device
        max_blocks = max(len(t) for t in step.block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in step.block_tables], dtype=torch.int32)
        starts = [0]
        for q in step.query_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.long, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            query_lens_list=step.query_lens, seq_lens_list=step.seq_lens, block_size=self.kv_cache.block_size,
            max_query_len=max(step.query_lens), max_seq_len=max(step.seq_lens))
        meta.plan = self.backend.plan(meta)
        return meta

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        """Run one packed forward; returns fp32 logits [len(sample_rows), vocab]."""
        ctx = StepContext(self._metadata(step), self.kv_cache, self.backend)
        input_ids = torch.tensor([step.input_ids], dtype=torch.long, device=self.device)
        positions = torch.tensor([step.positions], dtype=torch.long, device=self.device)
        hidden = self.decoder(input_ids=input_ids, position_ids=positions, use_cache=False,
                              **{_STEP_KWARG: ctx}).last_hidden_state[0]
        rows = torch.tensor(step.sample_rows, dtype=torch.long, device=self.device)
        return self.lm_head(hidden.index_select(0, rows)).float()
