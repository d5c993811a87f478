"""GPU throughput, part (2) of `benchmarks/gpu_check.sh`: prefix-serve against PEFT and transformers, and the roofline.

    PYTHONPATH=. python -m benchmarks.gpu_bench setup   --dir DIR              # model + 256 prefixes
    PYTHONPATH=. python -m benchmarks.gpu_bench ours    --dir DIR --out J      # + copy bandwidth, step timing
    PYTHONPATH=. python -m benchmarks.gpu_bench peft    --dir DIR --out J
    PYTHONPATH=. python -m benchmarks.gpu_bench cb      --dir DIR --out J
    PYTHONPATH=. python -m benchmarks.gpu_bench scale   --dir DIR --out J      # 10,000 registered prefixes
    PYTHONPATH=. python -m benchmarks.gpu_bench summary --results RESULTS_DIR    # the table (no torch needed)

Model: a random-weight Llama, hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary 32000,
bf16: 1.10 B parameters, the issue's "about 1.1B" (DESIGN's 2.2 GB of weights). Workload (ours): 1,024
requests over 256 PEFT prefixes of P=32 virtual tokens (random adapters in PEFT's format), prompts of 128
tokens, 128 new tokens each (ignore_eos), greedy. The warm-up runs the same workload once on other prompts: it
loads every prefix and compiles every kernel variant, so the timed run is steady-state serving with the prefixes
resident (the warm-up's rate and load times are reported).
`ours --decode-steps K` sets the engine's decode runs (default: the engine's, 16 on CUDA); `ours` also profiles
one decode step's kernels (device time by kernel, grouped into GEMMs, attention and the rest).

Baselines, each in its own process on the same GPU:
- PEFT: PeftModel.generate with one prefix at batch 256, 128 prompt / 128 new tokens (with transformers 5.17,
  the GPU image's version, generate applies the prefix; see DESIGN section 1).
- transformers' continuous batching: `model.generate_batch` over --cb-requests prompts, no prefix. Its rate is
  taken from its own request timestamps (first request created -> last finished), so its warm-up and CUDA-graph
  capture are not counted against it; the whole call's rate is reported too.

Scale (issue 18): 10,000 prefixes registered (`--scale-prefixes`; directories of hard links to the 256 prefixes'
files, so each is its own prefix with its own KV blocks, at no extra disk), the workload's requests all on one
prefix, then spread uniformly, then by Zipf(1.0), alternating for `--scale-rounds` rounds in one engine, every
resident prefix evicted from the device before each run. The KV cache holds the full batch's own blocks plus room
for one prefix per running sequence, so the roughly 970 distinct prefixes of a uniform run never fit at once and
are evicted and loaded again (from the host prefix tier where it still holds them). Reported: each layout's rate
against the one-prefix run's, and the p99 of the time a request waits for its prefix.

Roofline: the measured device-to-device copy bandwidth (bytes read + written per second), and the decode rate it
allows: batch / ((weight bytes + batch x average context x KV bytes per token) / bandwidth), at batch = the
number of running sequences (max_num_seqs) and the workload's average decode context (P + prompt + new / 2).
Weight bytes count every parameter once, less the input embedding when untied (a decode step reads only B rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.gpu_parity import failure_reason
from engine.config import EngineConfig


@dataclass(frozen=True)
class Workload:
    num_prefixes: int = 256
    num_virtual_tokens: int = 32
    prompt: int = 128
    new: int = 128
    requests: int = 1024
    model: dict = field(default_factory=lambda: dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False))

    @property
    def avg_decode_context(self) -> float:
        return self.num_virtual_tokens + self.prompt + self.new / 2


FULL = Workload()
# --small: the same code paths in seconds on a CPU, to check the script itself
SMALL = Workload(num_prefixes=8, prompt=16, new=8, requests=24, model=dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False))


class Results:
    """A JSON file rewritten after every result, so a part killed by its time limit keeps what it finished."""

    def __init__(self, path: str | None, **header):
        self.path = path
        self.data = dict(header)
        self.flush()

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1, default=str))


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _paths(root: str) -> tuple[Path, Path]:
    return Path(root) / "model", Path(root) / "prefixes"


def _prompts(work: Workload, count: int, seed: int) -> list[list[int]]:
    from benchmarks.common import random_prompts

    return random_prompts(count, work.prompt, work.prompt, work.model["vocab_size"], seed=seed)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


# ---- setup --------------------------------------------------------------------------------------------------------
def part_setup(args, work: Workload) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.common import write_random_prefix
    from engine.model_spec import ModelSpec

    results = Results(args.out, part="setup", workload=asdict(work))
    try:
        import peft
        import triton
        versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                    f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results.put("device", device_name)
    results.put("versions", versions)
    print(f"  {device_name} | {versions}", flush=True)
    model_dir, prefix_dir = _paths(args.dir)
    start = time.perf_counter()
    config = LlamaConfig(**{**work.model, **({"num_hidden_layers": args.num_layers} if args.num_layers else {})})
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        torch.manual_seed(0)
        with torch.device(args.device):  # random init on the device: seconds, not minutes
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _dtype(args.device)))
        results.put("parameters", sum(p.numel() for p in model.parameters()))
        model.save_pretrained(str(model_dir))
        del model
    results.put("model_seconds", round(time.perf_counter() - start, 1))
    print(f"  model: {results.data.get('parameters', 0) / 1e9:.3f} B parameters, "
          f"{results.data['model_seconds']} s", flush=True)
    start = time.perf_counter()
    spec = ModelSpec.from_config(config)
    for i in range(work.num_prefixes):
        out = prefix_dir / f"t{i:03d}"
        if not (out / "adapter_model.safetensors").is_file():
            write_random_prefix(out, spec, work.num_virtual_tokens, seed=i, model_name=str(model_dir))
    results.put("prefix_seconds", round(time.perf_counter() - start, 1))
    results.put("ok", True)
    print(f"  {work.num_prefixes} prefixes (P={work.num_virtual_tokens}) in {results.data['prefix_seconds']} s",
          flush=True)
    return 0


# ---- roofline pieces ----------------------------------------------------------------------------------------------
def _seconds_per_call(fn, iters: int, device: str) -> float:
    """Average seconds of fn(): CUDA events on a GPU, the clock (after a sync) elsewhere."""
    return (_time_device(fn, iters) if device.startswith("cuda") else _time_host(fn, device, iters)) / 1e3


def copy_bandwidth(num_bytes: int = 1 << 30, iters: int = 20, device: str = "cuda") -> float:
    """Device-to-device copy of a large tensor: bytes read + bytes written per second (the issue's roofline)."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _seconds_per_call(lambda: dst.copy_(src), iters, device)
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * num_bytes / seconds


def read_bandwidth(num_bytes: int = 1 << 30, iters: int = 20, device: str = "cuda") -> float:
    """Bytes read per second by a sum over a large bf16 tensor. A decode step mostly reads, so the roofline at this
    bandwidth is reported beside the copy roofline (the issue's), for information. On the H200 a sum read at
    4.10-4.13 TB/s against 4.24-4.27 TB/s copied, so this roofline came out a little lower, not stricter."""
    import torch

    data = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device=device)
    seconds = _seconds_per_call(lambda: data.sum(dtype=torch.float32), iters, device)
    del data
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return num_bytes / seconds


