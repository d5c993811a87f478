"""Parity of the fast paged-attention backends with TorchPagedAttention, the referee.

Every case builds a random paged cache with shuffled, non-contiguous block tables (padded with block 0, which
some sequence also owns) and poisons every cache slot no sequence may read, so a kernel that reads past a
sequence's length or through a padded table entry fails loudly.

- Triton runs under its CPU interpreter (TRITON_INTERPRET=1) in one subprocess, so interpreter mode never
  leaks into the test process or other test modules. Interpreter cases are fp32 and fp16: Triton 3.9's
  interpreter computes bf16 `tl.dot` wrongly, so bf16 is checked only on CUDA.
- xformers' paged bias is built on CPU and materialized; attention under that dense mask must match.
- `-m gpu` runs both backends on CUDA at bf16 tolerances.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the interpreter subprocess runs this file as a script
    sys.path.insert(0, str(REPO_ROOT))

from interpreter import run_under_triton_interpreter  # noqa: E402

from workers.attention import AttentionMetadata, write_kv  # noqa: E402
from workers.attention.torch_ref import TorchPagedAttention  # noqa: E402

POISON = 1.0e4  # in every cache slot that no sequence may read


@dataclass(frozen=True)
class Case:
    name: str
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    strided_query: bool = False  # query as a view into a wider [N, 3H, D] projection output
    dtype: str = "float32"  # CPU dtype; the GPU variant always runs bfloat16


CASES = [
    Case("mixed_gqa2_bs4", (1, 5, 1, 9), (7, 12, 1, 30), 4, 2, 16, 4),
    Case("mixed_gqa3_bs16_multitile", (1, 45, 1, 2), (40, 60, 17, 2), 6, 3, 32, 16, strided_query=True),
    Case("decode_mha_long_bs16", (1, 1, 1), (150, 64, 33), 2, 2, 64, 16),
    Case("prefill_mqa_bs4_odd_head_dim", (13, 3), (13, 20), 4, 1, 24, 4),
    Case("decode_gqa2_odd_head_dim", (1, 1, 1), (37, 16, 5), 4, 2, 24, 4),  # the CPU kernel's masked 16-key dots
    Case("mixed_gqa4_bs64", (1, 70, 1), (200, 90, 65), 8, 2, 16, 64),
    Case("mixed_gqa2_bs128", (1, 3), (300, 131), 4, 2, 32, 128),
    Case("decode_long_context_gqa2", (1, 1), (600, 530), 4, 2, 16, 16),
    Case("mixed_gqa2_bs16_fp16", (1, 7, 1), (20, 30, 9), 4, 2, 32, 16, dtype="float16"),
]


def make_batch(case: Case, dtype: torch.dtype | None = None, device: str = "cpu", seed: int = 0):
    """A random step for `case`: (query [N, H, D], key_cache, value_cache, meta), new K/V already written."""
    dtype = dtype or getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    bs, kvh, dim = case.block_size, case.num_kv_heads, case.head_dim
    pages = [math.ceil(n / bs) for n in case.seq_lens]
    num_blocks = sum(pages) + 2  # two spare blocks that no table references
    order = torch.randperm(num_blocks, generator=gen)
    if 0 not in order[: sum(pages)].tolist():  # some sequence must own block 0, the tables' padding value
        order = torch.cat([torch.tensor([0]), order[order != 0]])
    tables = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    taken = 0
    for s, n in enumerate(pages):
        tables[s, :n] = order[taken: taken + n]
        taken += n
    key_cache = torch.full((num_blocks, bs, kvh, dim), POISON)
    value_cache = torch.full((num_blocks, bs, kvh, dim), POISON)
    readable = torch.cat([_slots(tables[s], n, bs) for s, n in enumerate(case.seq_lens)])
    flat_k, flat_v = key_cache.view(-1, kvh, dim), value_cache.view(-1, kvh, dim)
    flat_k[readable] = torch.randn(len(readable), kvh, dim, generator=gen)
    flat_v[readable] = torch.randn(len(readable), kvh, dim, generator=gen)

    num_tokens = sum(case.query_lens)
    new_slots = torch.cat([_slots(tables[s], n, bs)[n - q:] for s, (q, n) in
                           enumerate(zip(case.query_lens, case.seq_lens))])
    write_kv(key_cache, value_cache, torch.randn(num_tokens, kvh, dim, generator=gen),
             torch.randn(num_tokens, kvh, dim, generator=gen), new_slots)
    projection = torch.randn(num_tokens, 3 * case.num_heads, dim, generator=gen)
    query = projection[:, : case.num_heads] if case.strided_query else projection[:, : case.num_heads].clone()

    starts = [0]
    for q in case.query_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=new_slots.to(device), query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(case.seq_lens, dtype=torch.int32, device=device), block_tables=tables.to(device),
        query_lens_list=list(case.query_lens), seq_lens_list=list(case.seq_lens), block_size=bs,
        max_query_len=max(case.query_lens), max_seq_len=max(case.seq_lens))
    return (query.to(device=device, dtype=dtype), key_cache.to(device=device, dtype=dtype),
            value_cache.to(device=device, dtype=dtype), meta)


def _slots(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    idx = torch.arange(length)
    return table.long()[idx // block_size] * block_size + idx % block_size


def run_backend(backend, query, key_cache, value_cache, meta) -> torch.Tensor:
    meta.plan = backend.plan(meta)
    return backend.forward(query, key_cache, value_cache, meta)


def reference_output(case: Case, query, key_cache, value_cache, meta) -> torch.Tensor:
    ref = TorchPagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)
    return run_backend(ref, query.float(), key_cache.float(), value_cache.float(), meta)


# ---------------------------------------------------------------------------------------------- Triton (CPU)

def _triton_interpreter_errors(case_names: list[str]) -> dict[str, dict]:
    """Run in a TRITON_INTERPRET=1 subprocess: max |triton - reference| per case, or the error raised."""
    from workers.attention.triton_paged import TritonPagedAttention

    results = {}
    for case in (c for c in CASES if c.name in case_names):
        try:
            batch = make_batch(case)
            expected = reference_output(case, *batch)
            backend = TritonPagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)
            got = run_backend(backend, *batch)
            results[case.name] = {"max_err": (got - expected).abs().max().item(), "error": None}
        except Exception as exc:  # noqa: BLE001 - reported to the parent test, which fails with it
            results[case.name] = {"max_err": None, "error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def triton_interpreter_results():
    return run_under_triton_interpreter(__file__, "--triton-interpreter", *(c.name for c in CASES))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_kernel_matches_reference_under_interpreter(triton_interpreter_results, case):
    result = triton_interpreter_results[case.name]
    assert result["error"] is None, result["error"]
    tolerance = 1e-4 if case.dtype == "float32" else 3e-3  # fp16 inputs against an fp32 reference
    assert result["max_err"] < tolerance, f"{case.name}: max error {result['max_err']}"


# ------------------------------------------------------------------------------------------- xformers (CPU)

def _attention_under_materialized_bias(case: Case, bias, query, key_cache, value_cache) -> torch.Tensor:
    """Dense attention of every query over the flat cache under bias.materialize(): [N, H, D]."""
    tables = bias.block_tables = bias.block_tables.clone()
    # materialize() copies each logical page's mask onto its physical page in table order, so a padded entry
    # pointing at a page its sequence owns would overwrite real columns with -inf. The kernels never read
    # padded entries (they stop at the sequence length); for materializing, send them to a spare page.
    pages_used = [math.ceil(n / case.block_size) for n in case.seq_lens]
    scratch = key_cache.shape[0]
    for s, n in enumerate(pages_used):
        tables[s, n:] = scratch
    num_tokens, num_seqs = query.shape[0], len(case.seq_lens)
    mask = bias.materialize((num_tokens, num_seqs * tables.shape[1] * case.block_size))  # [N, used pages * bs]
    keys = mask.shape[-1]
    group = case.num_heads // case.num_kv_heads
    flat_k = torch.cat([key_cache, torch.zeros_like(key_cache[:1])]).view(-1, case.num_kv_heads, case.head_dim)
    flat_v = torch.cat([value_cache, torch.zeros_like(value_cache[:1])]).view(-1, case.num_kv_heads, case.head_dim)
    k = flat_k[:keys].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, keys, D]
    v = flat_v[:keys].repeat_interleave(group, dim=1).transpose(0, 1)
    scores = query.transpose(0, 1) @ k.transpose(1, 2) * case.head_dim ** -0.5 + mask  # [H, N, keys]
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_xformers_paged_bias_masks_like_the_reference(case):
    pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed")
    from workers.attention.xformers_paged import build_paged_bias

    query, key_cache, value_cache, meta = make_batch(case, torch.float32)
    bias = build_paged_bias(meta.query_lens_list, meta.seq_lens_list, meta.block_tables, meta.block_size)
    assert bias.q_seqinfo.seqstart_py == meta.query_start_loc.tolist()
    assert bias.k_seqinfo.seqlen_py == list(case.seq_lens)
    assert bias.page_size == case.block_size
    got = _attention_under_materialized_bias(case, bias, query, key_cache, value_cache)
    expected = reference_output(case, query, key_cache, value_cache, meta)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_xformers_backend_refuses_to_construct_without_cuda_kernels():
    pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed")
    if torch.cuda.is_available():
        pytest.skip("this checks the refusal path on a machine without CUDA")
    from workers.attention.xformers_paged import XFormersPagedAttention, XFormersUnavailableError

    assert XFormersPagedAttention.is_supported() is False
    with pytest.raises(XFormersUnavailableError, match="CUDA is not available.*xformers build"):
        XFormersPagedAttention(4, 2, 64, 0.125)


# ---------------------------------------------------------------------------------------------------- GPU

def _gpu_backend(name: str, case: Case):
    from workers.attention import get_backend_class

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process")
    cls = get_backend_class(name)
    if not cls.is_supported():
        pytest.skip(f"attention backend {name!r} is not supported on this machine")
    return cls(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "xformers"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backend_matches_reference_on_cuda_bf16(backend_name, case):
    if backend_name == "xformers" and case.head_dim % 8:
        pytest.skip("xformers kernels need head_dim a multiple of 8")
    backend = _gpu_backend(backend_name, case)
    query, key_cache, value_cache, meta = make_batch(case, torch.bfloat16, "cuda")
    expected = reference_output(case, query, key_cache, value_cache, meta)
    got = run_backend(backend, query, key_cache, value_cache, meta).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


if __name__ == "__main__" and sys.argv[1:2] == ["--triton-interpreter"]:
    print(json.dumps(_triton_interpreter_errors(sys.argv[2:])))


def test_the_worker_not_the_engine_picks_the_default_backend(tiny_zoo):
    """A Ray worker may see a GPU that the engine's process does not (KubeRay: a CPU server pod, GPU workers), so
    an unset backend travels to the worker as None and the worker resolves it for its own device."""
    from engine import LLM

    llm = LLM(model=str(tiny_zoo("llama")["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=16)
    worker = llm.engine.executor.worker
    assert worker.config.attention_backend is None
    assert llm.engine.attention_backend == worker.attention_backend == "cpu"  # this CPU's best: the C++ kernel
    assert type(worker.runner.backend).__name__ == "CpuPagedAttention"
