"""Host work per engine step, measured on a model so small that the forward pass costs almost nothing.

On a GPU the host work of a decode step (scheduling, message packing, input assembly, output handling) is
not overlapped with the device, so it bounds throughput (docs/gpu.md). This measures it on a CPU, split by
stage, for B running sequences in steady decode, per decode forward, for each `decode_steps` setting (a decode
run spreads the engine's and the worker's per-step work over several forwards):

    python -m benchmarks.host_overhead [--batch 256] [--steps 48] [--decode-steps 1 8] [--no-forward]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def _timed(stages: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[name] += time.perf_counter() - start
    return wrapper


def measure(model_dir: Path, prefix_paths: list[Path], batch: int, forwards: int, decode_steps: int,
            no_forward: bool = False) -> dict:
    """Host time per stage over `forwards` decode forwards of `batch` sequences, in ms per forward. With
    `no_forward` the model runner returns zero logits at once, so only host work is timed."""
    from benchmarks.common import random_prompts
    from engine import LLM, SamplingParams

    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, max_num_seqs=batch, num_kv_blocks=batch * 24,
              decode_steps=decode_steps)
    engine = llm.engine
    for i, path in enumerate(prefix_paths):
        llm.load_prefix(f"t{i}", str(path))
    params = SamplingParams(max_tokens=forwards + 20, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(batch, 16, 16, 512)):
        engine.add_request(f"r{i}", None, prompt, params, f"t{i % len(prefix_paths)}")
    while engine.num_waiting() or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()  # prefill everything first: the timed steps are pure decode

    stages: dict[str, float] = defaultdict(float)
    worker = engine.executor.worker
    runner = worker.runner
    if no_forward:
        zeros = torch.zeros(batch, engine.spec.vocab_size)
        runner.execute = lambda step, input_ids=None: zeros[: len(step.sample_rows)]
    patches = [(engine.scheduler, "schedule", "engine: schedule"),
               (engine, "_step_message", "engine: pack message"),
               (engine, "_update", "engine: update + outputs"),
               (worker, "_update_state", "worker: state updates"),
               (runner, "execute", "runner: inputs + forward"),
               (worker, "execute", "worker: whole")]
    for obj, attr, name in patches:
        setattr(obj, attr, _timed(stages, name, getattr(obj, attr)))
    done = 0
    start = time.perf_counter()
    while done < forwards:
        runs0 = engine.stats.decode_run_steps
        engine.step()
        done += max(1, engine.stats.decode_run_steps - runs0)
    total = time.perf_counter() - start
    stages["worker: unpack, sample"] = (stages.pop("worker: whole") - stages["worker: state updates"]
                                         - stages["runner: inputs + forward"])
    result = {name: seconds * 1000 / done for name, seconds in stages.items()}
    result["whole step"] = total * 1000 / done
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=48, help="decode forwards timed per setting")
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8],
                        help="engine decode_steps settings to compare (default: 1 8)")
    parser.add_argument("--no-forward", action="store_true",
                        help="the model runner returns zero logits at once: time host work only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from benchmarks.common import tiny_model_and_prefixes

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefixes = tiny_model_and_prefixes(Path(tmp), args.prefixes)
        results = {k: measure(model_dir, prefixes, args.batch, args.steps, k, args.no_forward)
                   for k in args.decode_steps}

    print(f"{args.steps} decode forwards of {args.batch} sequences over {args.prefixes} prefixes "
          f"(tiny Llama, 1 thread); ms per forward")
    print(f"{'stage':<28}" + "".join(f"{f'decode_steps={k}':>17}" for k in args.decode_steps))
    for name in ("engine: schedule", "engine: pack message", "worker: state updates", "runner: inputs + forward",
                 "worker: unpack, sample", "engine: update + outputs", "whole step"):
        print(f"{name:<28}" + "".join(f"{results[k][name]:>17.2f}" for k in args.decode_steps))


if __name__ == "__main__":
    main()
