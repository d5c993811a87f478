"""A fused forward for Llama-family decoders (Llama, Mistral, Qwen2), over the Hugging Face model's own weights.

Hugging Face's decoder layer runs about 40 kernels per layer in a decode step: three projections for q, k and v,
two for gate and up, and long chains of small element-wise kernels for the norms, the rotary embedding and the
activation. The same layer here is about 9 kernels (plus whatever the attention backend launches):

    add + RMSNorm -> QKV projection (one GEMM) -> rotary + K/V write into the cache -> paged attention
    -> output projection -> add + RMSNorm -> gate/up projection (one GEMM) -> SiLU * up -> down projection

The q/k/v and gate/up weights are concatenated once at start-up and the modules' own parameters become views of
the concatenation, so no weight is held twice. The element-wise ops come from `workers.fused_ops` (Triton
kernels on GPUs, C++ kernels on CPUs, Hugging Face's torch formulas where neither is usable); the rotary kernel
also writes the rotated keys and the values into their cache slots. Everything else (embedding, rotary cos/sin,
the final norm's weight, the LM head) is the model's own module, so rope scaling variants and tied embeddings
behave as in Hugging Face.

`EngineConfig.fused_layers` (`--fused-layers`) is auto|on|off (default auto: on for CUDA devices, and on CPUs
where prefix-serve's C++ kernels build; `on` elsewhere runs the torch formulas). A model that does not fit
(another architecture, biases on only some projections, an activation other than SiLU, partial rotary, a head
size that is not a power of two) keeps Hugging Face's forward, with the reason logged once. On CPUs with
AVX-512, the fused q/k/v and gate/up weights are packed for oneDNN like every other linear layer
(`workers.model_runner.pack_cpu_linears`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.model_spec import head_dim_of
from workers import cpu_kernels
from workers.fused_ops import CppOps, TorchOps, TritonOps, triton_usable

logger = logging.getLogger("prefix_serve.fused_decoder")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# attend(layer_idx, q [N, H, D]) -> [N, H, D]: attention over the cache, the step's K/V already written
AttendFn = Callable[[int, torch.Tensor], torch.Tensor]


def _concat_into_views(modules: list[torch.nn.Linear], name: str) -> torch.Tensor | None:
    """Concatenate the modules' `name` tensors along dim 0 and make each module's parameter a view into it."""
    tensors = [getattr(m, name) for m in modules]
    if all(t is None for t in tensors):
        return None
    merged = torch.cat([t.detach() for t in tensors]).contiguous()
    start = 0
    for module, tensor in zip(modules, tensors):
        rows = tensor.shape[0]
        setattr(module, name, torch.nn.Parameter(merged[start:start + rows], requires_grad=False))
        start += rows
    return merged


@dataclass
class _Layer:
    index: int
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.nn.Linear
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_proj: torch.nn.Linear


class FusedDecoder:
    def __init__(self, model, ops=TorchOps):
        decoder = model.model
        config = model.config
        self.ops = ops
        self.linear = F.linear  # (x, weight, bias); `pack_weights` swaps in oneDNN's packed form
        self.embed_tokens = decoder.embed_tokens
        self.rotary_emb = decoder.rotary_emb
        self.norm = decoder.norm
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.layers = []
        self._hf_layers = list(decoder.layers)
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                index=i, in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                eps=layer.input_layernorm.variance_epsilon,
                qkv_weight=_concat_into_views([attn.q_proj, attn.k_proj, attn.v_proj], "weight"),
                qkv_bias=_concat_into_views([attn.q_proj, attn.k_proj, attn.v_proj], "bias"),
                o_proj=attn.o_proj,
                gate_up_weight=_concat_into_views([mlp.gate_proj, mlp.up_proj], "weight"),
                gate_up_bias=_concat_into_views([mlp.gate_proj, mlp.up_proj], "bias"),
                down_proj=mlp.down_proj))

    def pack_weights(self, pack: Callable[[torch.Tensor], torch.Tensor],
                     linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
        """Replace the fused q/k/v and gate/up weights by `pack(weight)` (oneDNN's pre-packed layout on CPUs),
        run through `linear(x, packed, bias)`. The Hugging Face modules' views of those weights are dropped, so
        no weight is held twice: from here on only this forward runs those projections."""
        packed = [(pack(layer.qkv_weight), pack(layer.gate_up_weight)) for layer in self.layers]  # may raise
        for layer, hf, (qkv, gate_up) in zip(self.layers, self._hf_layers, packed):
            layer.qkv_weight, layer.gate_up_weight = qkv, gate_up
            for module in (hf.self_attn.q_proj, hf.self_attn.k_proj, hf.self_attn.v_proj, hf.mlp.gate_proj,
                           hf.mlp.up_proj):
                module.weight = None
        self.linear = linear

    @staticmethod
    def unsupported_reason(model) -> str | None:
        """Why this model cannot take the fused forward, or None when it can."""
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            return f"model type {config.model_type!r} (fused layers cover {', '.join(SUPPORTED_MODEL_TYPES)})"
        if getattr(config, "hidden_act", "silu") != "silu":
            return f"activation {config.hidden_act!r} (fused layers need silu)"
        head_dim = head_dim_of(config)
        if head_dim & (head_dim - 1) or head_dim < 4:
            return f"head size {head_dim} is not a power of two"
        rope = getattr(config, "rope_parameters", None)
        factor = getattr(config, "partial_rotary_factor", 1.0)
        if isinstance(rope, dict):
            factor = rope.get("partial_rotary_factor", factor)
        if float(factor or 1.0) != 1.0:
            return "partial rotary embedding"
        decoder = getattr(model, "model", None)
        if decoder is None or not hasattr(decoder, "rotary_emb"):
            return "the decoder has no shared rotary embedding module"
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
                if len({m.bias is None for m in group}) > 1:
                    return "biases on some of the projections that would be fused, not all"
            if not (hasattr(layer.input_layernorm, "variance_epsilon")
                    and hasattr(layer.post_attention_layernorm, "variance_epsilon")):
                return "norms are not RMSNorm"
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache, slot_mapping: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        """input_ids, positions [N] -> final hidden states [N, hidden] (after the model's last norm). Each layer
        writes its new K/V into `kv_cache` (a `workers.kv_cache.KVCache`) at `slot_mapping`, then attends."""
        ops = self.ops
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, positions[None])
        cos, sin = cos[0], sin[0]  # [N, head_dim]
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        residual = None
        for layer in self.layers:
            h, residual = ops.add_rmsnorm(x, residual, layer.in_norm, layer.eps)
            qkv = self.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(n, self.num_heads, self.head_dim)
            k = k.view(n, self.num_kv_heads, self.head_dim)
            key_cache, value_cache = kv_cache.layer(layer.index)
            q = ops.rope_write(q, k, v.view(n, self.num_kv_heads, self.head_dim), cos, sin, key_cache,
                               value_cache, slot_mapping)
            out = attend(layer.index, q)
            x = layer.o_proj(out.reshape(n, q_size))
            h, residual = ops.add_rmsnorm(x, residual, layer.post_norm, layer.eps)
            x = layer.down_proj(ops.silu_mul(self.linear(h, layer.gate_up_weight, layer.gate_up_bias)))
        return ops.add_rmsnorm(x, residual, self.norm.weight, self.norm.variance_epsilon)[0]


def check_ops(ops, device: torch.device, dtype: torch.dtype, hidden: int, num_heads: int, num_kv_heads: int,
              head_dim: int) -> str | None:
    """Run each op once at the model's shapes against TorchOps; the failure, or None when all agree."""
    tolerance = 1e-4 if dtype == torch.float32 else 2 ** -5
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def off(want, got) -> float:
        return ((want.float() - got.float()).abs().max() / want.float().abs().max().clamp(min=1.0)).item()

    try:
        x, r, w = rand(3, hidden), rand(3, hidden), rand(hidden)
        errors = {"silu_mul": off(TorchOps.silu_mul(x), ops.silu_mul(x))}
        for name, residual in (("rmsnorm", None), ("add_rmsnorm", r)):
            want, got = TorchOps.add_rmsnorm(x, residual, w, 1e-6), ops.add_rmsnorm(x, residual, w, 1e-6)
            errors[name] = max(off(want[0], got[0]), off(want[1], got[1]))
        qkv = rand(3, (num_heads + 2 * num_kv_heads) * head_dim)
        q = qkv[:, :num_heads * head_dim].view(3, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(3, num_kv_heads, head_dim)
        cos, sin = rand(3, head_dim), rand(3, head_dim)
        v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(3, num_kv_heads, head_dim)
        caches = [torch.zeros(2, 4, num_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(4)]
        slots = torch.tensor([5, 0, 2], device=device)
        want_q = TorchOps.rope_write(q.clone(), k.clone(), v, cos, sin, caches[0], caches[1], slots)
        got_q = ops.rope_write(q.clone(), k.clone(), v, cos, sin, caches[2], caches[3], slots)
        errors["rope_write"] = max(off(want_q, got_q), off(caches[0], caches[2]), off(caches[1], caches[3]))
        want_q, want_k = TorchOps.rope(q.clone(), k.clone(), cos, sin)
        got_q, got_k = ops.rope(q, k, cos, sin)
        errors["rope"] = max(off(want_q, got_q), off(want_k, got_k))
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use these kernels
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    bad = {name: err for name, err in errors.items() if not err <= tolerance}
    return f"results differ from the torch formulas: {bad}" if bad else None


def make_fused_decoder(model, device: torch.device, mode: str) -> FusedDecoder | None:
    """The fused forward for `model` when the mode (auto|on|off, EngineConfig.fused_layers) and the model allow
    it, else None (Hugging Face's forward). Its ops: Triton kernels on GPUs, prefix-serve's C++ kernels on CPUs
    (`workers.cpu_kernels`), each first checked once against the torch formulas at the model's shapes, and the
    torch formulas where neither is usable. "auto": on CUDA devices, and on CPUs where the C++ kernels build."""
    if mode == "off":
        return None
    try:
        reason = FusedDecoder.unsupported_reason(model)
    except Exception as exc:  # noqa: BLE001 - a model laid out unlike the ones we know: Hugging Face's forward
        reason = f"could not inspect the model ({type(exc).__name__}: {exc})"
    ops = TorchOps
    if reason is None:
        if triton_usable(device):
            ops = TritonOps
        elif device.type == "cpu" and cpu_kernels.load() is not None:
            ops = CppOps
        if ops is not TorchOps:
            config = model.config
            failed = check_ops(ops, device, model.dtype, config.hidden_size, config.num_attention_heads,
                               config.num_key_value_heads, head_dim_of(config))
            if failed:
                reason = f"the {ops.name} kernels failed their start-up check: {failed}"
        elif mode == "auto" and device.type != "cuda":
            return None  # a CPU without the C++ kernels: Hugging Face's forward
    if reason is not None:
        logger.warning("Fused decoder layers unavailable, using Hugging Face's forward: %s", reason)
        return None
    # Building turns the modules' q/k/v and gate/up parameters into views of the concatenations; one that fails
    # half way leaves every module with its own values, so Hugging Face's forward still runs.
    try:
        return FusedDecoder(model, ops)
    except Exception as exc:  # noqa: BLE001
        logger.warning("Fused decoder layers unavailable, using Hugging Face's forward: %s: %s",
                       type(exc).__name__, exc)
        return None
