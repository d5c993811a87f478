"""The Ray Serve request router of the engine replicas (`engine.serving.data_parallel`): Serve's routing hook with
the choice of `engine.serving.prefix_routing`. A module of its own because Serve imports the class by name, and
because it imports Ray Serve, which only `--data-parallel-size` needs.
"""

from __future__ import annotations

from collections import defaultdict

from ray.serve.request_router import RequestRouter

from engine.serving.prefix_routing import PrefixAffinityRouter, ReplicaState


class PrefixAffinityRequestRouter(RequestRouter):
    """Loads are the requests this router has in flight on each replica (every request of the deployment goes
    through the frontend's handle, so they are exact); residency is what the replicas report (their
    `record_routing_stats`) plus where this router sent each prefix."""

    def initialize_state(self, load_factor: float = 1.2, patience: int = 4, **kwargs):
        self.policy = PrefixAffinityRouter(load_factor=load_factor, patience=patience)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.sent: dict[str, set[str]] = defaultdict(set)  # replica id -> prefixes routed to it

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        prefix = (pending_request.metadata.multiplexed_model_id or None) if pending_request else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = [ReplicaState(rid, self.in_flight[rid],
                              self.sent[rid] | set((r.routing_stats or {}).get("resident", ())))
                 for rid, r in by_id.items()]
        chosen = self.policy.choose(prefix, views)
        if prefix is not None:
            self.sent[chosen].add(prefix)
        rest = [r for rid, r in by_id.items() if rid != chosen]
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    def on_request_routed(self, pending_request, replica_id, result):
        self.in_flight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id, internal_request_id):
        rid = replica_id.unique_id
        self.in_flight[rid] = max(0, self.in_flight[rid] - 1)

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id.unique_id, None)
        self.sent.pop(replica_id.unique_id, None)
