"""prefix-serve's C++ CPU kernels (`workers.cpu_kernels`) against the torch formulas they replace.

The build must succeed here: CI installs a compiler and `ninja`, and a silent fallback to the torch formulas
would make every other test in this file pass without testing anything.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_backends import CASES, make_batch, reference_output, run_backend

from workers import cpu_kernels
from workers.attention import default_backend_name, get_backend_class
from workers.attention.cpu_paged import CpuPagedAttention
from workers.fused_decoder import check_ops
from workers.fused_ops import CppOps, TorchOps


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, f"the C++ CPU kernels did not build: {cpu_kernels.failure()}"
    return module


def test_the_cpu_backend_is_the_default_on_cpu(kernels):
    assert default_backend_name("cpu") == "cpu"
    assert get_backend_class("cpu") is CpuPagedAttention


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == "float32"], ids=lambda c: c.name)
def test_cpu_backend_matches_the_reference(kernels, case):
    """Decode rows and short prefill chunks through the kernel; poisoned slots catch any read past a sequence's
    length or through a padded block-table entry."""
    query, key_cache, value_cache, meta = make_batch(case)
    expected = reference_output(case, query, key_cache, value_cache, meta)
    backend = CpuPagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)
    got = run_backend(backend, query, key_cache, value_cache, meta)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("limit", [0, 10**9], ids=["prefill_chunks_through_sdpa", "all_rows_through_the_kernel"])
def test_prefill_chunks_through_the_kernel_or_sdpa_match_the_reference(kernels, limit, monkeypatch):
    """A prefill chunk up to KERNEL_MAX_PAIRS (query, key) pairs is one kernel row per token, each with its own
    causal length; a longer one runs through SDPA. Decode rows take the kernel either way."""
    from workers.attention import cpu_paged

    monkeypatch.setattr(cpu_paged, "KERNEL_MAX_PAIRS", limit)
    cases = [c for c in CASES if c.dtype == "float32" and any(q > 1 for q in c.query_lens)]
    assert cases
    for case in cases:
        query, key_cache, value_cache, meta = make_batch(case)
        backend = CpuPagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)
        meta.plan = backend.plan(meta)
        chunks = sum(q > 1 for q in case.query_lens)
        assert len(meta.plan.prefills) == (chunks if limit == 0 else 0)
        kernel_rows = 0 if meta.plan.rows is None else len(meta.plan.rows)
        assert kernel_rows == sum(q for q in case.query_lens if q == 1 or limit > 0)
        got = backend.forward(query, key_cache, value_cache, meta)
        torch.testing.assert_close(got, reference_output(case, query, key_cache, value_cache, meta), atol=1e-5,
                                   rtol=1e-5)


def test_cpu_backend_runs_other_dtypes_through_the_reference(kernels):
    case = next(c for c in CASES if c.dtype == "float16")
    query, key_cache, value_cache, meta = make_batch(case, dtype=torch.bfloat16)
    backend = CpuPagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)
    got = run_backend(backend, query, key_cache, value_cache, meta)
    torch.testing.assert_close(got.float(), reference_output(case, query, key_cache, value_cache, meta),
                               atol=3e-2, rtol=3e-2)


def test_without_the_kernels_the_torch_formulations_run_and_the_log_says_why(monkeypatch, caplog):
    """Turned off, or a failed build: load() is None, the warning names the reason (a compiler's first error
    line), and the CPU default attention backend is the torch reference."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("PREFIX_SERVE_CPU_KERNELS", "0")
    with caplog.at_level("WARNING", logger="prefix_serve.cpu_kernels"):
        assert cpu_kernels.load() is None
    assert cpu_kernels.failure() == "turned off by PREFIX_SERVE_CPU_KERNELS=0"
    assert "the torch formulations run (slower): turned off by PREFIX_SERVE_CPU_KERNELS=0" in caplog.text
    assert default_backend_name("cpu") == "torch"

    def broken_build():
        raise RuntimeError("ninja: build stopped\ncpu_kernels.cpp:12:3: error: 'foo' was not declared\nmore")

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.delenv("PREFIX_SERVE_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "_build", broken_build)
    caplog.clear()
    with caplog.at_level("WARNING", logger="prefix_serve.cpu_kernels"):
        assert cpu_kernels.load() is None
    assert cpu_kernels.failure() == "RuntimeError: cpu_kernels.cpp:12:3: error: 'foo' was not declared"
    assert "error: 'foo' was not declared" in caplog.text


def test_decode_kernel_rejects_bad_lengths_instead_of_reading_past_the_table(kernels):
    case = CASES[2]  # decode only
    query, key_cache, value_cache, meta = make_batch(case)
    rows = torch.arange(len(case.seq_lens), dtype=torch.long)
    lens = meta.seq_lens.clone()
    lens[0] = meta.block_tables.shape[1] * case.block_size + 1  # one key past the table's last block
    with pytest.raises(RuntimeError, match="bad sequence length"):
        kernels.decode_attention(torch.empty_like(query), query, key_cache, value_cache, meta.block_tables, lens,
                                 rows, rows, 0.1)
    with pytest.raises(RuntimeError, match="table row out of range"):
        kernels.decode_attention(torch.empty_like(query), query, key_cache, value_cache, meta.block_tables,
                                 meta.seq_lens, rows, rows + 1, 0.1)


@pytest.mark.parametrize("shape", [(9, 3, 64, 576), (4, 1, 16, 40), (6, 2, 24, 96)])
def test_cpp_ops_match_the_torch_formulas(kernels, shape):
    heads, kv_heads, head_dim, hidden = shape
    assert check_ops(CppOps, torch.device("cpu"), torch.float32, hidden, heads, kv_heads, head_dim) is None


def test_cpp_ops_on_strided_rows_and_many_rows(kernels):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(300, 1000, generator=gen)
    x, weight = wide[:, :576], torch.randn(576, generator=gen)  # rows 1,000 apart
    residual = torch.randn(300, 576, generator=gen)
    for res in (None, residual):
        want, got = TorchOps.add_rmsnorm(x, res, weight, 1e-5), CppOps.add_rmsnorm(x, res, weight, 1e-5)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    gate_up = torch.randn(300, 2 * 1536, generator=gen)
    torch.testing.assert_close(CppOps.silu_mul(gate_up), TorchOps.silu_mul(gate_up), atol=1e-6, rtol=1e-5)
    # rotary on q and k as strided views of one projection, k and v written to shuffled slots
    n, heads, kv_heads, dim = 300, 9, 3, 64
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=gen)
    q = qkv[:, :heads * dim].view(n, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(n, kv_heads, dim)
    cos, sin = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    slots = torch.randperm(40 * 16, generator=gen)[:n]
    caches = [torch.zeros(40, 16, kv_heads, dim) for _ in range(4)]
    want_q = TorchOps.rope_write(q.clone(), k.clone(), v, cos, sin, caches[0], caches[1], slots)
    got_q = CppOps.rope_write(q.clone(), k, v, cos, sin, caches[2], caches[3], slots)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[2], caches[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[3], caches[1], atol=0, rtol=0)


def test_rope_write_rejects_a_slot_outside_the_cache(kernels):
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    cos, sin = torch.randn(2, 8), torch.randn(2, 8)
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.rope_write(q, k, v, cos, sin, cache, cache.clone(), torch.tensor([0, 8]))


def argmax_cases() -> list[torch.Tensor]:
    """Logits rows for the argmax kernel: random, full of ties, with NaNs, all -inf, rows shorter and longer than
    a vector (and not a multiple of it), and a strided view."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for rows, vocab in ((64, 49152), (1, 1), (3, 17), (5, 100), (2, 33), (7, 8)):
        x = torch.randn(rows, vocab, generator=generator)
        ties = torch.randint(0, 3, (rows, vocab), generator=generator).float()
        nan = x.clone()
        nan[0, vocab // 2] = nan[-1, -1] = float("nan")
        cases += [x, ties, nan, torch.full((rows, vocab), float("-inf"))]
    cases.append(torch.randn(8, 200, generator=generator)[:, 10:150])  # rows 200 apart
    return cases


def test_argmax_kernel_matches_torch_argmax_on_ties_nans_and_odd_widths(kernels):
    for x in argmax_cases():
        assert torch.equal(kernels.argmax_rows(x), x.argmax(-1)), x.shape


def test_greedy_tokens_take_the_kernel_on_cpu_and_torch_otherwise(kernels, monkeypatch):
    from workers import sampler

    x = torch.randn(4, 300)
    calls = []
    monkeypatch.setattr(sampler.cpu_kernels, "load", lambda: calls.append(1) or kernels)
    assert torch.equal(sampler.greedy_tokens(x), x.argmax(-1)) and calls == [1]
    for other in (x.double(), x.t(), x[0]):  # another dtype, a transposed view, one row: torch's argmax
        assert torch.equal(sampler.greedy_tokens(other), other.argmax(dim=-1))
    assert calls == [1]
    monkeypatch.setattr(sampler.cpu_kernels, "load", lambda: None)  # no kernels built
    assert torch.equal(sampler.greedy_tokens(x), x.argmax(-1))


_OTHER_WIDTH_SCRIPT = """
import json, torch
from test_attention_backends import CASES, make_batch, reference_output, run_backend
from workers import cpu_kernels
from workers.attention.cpu_paged import CpuPagedAttention
from workers.fused_decoder import check_ops
from workers.fused_ops import CppOps
from test_cpu_kernels import argmax_cases
module = cpu_kernels.load()
errors = {"module": module.__name__ if module else cpu_kernels.failure()}
for case in CASES:
    if case.dtype == "float32":
        batch = make_batch(case)
        backend = CpuPagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim ** -0.5)
        got, want = run_backend(backend, *batch), reference_output(case, *batch)
        errors[case.name] = (got - want).abs().max().item()
errors["ops"] = check_ops(CppOps, torch.device("cpu"), torch.float32, 96, 6, 2, 16)
errors["argmax"] = sum(not torch.equal(module.argmax_rows(x), x.argmax(-1)) for x in argmax_cases())
print(json.dumps(errors))
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernels_built_for_narrower_vectors_match_the_reference(capability):
    """The build this machine would not choose: AVX2 (hosts without AVX-512) and plain C++ (other CPUs), selected
    the way PyTorch selects its own kernels (ATEN_CPU_CAPABILITY), in a subprocess of their own."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability,
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    proc = subprocess.run([sys.executable, "-c", _OTHER_WIDTH_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors.pop("module") == f"prefix_serve_cpu_kernels_{capability}"
    assert errors.pop("ops") is None
    assert errors.pop("argmax") == 0
    assert errors and max(errors.values()) <= 1e-5, errors
