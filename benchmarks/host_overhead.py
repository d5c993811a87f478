"""Host work per engine step, measured on a model so small that the forward pass costs almost nothing.

On a GPU the host work of a decode step (scheduling, message packing, input assembly, output handling) is
not overlapped with the device, so it bounds throughput (docs/gpu.md). This measures it on a CPU, split by
stage, for B running sequences in steady decode:

    python -m benchmarks.host_overhead [--batch 256] [--steps 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def _tiny_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)


def _timed(stages: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[name] += time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prefixes", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from benchmarks.common import random_prompts, write_random_prefix
    from engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        _tiny_llama(Path(tmp) / "model")
        llm = LLM(model=str(Path(tmp) / "model"), skip_tokenizer_init=True, max_num_seqs=args.batch,
                  num_kv_blocks=args.batch * 24)
        engine = llm.engine
        for i in range(args.prefixes):
            llm.load_prefix(f"t{i}", str(write_random_prefix(Path(tmp) / f"p{i}", engine.spec, 16, seed=i)))
        params = SamplingParams(max_tokens=args.steps + 20, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(random_prompts(args.batch, 16, 16, 512)):
            engine.add_request(f"r{i}", None, prompt, params, f"t{i % args.prefixes}")
        while engine.num_waiting() or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
            engine.step()  # prefill everything first: the timed steps are pure decode

        stages: dict[str, float] = defaultdict(float)
        worker = engine.executor.worker
        runner = worker.runner
        patches = [(engine.scheduler, "schedule", "engine: schedule"),
                   (engine, "_step_message", "engine: pack message"),
                   (engine, "_update", "engine: update + outputs"),
                   (worker, "_update_state", "worker: state updates"),
                   (runner, "execute", "runner: inputs + forward"),
                   (worker, "execute", "worker: whole")]
        originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        for obj, attr, name in patches:
            setattr(obj, attr, _timed(stages, name, getattr(obj, attr)))
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        total = time.perf_counter() - start
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)

    per_step = 1000 / args.steps
    stages["worker: unpack, sample"] = (stages.pop("worker: whole") - stages["worker: state updates"]
                                         - stages["runner: inputs + forward"])
    print(f"{args.steps} decode steps of {args.batch} sequences over {args.prefixes} prefixes (tiny Llama, 1 thread)")
    print(f"{'stage':<28}{'ms/step':>9}")
    for name in ("engine: schedule", "engine: pack message", "worker: state updates", "runner: inputs + forward",
                 "worker: unpack, sample", "engine: update + outputs"):
        print(f"{name:<28}{stages[name] * per_step:>9.2f}")
    print(f"{'whole step':<28}{total * per_step:>9.2f}")


if __name__ == "__main__":
    main()
