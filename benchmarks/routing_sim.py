"""Routing simulator: how routing policies place prefix requests over many engine replicas, beyond this machine.

A discrete-event simulation. Requests arrive as a Poisson stream, each on one of K prefixes (Zipf(1.0) or
uniform popularity), and each occupies its replica for an exponential time of mean 1. The arrival rate makes the
offered load `--mean-load` ongoing requests per replica (Ray Serve's "ongoing requests"; an engine batching 128
sequences at 50% is 64). A replica serves all it is given at once (continuous batching), so load only measures
placement. Each replica caches at most `--cache-per-replica` prefixes, least recently used out first; a prefix
with a request running there is pinned. A request on a prefix its replica does not hold materializes it there
(a cold load). Every policy sees the same arrivals, prefixes and durations.

    python -m benchmarks.routing_sim [--replicas 64] [--prefixes 10000] [--requests 50000] [--traffic zipf uniform]
        [--seed 0] [--mean-load 64] [--cache-per-replica 2K/N] [--load-cost-ms 10] [--load-factor 1.2]

Policies: round-robin; least-loaded; multiplex (Ray Serve's model multiplexing reduced to its rule: the least
loaded replica holding the prefix, else the least loaded one, with no cap, so a hot prefix stays pinned);
consistent hashing (the prefix's first replica on the ring, load ignored); ours (engine/serving/prefix_routing.py).
Printed per policy: cold loads (total materializations), the same per distinct prefix requested, mean resident
copies per resident prefix at the end, max/mean replica load (time-averaged, and the peak against the mean),
and the cold loads' cost at `--load-cost-ms` each. Loads are measured after a warm-up of 3 mean durations.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.serving.prefix_routing import HashRing, PrefixAffinityRouter, hash64

POLICIES = ("round-robin", "least-loaded", "multiplex", "consistent-hash", "ours")
WARMUP_DURATIONS = 3.0  # load statistics start after this many mean request durations


@dataclass
class SimReplica:
    """One engine replica as the router sees it (`replica_id`, `load`, `resident`), plus its LRU and counters."""

    replica_id: str
    capacity: int
    load: int = 0
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)  # least recently used first
    in_use: dict[str, int] = field(default_factory=dict)  # prefix -> its requests running here (pinned)
    area: float = 0.0  # load integrated over time
    since: float = 0.0  # time of the last load change
    peak: int = 0

    def advance(self, now: float) -> None:
        self.area += self.load * (now - self.since)
        self.since = now

    def admit(self, prefix: str, now: float) -> bool:
        """Start a request on `prefix`; True when the prefix had to be materialized here."""
        self.advance(now)
        self.load += 1
        self.peak = max(self.peak, self.load)
        self.in_use[prefix] = self.in_use.get(prefix, 0) + 1
        if prefix in self.resident:
            self.resident.move_to_end(prefix)
            return False
        self.resident[prefix] = None
        if len(self.resident) > self.capacity:
            victim = next((name for name in self.resident if name not in self.in_use), None)
            if victim is not None:  # all pinned: the cache overflows until a request ends
                del self.resident[victim]
        return True

    def finish(self, prefix: str, now: float) -> None:
        self.advance(now)
        self.load -= 1
        self.in_use[prefix] -= 1
        if not self.in_use[prefix]:
            del self.in_use[prefix]


class _Baseline:
    def __init__(self, seed: int):
        self._ties = random.Random(seed)

    def least_loaded(self, replicas: Sequence[SimReplica]) -> str:
        lowest = min(r.load for r in replicas)
        return self._ties.choice([r.replica_id for r in replicas if r.load == lowest])


class RoundRobin(_Baseline):
    def __init__(self, seed: int):
        super().__init__(seed)
        self._turn = itertools.count()

    def choose(self, prefix: str, replicas: Sequence[SimReplica]) -> str:
        return replicas[next(self._turn) % len(replicas)].replica_id


class LeastLoaded(_Baseline):
    def choose(self, prefix: str, replicas: Sequence[SimReplica]) -> str:
        return self.least_loaded(replicas)


class Multiplex(_Baseline):
    def choose(self, prefix: str, replicas: Sequence[SimReplica]) -> str:
        holders = [r for r in replicas if prefix in r.resident]
        return self.least_loaded(holders or replicas)


class ConsistentHash(_Baseline):
    def __init__(self, seed: int, virtual_nodes: int = 1000):
        super().__init__(seed)
        self.seed, self.virtual_nodes = seed, virtual_nodes
        self._ring = HashRing((), virtual_nodes, seed)

    def choose(self, prefix: str, replicas: Sequence[SimReplica]) -> str:
        ids = {r.replica_id for r in replicas}
        if not ids <= self._ring.replica_ids:
            self._ring = HashRing(ids, self.virtual_nodes, self.seed)
        return next(i for i in self._ring.walk(hash64(self.seed, prefix)) if i in ids)


def make_policy(name: str, seed: int, load_factor: float = 1.2, patience: int = 4):
    if name == "ours":
        return PrefixAffinityRouter(load_factor=load_factor, seed=seed, patience=patience)
    return {"round-robin": RoundRobin, "least-loaded": LeastLoaded, "multiplex": Multiplex,
            "consistent-hash": ConsistentHash}[name](seed)


@dataclass(frozen=True)
class Traffic:
    """The requests every policy sees: arrival times, prefix names and durations (mean 1)."""

    arrivals: list[float]
    prefixes: list[str]
    durations: list[float]


def make_traffic(kind: str, num_prefixes: int, requests: int, rate: float, seed: int) -> Traffic:
    rng = random.Random(seed)
    if kind == "zipf":  # P(rank k) ~ 1/k
        cumulative = list(itertools.accumulate(1.0 / k for k in range(1, num_prefixes + 1)))
        ranks = rng.choices(range(num_prefixes), cum_weights=cumulative, k=requests)
    elif kind == "uniform":
        ranks = [rng.randrange(num_prefixes) for _ in range(requests)]
    else:
        raise ValueError(f"unknown traffic {kind!r}: use zipf or uniform")
    arrivals = list(itertools.accumulate(rng.expovariate(rate) for _ in range(requests)))
    return Traffic(arrivals, [f"prefix-{k}" for k in ranks], [rng.expovariate(1.0) for _ in range(requests)])


def simulate(policy, traffic: Traffic, num_replicas: int, cache_per_replica: int, load_cost_s: float) -> dict:
    """Route `traffic` over `num_replicas` replicas with `policy`; the measures printed per policy."""
    replicas = [SimReplica(f"replica-{i}", cache_per_replica) for i in range(num_replicas)]
    by_id = {r.replica_id: r for r in replicas}
    running: list[tuple[float, int, SimReplica, str]] = []  # (end time, request number, replica, prefix)
    end = traffic.arrivals[-1]
    warm_at = min(WARMUP_DURATIONS, end / 2)
    cold = 0
    warm = False
    for i, (now, prefix, duration) in enumerate(zip(traffic.arrivals, traffic.prefixes, traffic.durations)):
        while running and running[0][0] <= now:
            done, _, replica, name = heapq.heappop(running)
            replica.finish(name, done)
        if not warm and now >= warm_at:
            warm = True
            for r in replicas:
                r.advance(warm_at)
                r.area, r.peak = 0.0, r.load
        replica = by_id[policy.choose(prefix, replicas)]
        cold += replica.admit(prefix, now)
        heapq.heappush(running, (now + duration, i, replica, prefix))
    for r in replicas:
        r.advance(end)
    mean_loads = [r.area / (end - warm_at) for r in replicas]
    mean_load = sum(mean_loads) / num_replicas
    resident = [name for r in replicas for name in r.resident]
    return {"cold loads": cold, "distinct prefixes": len(set(traffic.prefixes)),
            "copies per prefix": len(resident) / max(len(set(resident)), 1),
            "max/mean load": max(mean_loads) / mean_load, "peak/mean load": max(r.peak for r in replicas) / mean_load,
            "cold-load cost s": cold * load_cost_s}


def run(num_replicas: int, num_prefixes: int, requests: int, traffic_kind: str, seed: int = 0,
        mean_load: float = 64.0, cache_per_replica: int | None = None, load_cost_s: float = 0.010,
        load_factor: float = 1.2, policies: Sequence[str] = POLICIES, patience: int = 4) -> dict[str, dict]:
    """Every policy over the same traffic: policy name -> its measures."""
    cache = cache_per_replica or 2 * math.ceil(num_prefixes / num_replicas)
    traffic = make_traffic(traffic_kind, num_prefixes, requests, rate=num_replicas * mean_load, seed=seed)
    return {name: simulate(make_policy(name, seed, load_factor, patience), traffic, num_replicas, cache, load_cost_s)
            for name in policies}


def print_table(results: dict[str, dict]) -> None:
    ours = results.get("ours")
    print("| policy | cold loads | per distinct prefix | vs ours | copies per prefix | max/mean load | "
          "peak/mean load | cold-load cost (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        versus = f"{m['cold loads'] / ours['cold loads']:.2f}x" if ours else "-"
        print(f"| {name} | {m['cold loads']:,} | {m['cold loads'] / m['distinct prefixes']:.3f} | {versus} | "
              f"{m['copies per prefix']:.2f} | {m['max/mean load']:.3f} | {m['peak/mean load']:.2f} | "
              f"{m['cold-load cost s']:,.1f} |")


def check_targets(kind: str, ours: dict) -> str:
    """The issue's targets for our policy: uniform, cold loads <= 1.1 per prefix; Zipf, max/mean load <= 1.25."""
    if kind == "uniform":
        value, limit, what = ours["cold loads"] / ours["distinct prefixes"], 1.1, "cold loads per distinct prefix"
    else:
        value, limit, what = ours["max/mean load"], 1.25, "max/mean load"
    return f"target ({kind}): ours {what} {value:.3f} <= {limit}: {'met' if value <= limit else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[64])
    parser.add_argument("--prefixes", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--traffic", choices=["zipf", "uniform"], nargs="+", default=["zipf", "uniform"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-load", type=float, default=64.0, help="offered ongoing requests per replica")
    parser.add_argument("--cache-per-replica", type=int, default=None, help="prefixes; default 2 * ceil(K / N)")
    parser.add_argument("--load-cost-ms", type=float, default=10.0, help="device time of one materialization")
    parser.add_argument("--load-factor", type=float, default=1.2, help="ours: the bound's c")
    parser.add_argument("--patience", type=int, default=4, help="ours: requests in a row that find every copy "
                        "of their prefix full before it spreads to another replica")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    args = parser.parse_args()
    for num_replicas, kind in itertools.product(args.replicas, args.traffic):
        cache = args.cache_per_replica or 2 * math.ceil(args.prefixes / num_replicas)
        print(f"\n{num_replicas} replicas, {args.prefixes:,} prefixes, {args.requests:,} requests, {kind} traffic, "
              f"mean load {args.mean_load:g}, cache {cache} prefixes per replica, c = {args.load_factor}, "
              f"patience {args.patience}, "
              f"seed {args.seed}")
        start = time.perf_counter()
        results = run(num_replicas, args.prefixes, args.requests, kind, args.seed, args.mean_load, cache,
                      args.load_cost_ms / 1000, args.load_factor, args.policies, args.patience)
        print_table(results)
        if "ours" in results:
            print(check_targets(kind, results["ours"]))
        print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
