"""Data parallelism on Ray Serve: N engine replicas behind the one HTTP frontend, routed by prefix affinity.

`prefix-serve serve MODEL --data-parallel-size N` keeps the HTTP server (routes, errors, API key, metrics) in its
own process and puts the engines on Ray Serve: one `EngineReplica` deployment with N replicas, each running its
own engine process (the same `AsyncEngineClient` a single server uses; the replica only relays). Serve restarts a
replica that dies and can autoscale the deployment. `DataParallelClient` stands where the single server has its
`AsyncEngineClient`, with the same methods, and sends each request through a Serve deployment handle whose
request router is `PrefixAffinityRequestRouter`: the policy of `engine.serving.prefix_routing` (a prefix's
requests go to the replicas that hold it, spreading only past a load bound; base-model requests to the least
loaded replica).

Prefix registrations. Every replica registers the `--prefix-dir` directories itself at start. `load_prefix` is
checked on one replica and then remembered by the frontend, which sends the path along with every request for
that name, so a replica that has not seen it (one that started later, or was restarted) registers it before it
runs the request. `unload_prefix` is remembered the same way: the frontend refuses the name from then on, and
`/v1/models` answers from one replica's list with the frontend's loads and unloads applied.

Faults. A replica that dies ends its in-flight requests with a clean error (status 503) and Serve starts a new
one; the others go on.

Metrics. Each replica posts its engine's stats to a named actor (`StatsBoard`) every second, and the frontend's
`/metrics` gives each engine series a `replica` label. The same deployment runs under `serve run` and KubeRay
through `engine.serving.serve_app` (docs/distributed.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import OrderedDict

from engine.config import EngineConfig
from engine.errors import PrefixServeError, UnknownPrefixError
from engine.sampling_params import SamplingParams
from engine.serving.async_engine import (AsyncEngineClient, EngineDeadError, EngineStartupError, RequestUpdate,
                                         raise_for)
from engine.serving.engine_process import EngineProcessOptions
from engine.serving.metrics import ENGINE_HISTOGRAMS, engine_histogram, histogram_totals

logger = logging.getLogger("prefix_serve.data_parallel")
APP_NAME = "prefix-serve"
ENGINE_DEPLOYMENT = "EngineReplica"
STATS_BOARD, STATS_NAMESPACE = "prefix-serve-stats", "prefix-serve"
RESIDENT_NAMES = 4096  # prefix names a replica reports as held (its most recently served ones)
_ACCEPTED = "accepted"  # the first item of a replica's stream once its engine took the request


class EngineReplica:
    """One engine replica: a Serve replica that runs an engine process and relays requests and calls to it."""

    def __init__(self, config: EngineConfig, options: EngineProcessOptions):
        from engine.serving.server import _load_tokenizers

        self.client = AsyncEngineClient(config, options)
        self.info = self.client.start()
        if not config.skip_tokenizer_init:
            self.client.decode_tokenizer = _load_tokenizers(self.info["model_path"])[1]
        self._attached = False
        self._served: OrderedDict[str, None] = OrderedDict()  # prefix names, most recent last
        self._loaded: dict[str, str] = {}  # name -> path registered here by load_prefix
        self._board = None
        self._histograms = {name: engine_histogram(name) for name in ENGINE_HISTOGRAMS}  # posted with the stats
        self.client.on_load_seconds = self._histograms["prefix_load_seconds"].observe
        self.client.on_prefix_wait_seconds = self._histograms["prefix_wait_seconds"].observe
        self.client.on_step_seconds = self._histograms["engine_step_seconds"].observe

    def _attach(self) -> None:
        if not self._attached:
            self.client.attach(asyncio.get_running_loop())
            self._attached = True

    async def ready_info(self) -> dict:
        return self.info

    async def generate(self, request_id: str, tokens: list[int], params: SamplingParams, prefix: str | None,
                       prefix_path: str | None, stream: bool):
        """Run one request; yields _ACCEPTED (or an error payload) first, then its RequestUpdates. Cancelling the
        stream (the client went away) aborts the request in the engine."""
        self._attach()
        sink: asyncio.Queue = asyncio.Queue()
        try:
            if prefix is not None and prefix_path is not None and self._loaded.get(prefix) != prefix_path:
                await self.client.call("load_prefix", name=prefix, path=prefix_path)  # one loaded elsewhere
                self._loaded[prefix] = prefix_path
            await self.client.add(request_id, tokens, params, prefix, sink, stream=stream)
        except PrefixServeError as exc:
            yield {"status": getattr(exc, "http_status", 500), "type": getattr(exc, "error_type", type(exc).__name__),
                   "message": str(exc)}
            return
        if prefix is not None:
            self._served[prefix] = None
            self._served.move_to_end(prefix)
            while len(self._served) > RESIDENT_NAMES:
                self._served.popitem(last=False)
        yield _ACCEPTED
        finished = False
        try:
            while not finished:
                update = await sink.get()
                finished = update.finished
                yield update
        finally:
            if not finished:
                self.client.abort([request_id])

    async def call(self, method: str, args: dict):
        self._attach()
        result = await self.client.call(method, **args)
        if method == "load_prefix":
            self._loaded[args["name"]] = args["path"]
        elif method == "unload_prefix":
            self._loaded.pop(args["name"], None)
        return result

    async def record_routing_stats(self) -> dict:
        """Called by Serve every second: posts this replica's engine stats to the stats board (for /metrics) and
        tells the request router which prefixes it holds (as far as it knows: the ones it served last)."""
        from ray import serve

        self._attach()
        try:
            stats = await self.client.call("stats")
            stats["histograms"] = {name: histogram_totals(h) for name, h in self._histograms.items()}
            if self._board is None:
                self._board = stats_board()
            self._board.put.remote(serve.get_replica_context().replica_id.unique_id, stats)
        except Exception:  # noqa: BLE001 - metrics are best effort; routing goes on
            logger.exception("posting replica stats failed")
        return {"resident": list(self._served)}

    def check_health(self) -> None:
        if not self.client.alive:
            raise RuntimeError(f"the engine process is not running ({self.client.dead})")


class StatsBoard:
    """A small Ray actor: the latest engine stats of each replica, which the frontend reads for /metrics."""

    def __init__(self):
        self.latest: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, stats: dict) -> None:
        self.latest[replica] = (time.monotonic(), stats)

    def get(self, max_age: float) -> dict[str, dict]:
        """Replicas heard from within `max_age` seconds (a stopped replica drops out)."""
        now = time.monotonic()
        return {replica: stats for replica, (at, stats) in self.latest.items() if now - at <= max_age}


def stats_board():
    """The one StatsBoard actor (made by whichever side asks first)."""
    import ray

    return ray.remote(num_cpus=0)(StatsBoard).options(name=STATS_BOARD, namespace=STATS_NAMESPACE,
                                                     get_if_exists=True, lifetime="detached").remote()


def engine_deployment(num_replicas: int, replica_cpus: float = 1.0, routing: str = "prefix"):
    """The `EngineReplica` Serve deployment with the prefix-affinity request router ("prefix"), or Serve's default
    router, which looks at queue lengths alone ("load", for comparison). A Serve config file may override its
    replicas (`num_replicas`, `autoscaling_config`) and resources."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    router = (RequestRouterConfig(request_router_class="engine.serving.serve_router:PrefixAffinityRequestRouter",
                                  request_routing_stats_period_s=1)
              if routing == "prefix" else RequestRouterConfig(request_routing_stats_period_s=1))
    return serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT).options(
        num_replicas=num_replicas, max_ongoing_requests=1024, health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5, ray_actor_options={"num_cpus": replica_cpus}, request_router_config=router)


