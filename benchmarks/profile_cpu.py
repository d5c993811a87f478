"""Where a workload-1 run spends its time: per-step wall time split into prefill and decode, the model forward's
share of it, torch.profiler's top operators for three decode steps, and the time per call of the C++ kernels and
the packed linear layers over ten more.

    python -m benchmarks.profile_cpu [--threads N] [--ops 15]

Same requests as `prefix-serve bench --workload mixed` (64 requests over 16 random prefixes, P=16, 64 new tokens).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import parse_engine_args, workload1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ops", type=int, default=15, help="operators to list from the decode-step profile")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--shapes", action="store_true", help="group the operator table by input shapes")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="EngineConfig fields for the engine (repeatable), e.g. --set fused_layers=off")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from engine import LLM, SamplingParams

    llm = LLM(**{name: value for item in args.set for name, value in parse_engine_args(item).items()})
    with tempfile.TemporaryDirectory() as tmp:
        prompts, names = workload1(llm, Path(tmp))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2), prefix=names[:2], use_tqdm=False)

        runner = llm.engine.executor.worker.runner
        execute = runner.execute
        records: list[tuple[int, int, float]] = []  # (tokens, sequences, forward seconds)

        def timed(step):
            start = time.perf_counter()
            out = execute(step)
            records.append((len(step.input_ids), len(step.query_lens), time.perf_counter() - start))
            return out

        runner.execute = timed
        step_times: list[float] = []
        engine_step = llm.engine.step

        def timed_step():
            start = time.perf_counter()
            out = engine_step()
            step_times.append(time.perf_counter() - start)
            return out

        llm.engine.step = timed_step
        start = time.perf_counter()
        outs = llm.generate(prompts, params, prefix=names, use_tqdm=False)
        total = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        runner.execute = execute
        llm.engine.step = engine_step

        decode = [r for r in records if r[0] == r[1]]
        prefill = [r for r in records if r[0] != r[1]]
        fwd = sum(r[2] for r in records)
        print(f"{tokens} tokens in {total:.2f} s = {tokens / total:.1f} tok/s, {len(step_times)} steps, "
              f"torch threads {torch.get_num_threads()}")
        print(f"  engine steps {sum(step_times):.2f} s, model forward {fwd:.2f} s "
              f"({100 * fwd / sum(step_times):.0f}%); outside steps {total - sum(step_times):.2f} s")
        print(f"  prefill/mixed steps: {len(prefill)}, {sum(r[2] for r in prefill):.2f} s, "
              f"{sum(r[0] for r in prefill)} tokens")
        if decode:
            print(f"  decode steps: {len(decode)}, {sum(r[2] for r in decode):.2f} s, "
                  f"{1000 * sum(r[2] for r in decode) / len(decode):.1f} ms/step at batch "
                  f"{max(r[1] for r in decode)}")

        # three decode steps of all 64 sequences under the profiler
        runner.execute = timed
        for i, p in enumerate(prompts):
            llm.engine.add_request(f"prof{i}", None, p["prompt_token_ids"], params, names[i])
        llm.engine.step()
        while records[-1][0] != records[-1][1]:  # until prefill is done
            llm.engine.step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, record_shapes=args.shapes) as prof:
            for _ in range(3):
                llm.engine.step()
        runner.execute = execute
        table = prof.key_averages(group_by_input_shape=args.shapes)
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.ops))
        _kernel_timers(llm, runner, steps=10)


def _kernel_timers(llm, runner, steps: int) -> None:
    """Wall time per call of the C++ kernels and the packed linear layers over `steps` more decode steps (the
    profiler above does not see calls into the extension module)."""
    from workers import cpu_kernels, model_runner

    totals: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += time.perf_counter() - start
            entry[1] += 1
            return out
        return wrapper

    module = cpu_kernels.load()
    patched = []
    if module is not None:
        for name in ("decode_attention", "add_rmsnorm", "rope_write", "silu_mul"):
            patched.append((module, name, getattr(module, name)))
    if getattr(runner, "fused", None) is not None:
        patched.append((runner.fused, "linear", runner.fused.linear))
    patched.append((model_runner, "_onednn_linear", model_runner._onednn_linear))
    labels = {"linear": "linear qkv, gate_up", "_onednn_linear": "linear o, down, head"}
    for owner, name, fn in patched:
        setattr(owner, name, timed(labels.get(name, name), fn))
    try:
        start = time.perf_counter()
        done = 0
        while done < steps and llm.engine.has_unfinished_requests():
            llm.engine.step()
            done += 1
        wall = time.perf_counter() - start
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
    if not done:
        return
    print(f"kernel and linear-layer calls over {done} more engine steps: {1000 * wall / done:.1f} ms per step")
    for name, (seconds, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:20s} {1000 * seconds / done:7.2f} ms/step {calls / done:6.0f} calls/step "
              f"{1e6 * seconds / calls:8.0f} us/call")


if __name__ == "__main__":
    main()
