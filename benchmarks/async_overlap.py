"""Wall time of the same decode workload with and without async scheduling, through the mp executor.

    python -m benchmarks.async_overlap [--executor mp] [--batch 64] [--max-tokens 64] [--rounds 5]

With the mp executor the worker runs in its own process, so async scheduling can overlap the engine's host work
of step k+1 (scheduling, message, stop checks, outputs) with the worker's step k even on a CPU. The model is the
host-work benchmarks' tiny Llama (its forward costs little), so the host's share of a step, and with it what the
overlap can hide, is as large as it gets. Both engines are built first, then the workload alternates between
them, so a busy machine slows both alike; per mode the best and the median round are printed, and their ratios.
The tokens of both must be equal (greedy), which is checked.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=["inprocess", "mp"], default="mp")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from benchmarks.common import random_prompts, tiny_model_and_prefixes
    from engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefixes = tiny_model_and_prefixes(Path(tmp), 16)
        llms = {}
        for mode in (False, True):
            llms[mode] = LLM(model=str(model_dir), skip_tokenizer_init=True, executor=args.executor,
                             max_num_seqs=args.batch, num_kv_blocks=args.batch * 16, async_scheduling=mode)
            for i, path in enumerate(prefixes):
                llms[mode].load_prefix(f"t{i}", str(path))
        prompts = [{"prompt_token_ids": p} for p in random_prompts(args.batch, 16, 48, 512)]
        names = [f"t{i % 16}" for i in range(args.batch)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        walls: dict[bool, list[float]] = {False: [], True: []}
        tokens = {}
        for _ in range(args.rounds):
            for mode, llm in llms.items():
                start = time.perf_counter()
                outs = llm.generate(prompts, params, prefix=names, use_tqdm=False)
                walls[mode].append(time.perf_counter() - start)
                tokens[mode] = [o.outputs[0].token_ids for o in outs]
        assert tokens[False] == tokens[True], "async scheduling changed the tokens"
        stats = llms[True].engine.stats
        for llm in llms.values():
            llm.shutdown()
    count = args.batch * args.max_tokens
    print(f"{args.batch} requests x {args.max_tokens} tokens, tiny Llama, executor {args.executor}, "
          f"{args.rounds} rounds alternating; tokens equal in both modes")
    for mode, label in ((False, "one step at a time"), (True, "async scheduling")):
        best, median = min(walls[mode]), statistics.median(walls[mode])
        print(f"{label:<20} best {count / best:8.0f} tok/s  median {count / median:8.0f} tok/s  "
              f"rounds {' '.join(f'{w:.2f}' for w in walls[mode])} s")
    print(f"async / one step: best {min(walls[False]) / min(walls[True]):.2f}x, median "
          f"{statistics.median(walls[False]) / statistics.median(walls[True]):.2f}x; async steps overlapped "
          f"{stats.overlapped_steps} of {stats.steps}, synchronous fallbacks {stats.sync_fallbacks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
