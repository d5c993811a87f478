"""The Ray Serve application: `serve run` / `serve deploy` / a KubeRay RayService run prefix-serve from a config.

    serve run engine.serving.serve_app:build_app cli="path/to/model --prefix-dir /prefixes --api-key KEY"
    serve deploy deploy/serve/prefix-serve.yaml          # the same application from a Serve config file

`build_app(args)` takes one argument, `cli`: the options of `prefix-serve serve` as one string (or a list), parsed
and checked by the same parser, so every option means what it means on the command line. (`--host`, `--port` and
`--data-parallel-size` are Serve's business here: Serve's HTTP proxy listens, and the config's `EngineReplica`
deployment sets `num_replicas` or `autoscaling_config`.) The application has two deployments:

- `EngineReplica` (`engine.serving.data_parallel`): the engine replicas, routed by prefix affinity;
- `Ingress`: the HTTP entry behind Serve's proxy. It runs the same aiohttp server as `prefix-serve serve`, on a
  Unix socket inside the replica, and relays each request and response to it, streaming, so the routes, errors,
  API key and metrics are the single server's, not a second implementation.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tempfile

from ray import serve

from engine.serving.data_parallel import ENGINE_DEPLOYMENT, DataParallelClient, engine_deployment

# headers that belong to one hop, not to the request or response relayed
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


def parse_cli(cli) -> tuple:
    """`prefix-serve serve` options (a string or a list) -> (args, EngineConfig, EngineProcessOptions, names,
    API key), through the `serve` subcommand's own parser and checks."""
    import argparse

    from engine.serving.server import add_parser, settings_from_args

    argv = shlex.split(cli) if isinstance(cli, str) else [str(a) for a in (cli or [])]
    parser = argparse.ArgumentParser(prog="prefix-serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *argv])
    return (args, *settings_from_args(args))


class Ingress:
    """The HTTP entry: the prefix-serve server on a Unix socket in this replica, behind Serve's proxy."""

    def __init__(self, engines, cli):
        self.engines = engines
        self.args, self.config, self.options, self.names, self.api_key = parse_cli(cli)
        self._socket_dir = tempfile.mkdtemp(prefix="prefix-serve-ingress-")
        self._socket = os.path.join(self._socket_dir, "http.sock")
        self._started: asyncio.Task | None = None
        self._session = None

    async def _start(self) -> None:
        import aiohttp
        from aiohttp import web
        from prometheus_client import disable_created_metrics

        from engine.serving.metrics import ServerMetrics
        from engine.serving.server import OpenAIServer, ServerSettings, _load_tokenizers

        client = DataParallelClient.from_handle(self.engines, self.config, self.options)
        info = await self.engines.ready_info.remote()
        client.info = info
        tokenizer, client.decode_tokenizer = await asyncio.to_thread(_load_tokenizers, info["model_path"])
        client.attach(asyncio.get_running_loop())
        disable_created_metrics()
        settings = ServerSettings(self.names, info["model_path"], info["max_model_len"], self.api_key,
                                  self.args.debug_endpoints, vocab_size=info["vocab_size"],
                                  prefix_roots=tuple(self.config.allowed_prefix_roots),
                                  request_timeout=self.args.request_timeout, stall_timeout=self.args.stall_timeout)
        runner = web.AppRunner(OpenAIServer(client, tokenizer, settings, ServerMetrics()).build_app(),
                               handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, self._socket).start()
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self._socket),
                                              auto_decompress=False)

    async def __call__(self, request):
        """Relay one HTTP request to the server and stream its answer back; a client that leaves closes the
        relayed connection, so the server aborts the request as it would for a direct client."""
        from starlette.responses import StreamingResponse

        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)
        url = "http://prefix-serve" + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        response = await self._session.request(request.method, url, headers=headers, data=await request.body())

        async def body():
            try:
                async for chunk in response.content.iter_any():
                    yield chunk
            finally:
                response.close()

        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
        return StreamingResponse(body(), status_code=response.status, headers=out_headers)


def build_app(args: dict):
    """The Serve application of `args["cli"]` (see the module docstring)."""
    cli = args.get("cli", "")
    parsed, config, options, _, _ = parse_cli(cli)
    engines = engine_deployment(parsed.data_parallel_size, routing=parsed.data_parallel_routing).bind(config, options)
    return serve.deployment(Ingress, name="Ingress").options(max_ongoing_requests=4096).bind(engines, cli)


__all__ = ["ENGINE_DEPLOYMENT", "Ingress", "build_app", "parse_cli"]
