"""GPU parity, part (1) of `benchmarks/gpu_check.sh`: kernels against the torch reference, engine against PEFT.

    PYTHONPATH=. python -m benchmarks.gpu_parity kernels --out kernels.json
    PYTHONPATH=. python -m benchmarks.gpu_parity engine --out engine.json [--device cpu]

kernels: every fast attention backend against TorchPagedAttention on the shapes of `gpu_kernels_check.py` (bf16
tolerances; one fp16 and one fp32 case), checks only, no timing.
engine: greedy outputs of the engine on random-weight Llama and Qwen2 models with mixed prefixes (P = 5, 8 with
a projection, 16, and no prefix), against the referee of DESIGN section 1: PeftModel.forward over the whole
sequence at every step, argmax. fp32 with TF32 off, so the comparison is token for token. Each model runs four
times: with the fused decoder layers (the CUDA default), eager (cuda_graphs="off") and with CUDA-graph decode
("on"), one forward per engine step; then with graphs and decode runs of up to 8 forwards (tokens fed back on
the device); then with graphs and Hugging Face's layers (fused_layers="off"); last with two tensor-parallel ranks
on the one device (gloo), eager, with decode runs. One prompt is long
enough (530 tokens) for the long-context decode tiles. A mismatch reports the referee's top-1 / top-2 logit gap
where the outputs part, so a near-tie can be told from a bug.

Every section catches its own failure, prints FAIL with the reason and goes on; results go to --out as JSON,
rewritten after every section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def failure_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class Results:
    """A JSON file rewritten after every result, so a part killed by its time limit keeps what it finished."""

    def __init__(self, path: str | None, **header):
        self.path = path
        self.data = {**header, "sections": {}}
        self.flush()

    def put(self, name: str, value) -> None:
        self.data["sections"][name] = value
        self.flush()

    def flush(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1, default=str))


# ---- kernels ------------------------------------------------------------------------------------------------------
def run_kernels(out: str | None) -> int:
    import torch

    from benchmarks import gpu_kernels_check as kc

    results = Results(out, part="kernels")
    if not torch.cuda.is_available():
        print("FAIL kernels: no CUDA device")
        results.put("error", "no CUDA device")
        return 1
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    for name in kc.BACKENDS[1:]:
        for shape in kc.CHECKS:
            start = time.perf_counter()
            try:
                verdict = kc.check(name, shape)
            except Exception as exc:  # noqa: BLE001
                verdict = f"FAIL: {failure_reason(exc)}"
            print(f"  {name:<9}{shape.name:<26}{verdict}  ({time.perf_counter() - start:.1f} s)", flush=True)
            results.put(f"{name} | {shape.name}", verdict)
    return 0


# ---- engine -------------------------------------------------------------------------------------------------------
ADAPTERS = {"p5": (5, False, 1), "p8proj": (8, True, 2), "p16": (16, False, 3)}
PREFIXES = ["p5", "p8proj", None, "p16", "p5", "p16", "p8proj"]
MAX_TOKENS = [6, 10, 14, 18, 22, 8, 12]  # the batch shrinks as requests finish: several graph sizes run


def _prompts(vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 17, 2, 9, 40, 530, 23]
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=4, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=3, **common)
    raise ValueError(arch)


def build_zoo(root: Path, arch: str) -> dict:
    """A random model directory and its PEFT prefix adapters (saved by PEFT itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_models import make_prefix_adapter

    model_dir = root / arch
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32).save_pretrained(str(model_dir))
    adapters = {name: make_prefix_adapter(model_dir, root / f"{arch}-{name}", p, proj, seed)
                for name, (p, proj, seed) in ADAPTERS.items()}
    return {"model": model_dir, "adapters": adapters}


