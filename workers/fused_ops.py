"""The element-wise parts of a Llama-family decoder layer, each one kernel: residual add + RMSNorm, rotary
embedding (in place), and SiLU(gate) * up.

Hugging Face's modules run these as chains of small kernels (an RMSNorm is six or seven, a rotary embedding
about ten for q and k). A decode step at batch 256 moves little data through each, so on a GPU their count,
not their bytes, costs time. Each op here has three implementations with the same contract:
- `TorchOps`: Hugging Face's own formulas in torch (anywhere, and the reference in tests);
- `CppOps`: prefix-serve's C++ kernels (`workers.cpu_kernels`; CPU, fp32, the torch formulas otherwise);
- `TritonOps`: one Triton kernel per op (CUDA; CPU tensors under TRITON_INTERPRET=1, for tests).
The Triton kernels round to the model dtype where Hugging Face's chain of torch ops does, so bf16 results match
it closely and fp32 results to within a few units in the last place (exp and rsqrt are hardware approximations
on GPUs, in torch as here, and need not agree bit for bit).
"""

from __future__ import annotations

import os

import torch

from workers import cpu_kernels
from workers.attention.base import write_kv

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: TorchOps serve everywhere
    triton = None
    tl = None


def triton_usable(device: torch.device) -> bool:
    """Whether TritonOps can run on tensors of `device` here."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


class TorchOps:
    name = "torch"

    @staticmethod
    def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [N, hidden] -> (RMSNorm(residual + x) * weight, residual + x). No residual: x alone."""
        if residual is not None:
            x = residual + x
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype), x

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, H, D], k [N, KVH, D], cos and sin [N, D] (halves repeated) -> rotated q, k."""
        cos, sin = cos[:, None, :], sin[:, None, :]

        def rotate_half(x: torch.Tensor) -> torch.Tensor:
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    @staticmethod
    def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate q and k, write k and v into their cache slots ([num_blocks, block_size, KVH, D] caches);
        returns the rotated q [N, H, D]."""
        q, k = TorchOps.rope(q, k, cos, sin)
        write_kv(key_cache, value_cache, k, v, slot_mapping)
        return q

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [N, 2I] (gate first) -> SiLU(gate) * up [N, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


class CppOps:
    """The C++ kernels of `workers.cpu_kernels` (CPU, fp32): each op one pass over its rows. Anything else (another
    dtype) takes TorchOps' formula. The kernels read rows whose last dimension is contiguous; a linear layer run
    through MKL returns a transposed view (`_weight_major_linear`), so `_rows` copies such an input first."""
    name = "cpp"

    @staticmethod
    def add_rmsnorm(x, residual, weight, eps):
        if x.dtype != torch.float32:
            return TorchOps.add_rmsnorm(x, residual, weight, eps)
        residual = None if residual is None else _rows(residual)
        return tuple(cpu_kernels.load().add_rmsnorm(_rows(x), residual, weight, eps))

    @staticmethod
    def rope(q, k, cos, sin):
        return TorchOps.rope(q, k, cos, sin)

    @staticmethod
    def rope_write(q, k, v, cos, sin, key_cache, value_cache, slot_mapping):
        if q.dtype != torch.float32 or key_cache.dtype != torch.float32:
            return TorchOps.rope_write(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)
        return cpu_kernels.load().rope_write(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)

    @staticmethod
    def silu_mul(gate_up):
        if gate_up.dtype != torch.float32:
            return TorchOps.silu_mul(gate_up)
        return cpu_kernels.load().silu_mul(_rows(gate_up))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                            stride_x, stride_r, stride_o, stride_ro,
                            HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # rounded like torch's add
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        normed = (h * rstd).to(x.dtype)  # Hugging Face rounds before the weight multiply
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype),
                 mask=mask)

    @triton.jit
    def _rope_heads(src, dst, stride_sh, stride_dh, num_heads, c1, c2, s1, s2,
                    HALF: tl.constexpr, HEADS: tl.constexpr):
        """Rotate one token's heads read at `src` and store them at `dst` (may be the same place)."""
        heads = tl.arange(0, HEADS)
        dims = tl.arange(0, HALF)
        mask = heads[:, None] < num_heads
        p = src + heads[:, None] * stride_sh + dims[None, :]
        x1 = tl.load(p, mask=mask, other=0.0)
        x2 = tl.load(p + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1], each product and the sum rounded
        o1 = ((f1 * c1).to(dtype).to(tl.float32) + (-f2 * s1).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((f2 * c2).to(dtype).to(tl.float32) + (f1 * s2).to(dtype).to(tl.float32)).to(dtype)
        out = dst + heads[:, None] * stride_dh + dims[None, :]
        tl.store(out, o1, mask=mask)
        tl.store(out + HALF, o2, mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                     stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_c,
                     stride_cs, stride_ch, num_q_heads, num_k_heads, HALF: tl.constexpr, Q_HEADS: tl.constexpr,
                     K_HEADS: tl.constexpr, WRITE_CACHE: tl.constexpr):
        """One token: rotate its q heads in place; rotate its k heads in place, or with WRITE_CACHE into the
        cache slot `slot_ptr[token]` (and copy its v heads there)."""
        tok = tl.program_id(0).to(tl.int64)
        dims = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + tok * stride_c + dims).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + tok * stride_c + HALF + dims).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + tok * stride_c + dims).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + tok * stride_c + HALF + dims).to(tl.float32)[None, :]
        q = q_ptr + tok * stride_qn
        _rope_heads(q, q, stride_qh, stride_qh, num_q_heads, c1, c2, s1, s2, HALF, Q_HEADS)
        k = k_ptr + tok * stride_kn
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            _rope_heads(k, k_cache_ptr + slot * stride_cs, stride_kh, stride_ch, num_k_heads, c1, c2, s1, s2,
                        HALF, K_HEADS)
            heads = tl.arange(0, K_HEADS)
            full = tl.arange(0, 2 * HALF)
            mask = heads[:, None] < num_k_heads
            v = tl.load(v_ptr + tok * stride_vn + heads[:, None] * stride_vh + full[None, :], mask=mask)
            tl.store(v_cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + full[None, :], v, mask=mask)
        else:
            _rope_heads(k, k, stride_kh, stride_kh, num_k_heads, c1, c2, s1, s2, HALF, K_HEADS)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = tl.div_rn(gf, 1.0 + tl.exp(-gf)).to(g.dtype)  # SiLU as torch computes it, then rounded
        tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


