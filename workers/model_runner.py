"""Model runner: one packed forward per step over a Hugging Face model whose attention reads a paged KV cache.

We keep transformers' model classes for weights and layers and register our own attention function
("prefix_serve"). The whole step runs as one batch of shape [1, num_tokens] with explicit position ids; the
attention function finds the step's metadata in the forward kwargs, writes the new K/V into the cache and
attends over each sequence's block table, prefix blocks included.

A step's integer inputs travel to the device as one int32 buffer in one copy, with no device-to-host read, so
the host can queue the step while the device still runs the last one. Pure-decode steps run as CUDA graphs
where possible (`workers.cuda_graphs`); everything else, and every step on CPU, runs eagerly.
"""

from __future__ import annotations

import itertools
import logging
import types
from dataclasses import dataclass

import torch

from engine.model_spec import ModelSpec
from workers.attention import AttentionBackend, AttentionMetadata, get_backend_class, write_kv
from workers.cuda_graphs import CudaGraphConfig, DecodeGraphs, GraphStats, host_int32
from workers.fused_decoder import make_fused_decoder
from workers.kv_cache import KVCache
from workers.parallel import ShardPlan, load_sharded_model

ATTN_IMPLEMENTATION = "prefix_serve"
logger = logging.getLogger("prefix_serve.model_runner")
_STEP_KWARG = "prefix_serve_step"
_ALIGN = 16  # packed fields start at multiples of 16 int32s (64 bytes), which kernels compile best for
_registered = False


@dataclass
class StepContext:
    """Everything the attention function needs for one step; passed through the model's forward kwargs."""

    meta: AttentionMetadata
    kv_cache: KVCache
    backend: AttentionBackend


def attend(step: StepContext, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor) -> torch.Tensor:
    """Write the step's new K/V ([N, KVH, D]) into the cache, then attend: query [N, H, D] -> [N, H, D]."""
    key_cache, value_cache = step.kv_cache.layer(layer_idx)
    write_kv(key_cache, value_cache, key, value, step.meta.slot_mapping)
    return step.backend.forward(query, key_cache, value_cache, step.meta)


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention hook. query [1, H, N, D], key/value [1, KVH, N, D] -> ([1, N, H, D], None)."""
    out = attend(kwargs[_STEP_KWARG], module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                 value[0].transpose(0, 1))
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Register our attention function. No mask function is registered for it on purpose: transformers then
    skips mask creation altogether (masks come from block tables and sequence lengths). With one registered, it
    would run its packed-sequence check on our position ids, which reads a device value back every step and
    cannot be captured in a CUDA graph."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention)
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


def load_model(model_path: str, dtype: torch.dtype, device: str, shard: ShardPlan | None = None):
    """The Hugging Face model with our attention; with a `shard`, only that tensor-parallel rank's part of it."""
    from transformers import AutoModelForCausalLM

    register_attention()
    if shard is not None and shard.size > 1:
        model = load_sharded_model(model_path, dtype, device, shard, ATTN_IMPLEMENTATION)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        from engine.errors import UnsupportedModelError

        raise UnsupportedModelError("GPT-2 models with scale_attn_by_inverse_layer_idx are not supported.")
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.forward = types.MethodType(_weight_major_linear, module)
    return model


# CPU linear layers over few rows (decode steps) run as weight @ x^T: for these skinny inputs MKL is faster that
# way round than x @ weight^T (docs/performance.md). Long prefill batches keep the usual orientation. Wide layers
# (the LM head) go in slices of output features, each transposed into a contiguous result while it is still in
# cache: the sampler reads logits row by row, and transposing 49k x 64 logits afterwards costs more than it saves.
WEIGHT_MAJOR_MAX_ROWS = 256
WEIGHT_MAJOR_SLICE = 2048


def _weight_major_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows, features = x.numel() // x.shape[-1], self.weight.shape[0]
    if rows > WEIGHT_MAJOR_MAX_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    x_t = x.reshape(rows, x.shape[-1]).t()
    if features <= WEIGHT_MAJOR_SLICE:
        out = (self.weight @ x_t).t()  # [rows, features], a transposed view
    else:
        out = x.new_empty(rows, features)
        for start in range(0, features, WEIGHT_MAJOR_SLICE):
            out[:, start:start + WEIGHT_MAJOR_SLICE] = (self.weight[start:start + WEIGHT_MAJOR_SLICE] @ x_t).t()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], features)