def weight_bytes_read_per_step(runner) -> int:
    model = runner.model
    total = runner.weight_bytes  # tied weights counted once; counted before CPU linears are packed
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    # an untied output layer's weight may be gone, replaced by its packed copy (workers/model_runner.py)
    if output is None or output.weight is None or output.weight.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()  # a decode step gathers only B rows of the input embedding
    return total


def roofline_tok_s(bandwidth: float, weight_bytes: int, kv_bytes_per_token: int, batch: int,
                   avg_context: float) -> float:
    step_bytes = weight_bytes + batch * avg_context * kv_bytes_per_token
    return batch / (step_bytes / bandwidth)


# ---- ours ---------------------------------------------------------------------------------------------------------
def _synthetic_decode(runner, num_blocks: int, batch: int, context: int):
    """A decode step of `batch` sequences with `context` tokens each, on blocks at the top of the cache (which the
    finished run never reached), so it overwrites nothing that is still cached."""
    from workers.model_runner import StepInputs

    block_size = runner.kv_cache.block_size
    per_seq = math.ceil(context / block_size)
    first = num_blocks - batch * per_seq
    if first < 0:
        raise RuntimeError("the cache is too small for the synthetic step")
    tables = [[first + i * per_seq + j for j in range(per_seq)] for i in range(batch)]
    last = context - 1
    slots = [t[last // block_size] * block_size + last % block_size for t in tables]
    return StepInputs([1] * batch, [last] * batch, slots, [1] * batch, [context] * batch, tables,
                      list(range(batch)))


def _time_host(fn, device: str, iters: int = 20) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters * 1e3


def _time_device(fn, iters: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def step_timing(runner, num_blocks: int, batch: int, context: int, device: str) -> dict:
    """One decode step at (batch, context): graph replay alone (device time), the runner's whole execute (host +
    device, synchronized), and the eager forward."""
    import torch

    step = _synthetic_decode(runner, num_blocks, batch, context)
    out = {"batch": batch, "context": context}
    with torch.inference_mode():
        out["execute_ms"] = round(_time_host(lambda: runner.execute(step), device), 3)
        graphs = runner.graphs
        if graphs is not None and device.startswith("cuda"):
            from workers.cuda_graphs import bucket_for

            graph = graphs.graphs.get((bucket_for(batch, graphs.sizes), runner.backend.decode_variant(context)))
            if graph is not None:
                runner.execute(step)  # the graph's static inputs now hold this step
                out["graph_replay_ms"] = round(_time_device(graph.replay), 3)
        out["eager_ms"] = round(_time_host(lambda: runner._execute_eager(step), device), 3)
    return out


def _engine_info(llm, start: float) -> dict:
    import torch

    engine = llm.engine
    worker = engine.executor.worker
    spec = engine.spec
    stats = worker.runner.graph_stats
    kv = worker.kv_cache.data
    info = {"init_seconds": round(time.perf_counter() - start, 1), "attention_backend": engine.attention_backend,
            "num_blocks": worker.kv_cache.num_blocks, "kv_cache_gb": round(kv.numel() * kv.element_size() / 1e9, 1),
            "weight_bytes": weight_bytes_read_per_step(worker.runner),
            "kv_bytes_per_token": spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * kv.element_size(),
            "fused_layers": worker.runner.fused.ops.name if worker.runner.fused is not None else None}
    if kv.is_cuda:
        info["gpu_total_gb"] = round(torch.cuda.mem_get_info()[1] / 1e9, 1)
    if stats is not None:
        info.update(graphs_captured=len(stats.captured), graph_capture_seconds=round(stats.capture_seconds, 2),
                    graph_memory_mb=round(stats.graph_memory_bytes / 2**20),
                    graph_failures={str(k): v[:300] for k, v in stats.failed.items()})
    return info


def part_ours(args, work: Workload) -> int:
    from engine import LLM, SamplingParams

    device = args.device
    results = Results(args.out, part="ours", workload=asdict(work), max_num_seqs=args.max_num_seqs,
                      requests=work.requests, max_num_batched_tokens=args.max_num_batched_tokens)
    model_dir, prefix_dir = _paths(args.dir)
    if device.startswith("cuda"):
        try:
            bandwidth = copy_bandwidth()
            results.put("copy_bandwidth", bandwidth)
            print(f"  copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL copy bandwidth: {failure_reason(exc)}")
            results.put("copy_bandwidth_error", failure_reason(exc))
        try:
            results.put("read_bandwidth", read_bandwidth())
        except Exception as exc:  # noqa: BLE001 - informational only
            print(f"read bandwidth not measured: {failure_reason(exc)}")

    start = time.perf_counter()
    llm = LLM(model=str(model_dir), device=device, dtype=_dtype(device), skip_tokenizer_init=True, block_size=16,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=None if device.startswith("cuda") else 4096, decode_steps=args.decode_steps,
              fused_layers=args.fused_layers, async_scheduling=args.async_scheduling)
    results.put("decode_steps", llm.engine.scheduler.config.decode_steps)
    results.put("async_scheduling", args.async_scheduling)
    results.put("engine", _engine_info(llm, start))
    print(f"  engine up: {results.data['engine']}", flush=True)
    engine = llm.engine
    runner = engine.executor.worker.runner
    stats = runner.graph_stats

    names = engine.register_prefix_dir(str(prefix_dir))
    params = SamplingParams(max_tokens=work.new, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(work, work.requests, seed=0)]
    # The warm-up is the whole workload once, on other prompts: it loads every prefix, and every kernel variant
    # and tile shape the timed run uses is compiled and cached, and the GPU's clocks are up. Its rate is reported.
    start = time.perf_counter()
    warm = [{"prompt_token_ids": p} for p in _prompts(work, work.requests, seed=1)]
    warm_outs = llm.generate(warm, params, prefix=[names[i % len(names)] for i in range(len(warm))],
                             use_tqdm=False)
    _sync(device)
    warm_seconds = time.perf_counter() - start
    warm_tokens = sum(len(o.outputs[0].token_ids) for o in warm_outs)
    results.put("warmup", {"seconds": round(warm_seconds, 2), "tok_s": round(warm_tokens / warm_seconds),
                           "prefix_loads": engine.stats.prefix_loads,
                           "prefix_load_seconds_total": round(sum(engine.stats.prefix_load_seconds), 3)})
    print(f"  warm-up: {results.data['warmup']}", flush=True)

    timers = {"worker": 0.0, "runner": 0.0}
    calls = {"worker": 0, "runner": 0}
    # the engine's wait for the worker: execute, or with async scheduling collect (submit returns at once)
    wait_name = "collect" if args.async_scheduling else "execute"
    executor_execute, runner_execute = getattr(engine.executor, wait_name), runner.execute

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            timers[name] += time.perf_counter() - t
            calls[name] += 1
            return out
        return wrapper

    setattr(engine.executor, wait_name, timed(executor_execute, "worker"))
    runner.execute = timed(runner_execute, "runner")
    # engine steps that only decode (every sequence brings its one newest token) against the rest (prefill)
    phases = {"decode_s": 0.0, "decode_tokens": 0, "decode_steps": 0, "decode_forwards": 0}
    schedule, engine_step, scheduled = engine.scheduler.schedule, engine.step, []

    def schedule_recorded():
        out = schedule()
        scheduled.append(out)
        return out

    def step_timed():
        t = time.perf_counter()
        result = engine_step()
        out = scheduled.pop() if scheduled else None
        if out is not None and out.scheduled and all(i.num_tokens == 1 and not i.is_new for i in out.scheduled):
            phases["decode_s"] += time.perf_counter() - t
            phases["decode_tokens"] += sum(item.num_steps for item in out.scheduled)
            phases["decode_steps"] += 1
            phases["decode_forwards"] += out.num_steps
        return result

    engine.scheduler.schedule, engine.step = schedule_recorded, step_timed
    steps0 = engine.stats.steps
    graph0 = (stats.graph_steps, stats.eager_steps) if stats else (0, 0)
    assignment = [names[i % len(names)] for i in range(len(prompts))]
    _sync(device)
    start = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, prefix=assignment, use_tqdm=False)
        _sync(device)
    finally:
        setattr(engine.executor, wait_name, executor_execute)
        runner.execute = runner_execute
        engine.scheduler.schedule, engine.step = schedule, engine_step
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps, forwards = engine.stats.steps - steps0, calls["runner"]
    run = {"seconds": round(seconds, 3), "tokens": tokens, "tok_s": tokens / seconds, "steps": steps,
           "forwards": forwards, "ms_per_step": round(seconds / steps * 1e3, 3),
           "ms_per_forward": round(seconds / forwards * 1e3, 3), "prefixes_used": len(set(assignment)),
           "tokens_per_step": round(tokens / steps, 1), "tokens_per_forward": round(tokens / forwards, 1),
           "worker_share": round(timers["worker"] / seconds, 3), "runner_share": round(timers["runner"] / seconds, 3),
           "decode_steps": engine.scheduler.config.decode_steps,
           "decode_phase": {"share_of_wall_time": round(phases["decode_s"] / seconds, 3),
                            "engine_steps": phases["decode_steps"], "forwards": phases["decode_forwards"],
                            "ms_per_forward": (round(phases["decode_s"] / phases["decode_forwards"] * 1e3, 3)
                                               if phases["decode_forwards"] else None),
                            "rows_per_forward": (round(phases["decode_tokens"] / phases["decode_forwards"], 1)
                                                 if phases["decode_forwards"] else None),
                            "tok_s": phases["decode_tokens"] / phases["decode_s"] if phases["decode_s"] else None}}
    if stats:
        run.update(graph_steps=stats.graph_steps - graph0[0], eager_steps=stats.eager_steps - graph0[1],
                   graphs_captured=len(stats.captured), graph_failures=len(stats.failed))
    results.put("run", run)
    print(f"  ours: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tok/s; {run}", flush=True)
    if tokens != work.requests * work.new:
        print(f"FAIL ours: expected {work.requests * work.new} tokens, got {tokens}")

    for batch in sorted({args.max_num_seqs, 64}, reverse=True):
        try:
            timing = step_timing(runner, engine.executor.worker.kv_cache.num_blocks, batch,
                                 int(work.avg_decode_context), device)
            results.put(f"step_b{batch}", timing)
            print(f"  decode step timing: {timing}", flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            print(f"FAIL step timing at batch {batch}: {failure_reason(exc)}")
            results.put(f"step_b{batch}", f"FAIL: {failure_reason(exc)}")
    if args.profile:
        try:
            profile = kernel_profile(runner, engine.executor.worker.kv_cache.num_blocks, args.max_num_seqs,
                                     int(work.avg_decode_context), device)
            results.put("kernel_profile", profile)
            print(f"  kernels of one eager decode step at B={args.max_num_seqs}: {profile['kernels_per_step']:.0f}"
                  f" kernels, {profile['device_ms']:.3f} ms of device time; by class {profile['by_class']}")
            for name, ms, count in profile["top"]:
                print(f"    {ms:8.3f} ms {count:6.1f}x  {name[:110]}")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            print(f"FAIL kernel profile: {failure_reason(exc)}")
    results.put("ok", True)
    return 0


def part_scale(args, work: Workload) -> int:
    import random

    from benchmarks.common import percentile_ms, prefix_assignment
    from engine import LLM, SamplingParams

    device = args.device
    model_dir, prefix_dir = _paths(args.dir)
    count = args.scale_prefixes
    block_size = 16
    blocks_per_seq = -(-(work.prompt + work.new) // block_size)
    prefix_blocks = -(-work.num_virtual_tokens // block_size)
    batch = min(args.max_num_seqs, work.requests)
    kv_blocks = batch * (blocks_per_seq + prefix_blocks)  # the batch's own blocks + one prefix per sequence
    results = Results(args.out, part="scale", workload=asdict(work), registered=count, kv_blocks=kv_blocks,
                      max_num_seqs=args.max_num_seqs, rounds=args.scale_rounds)
    sources = sorted(p for p in prefix_dir.iterdir() if (p / "adapter_config.json").is_file())
    root = Path(args.dir) / f"scale{count}"
    start = time.perf_counter()
    for i in range(count):  # hard links: 10,000 registrations of the 256 prefixes' files, no extra disk
        out = root / f"s{i:05d}"
        out.mkdir(parents=True, exist_ok=True)
        for f in sources[i % len(sources)].iterdir():
            if not (out / f.name).exists():
                os.link(f, out / f.name)
    results.put("link_seconds", round(time.perf_counter() - start, 1))

    start = time.perf_counter()
    llm = LLM(model=str(model_dir), device=device, dtype=_dtype(device), skip_tokenizer_init=True,
              block_size=block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=kv_blocks)
    results.put("engine", _engine_info(llm, start))
    engine = llm.engine
    start = time.perf_counter()
    names = engine.register_prefix_dir(str(root))
    results.put("register_seconds", round(time.perf_counter() - start, 2))
    print(f"  {len(names)} prefixes registered in {results.data['register_seconds']} s; {kv_blocks} KV blocks "
          f"({batch} sequences x ({blocks_per_seq} + {prefix_blocks}))", flush=True)
    rng = random.Random(7)
    layouts = {layout: prefix_assignment(names, work.requests, layout, rng) for layout in ("one", "uniform", "zipf")}
    params = SamplingParams(max_tokens=work.new, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(work, work.requests, seed=0)]
    start = time.perf_counter()  # the warm-up compiles every kernel variant and shape the runs use
    warm = [{"prompt_token_ids": p} for p in _prompts(work, work.requests, seed=1)]
    llm.generate(warm, params, prefix=layouts["one"], use_tqdm=False)
    _sync(device)
    results.put("warmup_seconds", round(time.perf_counter() - start, 1))
    runs: dict[str, list[dict]] = {label: [] for label in layouts}
    for round_ in range(args.scale_rounds):
        for label, assignment in layouts.items():
            for key in engine.block_manager.resident_prefixes():
                engine.block_manager.evict_prefix(key)  # every run pays its loads (none is in use here)
            waits0, loads0 = len(engine.stats.prefix_wait_seconds), engine.stats.prefix_loads
            evictions0 = engine.block_manager.num_evictions
            _sync(device)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, prefix=assignment, use_tqdm=False)
            _sync(device)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            waits = sorted(engine.stats.prefix_wait_seconds[waits0:])
            run = {"tok_s": tokens / seconds, "seconds": round(seconds, 3), "tokens": tokens,
                   "prefixes_used": len(set(assignment)), "prefix_loads": engine.stats.prefix_loads - loads0,
                   "evictions": engine.block_manager.num_evictions - evictions0,
                   "wait_p50_ms": round(percentile_ms(waits, 0.5), 2),
                   "wait_p99_ms": round(percentile_ms(waits, 0.99), 2)}
            runs[label].append(run)
            results.put("runs", runs)
            print(f"  round {round_ + 1}, {label}: {run}", flush=True)
            if tokens != work.requests * work.new:
                print(f"FAIL scale {label}: expected {work.requests * work.new} tokens, got {tokens}")
    best = {label: max(r["tok_s"] for r in rs) for label, rs in runs.items()}
    results.put("best_tok_s", best)
    results.put("vs_one", {label: best[label] / best["one"] for label in ("uniform", "zipf")})
    results.put("ok", True)
    print(f"  best of {args.scale_rounds}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in best.items()), flush=True)
    return 0


def _kernel_class(name: str) -> str:
    lowered = name.lower()
    if "paged" in lowered or "attn" in lowered or "attention" in lowered:
        return "attention"
    if any(word in lowered for word in ("gemm", "cutlass", "xmma", "sm90", "cublas", "nvjet", "matmul")):
        return "gemm"
    if "memcpy" in lowered or "memset" in lowered:
        return "copies"
    return "other"


def kernel_profile(runner, num_blocks: int, batch: int, context: int, device: str, iters: int = 5) -> dict:
    """Device time of one eager decode step by kernel (torch.profiler, CUDA activity only). The CUDA graph
    replays the same kernels without the launch gaps, so this says where the device time of a step goes.
    On a CPU (--small) it lists operators' self CPU time instead, which checks the code, not a GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.startswith("cuda")
    step = _synthetic_decode(runner, num_blocks, batch, context)
    with torch.inference_mode():
        runner._execute_eager(step)
        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                runner._execute_eager(step)
            _sync(device)
    rows, by_class, kernels = [], {}, 0.0
    for event in prof.key_averages():
        if on_cuda:
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if not us:
            continue
        ms = us / 1e3 / iters
        rows.append((event.key, round(ms, 4), event.count / iters))
        kind = _kernel_class(event.key)
        by_class[kind] = round(by_class.get(kind, 0.0) + ms, 3)
        kernels += event.count / iters
    rows.sort(key=lambda r: -r[1])
    return {"batch": batch, "context": context, "device": device, "device_ms": round(sum(r[1] for r in rows), 3),
            "kernels_per_step": kernels, "by_class": by_class, "top": rows[:15]}


# ---- baselines ----------------------------------------------------------------------------------------------------
def _hf_model(model_dir: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, _dtype(device)),
                                                attn_implementation="sdpa").to(device).eval()


def part_peft(args, work: Workload) -> int:
    import torch
    from peft import PeftModel

    device = args.device
    results = Results(args.out, part="peft", batch=args.peft_batch, workload=asdict(work))
    model_dir, prefix_dir = _paths(args.dir)
    dtype = getattr(torch, _dtype(device))
    model = PeftModel.from_pretrained(_hf_model(model_dir, device), str(prefix_dir / "t000")).to(dtype).eval()
    ids = torch.tensor(_prompts(work, args.peft_batch, seed=1), device=device)
    mask = torch.ones_like(ids)

    def generate(n: int, new: int) -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids[:n], attention_mask=mask[:n], max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * n

    generate(args.peft_batch, 8)  # warm-up at the timed batch: cuBLAS and SDPA pick their kernels for its shapes
    _sync(device)
    start = time.perf_counter()
    tokens = generate(args.peft_batch, work.new)
    _sync(device)
    seconds = time.perf_counter() - start
    results.put("run", {"seconds": round(seconds, 3), "tokens": tokens, "tok_s": tokens / seconds})
    print(f"  PEFT batch {args.peft_batch}, one prefix: {tokens} tokens in {seconds:.2f} s = "
          f"{tokens / seconds:,.0f} tok/s", flush=True)
    results.put("ok", True)
    return 0


def part_cb(args, work: Workload) -> int:
    from transformers import GenerationConfig

    device = args.device
    results = Results(args.out, part="cb", requests=args.cb_requests, workload=asdict(work))
    model = _hf_model(_paths(args.dir)[0], device)
    config = GenerationConfig(max_new_tokens=work.new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompts = _prompts(work, args.cb_requests, seed=2)
    _sync(device)
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    _sync(device)
    seconds = time.perf_counter() - start
    outs = list(outs.values())
    tokens = sum(len(o.generated_tokens) for o in outs)
    run = {"seconds_whole_call": round(seconds, 3), "tokens": tokens, "finished": len(outs),
           "errors": sum(o.error is not None for o in outs), "tok_s_whole_call": tokens / seconds}
    try:  # its own timestamps: from the first request's creation (after its warm-up) to the last finish
        window = max(o.lifespan[1] for o in outs) - min(o.created_time for o in outs)
        if window > 0:
            run.update(seconds=round(window, 3), tok_s=tokens / window)
    except Exception as exc:  # noqa: BLE001 - output objects without timestamps: rate of the whole call
        run["timestamp_error"] = failure_reason(exc)
    run.setdefault("tok_s", tokens / seconds)
    results.put("run", run)
    print(f"  generate_batch: {run}", flush=True)
    if len(outs) != args.cb_requests or run["errors"]:
        print(f"FAIL generate_batch: {len(outs)} of {args.cb_requests} requests returned, {run['errors']} errors")
    results.put("ok", True)
    return 0


# ---- summary ------------------------------------------------------------------------------------------------------
def _load(results_dir: Path, name: str) -> dict:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001
        return {}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _parity_rows(results_dir: Path) -> list[tuple[str, str, str]]:
    rows = []
    kernels = _load(results_dir, "kernels").get("sections", {})
    if "error" in kernels:
        rows.append(("kernel parity", str(kernels.pop("error"))[:40], "FAIL"))
    by_backend: dict[str, list[str]] = {}
    for key, verdict in kernels.items():
        by_backend.setdefault(key.split(" | ")[0], []).append(str(verdict))
    for backend, verdicts in by_backend.items():
        ok = sum(v.startswith("ok") for v in verdicts)
        na = sum(v.startswith("n/a") for v in verdicts)
        if na == len(verdicts):
            rows.append((f"kernel parity: {backend}", "n/a (not supported here)", ""))
        else:
            rows.append((f"kernel parity: {backend}", f"{ok}/{len(verdicts) - na} ok",
                         "PASS" if ok == len(verdicts) - na else "FAIL"))
    if not by_backend and not rows:
        rows.append(("kernel parity", "no result", "FAIL"))
    engine = _load(results_dir, "engine").get("sections", {})
    for name, value in engine.items():
        if isinstance(value, dict):
            text = f"{value['exact']}/{value['total']} token-exact"
            note = "PASS" if value["exact"] == value["total"] and not value.get("warning") else "FAIL"
            if "graph_steps" in value:
                note += f" ({value['graph_steps']} graph / {value['eager_steps']} eager steps)"
            rows.append((f"engine parity: {name}", text, note))
        else:
            rows.append((f"engine parity: {name}", str(value)[:40], "FAIL"))
    if not engine:
        rows.append(("engine parity", "no result", "FAIL"))
    log = results_dir / "gputests.log"
    if log.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if any(word in line for word in (" passed", " failed", " error", "no tests ran"))]
        last = lines[-1].strip(" =") if lines else "no pytest summary line"
        ok = " passed" in last and " failed" not in last and " error" not in last
        rows.append(("pytest -m gpu", last.split(" in ")[0][:40], "PASS" if ok else "FAIL"))
    return rows


def _throughput_rows(results_dir: Path) -> list[tuple[str, str, str]]:
    rows = []
    ours = _load(results_dir, "ours")
    work = Workload(**ours["workload"]) if "workload" in ours else FULL
    run = ours.get("run", {})
    ours_tok_s = run.get("tok_s")
    if ours_tok_s:
        graphs = (f"{run['graph_steps']} graph / {run['eager_steps']} eager forwards" if "graph_steps" in run
                  else "no CUDA graphs")
        fused = ours.get("engine", {}).get("fused_layers")
        rows.append((f"ours: {work.requests} req over {work.num_prefixes} prefixes, B<={ours.get('max_num_seqs')}",
                     f"{ours_tok_s:,.0f} tok/s", f"decode runs <= {run.get('decode_steps', '?')}; fused layers: "
                     f"{fused or 'off'}; {graphs}"))
        warm = ours.get("warmup", {})
        if warm.get("tok_s"):
            rows.append(("ours, its warm-up pass (prefix loads, compiles)", f"{warm['tok_s']:,.0f} tok/s",
                         f"{warm.get('prefix_loads', '?')} prefix loads, {warm.get('seconds', '?')} s"))
    else:
        rows.append(("ours", "no result", "FAIL"))
    peft, cb = _load(results_dir, "peft"), _load(results_dir, "cb")
    for label, base, target in ((f"PEFT generate, 1 prefix, batch {peft.get('batch', 256)}", peft.get("run", {}), 10),
                                (f"transformers generate_batch, {cb.get('requests', 512)} req, no prefix",
                                 cb.get("run", {}), 5)):
        if not base.get("tok_s"):
            rows.append((label, "no result", "FAIL"))
            continue
        note = ""
        if ours_tok_s:
            ratio = ours_tok_s / base["tok_s"]
            note = f"ours {ratio:.1f}x (target >= {target}x) {_verdict(ratio >= target)}"
        rows.append((label, f"{base['tok_s']:,.0f} tok/s", note))
    info, bandwidth = ours.get("engine", {}), ours.get("copy_bandwidth")
    batch = min(ours.get("max_num_seqs") or 256, work.requests)
    roof = None
    if bandwidth and info.get("weight_bytes"):
        context = work.avg_decode_context
        roof = roofline_tok_s(bandwidth, info["weight_bytes"], info["kv_bytes_per_token"], batch, context)
        kv_gb = batch * context * info["kv_bytes_per_token"] / 1e9
        rows.append(("copy bandwidth (D2D, read + write)", f"{bandwidth / 1e12:.2f} TB/s", ""))
        rows.append((f"decode roofline, B={batch}, context {context:.0f}", f"{roof:,.0f} tok/s",
                     f"weights {info['weight_bytes'] / 1e9:.2f} GB + KV {kv_gb:.2f} GB per step"))
        if ours_tok_s:
            share = ours_tok_s / roof
            rows.append(("ours / roofline (whole run, prefill included)", f"{share:.1%}",
                         f"target >= 40% {_verdict(share >= 0.4)}"))
        decode = run.get("decode_phase") or {}
        if decode.get("tok_s"):
            share = decode["tok_s"] / roof
            rows.append(("pure decode steps of the timed run", f"{decode['tok_s']:,.0f} tok/s",
                         f"{share:.1%} of roofline, target >= 40% {_verdict(share >= 0.4)}; "
                         f"{decode['share_of_wall_time']:.0%} of wall time (the rest: steps with prefill)"))
    else:
        rows.append(("roofline", "no result", "FAIL"))
    decode, read = run.get("decode_phase") or {}, ours.get("read_bandwidth")
    if read and info.get("weight_bytes") and decode.get("tok_s"):  # informational: the roofline is above
        read_roof = roofline_tok_s(read, info["weight_bytes"], info["kv_bytes_per_token"], batch,
                                   work.avg_decode_context)
        rows.append(("read bandwidth (sum over 1 GiB)", f"{read / 1e12:.2f} TB/s", f"roofline at it {read_roof:,.0f} "
                     f"tok/s; the pure decode steps reach {decode['tok_s'] / read_roof:.1%}"))
    if decode.get("ms_per_forward"):
        rows.append(("forwards of the pure decode steps", f"{decode['ms_per_forward']:.3f} ms each",
                     f"{decode['forwards']} forwards in {decode['engine_steps']} engine steps, "
                     f"{decode['rows_per_forward']} rows per forward"))
    timing = ours.get(f"step_b{batch}")
    if isinstance(timing, dict):
        if timing.get("graph_replay_ms") and roof:
            rate = batch / (timing["graph_replay_ms"] / 1e3)
            rows.append((f"one decode step B={batch}: graph replay (device)", f"{timing['graph_replay_ms']:.3f} ms",
                         f"{rate:,.0f} tok/s = {rate / roof:.0%} of roofline"))
        rows.append((f"one decode step B={batch}: runner.execute", f"{timing['execute_ms']:.3f} ms",
                     f"eager forward {timing.get('eager_ms', float('nan')):.3f} ms"))
    if run.get("ms_per_forward"):
        rows.append(("wall time per forward in the timed run", f"{run['ms_per_forward']:.3f} ms",
                     f"{run.get('tokens_per_forward')} tok/forward; worker {run.get('worker_share', 0):.0%}, "
                     f"runner {run.get('runner_share', 0):.0%} of wall time"))
    plain = _load(results_dir, "ours_plain")
    for label, data in (("", ours), (" (HF layers)", plain)):
        profile = data.get("kernel_profile")
        if isinstance(profile, dict):
            classes = ", ".join(f"{k} {v:.2f}" for k, v in sorted(profile["by_class"].items(), key=lambda kv: -kv[1]))
            rows.append((f"kernels of one eager decode step{label}, B={profile['batch']}",
                         f"{profile['kernels_per_step']:.0f} kernels", f"{profile['device_ms']:.3f} ms: {classes} ms"))
    one = _load(results_dir, "ours1").get("run", {})
    if one.get("tok_s"):
        note = f"decode runs gain {ours_tok_s / one['tok_s']:.2f}x" if ours_tok_s else ""
        rows.append(("ours with decode_steps=1 (a forward per step)", f"{one['tok_s']:,.0f} tok/s", note))
    plain_run = plain.get("run", {})
    if plain_run.get("tok_s"):
        note = f"fused layers gain {one['tok_s'] / plain_run['tok_s']:.2f}x" if one.get("tok_s") else ""
        rows.append(("ours, decode_steps=1 and HF layers (earlier engine)", f"{plain_run['tok_s']:,.0f} tok/s",
                     note))
        step = plain.get(f"step_b{batch}")
        if isinstance(step, dict) and step.get("graph_replay_ms") and isinstance(timing, dict):
            rows.append((f"one decode step B={batch}, HF layers: graph replay", f"{step['graph_replay_ms']:.3f} ms",
                         f"fused: {timing.get('graph_replay_ms', float('nan')):.3f} ms"))
    shorter = _load(results_dir, "ours8").get("run", {})
    if shorter.get("tok_s"):
        note = f"the default of {run.get('decode_steps', '?')}: {ours_tok_s / shorter['tok_s']:.2f}x this" if (
            ours_tok_s) else ""
        rows.append(("ours with decode runs of up to 8", f"{shorter['tok_s']:,.0f} tok/s", note))
    overlapped = _load(results_dir, "ours_async").get("run", {})
    if overlapped.get("tok_s"):
        note = f"{overlapped['tok_s'] / ours_tok_s:.2f}x one step at a time" if ours_tok_s else ""
        rows.append(("ours with async scheduling", f"{overlapped['tok_s']:,.0f} tok/s", note))
    scale = _load(results_dir, "scale")
    if scale.get("best_tok_s"):
        base, runs = scale["best_tok_s"]["one"], scale.get("runs", {})
        requests = scale.get("workload", {}).get("requests", "?")
        rows.append((f"scale: {scale['registered']:,} registered, {requests} req on one prefix",
                     f"{base:,.0f} tok/s", f"{scale['kv_blocks']} KV blocks; best of {scale.get('rounds', '?')}"))
        for label in ("uniform", "zipf"):
            ratio = scale["best_tok_s"][label] / base
            worst = max(runs.get(label, [{}]), key=lambda r: r.get("wait_p99_ms", 0))
            rows.append((f"scale: spread {label} ({worst.get('prefixes_used', '?')} prefixes used)",
                         f"{scale['best_tok_s'][label]:,.0f} tok/s",
                         f"{ratio:.2f}x one prefix (target >= 0.95x) {_verdict(ratio >= 0.95)}; prefix wait p99 "
                         f"{worst.get('wait_p99_ms', '?')} ms; {worst.get('evictions', '?')} evictions"))
    elif (results_dir / "scale.json").exists():
        rows.append(("scale: 10,000 prefixes", "no result", "FAIL"))
    extra = _load(results_dir, "ours512").get("run", {})
    if extra.get("tok_s"):
        note = ""
        if peft.get("run", {}).get("tok_s"):
            note = f"{extra['tok_s'] / peft['run']['tok_s']:.1f}x PEFT batch {peft.get('batch', 256)}"
        rows.append(("ours with max_num_seqs=512", f"{extra['tok_s']:,.0f} tok/s", note))
    return rows


def part_summary(args) -> int:
    results_dir = Path(args.results)
    setup = _load(results_dir, "setup")
    rows = []
    for make in (_parity_rows, _throughput_rows):
        try:
            rows += make(results_dir)
        except Exception as exc:  # noqa: BLE001
            rows.append((make.__name__.strip("_"), f"summary error: {failure_reason(exc)}", ""))
    width = max(len(r[0]) for r in rows) + 2
    print("\n" + "=" * 110)
    print(f"prefix-serve GPU check: {setup.get('device', '?')} | {setup.get('versions', '?')}")
    print("=" * 110)
    for name, value, note in rows:
        print(f"{name:<{width}}{value:<20} {note}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["setup", "ours", "peft", "cb", "scale", "summary"])
    parser.add_argument("--dir", default="/tmp/prefix_serve_gpu_bench", help="model and prefixes")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--results", default=None, help="summary: the directory of the parts' JSON files")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model and workload, to check the script")
    parser.add_argument("--num-layers", type=int, default=None, help="setup: override the model's 16 layers")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="ours: the engine's decode_steps (default: the engine's own, 16 on CUDA)")
    parser.add_argument("--fused-layers", choices=["auto", "on", "off"], default=EngineConfig.fused_layers,
                        help="ours: the engine's fused_layers (default: %(default)s, on for CUDA)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="ours: the engine's async_scheduling (worker_share is then the engine's wait in collect)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="ours: skip the kernel profile of one decode step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--peft-batch", type=int, default=256)
    parser.add_argument("--cb-requests", type=int, default=512)
    parser.add_argument("--scale-prefixes", type=int, default=10_000, help="scale: prefixes registered")
    parser.add_argument("--scale-rounds", type=int, default=2, help="scale: rounds of the three layouts")
    args = parser.parse_args()
    if args.part == "summary":
        return part_summary(args)
    _quiet_transformers()
    work = SMALL if args.small else FULL
    part = {"setup": part_setup, "ours": part_ours, "peft": part_peft, "cb": part_cb, "scale": part_scale}[args.part]
    try:
        return part(args, work)
    except Exception as exc:  # noqa: BLE001 - the shell script goes on to the next part either way
        traceback.print_exc()
        print(f"FAIL {args.part}: {failure_reason(exc)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