def referee(model_dir: Path, adapter_dir: Path | None, prompt: list[int], max_tokens: int,
            device: str) -> tuple[list[int], list[float]]:
    """PeftModel.forward over the full sequence each step, argmax; also each step's top-1 minus top-2 logit."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model = model.to(device).eval()
    tokens, out, gaps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            ids = torch.tensor([tokens], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            token = int(logits.argmax())
            out.append(token)
            tokens.append(token)
    return out, gaps


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()  # the runner and its graphs reference each other: only the collector frees them
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine_case(zoo: dict, prompts, expected, gaps, device: str, graphs: str, backend: str | None,
                    decode_steps: int = 1, fused: str = "auto", tp: int = 1) -> dict:
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    # a 256-token budget chunks the long prompt over three steps, mixed with the others' decodes (eager steps)
    llm = LLM(model=str(zoo["model"]), device=device, dtype="float32", skip_tokenizer_init=True, block_size=16,
              num_kv_blocks=512, max_num_seqs=64, max_num_batched_tokens=256, attention_backend=backend,
              decode_steps=decode_steps, cuda_graphs=graphs, fused_layers=fused, tensor_parallel_size=tp)
    init_s = time.perf_counter() - start
    try:
        for name, path in zoo["adapters"].items():
            llm.load_prefix(name, str(path))
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, prefix=PREFIXES, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        llm.check_integrity()
        runner = llm.engine.executor.worker.runner if tp == 1 else None  # ranks live in their own processes
        stats = runner.graph_stats if runner else None
        decode_run_steps = llm.engine.stats.decode_run_steps
        fused_ops = getattr(runner.fused, "ops", None) if runner else None
    finally:
        llm.shutdown()
        del llm
        _free_device_memory()
    mismatches = []
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            at = next((j for j, (a, b) in enumerate(zip(g, e)) if a != b), min(len(g), len(e)))
            gap = gaps[i][at] if at < len(gaps[i]) else None
            mismatches.append({"prompt": i, "prefix": PREFIXES[i], "first_diff": at, "referee_top2_gap": gap,
                               "got": g, "expected": e})
    result = {"exact": len(got) - len(mismatches), "total": len(got), "mismatches": mismatches,
              "init_seconds": round(init_s, 2), "seconds": round(time.perf_counter() - start, 2),
              "decode_run_steps": decode_run_steps, "fused_layers": fused_ops.name if fused_ops else None}
    if stats is not None:
        result.update(graph_steps=stats.graph_steps, eager_steps=stats.eager_steps,
                      captured=[list(k) for k in stats.captured], failed={str(k): v for k, v in stats.failed.items()},
                      capture_seconds=round(stats.capture_seconds, 2))
    if graphs == "on" and not result.get("graph_steps"):
        result["warning"] = "CUDA graphs were requested but no decode step ran as a graph"
    if decode_steps > 1 and not decode_run_steps:
        result["warning"] = "decode runs were requested but none ran"
    return result


def run_engine(out: str | None, device: str, archs: list[str], deadline: float, backend: str | None) -> int:
    import tempfile

    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("FAIL engine parity: no CUDA device")
            Results(out, part="engine").put("error", "no CUDA device")
            return 1
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 all the way, so greedy tokens can match exactly
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    results = Results(out, part="engine", device=device)
    root = Path(tempfile.mkdtemp(prefix="prefix-serve-parity-"))
    for arch in archs:
        if time.monotonic() > deadline:
            print(f"SKIP engine parity {arch}: out of time")
            results.put(f"{arch}", "SKIP: out of time")
            continue
        try:
            start = time.perf_counter()
            zoo = build_zoo(root, arch)
            prompts = _prompts(512)
            refs = [referee(zoo["model"], zoo["adapters"][p] if p else None, prompt, m, device)
                    for prompt, p, m in zip(prompts, PREFIXES, MAX_TOKENS)]
            expected, gaps = [r[0] for r in refs], [r[1] for r in refs]
            print(f"  {arch}: models and referee in {time.perf_counter() - start:.1f} s "
                  f"(smallest referee top-2 gap {min(min(g) for g in gaps):.2e})", flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            print(f"FAIL engine parity {arch}: building models or referee: {failure_reason(exc)}")
            results.put(f"{arch}", f"FAIL: {failure_reason(exc)}")
            continue
        # with the fused layers (the CUDA default): one forward per engine step, eager and as graphs, then decode
        # runs of up to 8 forwards (rows leave them at different forwards); last, graphs with Hugging Face's
        # layers, to tell a fault of the fused layers from one of the rest
        # then two tensor-parallel ranks on the one device (gloo: NCCL refuses two ranks on one GPU), eager
        for graphs, decode_steps, fused, tp in (("off", 1, "auto", 1), ("on", 1, "auto", 1), ("on", 8, "auto", 1),
                                                ("on", 1, "off", 1), ("off", 8, "off", 2)):
            name = (f"{arch} graphs={graphs}" + (f" runs={decode_steps}" if decode_steps > 1 else "")
                    + (" HF layers" if fused == "off" else "") + (f" tp={tp}" if tp > 1 else ""))
            if time.monotonic() > deadline:
                print(f"SKIP engine parity {name}: out of time")
                results.put(name, "SKIP: out of time")
                continue
            try:
                result = run_engine_case(zoo, prompts, expected, gaps, device, graphs, backend, decode_steps, fused,
                                         tp)
                verdict = "ok" if result["exact"] == result["total"] else "FAIL"
                extra = (f", graph steps {result['graph_steps']}, eager steps {result['eager_steps']}, "
                         f"captured {len(result['captured'])}, failed {len(result['failed'])}"
                         if "graph_steps" in result else "")
                extra += f", forwards in decode runs {result['decode_run_steps']}" if decode_steps > 1 else ""
                extra += f", fused layers: {result['fused_layers'] or 'off'}"
                print(f"  {verdict} {name}: {result['exact']}/{result['total']} token-exact "
                      f"({result['seconds']} s{extra})", flush=True)
                for m in result["mismatches"]:
                    print(f"     prompt {m['prompt']} (prefix {m['prefix']}): first differs at token "
                          f"{m['first_diff']}, referee top-2 gap there {m['referee_top2_gap']}")
                if result.get("warning"):
                    print(f"     WARNING: {result['warning']}")
                for key, reason in result.get("failed", {}).items():
                    print(f"     capture failed for {key}: {reason[:200]}")
                results.put(name, result)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                print(f"FAIL engine parity {name}: {failure_reason(exc)}")
                results.put(name, f"FAIL: {failure_reason(exc)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["kernels", "engine"])
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", default="llama,qwen2")
    parser.add_argument("--attention-backend", default=None, help="default: the best for the device")
    parser.add_argument("--budget-s", type=float, default=150, help="start no new section after this many seconds")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part == "kernels":
        return run_kernels(args.out)
    return run_engine(args.out, args.device, args.archs.split(","), time.monotonic() + args.budget_s,
                      args.attention_backend)


if __name__ == "__main__":
    sys.exit(main())
