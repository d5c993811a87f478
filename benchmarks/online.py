"""Online workload: the real server under a Poisson arrival-rate sweep, with requests mixed over 16 prefixes.

For each arrival rate it streams completions from `prefix-serve serve` (the embedded model by default) and
reports time to first token and inter-token latency (p50, p99), throughput, and whether p99 TTFT stays under
one second. No PEFT or transformers server exists to compare with, so the same run also measures the
engine's offline throughput on the same requests (its best case) and reports online throughput against it.

    python -m benchmarks.online --rates 0.5,1,2,4,8 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import random_prompts, write_random_prefix


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _one(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    import aiohttp

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    stamps = []
    async with session.post(f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=600)) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"]:
                    stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "end": stamps[-1]}


async def _sweep_rate(url: str, rate: float, prompts, models, max_tokens: int, seed: int) -> dict:
    import aiohttp

    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        tasks = []
        start = time.perf_counter()
        for prompt, model in zip(prompts, models):
            tasks.append(asyncio.create_task(_one(session, url, model, prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    elapsed = max(r["end"] for r in results) - start
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"rate": rate, "requests": len(results), "tok_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99), "itl_p50": _pct(itl, 0.5),
            "itl_p99": _pct(itl, 0.99)}


def _offline_tok_s(model: str | None, prefix_root: Path, prompts, models, max_tokens: int) -> float:
    from engine import LLM, SamplingParams

    llm = LLM(model=model)
    llm.engine.register_prefix_dir(str(prefix_root))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, prefix=models, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.5,1,2,4,8", help="Poisson arrival rates, requests per second")
    parser.add_argument("--requests", type=int, default=32, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--json", default="bench_online.json")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from engine.model_loader import resolve_model_path
    from engine.model_spec import ModelSpec

    path = resolve_model_path(args.model)
    spec = ModelSpec.from_config(AutoConfig.from_pretrained(path))
    with tempfile.TemporaryDirectory(prefix="prefix-serve-online-") as tmp:
        root = Path(tmp)
        for i in range(16):
            write_random_prefix(root / f"task{i}", spec, 16, seed=i, model_name=path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "engine.serving.server", *([args.model] if args.model else []), "--prefix-dir",
                   str(root), "--port", "0"]
        server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = None
        for line in server.stdout:
            match = re.search(r"ready on (http://\S+)", line)
            if match:
                url = match.group(1)
                break
        if url is None:
            raise RuntimeError("server did not start")
        rows = []
        try:
            for i, rate in enumerate(float(r) for r in args.rates.split(",")):
                prompts = random_prompts(args.requests, 20, 60, spec.vocab_size, seed=100 + i)
                models = [f"task{random.Random(i * 1000 + j).randrange(16)}" for j in range(args.requests)]
                rows.append(asyncio.run(_sweep_rate(url, rate, prompts, models, args.max_tokens, seed=i)))
        finally:
            server.terminate()
            server.wait(60)
        prompts = random_prompts(args.requests, 20, 60, spec.vocab_size, seed=100)
        models = [f"task{random.Random(j).randrange(16)}" for j in range(args.requests)]
        offline = _offline_tok_s(args.model, root, prompts, models, args.max_tokens)
    print(f"\nWorkload 3, online: {args.requests} streamed requests per rate over 16 prefixes, "
          f"{args.max_tokens} new tokens")
    print(f"{'rate/s':>7}{'tok/s':>8}{'vs offline':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
          f"{'p99 TTFT>1s':>12}")
    for r in rows:
        print(f"{r['rate']:>7.2f}{r['tok_s']:>8.1f}{r['tok_s'] / offline:>10.2f}x{r['ttft_p50']:>10.3f}"
              f"{r['ttft_p99']:>10.3f}{r['itl_p50']:>9.3f}{r['itl_p99']:>9.3f}{str(r['ttft_p99'] > 1):>12}")
    over = [r["rate"] for r in rows if r["ttft_p99"] > 1]
    print(f"offline throughput on the same requests: {offline:.1f} tok/s; p99 TTFT first exceeds 1 s "
          + (f"at {over[0]:g} req/s" if over else "at none of the tested rates"))
    Path(args.json).write_text(json.dumps({"offline_tok_s": offline, "rates": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
