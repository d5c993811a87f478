"""Prometheus metrics for the server: engine counters and gauges, request latency histograms, HTTP counts.

Engine counters live in the engine process (EngineStats); the frontend fetches a snapshot on each scrape and
exposes it through a custom collector, so a scrape always shows the engine's exact totals. Latency histograms
are observed in the frontend, where the client's experience is measured. No metric has a per-prefix or
per-request label, so the number of series stays fixed however many prefixes are served. docs/metrics.md
describes every metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

FINISH_REASONS = ("stop", "length", "abort", "error")

# Every latency histogram reaches at least 60 s: a quantile that falls beyond the last finite bucket reads as that
# bucket's bound, so with a 5 s top an overloaded server's p99 showed exactly 5.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
               60.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0)
PREFIX_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                       40.0, 60.0)


# Histograms observed where the engine runs. A single server observes them in its frontend, from the times the
# engine process reports with each step; a data-parallel replica observes its own and posts their totals with its
# stats (`histogram_totals`), and the frontend exposes each replica's with a `replica` label.
ENGINE_HISTOGRAMS = {
    "prefix_load_seconds": (("Time to materialize a prefix into KV blocks in the step (take its staged KV, write "
                             "into the cache; the disk read runs before, in the background)."), PREFIX_LOAD_BUCKETS),
    "prefix_wait_seconds": (("Time a request waited for its prefix: from its arrival at the engine until its "
                             "prefix was on the device or its read into host memory finished (0 when it already "
                             "was); one observation per request on a prefix, at its admission."),
                            PREFIX_LOAD_BUCKETS),
    "engine_step_seconds": (("Duration of one engine step (schedule, model forward, update), measured in the "
                             "engine process."), STEP_BUCKETS),
}


def engine_histogram(name: str) -> Histogram:
    """One of ENGINE_HISTOGRAMS, in no registry (EngineStatsCollector exposes it)."""
    doc, buckets = ENGINE_HISTOGRAMS[name]
    return Histogram(f"prefix_serve_{name}", doc, buckets=buckets, registry=None)


def histogram_totals(histogram: Histogram) -> dict:
    """A histogram's cumulative bucket counts and sum, as plain data: {"buckets": [[le, count], ...], "sum": s}."""
    samples = histogram.collect()[0].samples
    return {"buckets": [[s.labels["le"], s.value] for s in samples if s.name.endswith("_bucket")],
            "sum": next(s.value for s in samples if s.name.endswith("_sum"))}


