"""How many decode forwards each engine step runs when requests want different numbers of tokens.

Decode runs (scheduler/scheduler.py) spread the host's per-step work over several forwards. This counts them on
a tiny model on the CPU (the counts do not depend on the device) under traffic like an online server's: requests
arrive over time, at random with a mean rate per forward (time on a GPU is mostly forwards), and each asks for
16-256 new tokens, over 16 prefixes.

    python -m benchmarks.run_lengths [--requests 512] [--max-num-seqs 64] [--decode-steps 1 8] [--arrivals 1.0]

Printed per decode_steps setting: engine steps (each pays the host's per-step work once), forwards (each pays
the device's), tokens per forward (how full the batches were), and the pure-decode steps with their forwards.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch


def measure(model_dir: Path, prefixes: list[Path], requests: int, max_num_seqs: int, decode_steps: int,
            arrivals_per_forward: float, seed: int = 0) -> dict:
    from benchmarks.common import random_prompts
    from engine.config import EngineConfig
    from engine.llm_engine import EngineCore
    from engine.sampling_params import SamplingParams

    config = EngineConfig(model=str(model_dir), skip_tokenizer_init=True, max_num_seqs=max_num_seqs,
                          num_kv_blocks=max_num_seqs * 24, decode_steps=decode_steps)
    engine = EngineCore(config)
    for i, path in enumerate(prefixes):
        engine.load_prefix(f"t{i}", str(path))
    rng = random.Random(seed)
    pending = [(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(16, 257), temperature=0.0, ignore_eos=True),
                f"t{i % len(prefixes)}") for i, prompt in enumerate(random_prompts(requests, 8, 48, 512, seed))]
    pending.reverse()
    last = {"forwards": 0}
    counts = {"decode_steps": 0, "decode_forwards": 0}
    schedule = engine.scheduler.schedule

    def recorded():
        out = schedule()
        last["forwards"] = out.num_steps if out.scheduled else 0
        if out.scheduled and all(i.num_tokens == 1 and not i.is_new for i in out.scheduled):
            counts["decode_steps"] += 1
            counts["decode_forwards"] += out.num_steps
        return out

    engine.scheduler.schedule = recorded
    tokens = forwards = 0
    while pending or engine.has_unfinished_requests():
        last["forwards"] = 0
        outputs = engine.step()
        forwards += last["forwards"]
        for _ in range(max(last["forwards"], 1)):  # arrivals follow device time, counted in forwards
            if pending and rng.random() < arrivals_per_forward:
                request_id, prompt, params, prefix = pending.pop()
                engine.add_request(request_id, None, prompt, params, prefix=prefix)
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs if o.finished)
    return {"engine steps": engine.stats.steps, "forwards": forwards, "tokens": tokens,
            "tokens per forward": tokens / forwards, "pure-decode steps": counts["decode_steps"],
            "their forwards": counts["decode_forwards"],
            "forwards per pure-decode step": counts["decode_forwards"] / max(counts["decode_steps"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--arrivals", type=float, default=1.0, help="mean request arrivals per forward")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from benchmarks.common import tiny_model_and_prefixes

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefixes = tiny_model_and_prefixes(Path(tmp), 16)
        results = {k: measure(model_dir, prefixes, args.requests, args.max_num_seqs, k, args.arrivals)
                   for k in args.decode_steps}
    print(f"{args.requests} requests (16-256 new tokens; {args.arrivals} arrivals per forward), "
          f"max_num_seqs {args.max_num_seqs}")
    print(f"{'':<32}" + "".join(f"{f'decode_steps={k}':>17}" for k in args.decode_steps))
    for name in results[args.decode_steps[0]]:
        cells = (results[k][name] for k in args.decode_steps)
        print(f"{name:<32}" + "".join(f"{v:>17,.2f}" if isinstance(v, float) else f"{v:>17,}" for v in cells))


if __name__ == "__main__":
    main()
