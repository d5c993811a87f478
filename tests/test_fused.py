"""Fused decoder layers: the Triton ops against Hugging Face's formulas, and the fused forward in the engine.

The Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) in a subprocess, as the attention
kernel's tests do. Greedy parity of the fused forward against the PEFT-forward referee is in test_parity.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreter import run_under_triton_interpreter

from workers.fused_decoder import FusedDecoder, make_fused_decoder
from workers.fused_ops import TorchOps


def _relative(want: torch.Tensor, got: torch.Tensor) -> float:
    return ((want.float() - got.float()).abs().max() / want.float().abs().max().clamp(min=1.0)).item()


def _op_errors() -> dict[str, float]:
    """In the interpreter subprocess: max |triton - torch| / max |torch| for each op, dtype and layout."""
    from workers.fused_ops import TritonOps

    torch.manual_seed(0)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).split(".")[-1]
        x, r, w = torch.randn(6, 96, dtype=dtype), torch.randn(6, 96, dtype=dtype), torch.randn(96, dtype=dtype)
        layouts = {"norm": (x, None), "add_norm": (x, r), "add_norm_transposed": (x.t().contiguous().t(), r)}
        for name, args in layouts.items():
            want, got = TorchOps.add_rmsnorm(*args, w, 1e-5), TritonOps.add_rmsnorm(*args, w, 1e-5)
            errors[f"{name} {tag}"] = max(_relative(want[0], got[0]), _relative(want[1], got[1]))
        gate_up = torch.randn(6, 2 * 80, dtype=dtype) * 4
        errors[f"silu_mul {tag}"] = _relative(TorchOps.silu_mul(gate_up), TritonOps.silu_mul(gate_up))
        # q and k as strided views of one QKV projection, 5 query heads and 3 KV heads (not powers of two)
        qkv = torch.randn(6, (5 + 3 + 3) * 16, dtype=dtype)
        positions = torch.arange(6, dtype=torch.float32)[:, None] * (1e-2 ** (torch.arange(8) / 8))[None, :]
        angles = torch.cat([positions, positions], dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        q, k = qkv[:, :80].view(6, 5, 16), qkv[:, 80:128].view(6, 3, 16)
        want_q, want_k = TorchOps.rope(q.clone(), k.clone(), cos, sin)
        v_before = qkv[:, 128:].clone()
        got_q, got_k = TritonOps.rope(q, k, cos, sin)  # in place, through the views
        errors[f"rope {tag}"] = max(_relative(want_q, got_q), _relative(want_k, got_k))
        errors[f"rope leaves v {tag}"] = (qkv[:, 128:] - v_before).abs().max().item()
        # rope_write: k rotated into its cache slots and v copied there; caches [blocks, block_size, KVH, D]
        qkv = torch.randn(6, (5 + 3 + 3) * 16, dtype=dtype)
        views = qkv[:, :80].view(6, 5, 16), qkv[:, 80:128].view(6, 3, 16), qkv[:, 128:].view(6, 3, 16)
        slots = torch.tensor([9, 2, 3, 14, 0, 7])
        want_caches = [torch.zeros(4, 4, 3, 16, dtype=dtype) for _ in range(2)]
        got_caches = [torch.zeros(4, 4, 3, 16, dtype=dtype) for _ in range(2)]
        want_q = TorchOps.rope_write(views[0].clone(), views[1].clone(), views[2], cos, sin, *want_caches, slots)
        got_q = TritonOps.rope_write(views[0].clone(), views[1].clone(), views[2], cos, sin, *got_caches, slots)
        errors[f"rope_write {tag}"] = max(_relative(want_q, got_q), _relative(want_caches[0], got_caches[0]),
                                          _relative(want_caches[1], got_caches[1]))
        untouched = torch.ones(16, dtype=torch.bool)
        untouched[slots] = False
        errors[f"rope_write leaves other slots {tag}"] = got_caches[0].view(16, -1)[untouched].abs().max().item()
    return errors


@pytest.fixture(scope="module")
def interpreter_errors():
    return run_under_triton_interpreter(__file__, "--interpreter")


@pytest.mark.parametrize("op", ["norm", "add_norm", "add_norm_transposed", "silu_mul", "rope", "rope_write"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_op_matches_hugging_face_formula(interpreter_errors, op, dtype):
    # fp32: the same operations, so equal to rounding; bf16: a bf16 step (2^-8 relative) or two, as the
    # interpreter's bf16 conversion need not round like the GPU's
    tolerance = 1e-6 if dtype == "float32" else 2 ** -6
    assert interpreter_errors[f"{op} {dtype}"] <= tolerance
    if op == "rope":
        assert interpreter_errors[f"rope leaves v {dtype}"] == 0.0
    if op == "rope_write":
        assert interpreter_errors[f"rope_write leaves other slots {dtype}"] == 0.0


def test_fused_weights_are_views_of_one_concatenation_and_gpt2_is_not_fused(tiny_zoo, monkeypatch):
    import workers.fused_decoder as fused_decoder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo("qwen2")["model"], dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    q_before = attn.q_proj.weight.detach().clone()
    monkeypatch.setattr(fused_decoder.cpu_kernels, "load", lambda: None)  # a CPU where the C++ kernels do not build
    assert make_fused_decoder(model, torch.device("cpu"), "auto") is None  # auto: Hugging Face's layers there
    assert make_fused_decoder(model, torch.device("cpu"), "off") is None
    fused = make_fused_decoder(model, torch.device("cpu"), "on")
    layer = fused.layers[0]
    assert fused.ops is TorchOps
    assert attn.q_proj.weight.data_ptr() == layer.qkv_weight.data_ptr()  # no second copy of the weights
    assert attn.k_proj.weight.data_ptr() == layer.qkv_weight[attn.q_proj.weight.shape[0]:].data_ptr()
    assert torch.equal(attn.q_proj.weight, q_before)
    assert layer.qkv_bias is not None and layer.gate_up_bias is None  # Qwen2: q/k/v biases, none in the MLP
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_zoo("gpt2")["model"], dtype=torch.float32)
    assert "model type 'gpt2'" in FusedDecoder.unsupported_reason(gpt2)
    assert make_fused_decoder(gpt2, torch.device("cpu"), "on") is None


def test_auto_fuses_cpu_layers_with_the_cpp_kernels_where_they_build(tiny_zoo):
    from transformers import AutoModelForCausalLM

    from workers import cpu_kernels
    from workers.fused_ops import CppOps

    assert cpu_kernels.load() is not None, cpu_kernels.failure()
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo("llama")["model"], dtype=torch.float32)
    assert make_fused_decoder(model, torch.device("cpu"), "auto").ops is CppOps


class _WrongRope(TorchOps):
    @staticmethod
    def rope(q, k, cos, sin):
        return q, k  # forgets to rotate


class _Crashing(TorchOps):
    @staticmethod
    def silu_mul(gate_up):
        raise RuntimeError("no kernel image for this device")


def test_startup_check_rejects_wrong_or_crashing_kernels_and_keeps_hugging_face_layers(tiny_zoo, monkeypatch,
                                                                                         caplog):
    import workers.fused_decoder as fused_decoder
    from transformers import AutoModelForCausalLM

    from workers.fused_decoder import check_ops

    cpu = torch.device("cpu")
    assert check_ops(TorchOps, cpu, torch.float32, 64, 4, 2, 16) is None
    assert "rope" in check_ops(_WrongRope, cpu, torch.float32, 64, 4, 2, 16)
    assert "no kernel image" in check_ops(_Crashing, cpu, torch.bfloat16, 64, 4, 2, 16)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo("llama")["model"], dtype=torch.float32)
    monkeypatch.setattr(fused_decoder, "triton_usable", lambda device: True)
    monkeypatch.setattr(fused_decoder, "TritonOps", _WrongRope)
    with caplog.at_level("WARNING", logger="prefix_serve.fused_decoder"):
        assert make_fused_decoder(model, cpu, "on") is None
    assert "start-up check" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_ops_on_cuda_match_the_torch_formulas(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from workers.fused_decoder import check_ops
    from workers.fused_ops import TritonOps

    for hidden, heads, kv_heads, head_dim in ((2048, 32, 8, 64), (896, 14, 2, 64), (4096, 32, 8, 128)):
        assert check_ops(TritonOps, torch.device("cuda"), dtype, hidden, heads, kv_heads, head_dim) is None


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter"]:
    print(json.dumps(_op_errors()))