class DataParallelClient:
    """The frontend's side: `AsyncEngineClient`'s methods over a Serve deployment of engine replicas."""

    def __init__(self, config: EngineConfig, options: EngineProcessOptions, num_replicas: int,
                 replica_cpus: float = 1.0, routing: str = "prefix"):
        self.config = config
        self.options = options
        self.num_replicas = num_replicas
        self.replica_cpus = replica_cpus
        self.routing = routing
        self.decode_tokenizer = None  # replicas decode; kept for the server's interface
        self.on_load_seconds = lambda seconds: None  # the replicas observe their histograms and post their totals
        self.on_prefix_wait_seconds = lambda seconds: None
        self.on_step_seconds = lambda seconds: None
        self.info: dict = {}
        self.dead: str | None = None
        self.dead_event: asyncio.Event | None = None
        self._handle = None
        self._board = None
        self._local_ray = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, tuple[object, asyncio.Task]] = {}
        self._loaded: dict[str, str] = {}  # name -> path, from load_prefix; sent with each request for the name
        self._unloaded: set[str] = set()

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 900.0) -> dict:
        """Start (or join, with $RAY_ADDRESS) Ray, deploy the replicas and wait until they are ready. Blocking."""
        try:
            return self._start(timeout)
        except Exception as exc:  # noqa: BLE001 - reported by the server in one message, as a single engine's
            raise EngineStartupError(f"the engine replicas did not start: {type(exc).__name__}: {exc}") from exc

    def _start(self, timeout: float) -> dict:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=False)
            self._local_ray = "RAY_ADDRESS" not in os.environ  # else it joined a cluster, which outlives it
        serve.start(proxy_location="Disabled")
        deployment = engine_deployment(self.num_replicas, self.replica_cpus, self.routing)
        self._handle = serve.run(deployment.bind(self.config, self.options), name=APP_NAME, route_prefix=None)
        self._board = stats_board()
        self.info = self._handle.ready_info.remote().result(timeout_s=timeout)
        return self.info

    @classmethod
    def from_handle(cls, handle, config: EngineConfig, options: EngineProcessOptions) -> DataParallelClient:
        """A client of replicas that a Serve application already runs (`engine.serving.serve_app`)."""
        client = cls(config, options, 0)
        client._handle, client._board = handle, stats_board()
        return client

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.dead_event = asyncio.Event()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Delete the replicas (each stops its engine process); stop Serve and Ray too when this server started
        them (not when it joined a cluster through $RAY_ADDRESS)."""
        import ray
        from ray import serve

        try:
            serve.delete(APP_NAME)
            if self._local_ray:
                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down: nothing left to tell
            logger.exception("stopping the engine replicas failed")

    @property
    def alive(self) -> bool:
        return self.dead is None  # Serve restarts a replica that dies

    @property
    def silent_for(self) -> float:
        return 0.0  # Serve health-checks each replica (check_health) and replaces a stuck one

    # ---- requests -------------------------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefix: str | None,
                  sink: asyncio.Queue, tag: object = None, stream: bool = True) -> None:
        if prefix is not None and prefix in self._unloaded:
            raise UnknownPrefixError(f"Unknown prefix {prefix!r}: it was unloaded.")
        handle = self._handle.options(stream=True, multiplexed_model_id=prefix or "")
        response = handle.generate.remote(request_id, list(prompt_token_ids), params, prefix,
                                          self._loaded.get(prefix), stream)
        try:
            first = await response.__anext__()
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the replica died before it answered
            raise EngineDeadError(f"The engine replica failed: {type(exc).__name__}") from None
        if first != _ACCEPTED:
            raise_for(first)
        self._streams[request_id] = (response, self._loop.create_task(self._relay(request_id, response, sink, tag)))

    async def _relay(self, request_id: str, response, sink: asyncio.Queue, tag: object) -> None:
        try:
            async for update in response:
                sink.put_nowait(dataclasses.replace(update, tag=tag, time=time.monotonic()))  # this host's clock
                if update.finished:
                    return
            error = {"status": 503, "type": "EngineDeadError", "message": "The engine replica ended the stream."}
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - the replica died: this request ends with an error, not a hang
            error = {"status": 503, "type": "EngineDeadError",
                     "message": f"The engine replica serving this request failed ({type(exc).__name__})."}
        finally:
            self._streams.pop(request_id, None)
        sink.put_nowait(RequestUpdate(request_id, tag, [], True, time.monotonic(), error))

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            entry = self._streams.pop(request_id, None)
            if entry is not None:
                response, task = entry
                response.cancel()  # the replica's generator is cancelled, and aborts the request in its engine
                task.cancel()

    async def call(self, method: str, **args):
        if method == "load_prefix":
            info = await self._call_one(method, args)
            self._loaded[args["name"]] = args["path"]
            self._unloaded.discard(args["name"])
            return info
        if method == "unload_prefix":
            name = args["name"]
            if name in self._unloaded or (name not in self._loaded
                                          and name not in dict(await self._call_one("list_prefixes", {}))):
                raise UnknownPrefixError(f"Unknown prefix {name!r}.")
            self._loaded.pop(name, None)
            self._unloaded.add(name)
            return {"name": name}
        if method == "stats":  # every replica's, as posted each second: {"replicas": {replica id: stats}}
            return {"replicas": await self._board.get.remote(5.0)}
        if method == "list_prefixes":
            listed = dict(await self._call_one(method, args))
            listed.update({name: path for name, path in self._loaded.items() if name not in listed})
            return [[name, path] for name, path in sorted(listed.items()) if name not in self._unloaded]
        return await self._call_one(method, args)

    async def _call_one(self, method: str, args: dict):
        try:
            return await self._handle.call.remote(method, args)
        except PrefixServeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a Ray error wrapping the replica's own
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PrefixServeError):
                raise cause from None
            raise EngineDeadError(f"The engine replica failed: {type(exc).__name__}") from None
