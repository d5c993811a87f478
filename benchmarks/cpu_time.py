"""Workload 1's tokens per CPU-second, for A/B comparisons of two commits on a busy machine.

    python -m benchmarks.cpu_time [--rounds 2] [--max-tokens 32] [--async-scheduling] [--executor mp]

Wall-clock tok/s swings by several times when other processes share a 2-core machine (two torch processes with
two threads each spin against each other). With one torch thread, the process's CPU time is far steadier, so
running this in two checkouts, interleaved (`PYTHONPATH=<checkout> python -m benchmarks.cpu_time`), compares
their host and model work even then. The requests are those of `prefix-serve bench --workload mixed`: 64 over
16 random prefixes (P = 16), prompts of 20-60 tokens, greedy, ignore_eos.

`--async-scheduling` and `--executor` set the engine's settings of those names. CPU time counts this process
only: with `--executor mp` the worker's forwards run in another process, so compare wall time there.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--executor", choices=["inprocess", "mp"], default="inprocess")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from benchmarks.common import workload1
    from engine import LLM, SamplingParams

    llm = LLM(async_scheduling=args.async_scheduling, executor=args.executor)
    with tempfile.TemporaryDirectory() as tmp:
        prompts, names = workload1(llm, Path(tmp))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2), prefix=names[:2], use_tqdm=False)  # warm-up
        for _ in range(args.rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            outs = llm.generate(prompts, params, prefix=names, use_tqdm=False)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"{tokens} tokens: {cpu:.2f} CPU-s ({tokens / cpu:.1f} tok per CPU-second), {wall:.2f} s wall",
                  flush=True)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
