"""Shared pieces of the benchmarks: random PEFT prefix adapters, prompts, timing in a child process."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_random_prefix(out_dir: Path, spec, num_virtual_tokens: int, seed: int, model_name: str = "") -> Path:
    """A PEFT PREFIX_TUNING adapter directory with random KV, in exactly PEFT's saved format."""
    from peft import PrefixTuningConfig
    from safetensors.torch import save_file

    from engine.peft_format import ADAPTER_WEIGHTS, TENSOR_NAME, prefix_tensor_shape

    out_dir.mkdir(parents=True, exist_ok=True)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                num_layers=spec.num_layers, num_attention_heads=spec.num_kv_heads,
                                token_dim=spec.num_kv_heads * spec.head_dim, base_model_name_or_path=model_name,
                                inference_mode=True)
    config.save_pretrained(str(out_dir))
    generator = torch.Generator().manual_seed(seed)
    shape = prefix_tensor_shape(num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim)
    tensor = torch.randn(*shape, generator=generator) * 0.5
    save_file({TENSOR_NAME: tensor}, str(out_dir / ADAPTER_WEIGHTS))
    return out_dir


def _tiny_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)


def tiny_model_and_prefixes(tmp: Path, count: int) -> tuple[Path, list[Path]]:
    """A 2-layer, hidden-64 Llama under `tmp`/model (the host-work benchmarks' model: its forward costs almost
    nothing) and `count` random P=16 prefixes for it."""
    from transformers import AutoConfig

    from engine.model_spec import ModelSpec

    model_dir = tmp / "model"
    _tiny_llama(model_dir)
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(model_dir))
    return model_dir, [write_random_prefix(tmp / f"p{i}", spec, 16, seed=i) for i in range(count)]


def random_prompts(count: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids away from both ends of the vocabulary (where special tokens usually sit)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator).tolist()
    margin = min(100, vocab // 4)
    return [torch.randint(margin, vocab - margin, (n,), generator=generator).tolist() for n in lengths]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def run_in_child(module: str, task: dict, timeout: float = 3600, python: str | None = None,
                 env: dict | None = None) -> dict:
    """Run `module`'s child entry point on `task` in a fresh process, so peak RSS is that task's alone.
    `python`: another interpreter (such as a separate virtualenv's) to run it with."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    # the child finds this checkout's packages from any directory, even under another interpreter (a vLLM venv)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([python or sys.executable, "-m", module, "--child", json.dumps(task)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({task.get('kind')}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def workload1(llm, directory: Path) -> tuple[list[dict], list[str]]:
    """Workload 1 in one process: 16 random prefixes (P = 16) written under `directory` and loaded as task0..15,
    and 64 prompts of 20-60 random tokens with the prefix name of each. Returns (prompts, prefix names)."""
    spec = llm.engine.spec
    for i in range(16):
        llm.load_prefix(f"task{i}", str(write_random_prefix(Path(directory) / f"p{i}", spec, 16, seed=i)))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(64, 20, 60, spec.vocab_size)]
    return prompts, [f"task{i % 16}" for i in range(64)]


def parse_engine_args(text: str) -> dict:
    """'a=1,b=on' -> {'a': 1, 'b': 'on'}: EngineConfig fields from the command line (numbers and True/False
    parsed, anything else a string)."""
    import ast

    fields = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected FIELD=VALUE, got {item!r}")
        try:
            fields[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            fields[name.strip()] = value.strip()
    return fields


def prefix_assignment(names: list[str], count: int, distribution: str, rng) -> list[str]:
    """The prefix of each of `count` requests: all the first name ("one"), drawn uniformly ("uniform"), or by
    Zipf(1.0) over the names in order ("zipf"), from the `random.Random` given."""
    if distribution == "one":
        return [names[0]] * count
    if distribution == "zipf":
        return rng.choices(names, weights=[1.0 / (k + 1) for k in range(len(names))], k=count)
    return [rng.choice(names) for _ in range(count)]


def percentile_ms(sorted_seconds: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ascending durations in seconds, in ms; 0 for none."""
    if not sorted_seconds:
        return 0.0
    return sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))] * 1000
