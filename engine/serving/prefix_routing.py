"""Which engine replica serves a request: prefix affinity with a bounded load.

A prefix is materialized (its KV written into a replica's cache) on every replica that serves it, so each prefix
should live on about one replica; yet a hot prefix must not pin one replica. This is consistent hashing with
bounded loads (Mirrokni, Thorup and Zadimoghaddam, SODA 2018), made aware of which replicas hold a prefix:

- **Preference order.** Each replica owns `virtual_nodes` seeded points on a 64-bit hash ring; a prefix hashes to
  a point, and walking the ring clockwise from it orders the replicas for that prefix. A replica that joins or
  leaves changes the first choice of only the prefixes whose walk meets it first (about 1/N of them).
- **The bound.** A replica may take a request only if its load with it stays within `ceil(c * mean)`, the mean
  counting the new request: `load + 1 <= ceil(c * (total + 1) / N)`, load being ongoing requests and `c` the
  `load_factor`. With c >= 1 the least loaded replica always qualifies. The default c = 1.2 keeps the busiest
  replica under 1.25 x the mean even with the ceiling's extra request (benchmarks/routing_sim.py measures it).
- **A prefix request** goes to the replica that holds the prefix and is within the bound, the earliest in the
  prefix's order if several do. When every replica holding it is full, the prefix spreads only if that pressure
  persists: the request goes to the least loaded holder unless it is the `patience`-th request of the prefix in a
  row to find all its copies full; then (or when no replica holds the prefix) to the first replica in its order
  within the bound, which materializes it. So a prefix stays where it is resident (a replica that joins takes over
  nothing that is still resident elsewhere), and a hot prefix spills onto its next replicas in a fixed order, one
  more each time the ones it has stay full.
- **Why patience.** A replica's ongoing requests fluctuate by about the square root of their mean, so at a few
  dozen per replica the bound is crossed by noise, and a spill made on noise leaves a copy that stays: with
  patience 1 (spill at once), 2 replicas at 16 requests each materialized each uniform prefix 1.9 times. A hot
  prefix keeps its copies full on every request and spreads after a few; a cold one on a replica that is briefly
  full almost never meets `patience` misses in a row. The cost is a brief overload: a replica may take up to
  `patience - 1` requests per prefix beyond the bound (benchmarks/routing_sim.py measures both).
- **A base-model request** (no prefix) goes to the least loaded replica, ties broken by a seeded random choice.

Pure Python, stdlib only: a Ray Serve request router passes in its candidate replicas and uses the answer.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Collection, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.errors import InvalidConfigError

RING = 1 << 64


class ReplicaView(Protocol):
    """What the policy reads of a replica: its id, its load (ongoing requests, queued ones included) and the
    names of the prefixes it holds resident (a set, or any container answering `in`)."""

    @property
    def replica_id(self) -> str: ...

    @property
    def load(self) -> float: ...

    @property
    def resident(self) -> Container[str]: ...


@dataclass(frozen=True)
class ReplicaState:
    """A `ReplicaView` as plain data, for callers that have no replica object of their own."""

    replica_id: str
    load: float = 0
    resident: Container[str] = frozenset()


def hash64(seed: int, key: str) -> int:
    """A 64-bit hash of `key` that depends on `seed` only (unlike `hash()`, the same in every process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little")


class HashRing:
    """Replicas as points on a 64-bit ring. A replica's points depend only on its id and the seed, so the order
    `walk` gives over any set of replicas is the same whatever other replicas the ring holds."""

    def __init__(self, replica_ids: Collection[str], virtual_nodes: int, seed: int):
        self.replica_ids = frozenset(replica_ids)
        self._points: dict[str, list[int]] = {}  # replica id -> its sorted points
        owner_of: dict[int, str] = {}
        for replica_id in self.replica_ids:
            draw = random.Random(hash64(seed, replica_id))
            self._points[replica_id] = sorted(draw.getrandbits(64) for _ in range(virtual_nodes))
            owner_of.update(dict.fromkeys(self._points[replica_id], replica_id))
        self._positions = sorted(owner_of)
        self._owners = [owner_of[point] for point in self._positions]

    def walk(self, point: int) -> Iterator[str]:
        """Owners of the points clockwise from `point`, once round the ring (a replica recurs, once per point)."""
        start = bisect.bisect_right(self._positions, point)
        size = len(self._owners)
        for i in range(start, start + size):
            yield self._owners[i - size if i >= size else i]

    def distance(self, replica_id: str, point: int) -> int:
        """How far clockwise from `point` the replica's first point lies: `walk` meets replicas in this order."""
        points = self._points[replica_id]
        i = bisect.bisect_right(points, point)
        return points[i] - point if i < len(points) else points[0] + RING - point


class PrefixAffinityRouter:
    """Chooses a replica per request (see the module docstring). Deterministic given the seed and the sequence of
    calls; the state is the hash ring, rebuilt when an unknown replica appears, the seeded tie-breaker and each
    prefix's count of requests in a row that found its copies full (kept only while it is not zero)."""

    def __init__(self, load_factor: float = 1.2, virtual_nodes: int = 1000, seed: int = 0, patience: int = 4):
        if not load_factor >= 1.0:
            raise InvalidConfigError(f"load_factor must be at least 1.0 (got {load_factor}): below 1 no replica "
                                     "may be within the bound; 1.2 is the default")
        if virtual_nodes < 1:
            raise InvalidConfigError(f"virtual_nodes must be at least 1 (got {virtual_nodes})")
        if patience < 1:
            raise InvalidConfigError(f"patience must be at least 1 (got {patience}); 1 spills at once")
        self.load_factor = load_factor
        self.patience = patience
        self._pressure: dict[str, int] = {}  # prefix -> its requests in a row that found every copy full
        self.virtual_nodes = virtual_nodes
        self.seed = seed
        self._ring = HashRing((), virtual_nodes, seed)
        self._ties = random.Random(seed)

    def bound(self, total_load: float, num_replicas: int) -> int:
        """The most requests a replica may hold once a new request is placed: ceil(c * (total + 1) / N)."""
        return math.ceil(self.load_factor * (total_load + 1) / num_replicas)

    def choose(self, prefix: str | None, replicas: Sequence[ReplicaView]) -> str:
        """The id of the replica that should serve a request on `prefix` (None: the bare base model)."""
        if not replicas:
            raise ValueError("no replicas to route to")
        if prefix is None:
            return self._least_loaded(replicas)
        by_id = {r.replica_id: r for r in replicas}
        self._cover(by_id.keys())
        cap = self.bound(sum(r.load for r in replicas), len(replicas))
        point = hash64(self.seed, prefix)
        holders = [r for r in replicas if prefix in r.resident]
        within = [r.replica_id for r in holders if r.load + 1 <= cap]
        if within:
            self._pressure.pop(prefix, None)
            return min(within, key=lambda replica_id: self._ring.distance(replica_id, point))
        if holders:  # every copy is full: wait for the pressure to persist before making another
            pressure = self._pressure.get(prefix, 0) + 1
            if pressure < self.patience:
                self._pressure[prefix] = pressure
                return min(holders, key=lambda r: (r.load, self._ring.distance(r.replica_id, point))).replica_id
        self._pressure.pop(prefix, None)
        for replica_id in self._ring.walk(point):
            replica = by_id.get(replica_id)  # None: a replica that left, still on the ring
            if replica is not None and replica.load + 1 <= cap:
                return replica_id
        return self._least_loaded(replicas)  # unreachable with load_factor >= 1; kept for float loads

    def preference(self, prefix: str, replica_ids: Collection[str]) -> list[str]:
        """The prefix's order of preference over these replicas, loads and residency aside (a request router may
        offer the rest of it as fallback ranks)."""
        wanted = set(replica_ids)
        self._cover(wanted)
        order: dict[str, None] = {}
        for replica_id in self._ring.walk(hash64(self.seed, prefix)):
            if replica_id in wanted:
                order[replica_id] = None
                if len(order) == len(wanted):
                    break
        return list(order)

    def _cover(self, replica_ids: Collection[str]) -> None:
        """Rebuild the ring when a replica joined (replicas that left go then; until then the walk skips them)."""
        if not self._ring.replica_ids.issuperset(replica_ids):
            self._ring = HashRing(replica_ids, self.virtual_nodes, self.seed)

    def _least_loaded(self, replicas: Sequence[ReplicaView]) -> str:
        lowest = min(r.load for r in replicas)
        return self._ties.choice([r.replica_id for r in replicas if r.load == lowest])