def onednn_linears_help() -> bool:
    """Whether CPU linear layers should run through oneDNN with pre-packed weights: on x86 (AVX2 or better) where
    PyTorch has oneDNN. On an AVX-512 host they ran 2.3-2.6x faster than MKL for SmolLM2's shapes at 16-64 rows and
    2.3x at 2,048 (one thread, PyTorch 2.13). With oneDNN held to AVX2 there (`ONEDNN_MAX_CPU_ISA=AVX2`,
    `ATEN_CPU_CAPABILITY=avx2`), a decode step's 121 products took 84 ms against MKL's 110 ms, and workload 1 ran
    1.3x faster end to end; an AVX2 host itself was last measured in session 5, one layer at a time, where
    neither was faster (docs/performance.md)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return torch.backends.mkldnn.is_available() and (capability.startswith(("AVX2", "AVX512")) or "AMX" in capability)


def pack_cpu_linears(model) -> int:
    """Run every plain `nn.Linear` of `model` through oneDNN with its weight pre-packed (reordered once into the
    kernel's blocked layout). A weight that only its Linear uses is replaced by the packed copy, so it is not held
    twice; one shared with another module (an LM head tied to the embedding) is kept beside it. A layer whose
    packed result differs from `F.linear` beyond rounding, or that oneDNN cannot pack, keeps its forward.
    Returns the number of layers packed."""
    shared = {id(module.weight) for module in model.modules()
              if type(module) is not torch.nn.Linear and isinstance(getattr(module, "weight", None), torch.Tensor)}
    probe = torch.Generator().manual_seed(0)
    packed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight is None:
            continue
        weight = module.weight.detach()
        try:
            packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
            x = torch.randn(3, weight.shape[1], generator=probe).to(weight.dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")
        except RuntimeError:
            continue
        if not torch.allclose(got.float(), torch.nn.functional.linear(x, weight).float(), rtol=1e-2, atol=1e-2):
            continue
        module.packed_weight = packed_weight
        module.forward = types.MethodType(_packed_linear, module)
        if id(module.weight) not in shared:
            module.weight = None  # the packed copy is the layer's weight from now on
        packed += 1
    if packed:
        # Hugging Face may leave the parameters as views of the memory-mapped checkpoint, and the file stays mapped
        # (its pages resident) while any view lives: copying the few parameters left releases it (SmolLM2: about
        # 430 MB of RSS).
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    return packed


def _onednn_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def _packed_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _onednn_linear(x, self.packed_weight, self.bias)


def pack_fields(fields: list[list[int]]) -> tuple[list[int], list[int]]:
    """Concatenate int lists into one, each starting at a multiple of _ALIGN; returns (flat, start offsets)."""
    flat: list[int] = []
    offsets = []
    for values in fields:
        offsets.append(len(flat))
        flat += values
        flat += [0] * (-len(flat) % _ALIGN)
    return flat, offsets


def flatten_tables(block_tables: list[list[int]], width: int) -> list[int]:
    """Block tables as one row-major [B, width] list, each row padded with block 0 (never read past its end)."""
    flat: list[int] = []
    for table in block_tables:
        flat += table
        flat += [0] * (width - len(table))
    return flat


class ModelRunner:
    def __init__(self, model, spec: ModelSpec, kv_cache: KVCache, backend_name: str,
                 scratch_block: int | None = None, *, cuda_graphs: CudaGraphConfig, fused_layers: str,
                 computes_logits: bool = True):
        """`scratch_block`: a cache block that no sequence owns, where padding rows of a CUDA-graph batch write;
        without one, every step runs eagerly. `cuda_graphs` and `fused_layers` (auto|on|off, see
        `workers.fused_decoder`) come from EngineConfig, through the WorkerConfig. `computes_logits` False: a
        tensor-parallel rank other than 0, which runs the layers but not the LM head (rank 0 samples);
        `execute` then returns None."""
        self.model = model
        self.spec = spec
        self.kv_cache = kv_cache
        self.device = kv_cache.data.device
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        self.computes_logits = computes_logits
        scale = spec.head_dim ** -0.5
        self.backend = get_backend_class(backend_name)(spec.num_heads, spec.num_kv_heads, spec.head_dim, scale)
        self.fused = make_fused_decoder(model, self.device, fused_layers)
        self.graphs = self._make_graphs(cuda_graphs, scratch_block)
        # counted before packing, which may replace weights by opaque copies: every distinct parameter once
        self.weight_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
        if self.device.type == "cpu" and onednn_linears_help():
            if self.fused is not None:
                try:
                    self.fused.pack_weights(torch.ops.mkldnn._reorder_linear_weight, _onednn_linear)
                except RuntimeError as exc:  # nothing was replaced: the fused projections keep F.linear
                    logger.warning("The fused q/k/v and gate/up weights could not be packed for oneDNN: %s", exc)
            logger.info("%d linear layers run through oneDNN with pre-packed weights.", pack_cpu_linears(model))

    def _make_graphs(self, config: CudaGraphConfig, scratch_block: int | None) -> DecodeGraphs | None:
        if scratch_block is None or not config.enabled_for(self.device):
            return None
        if not DecodeGraphs.supported(self.backend):
            logger.warning("The %s attention backend cannot be captured in CUDA graphs, so every decode step "
                           "runs eagerly (on an H200 an eager B=256 step took 5.9 ms, a graph replay 1.9 ms; "
                           "docs/gpu.md). --attention-backend triton decodes through graphs.", self.backend.name)
            return None
        block_size = self.kv_cache.block_size
        max_blocks = -(-self.spec.max_model_len // block_size) + 1
        graphs = DecodeGraphs(config, self._forward, self.backend, self.device, block_size, scratch_block,
                              max_blocks)
        if config.capture_at_start and self.device.type == "cuda":
            with torch.inference_mode():
                graphs.capture_all()
        return graphs

    @property
    def graph_stats(self) -> GraphStats | None:
        return self.graphs.stats if self.graphs is not None else None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [N] -> fp32 logits of `rows` (all rows when None)."""
        if self.fused is not None:
            hidden = self.fused.forward(input_ids, positions, self.kv_cache, meta.slot_mapping,
                                        lambda i, q: self.backend.forward(q, *self.kv_cache.layer(i), meta))
        else:
            ctx = StepContext(meta, self.kv_cache, self.backend)
            hidden = self.decoder(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                                  **{_STEP_KWARG: ctx}).last_hidden_state[0]  # [N, hidden]
        if not self.computes_logits:
            return None
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.lm_head(hidden).float().contiguous()  # CPU linears may return a transposed view

    @torch.inference_mode()
    def execute(self, step: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run one packed forward; returns fp32 logits [len(sample_rows), vocab].

        `input_ids`, a device tensor of N token ids, replaces `step.input_ids` without a trip through the host
        (a decode run feeds each step the previous step's tokens this way). The logits may be a view of a CUDA
        graph's output buffer, which the next call may overwrite: read them, or queue the kernels that do on the
        same stream, before the next call."""
        if self.graphs is not None:
            logits = self._execute_graph(step, input_ids)
            if logits is not None:
                return logits
            self.graphs.stats.eager_steps += 1
        return self._execute_eager(step, input_ids)

    def _execute_graph(self, step: StepInputs, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        key = self.graphs.key_for(step.query_lens, step.seq_lens, step.block_tables)
        if key is None:
            return None
        logits = self.graphs.run(key, step.input_ids, step.positions, step.slot_mapping, step.seq_lens,
                                 step.block_tables, input_ids)
        if logits is None or len(step.sample_rows) == len(step.input_ids):
            return logits
        # some rows are non-final 1-token prefill chunks: keep only the sampled ones
        rows = torch.tensor(step.sample_rows, dtype=torch.long).to(self.device, non_blocking=True)
        return logits.index_select(0, rows)

    def _execute_eager(self, step: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        num_seqs = len(step.query_lens)
        width = max(map(len, step.block_tables))
        query_start_loc = list(itertools.accumulate(step.query_lens, initial=0))
        flat, at = pack_fields([step.input_ids, step.positions, step.slot_mapping, step.sample_rows,
                                query_start_loc, step.seq_lens, flatten_tables(step.block_tables, width)])
        packed = host_int32(flat).to(self.device, non_blocking=True)  # one copy for every integer input
        n, b = len(step.input_ids), num_seqs
        meta = AttentionMetadata(
            slot_mapping=packed[at[2]: at[2] + n].long(),
            query_start_loc=packed[at[4]: at[4] + b + 1],
            seq_lens=packed[at[5]: at[5] + b],
            block_tables=packed[at[6]: at[6] + b * width].view(b, width),
            query_lens_list=step.query_lens, seq_lens_list=step.seq_lens, block_size=self.kv_cache.block_size,
            max_query_len=max(step.query_lens), max_seq_len=max(step.seq_lens))
        meta.plan = self.backend.plan(meta)
        rows = packed[at[3]: at[3] + len(step.sample_rows)]
        ids = packed[at[0]: at[0] + n] if input_ids is None else input_ids.to(torch.int32)
        return self._forward(ids, packed[at[1]: at[1] + n], meta, rows)
