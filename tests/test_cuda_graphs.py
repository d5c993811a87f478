"""CUDA-graph decode: bucket choice, padding to the scratch block, eager fallback, and parity of the graph path.

On CPU the graph path runs with `mode="on"`, where a "graph" replays by re-running the captured function over
the same static buffers (everything but the capture itself), with the Triton kernel under its interpreter in a
subprocess. `-m gpu` captures real CUDA graphs and compares them with eager steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.cuda_graphs import (DEFAULT_BATCH_SIZES, CudaGraphConfig, DecodeGraphs, bucket_for, field_stride,
                                 pack_decode_step)

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def test_bucket_is_smallest_captured_size_that_holds_the_batch():
    assert [bucket_for(n, SIZES) for n in (1, 2, 3, 5, 8, 9, 200, 256, 257, 512)] == \
        [1, 2, 4, 8, 8, 16, 256, 256, 512, 512]


def test_batch_larger_than_every_captured_size_has_no_bucket():
    assert bucket_for(513, SIZES) is None
    assert bucket_for(3, (1, 2)) is None


def test_fields_start_64_byte_aligned():
    assert [field_stride(b) for b in (1, 2, 16, 32, 512)] == [16, 16, 16, 32, 512]


def test_padding_rows_write_and_read_only_the_scratch_slot():
    # two real sequences in a bucket of 4; block size 4, scratch block 20, tables padded to width 3
    flat = pack_decode_step(input_ids=[11, 12], positions=[5, 9], slot_mapping=[21, 38], seq_lens=[6, 10],
                            block_tables=[[3, 5], [7, 8, 9]], bucket=4, width=3, scratch_block=20, block_size=4)
    stride = 16
    fields = [flat[i * stride:(i + 1) * stride] for i in range(4)]
    assert fields[0][:4] == [11, 12, 0, 0]  # input ids: padding rows feed token 0
    assert fields[1][:4] == [5, 9, 0, 0]  # positions
    assert fields[2][:4] == [21, 38, 80, 80]  # slots: padding rows write slot 20 * 4 + 0, the scratch block's first
    assert fields[3][:4] == [6, 10, 1, 1]  # seq_lens: padding rows see one key, their own
    assert set(fields[2][2:]) == {80}  # rows past the bucket, up to the aligned stride, also point at scratch
    tables = flat[4 * stride:]
    assert tables == [3, 5, 0, 7, 8, 9, 20, 0, 0, 20, 0, 0]  # [4, 3]: padding rows' only block is scratch


def test_auto_mode_uses_graphs_on_cuda_devices_only():
    assert CudaGraphConfig("auto", None, 1024).enabled_for(torch.device("cuda"))
    assert not CudaGraphConfig("auto", None, 1024).enabled_for(torch.device("cpu"))
    assert CudaGraphConfig("on", None, 1024).enabled_for(torch.device("cpu"))
    assert not CudaGraphConfig("off", None, 1024).enabled_for(torch.device("cuda"))


class _FakeBackend:
    """Decode-graph capable backend stub: variant by context length, plans nothing."""

    def decode_variant(self, max_seq_len):
        return max_seq_len > 512

    def static_decode_plan(self, seq_index, long_context):
        return None


def _graphs(forward, sizes=(1, 2, 4, 8), width=4, memory_cap_mb=1024):
    return DecodeGraphs(CudaGraphConfig(mode="on", batch_sizes=sizes, memory_cap_mb=memory_cap_mb), forward,
                        _FakeBackend(), torch.device("cpu"), block_size=4, scratch_block=99, max_blocks_per_seq=width)


def test_only_pure_decode_steps_that_fit_get_a_graph():
    graphs = _graphs(lambda *a: None)
    assert graphs.key_for([1, 1, 1], [5, 7, 600], [[0, 1], [2, 3], [4]]) == (4, True)
    assert graphs.key_for([1, 1], [5, 7], [[0, 1], [2, 3]]) == (2, False)
    assert graphs.key_for([1, 3], [5, 7], [[0, 1], [2, 3]]) is None  # a prefill chunk in the batch
    assert graphs.key_for([1] * 9, [5] * 9, [[0]] * 9) is None  # more rows than the largest size
    assert graphs.key_for([1], [5], [[0, 1, 2, 3, 4]]) is None  # a table wider than the static one


def test_replay_feeds_padded_static_inputs_and_returns_the_real_rows():
    seen = []

    def forward(input_ids, positions, meta):
        seen.append((input_ids.tolist(), positions.tolist(), meta.slot_mapping.tolist(), meta.seq_lens.tolist(),
                     meta.block_tables[:, :2].tolist(), meta.query_start_loc.tolist()))
        return torch.arange(input_ids.numel(), dtype=torch.float32)[:, None].repeat(1, 3)

    graphs = _graphs(forward)
    key = graphs.key_for([1, 1, 1], [6, 10, 3], [[3, 5], [7, 8, 9], [4]])
    logits = graphs.run(key, [11, 12, 13], [5, 9, 2], [21, 38, 18], [6, 10, 3], [[3, 5], [7, 8, 9], [4]])
    assert logits.tolist() == [[0.0] * 3, [1.0] * 3, [2.0] * 3]
    ids, pos, slots, lens, tables, starts = seen[-1]
    assert ids == [11, 12, 13, 0] and pos == [5, 9, 2, 0]
    assert slots == [21, 38, 18, 396] and lens == [6, 10, 3, 1]  # 396 = scratch block 99 * block size 4
    assert tables == [[3, 5], [7, 8], [4, 0], [99, 0]]
    assert starts == [0, 1, 2, 3, 4]
    assert graphs.stats.graph_steps == 1 and graphs.stats.captured == [(4, False)]


def test_capture_failure_runs_that_size_eagerly_forever_and_is_logged_once(caplog):
    calls = []

    def forward(input_ids, positions, meta):
        calls.append(input_ids.numel())
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = _graphs(forward)
    with caplog.at_level("WARNING", logger="prefix_serve.cuda_graphs"):
        for _ in range(3):
            key = graphs.key_for([1, 1], [5, 7], [[0], [1]])
            assert key is None or graphs.run(key, [1, 2], [4, 6], [0, 4], [5, 7], [[0], [1]]) is None
    assert calls == [2]  # one capture attempt, then eager without trying again
    assert list(graphs.stats.failed) == [(2, False)]
    assert len([r for r in caplog.records if "decode batch 2" in r.message]) == 1


def test_memory_cap_stops_new_captures():
    graphs = _graphs(lambda ids, pos, meta: torch.zeros(ids.numel(), 2), memory_cap_mb=0)
    key = graphs.key_for([1], [5], [[0]])
    assert graphs.run(key, [1], [4], [0], [5], [[0]]) is None
    assert "memory cap" in graphs.stats.failed[(1, False)]


def test_worker_keeps_a_scratch_block_outside_the_engines_blocks(tiny_zoo):
    from engine import LLM

    llm = LLM(model=str(tiny_zoo("llama")["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=20)
    worker = llm.engine.executor.worker
    assert llm.engine.block_manager.num_blocks == 20 == worker.kv_cache.num_blocks
    assert worker.kv_cache.data.shape[2] == 21
    assert worker.runner.graphs is None  # CPU, mode auto: eager
    assert worker.runner.fused is not None  # CPU, mode auto: fused with the C++ kernels


def test_graph_and_fused_settings_reach_the_model_runner(tiny_zoo):
    """The EngineConfig fields, not the environment, decide: here graphs and fused layers on a CPU."""
    from engine import LLM

    llm = LLM(str(tiny_zoo("llama")["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=20,
              attention_backend="triton", cuda_graphs="on", cuda_graph_sizes=[8, 1, 4, 4], cuda_graph_memory_mb=256,
              fused_layers="on")
    runner = llm.engine.executor.worker.runner
    assert runner.graphs.config == CudaGraphConfig(mode="on", batch_sizes=(1, 4, 8), memory_cap_mb=256.0)
    assert runner.graphs.sizes == (1, 4, 8)
    assert runner.fused is not None
    default = LLM(str(tiny_zoo("llama")["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=20,
                  attention_backend="triton", cuda_graphs="on")
    assert default.engine.executor.worker.runner.graphs.sizes == DEFAULT_BATCH_SIZES


_EMULATED_GRAPH_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import torch
from engine import LLM, SamplingParams
from tiny_models import peft_forward_greedy
zoo = json.loads(sys.argv[2])
prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [30, 31],
           [40, 41, 42, 43, 44, 45, 46, 47, 48], [50, 51, 52]]
prefixes = ["p5", "p8proj", None, "p16", "p5"]
max_tokens = [3, 5, 7, 9, 12]  # the batch shrinks 5 -> 1, so buckets 8, 4, 2 and 1 all run
expected = [peft_forward_greedy(zoo["model"], zoo["adapters"][p] if p else None, pr, m)
            for pr, p, m in zip(prompts, prefixes, max_tokens)]
llm = LLM(model=zoo["model"], skip_tokenizer_init=True, block_size=4, attention_backend="triton",
          decode_steps=int(sys.argv[3]), cuda_graphs="on", fused_layers=sys.argv[4])
for name, path in zoo["adapters"].items():
    llm.load_prefix(name, path)
worker = llm.engine.executor.worker
cache = worker.kv_cache.data
scratch = worker.kv_cache.num_blocks
params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, prefix=prefixes, use_tqdm=False)
stats = worker.runner.graph_stats
print(json.dumps({"got": [o.outputs[0].token_ids for o in outs], "expected": expected,
                  "captured": [list(k) for k in stats.captured], "graph_steps": stats.graph_steps,
                  "eager_steps": stats.eager_steps, "failed": len(stats.failed),
                  "decode_run_steps": llm.engine.stats.decode_run_steps,
                  "fused_ops": getattr(worker.runner.fused, "ops", None) and worker.runner.fused.ops.name,
                  "scratch_written": bool(cache[:, :, scratch].abs().sum() > 0)}))
"""


