"""Data-parallel routing on real replicas: the prefix-affinity router against Ray Serve's default (load only).

    python -m benchmarks.dp_routing [--replicas 2] [--prefixes 96] [--requests 600] [--concurrency 32]

For each router and traffic pattern, a fresh `prefix-serve serve --data-parallel-size N` on a tiny random Llama
(CPU), then the same requests (prefixes drawn uniformly, then by Zipf(1.0), 8 new tokens each, a fixed number in flight), then the
replicas' counters from `/metrics`: prefix materializations (`prefix_serve_prefix_loads_total`) and each
replica's share of the requests. Both routers run in this one invocation; docs/distributed.md has a result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _server(model: Path, prefixes: Path, replicas: int, routing: str):
    """The server in its own process (the tests' launcher), ready; `.url` is where it listens."""
    from test_server_support import ServerProcess

    return ServerProcess([str(model), "--prefix-dir", str(prefixes), "--block-size", "4", "--num-kv-blocks", "8192",
                          "--log-level", "WARNING", "--data-parallel-size", str(replicas),
                          "--data-parallel-routing", routing], startup_timeout=600).wait_ready()


def _post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


def _replica_counters(url: str) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    counters: dict[str, dict[str, float]] = {}
    for name, replica, value in re.findall(r'(prefix_serve_\w+_total)\{replica="([^"]+)"\} (\S+)', text):
        counters.setdefault(replica, {})[name] = float(value)
    return counters


def run_traffic(url: str, names: list[str], concurrency: int) -> dict[str, dict[str, float]]:
    body = {"prompt": "hello there", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda name: _post(url + "/v1/completions", {**body, "model": name}), names))
    time.sleep(2.5)  # the replicas post their counters every second
    return _replica_counters(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=96, help="at most 120 (prefix i has 3 + 2i virtual tokens)")
    parser.add_argument("--requests", type=int, default=600, help="per traffic pattern")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_server_support import build_model, build_prefixes

    rng = random.Random(args.seed)
    names = [f"task{i}" for i in range(args.prefixes)]
    weights = [1 / (rank + 1) for rank in range(args.prefixes)]
    patterns = {"uniform": [rng.choice(names) for _ in range(args.requests)],
                "zipf": rng.choices(names, weights, k=args.requests)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefix-serve-dp-") as tmp:
        model = build_model(Path(tmp) / "model")
        build_prefixes(model, Path(tmp) / "prefixes", args.prefixes)
        for routing in ("prefix", "load"):
            for pattern, sequence in patterns.items():  # a fresh server per run: no prefix is resident at the start
                server = _server(model, Path(tmp) / "prefixes", args.replicas, routing)
                try:
                    counters = run_traffic(server.url, sequence, args.concurrency)
                finally:
                    server.stop(timeout=120)
                loads = sum(c.get("prefix_serve_prefix_loads_total", 0) for c in counters.values())
                # every request names a prefix, so each is one prefix cache hit or miss on its replica
                share = [c.get("prefix_serve_prefix_cache_hits_total", 0)
                         + c.get("prefix_serve_prefix_cache_misses_total", 0) for c in counters.values()]
                rows.append((routing, pattern, len(set(sequence)), loads, [int(x) for x in share],
                             max(share) / (sum(share) / len(share)) if sum(share) else float("nan")))
    print(f"\n{args.replicas} CPU replicas, {args.prefixes} prefixes, {args.requests} requests per pattern, "
          f"{args.concurrency} in flight")
    print(f"{'router':<8}{'traffic':<9}{'prefixes used':>14}{'materializations':>18}{'requests per replica':>24}"
          f"{'max/mean':>10}")
    for routing, pattern, distinct, loads, share, ratio in rows:
        print(f"{routing:<8}{pattern:<9}{distinct:>14}{loads:>18.0f}{str(share):>24}{ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