class EngineStatsCollector:
    """Exposes the latest engine snapshot (from the engine loop's `stats` call) as gauges and counters, and the
    engine histograms: the frontend's own (`histograms`) for one engine, each replica's posted totals for
    data-parallel replicas."""

    def __init__(self):
        self.snapshot: dict = {}
        self.engine_up = False
        self.histograms = {name: engine_histogram(name) for name in ENGINE_HISTOGRAMS}

    def describe(self):  # nothing to describe before the first snapshot; collect() always yields the same names
        return []

    def collect(self):
        # one engine's snapshot, or {"replicas": {replica id: snapshot}} from data-parallel replicas: then every
        # engine series has a `replica` label (one value per replica) and Grafana sums them for the cluster
        replicas = self.snapshot.get("replicas")
        snapshots = sorted(replicas.items()) if replicas is not None else [(None, self.snapshot)]
        labels = ["replica"] if replicas is not None else []

        def family(cls, name: str, doc: str, value_of, extra: list[str] | None = None):
            metric = cls(f"prefix_serve_{name}", doc, labels=labels + (extra or []))
            for replica, snapshot in snapshots:
                for label_values, value in value_of(snapshot):
                    metric.add_metric(([replica] if replica is not None else []) + label_values, value)
            return metric

        def gauge(name: str, doc: str, key: str, default=0):
            return family(GaugeMetricFamily, name, doc, lambda s: [([], s.get(key, default))])

        def counter(name: str, doc: str, key: str):
            return family(CounterMetricFamily, name, doc, lambda s: [([], s.get(key, 0))])

        yield GaugeMetricFamily("prefix_serve_engine_up", "1 while the engine process runs (with replicas: while "
                                "the deployment runs), 0 after it stopped.", value=float(self.engine_up))
        yield gauge("num_requests_running", "Sequences in the running batch (each sample of an n > 1 request once "
                    "it has forked).", "running")
        yield gauge("num_requests_waiting", "Sequences waiting for admission (new or preempted).", "waiting")
        yield gauge("kv_cache_usage_ratio", "Share of KV blocks held by running sequences or pinned prefixes "
                    "(0-1); cached, unpinned prefix blocks count as free.", "kv_usage", 0.0)
        yield gauge("resident_prefixes", "Prefixes materialized in KV blocks (pinned or cached).",
                    "resident_prefixes")
        yield gauge("registered_prefixes", "Prefixes the server knows by name (loaded or registered lazily).",
                    "registered_prefixes")
        yield gauge("prefix_kv_blocks", "KV blocks holding materialized prefixes.", "prefix_blocks")
        yield gauge("kv_cache_blocks", "Total KV blocks in the cache.", "num_blocks")
        yield counter("prompt_tokens", "Prompt tokens prefilled (counted once per request at its first token; "
                      "prefix virtual tokens excluded).", "prompt_tokens")
        yield counter("generation_tokens", "Tokens generated, over all samples.", "generation_tokens")
        yield family(CounterMetricFamily, "requests_finished", "Requests finished, by reason: stop (EOS or stop "
                     "string/token), length (max_tokens or context), abort (client disconnected or cancelled), error "
                     "(its prefix could not be materialized).",
                     lambda s: [([reason], s.get("finished", {}).get(reason, 0)) for reason in FINISH_REASONS],
                     ["reason"])
        yield counter("preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.", "preemptions")
        yield counter("prefix_cache_hits", "Requests admitted onto a prefix already resident in KV blocks.",
                      "prefix_hits")
        yield counter("prefix_cache_misses", "Requests whose prefix had to be materialized first.", "prefix_misses")
        yield counter("prefix_loads", "Prefix materializations into KV blocks.", "prefix_loads")
        yield counter("engine_steps", "Engine iterations that ran the model.", "steps")
        if replicas is None:
            for histogram in self.histograms.values():
                yield from histogram.collect()
            return
        for name, (doc, _) in ENGINE_HISTOGRAMS.items():
            metric = HistogramMetricFamily(f"prefix_serve_{name}", doc, labels=["replica"])
            for replica, snapshot in snapshots:
                totals = snapshot.get("histograms", {}).get(name)
                if totals is not None:
                    metric.add_metric([replica], totals["buckets"], totals["sum"])
            yield metric


class ServerMetrics:
    """All of the server's metrics, in their own registry (several servers can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = EngineStatsCollector()
        self.registry.register(self.engine)
        self.ttft = Histogram("prefix_serve_time_to_first_token_seconds", "Time from receiving a request to its "
                              "first generated token reaching the server frontend.", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram("prefix_serve_inter_token_latency_seconds", "Time between successive token "
                             "updates of a request.", buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("prefix_serve_e2e_request_latency_seconds", "Time from receiving a request to its "
                             "last token (finished requests only).", buckets=E2E_BUCKETS, registry=self.registry)
        self.prefix_load = self.engine.histograms["prefix_load_seconds"]
        self.prefix_wait = self.engine.histograms["prefix_wait_seconds"]
        self.engine_step = self.engine.histograms["engine_step_seconds"]
        self.http_requests = Counter("prefix_serve_http_requests", "HTTP requests by route template and status "
                                     "code.", ["route", "status"], registry=self.registry)

    def update_engine(self, snapshot: dict, engine_up: bool) -> None:
        self.engine.snapshot = snapshot
        self.engine.engine_up = engine_up

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency observations for one engine request: TTFT at the first tokens, ITL between updates, E2E at the end."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.last: float | None = None

    def tokens(self, now: float, count: int = 1) -> None:
        """An update that brought `count` new tokens per sample. Several at once (a decode run) count as that
        many intervals, each an equal share of the time since the previous update."""
        if self.last is None:
            self.metrics.ttft.observe(max(0.0, now - self.arrival))
        else:
            share = max(0.0, now - self.last) / count
            for _ in range(count):
                self.metrics.itl.observe(share)
        self.last = now

    def finished(self, now: float) -> None:
        self.metrics.e2e.observe(max(0.0, now - self.arrival))