def _emulated_graph_run(entry, decode_steps: int, fused: str = "off") -> dict:
    zoo = {"model": str(entry["model"]), "adapters": {k: str(v) for k, v in entry["adapters"].items()}}
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # Triton's CPU interpreter, for the attention kernel
    proc = subprocess.run([sys.executable, "-c", _EMULATED_GRAPH_CHILD, str(REPO_ROOT), json.dumps(zoo),
                           str(decode_steps), fused], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_decode_path_matches_peft_forward_with_mixed_prefixes(tiny_zoo, arch):
    result = _emulated_graph_run(tiny_zoo(arch), decode_steps=1)
    assert result["got"] == result["expected"]
    assert [k[0] for k in result["captured"]] == [8, 4, 2, 1]
    assert result["graph_steps"] >= 10 and result["failed"] == 0
    assert result["scratch_written"]  # padding rows went to the scratch block
    assert result["decode_run_steps"] == 0 and result["fused_ops"] is None


def test_graph_decode_runs_feed_tokens_on_the_device_and_match_peft_forward(tiny_zoo):
    """Decode runs through the graph path: each replay's input ids are the previous replay's argmax. With the
    fused layers' Triton kernels, as on a GPU."""
    result = _emulated_graph_run(tiny_zoo("llama"), decode_steps=4, fused="on")
    assert result["fused_ops"] == "triton"
    assert result["got"] == result["expected"]
    assert result["decode_run_steps"] >= 4 and result["graph_steps"] >= 10 and result["failed"] == 0


@pytest.mark.gpu
def test_captured_cuda_graph_decode_equals_eager_decode(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tiny_models import make_tiny_model

    from engine.model_spec import ModelSpec
    from workers.kv_cache import KVCache
    from workers.model_runner import ModelRunner, StepInputs, load_model

    model_dir = make_tiny_model("llama", tmp_path / "llama")
    model = load_model(str(model_dir), torch.float32, "cuda")
    spec = ModelSpec.from_config(model.config)
    kv = KVCache(spec, 65, 4, torch.float32, "cuda")
    kv.data.normal_()
    runner = ModelRunner(model, spec, kv, "triton", scratch_block=64, fused_layers="auto",
                         cuda_graphs=CudaGraphConfig(mode="on", batch_sizes=(1, 4, 8), memory_cap_mb=1024))
    assert runner.graph_stats.failed == {}
    seq_lens = [9, 30, 17]
    tables = [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    slots = [tables[s][(n - 1) // 4] * 4 + (n - 1) % 4 for s, n in enumerate(seq_lens)]
    step = StepInputs([5, 6, 7], [n - 1 for n in seq_lens], slots, [1, 1, 1], seq_lens, tables, [0, 1, 2])
    graph_logits = runner.execute(step)
    assert runner.graph_stats.graph_steps == 1
    with torch.inference_mode():
        eager_logits = runner._execute_eager(step)
    torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_ring_refills_a_buffer_only_after_its_copy_ran():
    """More copies than buffers while the stream is held up: each destination must get its own values, which
    fails if a buffer is refilled before the queued copy that reads it has run."""
    from workers.cuda_graphs import PinnedRing

    ring = PinnedRing(1024, slots=2)
    dests = [torch.zeros(1024, dtype=torch.int32, device="cuda") for _ in range(6)]
    torch.cuda._sleep(50_000_000)  # keeps the stream busy for tens of milliseconds
    for i, dest in enumerate(dests):
        ring.copy_to(dest, torch.full((1000,), i, dtype=torch.int32))
    torch.cuda.synchronize()
    for i, dest in enumerate(dests):
        assert dest[:1000].eq(i).all() and dest[1000:].eq(0).all(), f"copy {i} was overwritten"