class TritonOps:
    name = "triton"

    @staticmethod
    def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if x.stride(1) == 1 else x.contiguous()  # rows may be strided, columns must not be
        if residual is not None and residual.stride(1) != 1:
            residual = residual.contiguous()
        n, cols = x.shape
        out = torch.empty((n, cols), dtype=x.dtype, device=x.device)
        res_out = torch.empty_like(out) if residual is not None else x
        block = triton.next_power_of_2(cols)
        res = residual if residual is not None else x
        _add_rmsnorm_kernel[(n,)](x, res, weight, out, res_out, cols, eps, x.stride(0), res.stride(0),
                                  out.stride(0), res_out.stride(0), HAS_RESIDUAL=residual is not None,
                                  BLOCK=block, num_warps=8 if block >= 4096 else 4)
        return out, res_out

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: q and k may be strided views (of one fused QKV projection); their last dim contiguous."""
        TritonOps._rope(q, k, None, cos, sin, None, None, None)
        return q, k

    @staticmethod
    def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """One kernel: q rotated in place, k rotated straight into its cache slots, v copied into its slots."""
        TritonOps._rope(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)
        return q

    @staticmethod
    def _rope(q, k, v, cos, sin, key_cache, value_cache, slot_mapping) -> None:
        n, num_q, dim = q.shape
        num_k = k.shape[1]
        assert q.stride(2) == k.stride(2) == 1 and cos.stride(1) == sin.stride(1) == 1
        assert cos.stride(0) == sin.stride(0) and dim % 2 == 0 and (dim & (dim - 1)) == 0
        write = key_cache is not None
        if write:
            blocks, block_size = key_cache.shape[:2]
            key_flat = key_cache.view(blocks * block_size, num_k, dim)
            value_flat = value_cache.view(blocks * block_size, num_k, dim)
            assert v.stride(2) == 1 and key_flat.stride() == value_flat.stride() and key_flat.stride(2) == 1
            cache_strides = key_flat.stride()[:2]
            v_strides = v.stride()[:2]
        else:
            key_flat = value_flat = slot_mapping = v = k  # unused: WRITE_CACHE is off
            cache_strides = v_strides = (0, 0)
        _rope_kernel[(n,)](q, k, v, cos, sin, slot_mapping, key_flat, value_flat,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), *v_strides, cos.stride(0),
                           *cache_strides, num_q, num_k, HALF=dim // 2, Q_HEADS=triton.next_power_of_2(num_q),
                           K_HEADS=triton.next_power_of_2(num_k), WRITE_CACHE=write, num_warps=4)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up if gate_up.stride(1) == 1 else gate_up.contiguous()
        n, cols = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((n, cols), dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(cols, block))](gate_up, out, cols, gate_up.stride(0), out.stride(0),
                                                        BLOCK=block, num_warps=4)
        return out
