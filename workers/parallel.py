"""Tensor parallelism: how a model splits over N ranks, the sharded load, and the collectives of a forward.

Megatron-style, on top of the Hugging Face layers:

- attention: Q/K/V projections split by head (column parallel), biases with them; the output projection split by
  input feature (row parallel), followed by an all-reduce;
- MLP: gate and up projections column parallel, the down projection row parallel, then an all-reduce;
- embedding, norms and LM head replicated; the LM head runs on rank 0 only, which samples (docs/distributed.md
  has the measurement behind that choice).

Each rank holds `num_heads / N` query heads and `num_kv_heads / N` KV heads. When there are fewer KV heads than
ranks (`N % num_kv_heads == 0`), each KV head is replicated on the `N / num_kv_heads` ranks whose query heads use
it. Any other split is refused before a worker starts.

A rank builds the model from a config with its local head counts and intermediate size (so each projection has
its shard's shape and the HF attention code runs unchanged), then reads only its slices from the safetensors
files: no rank ever holds the whole model.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from engine.errors import InvalidConfigError, UnsupportedModelError
from engine.model_spec import ModelSpec, head_dim_of

logger = logging.getLogger("prefix_serve.parallel")
TP_MODEL_TYPES = ("llama", "mistral", "qwen2")
# the named row-parallel projections, whose partial outputs are summed over ranks
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
_COLUMN_BY_HEAD = {"self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv"}
_COLUMN_BY_FEATURE = ("mlp.gate_proj", "mlp.up_proj")


class DistributedInitError(RuntimeError):
    """The ranks could not form their process group (gloo or NCCL)."""


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `size` holds: ranges of query heads, KV heads and MLP intermediate features."""

    rank: int
    size: int
    q_heads: range
    kv_heads: range
    intermediate: range

    @staticmethod
    def of(config, rank: int, size: int) -> ShardPlan:
        check_split(config, size)
        heads, kv_heads = config.num_attention_heads, _kv_heads(config)
        q_per = heads // size
        if kv_heads >= size:
            kv_per = kv_heads // size
            kv = range(rank * kv_per, (rank + 1) * kv_per)
        else:  # replicated: the one KV head that this rank's query heads read
            kv = range(rank * kv_heads // size, rank * kv_heads // size + 1)
        inter = config.intermediate_size // size
        return ShardPlan(rank, size, range(rank * q_per, (rank + 1) * q_per), kv,
                         range(rank * inter, (rank + 1) * inter))

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shape facts of this rank's shard: its heads (the KV cache and attention see only these)."""
        return ModelSpec(spec.model_type, spec.num_layers, len(self.q_heads), len(self.kv_heads), spec.head_dim,
                         spec.vocab_size, spec.max_model_len, spec.eos_token_ids, spec.sliding_window)


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_split(config, size: int) -> None:
    """Refuse, by name, a model that cannot split over `size` ranks."""
    if size == 1:
        return
    if config.model_type not in TP_MODEL_TYPES:
        raise UnsupportedModelError(f"tensor_parallel_size {size}: model type {config.model_type!r} cannot be split "
                                    f"over ranks; tensor parallelism covers {', '.join(TP_MODEL_TYPES)}. Use "
                                    "tensor_parallel_size 1.")
    heads, kv_heads, inter = config.num_attention_heads, _kv_heads(config), config.intermediate_size
    if heads % size:
        raise InvalidConfigError(f"tensor_parallel_size {size} does not divide the model's {heads} attention heads.")
    if (kv_heads >= size and kv_heads % size) or (kv_heads < size and size % kv_heads):
        raise InvalidConfigError(
            f"tensor_parallel_size {size} cannot split the model's {kv_heads} KV heads ({heads} query heads): the "
            f"KV heads must be a multiple of the ranks, or the ranks a multiple of the KV heads (each KV head then "
            f"replicated on {size // max(kv_heads, 1) or 1} ranks).")
    if inter % size:
        raise InvalidConfigError(f"tensor_parallel_size {size} does not divide the model's MLP intermediate size "
                                 f"{inter}.")


# ---- the process group -------------------------------------------------------------------------------------------

def collective_backend(device: str, one_gpu_per_rank: bool) -> str:
    """NCCL between distinct GPUs; gloo on CPU, and for several ranks on one GPU (NCCL refuses those)."""
    return "nccl" if str(device).startswith("cuda") and one_gpu_per_rank else "gloo"


def init_process_group(init_method: str, rank: int, size: int, backend: str, timeout_s: float = 120.0) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # a start-up failure, named for the user
        raise DistributedInitError(f"rank {rank} of {size} could not join the {backend} process group at "
                                   f"{init_method}: {type(exc).__name__}: {exc}") from exc


class RowParallelLinear(torch.nn.Module):
    """A row-parallel projection: this rank's partial product, summed over ranks. The bias, if any, is held by
    rank 0 only (zeros elsewhere, see `shard_tensor`), so the sum adds it once."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = self.linear(x).contiguous()  # a CPU linear may return a transposed view
        dist.all_reduce(out)
        return out


def broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank, in place (other ranks pass a buffer of the same shape and dtype)."""
    import torch.distributed as dist

    dist.broadcast(tensor, src=0)
    return tensor


# ---- the sharded load --------------------------------------------------------------------------------------------

def shard_tensor(name: str, tensor, plan: ShardPlan, head_dim: int) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `name` (a safetensors slice or a tensor): read only that slice."""
    module = name.rsplit(".", 1)[0]
    kind = name.rsplit(".", 1)[1]
    for suffix, heads in _COLUMN_BY_HEAD.items():
        if module.endswith(suffix):
            chosen = plan.q_heads if heads == "q" else plan.kv_heads
            return tensor[chosen.start * head_dim: chosen.stop * head_dim]
    if module.endswith(_COLUMN_BY_FEATURE):
        return tensor[plan.intermediate.start: plan.intermediate.stop]
    for suffix in _ROW_PARALLEL:
        if module.endswith(suffix):
            if kind == "bias":
                full = tensor[:]
                return full if plan.rank == 0 else torch.zeros_like(full)
            cols = plan.q_heads if suffix == "self_attn.o_proj" else plan.intermediate
            scale = head_dim if suffix == "self_attn.o_proj" else 1
            return tensor[:, cols.start * scale: cols.stop * scale]
    return tensor[:]


def load_sharded_model(model_path: str, dtype: torch.dtype, device: str, plan: ShardPlan, attn_implementation: str):
    """The model with this rank's shard of every split weight and a full copy of the rest, read slice by slice
    from the safetensors files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(model_path)
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"tensor parallelism reads each rank's shard from safetensors files, and "
                                    f"{model_path} has none (convert the checkpoint with save_pretrained).")
    head_dim = head_dim_of(config)
    local = copy.deepcopy(config)
    local.num_attention_heads = len(plan.q_heads)
    local.num_key_value_heads = len(plan.kv_heads)
    local.head_dim = head_dim
    local.intermediate_size = len(plan.intermediate)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(local, dtype=dtype, attn_implementation=attn_implementation)
    expected = model.state_dict()
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                if name not in expected:
                    continue
                state[name] = shard_tensor(name, f.get_slice(name), plan, head_dim).to(dtype)
                if state[name].shape != expected[name].shape:
                    raise UnsupportedModelError(f"{name}: rank {plan.rank}'s slice has shape "
                                                f"{tuple(state[name].shape)}, the model expects "
                                                f"{tuple(expected[name].shape)}.")
    missing = set(expected) - set(state)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise UnsupportedModelError(f"{model_path}: the safetensors files lack {sorted(missing)[:4]}.")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    for layer in getattr(model, model.base_model_prefix).layers:
        for path in _ROW_PARALLEL:
            owner_name, attr = path.split(".")
            owner = getattr(layer, owner_name)
            setattr(owner, attr, RowParallelLinear(getattr(owner, attr)))
    return model


def cpu_threads_per_rank(size: int) -> int:
    """Torch threads for each of `size` CPU ranks on this machine: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // size)
