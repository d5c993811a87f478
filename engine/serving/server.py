"""`prefix-serve serve`: an OpenAI-compatible HTTP server (aiohttp) in front of an engine process.

The frontend parses and tokenizes requests, streams SSE, checks API keys and exports metrics; the EngineCore
runs in its own process (`engine.serving.engine_process`), reached through `engine.serving.async_engine`. A
prefix is chosen by putting its name in `model`, as vLLM does for LoRA adapters. docs/server.md describes the API,
`/openapi.json` (engine.serving.openapi) describes it for tools, and docs/reliability.md states what is promised
under load and attack.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from engine.errors import InvalidConfigError, PrefixServeError, PromptTooLongError, RequestTimeoutError, quote
from engine.model_loader import DEMO_PREFIX_DIR
from engine.prefix_registry import allowed_path
from engine.serving import openapi, protocol
from engine.serving.async_engine import raise_for
from engine.serving.engine_process import HEARTBEAT_SECONDS, configure_logging
from engine.serving.metrics import RequestTimer

logger = logging.getLogger("prefix_serve.server")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


DEFAULT_STALL_TIMEOUT = 5.0  # /health: seconds without a word from the engine loop before it answers 503


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...]
    model_path: str
    max_model_len: int
    api_key: str | None = None
    debug_endpoints: bool = False
    vocab_size: int | None = None  # token-id prompts are checked against it before they reach the engine
    prefix_roots: tuple[str, ...] = ()  # where /v1/load_prefix paths may lead (checked here, then in the engine)
    request_timeout: float | None = None  # a request still unfinished after this many seconds is aborted (504)
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


def _dumps(obj) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate a client sent, quoted in a message: escaped, it is valid JSON
        return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    return json_response(protocol.error_body(status, message, code), status)


class Generation:
    """The engine requests behind one HTTP request (one per prompt): starts them, yields updates, aborts leftovers.

    `close()` is safe at any moment, even before `start()`: every prompt counts as unfinished from the start, and
    aborting a request the engine never got changes nothing. So a caller that puts `start()` inside the
    try/finally that closes it aborts every request the engine accepted, however the handler ends."""

    def __init__(self, server: "OpenAIServer", request_id: str, prompts: list[list[int]], params, prefix,
                 stream: bool, arrival: float | None = None):
        self.server = server
        self.client = server.client
        self.request_id = request_id
        self.ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.prompts = prompts
        self.params = params
        self.prefix = prefix
        self.stream = stream
        self.sink: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic() if arrival is None else arrival  # latencies count from here
        timeout = server.settings.request_timeout
        self.deadline = None if timeout is None else self.arrival + timeout
        self._unfinished = set(self.ids)

    async def _in_time(self, awaitable):
        """`awaitable`'s result, or RequestTimeoutError once the request's deadline has passed."""
        if self.deadline is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, self.deadline - time.monotonic())
        except asyncio.TimeoutError:
            self.close()
            raise RequestTimeoutError(
                f"The request did not finish within the server's deadline of {self.server.settings.request_timeout:g} "
                "s (--request-timeout); it was aborted.") from None

    async def start(self) -> None:
        """Queue every prompt; if the engine rejects one, abort the others and raise its error."""
        adds = [self.client.add(rid, tokens, self.params, self.prefix, self.sink, tag=i, stream=self.stream)
                for i, (rid, tokens) in enumerate(zip(self.ids, self.prompts))]
        results = await self._in_time(asyncio.gather(*adds, return_exceptions=True))
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.close()
            raise errors[0]

    async def updates(self):
        """Yield RequestUpdates until every prompt finished; records the latency histograms."""
        timers = {rid: RequestTimer(self.server.metrics, self.arrival) for rid in self.ids}
        while self._unfinished:
            update = await self._in_time(self.sink.get())
            if update.error is not None:  # the engine died, or this prompt failed after it was queued
                self._unfinished.discard(update.request_id)
                self.close()  # abort the request's other prompts
                raise_for(update.error)
            timer = timers[update.request_id]
            new_tokens = max((len(s.token_ids) for s in update.samples), default=0)
            if new_tokens:
                timer.tokens(update.time, new_tokens)
            if update.finished:
                self._unfinished.discard(update.request_id)
                timer.finished(update.time)
            yield update

    def close(self) -> None:
        """Abort whatever has not finished: the client is gone, cancelled, or a sibling prompt failed."""
        if self._unfinished:
            self.client.abort(sorted(self._unfinished))
            self._unfinished.clear()


class OpenAIServer:
    def __init__(self, client, tokenizer, settings: ServerSettings, metrics):
        self.client = client
        self.tokenizer = tokenizer  # for encoding, in its own thread; the client decodes with its own copy
        # One thread: a long prompt is tokenized off the event loop, and a fast tokenizer is never used by two
        # threads at once.
        self._tokenize_thread = ThreadPoolExecutor(1, thread_name_prefix="prefix-serve-tokenize")
        self.max_prompt_chars = max_prompt_chars(tokenizer, settings.max_model_len)
        self.settings = settings
        self.metrics = metrics
        self.base_name = settings.served_model_names[0]
        self.prefix_roots = [Path(root).resolve() for root in settings.prefix_roots]
        self.openapi: dict = {}  # built with the app, from the routes it registers
        client.on_load_seconds = metrics.prefix_load.observe
        client.on_prefix_wait_seconds = metrics.prefix_wait.observe
        client.on_step_seconds = metrics.engine_step.observe

    def close(self) -> None:
        self._tokenize_thread.shutdown(wait=False, cancel_futures=True)

    # ---- app ------------------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_middleware, self._error_middleware, self._auth_middleware],
                              client_max_size=protocol.MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/load_prefix", self.load_prefix)
        app.router.add_post("/v1/unload_prefix", self.unload_prefix)
        app.router.add_get("/openapi.json", self.openapi_spec)
        app.router.add_get("/docs", self.docs)
        if self.settings.debug_endpoints:
            app.router.add_get("/debug/engine_state", self.debug_state)
        self.openapi = openapi.document(registered_routes(app), _version())
        return app

    @web.middleware
    async def _count_middleware(self, request: web.Request, handler):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        response = await handler(request)
        self.metrics.http_requests.labels(route, str(response.status)).inc()
        return response

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler):
        try:
            return await handler(request)
        except PrefixServeError as exc:
            return error_response(exc.http_status, str(exc), getattr(exc, "error_type", type(exc).__name__))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.reason if exc.text is None else f"{exc.reason}: {quote(request.path)}"
            return error_response(exc.status, message)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: log it, answer 500, keep serving
            logger.exception("unhandled error on %s %s", request.method, quote(request.path))
            # its text may hold anything (a path, a client's value): the log has it, the client gets the type
            return error_response(500, f"Internal server error ({type(exc).__name__}); the server log has the "
                                       "details.", "internal_error")

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler):
        key = self.settings.api_key
        if key is not None and request.path != "/health":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise protocol.AuthenticationError(
                    "Missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server was "
                    "started with (--api-key).")
        return await handler(request)

    async def _body(self, request: web.Request) -> dict:
        return protocol.parse_json_body(await request.read(), request.charset)

    def _prefix_for(self, model: str | None) -> str | None:
        """`model` names the base model (no prefix) or a prefix; the engine answers 404 for unknown names."""
        if model is None or model in self.settings.served_model_names:
            return None
        return protocol.check_name(model, "'model'")  # a prefix name is also a directory name: bound it here

    async def _call(self, method: str, **args):
        """An engine call, bounded by --request-timeout when it is set (a wedged engine would never answer)."""
        timeout = self.settings.request_timeout
        if timeout is None:
            return await self.client.call(method, **args)
        try:
            return await asyncio.wait_for(self.client.call(method, **args), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"The engine did not answer within the server's deadline of {timeout:g} s "
                                      "(--request-timeout).") from None

    def _stalled(self) -> bool:
        return self.client.silent_for > self.settings.stall_timeout

    # ---- simple routes --------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """503 when the engine process is gone, or when its loop has sent nothing (not even its once-a-second
        heartbeat) for --stall-timeout seconds: it is stopped, or stuck in one step."""
        if not self.client.alive:
            return error_response(503, f"The engine process is not running ({self.client.dead}).", "engine_dead")
        if self._stalled():
            return error_response(503, f"The engine has not reported for {self.client.silent_for:.1f} s (more than "
                                       f"--stall-timeout {self.settings.stall_timeout:g} s): it is stopped or stuck "
                                       "in one step.", "engine_stalled")
        return web.Response(text="")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if self.client.alive and not self._stalled():  # a stalled engine would not answer: serve what is known
            try:
                stats = await asyncio.wait_for(self.client.call("stats"), self.settings.stall_timeout)
                self.metrics.update_engine(stats, True)
            except (PrefixServeError, asyncio.TimeoutError):
                pass
        self.metrics.engine.engine_up = self.client.alive
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        """Roots name no server directory: a base model's is its name, a prefix's its directory relative to the
        root it lies under."""
        created = int(time.time())
        cards = [protocol.model_card(name, name, None, self.settings.max_model_len, created)
                 for name in self.settings.served_model_names]
        for name, path in await self._call("list_prefixes"):
            cards.append(protocol.model_card(name, path, self.base_name, self.settings.max_model_len, created))
        return json_response({"object": "list", "data": cards})

    async def load_prefix(self, request: web.Request) -> web.Response:
        """The path's form is checked first, then its place (resolved, in a thread: file-system work never runs
        on the event loop, nor in the engine's loop for a path that is refused)."""
        name, path = protocol.parse_load_prefix(await self._body(request))
        if name in self.settings.served_model_names:
            raise protocol.BadRequestError(f"{quote(name)} is the base model's name; choose another prefix name.")
        resolved = await asyncio.get_running_loop().run_in_executor(None, allowed_path, path, self.prefix_roots)
        info = await self._call("load_prefix", name=name, path=resolved)
        return json_response({"status": "ok", "prefix_name": info["name"], "prefix_path": info["path"],
                              "num_virtual_tokens": info["num_virtual_tokens"]})

    async def unload_prefix(self, request: web.Request) -> web.Response:
        name = protocol.parse_unload_prefix(await self._body(request))
        await self._call("unload_prefix", name=name)
        return json_response({"status": "ok", "prefix_name": name})

    async def debug_state(self, request: web.Request) -> web.Response:
        return json_response(await self._call("debug_state"))

    async def openapi_spec(self, request: web.Request) -> web.Response:
        return json_response(self.openapi)

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=openapi.docs_page(self.openapi), content_type="text/html")

    # ---- completions ----------------------------------------------------------------------------------------
    def _check_prompt_chars(self, chars: int) -> None:
        """Refuse, before tokenizing it, a text that has too many characters to fit the context in any case."""
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise PromptTooLongError(
                f"The prompt has {chars} characters, more than {self.max_prompt_chars} (a bound on what the "
                f"maximum context of {self.settings.max_model_len} tokens can hold); it was not tokenized.")

    def _tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        # as LLM.generate does, special tokens included
        return [p if isinstance(p, list) else self.tokenizer(p).input_ids for p in prompts]

    async def _in_tokenizer_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_thread, fn, *args)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()  # the latency histograms count from here, before reading and tokenizing
        req = protocol.parse_completion_request(await self._body(request), self.settings.max_model_len,
                                                self.settings.vocab_size)
        if self.tokenizer is None and any(isinstance(p, str) for p in req.prompts):
            raise protocol.BadRequestError("This model has no tokenizer: send 'prompt' as token ids.")
        texts = [prompt for prompt in req.prompts if isinstance(prompt, str)]
        for text in texts:
            self._check_prompt_chars(len(text))
        # token-id prompts need no tokenizer: no thread hop, so nothing can cancel the handler before the engine
        # has the request
        prompts = await self._in_tokenizer_thread(self._tokenize, req.prompts) if texts else req.prompts
        return await self._generate(request, arrival, "cmpl", req.model, prompts, req.params, req.stream,
                                    req.return_token_ids, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req = protocol.parse_chat_request(await self._body(request))
        self._check_prompt_chars(sum(len(m["content"]) for m in req.messages))  # before the template renders them
        prompt = await self._in_tokenizer_thread(self._chat_prompt, req)
        default_max = max(1, self.settings.max_model_len - len(prompt))  # the engine stops at the context anyway
        params = protocol.sampling_params(req.params_body, default_max)
        return await self._generate(request, arrival, "chatcmpl", req.model, [prompt], params, req.stream,
                                    req.return_token_ids, chat=True)

    async def _generate(self, request: web.Request, arrival: float, kind: str, model: str | None,
                        prompts: list[list[int]], params, stream: protocol.StreamOptions, return_token_ids: bool,
                        chat: bool) -> web.StreamResponse:
        """Queue the prompts (errors become 4xx before any byte is sent), then answer at once or as SSE."""
        gen = Generation(self, protocol.new_id(kind), prompts, params, self._prefix_for(model), stream.stream,
                         arrival)
        try:  # start() inside: a handler cancelled once the engine has accepted, but before start() returns, aborts
            await gen.start()
            if stream.stream:
                return await self._stream(request, gen, model or self.base_name, stream.include_usage,
                                          return_token_ids, chat)
            return await self._complete(gen, model or self.base_name, return_token_ids, chat)
        finally:
            gen.close()  # aborts the engine requests if the client went away (the handler is cancelled)

    def _chat_prompt(self, req: protocol.ChatRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise protocol.BadRequestError("This model's tokenizer has no chat template; use /v1/completions.")
        try:
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raises what the template author chose
            raise protocol.BadRequestError(f"The chat template rejected the messages: {exc}") from None
        self._check_prompt_chars(len(text))
        return self.tokenizer(text, add_special_tokens=False).input_ids  # the template adds its own

    async def _complete(self, gen: Generation, model: str, return_token_ids: bool, chat: bool) -> web.Response:
        n = gen.params.n
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        finish: dict[int, tuple] = {}
        async for update in gen.updates():
            for s in update.samples:
                index = update.tag * n + s.index
                texts.setdefault(index, []).append(s.text)
                tokens.setdefault(index, []).extend(s.token_ids)
                if s.finish_reason is not None:
                    finish[index] = (s.finish_reason, s.stop_reason)
        choices = []
        for index in range(len(gen.prompts) * n):
            reason, stop_reason = finish.get(index, (None, None))
            ids = tokens.get(index, []) if return_token_ids else None
            text = "".join(texts.get(index, []))
            if chat:
                choices.append(protocol.chat_choice(index, text, reason, stop_reason, ids))
            else:
                prompt_ids = gen.prompts[index // n] if return_token_ids else None
                choices.append(protocol.completion_choice(index, text, reason, stop_reason, ids, prompt_ids))
        usage = protocol.usage(sum(map(len, gen.prompts)), sum(map(len, tokens.values())))
        shape = protocol.chat_response if chat else protocol.completion_response
        return json_response(shape(gen.request_id, model, choices, usage))

    async def _stream(self, request: web.Request, gen: Generation, model: str, include_usage: bool,
                      return_token_ids: bool, chat: bool) -> web.StreamResponse:
        """SSE in OpenAI's chunk format, one event per token update, flushed as it is written."""
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        created, n = int(time.time()), gen.params.n
        shape = protocol.chat_response if chat else protocol.completion_response

        async def send(choices: list[dict], usage=None) -> None:
            body = shape(gen.request_id, model, choices, usage, created, chunk=True)
            await response.write(b"data: " + _dumps(body) + b"\n\n")

        completion_tokens = 0
        try:
            if chat:
                for index in range(len(gen.prompts) * n):
                    await send([protocol.chat_chunk_choice(index, {"role": "assistant", "content": ""})])
            async for update in gen.updates():
                for s in update.samples:
                    completion_tokens += len(s.token_ids)
                    index = update.tag * n + s.index
                    ids = s.token_ids if return_token_ids else None
                    if not (s.text or s.finish_reason or ids):
                        continue
                    if not chat:
                        await send([protocol.completion_choice(index, s.text, s.finish_reason, s.stop_reason, ids)])
                        continue
                    if s.text or ids:
                        await send([protocol.chat_chunk_choice(index, {"content": s.text}, token_ids=ids)])
                    if s.finish_reason is not None:
                        await send([protocol.chat_chunk_choice(index, {}, s.finish_reason, s.stop_reason)])
            if include_usage:
                await send([], protocol.usage(sum(map(len, gen.prompts)), completion_tokens))
        except PrefixServeError as exc:  # the engine died, or a prompt failed, mid-stream: the status is sent
            body = protocol.error_body(exc.http_status, str(exc), getattr(exc, "error_type", type(exc).__name__))
            await response.write(b"data: " + _dumps(body) + b"\n\n")
        except ConnectionError:  # the client went away; the caller's `finally` aborts the engine requests
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# ---- CLI ------------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    from dataclasses import fields

    from engine.config import EngineConfig
    from workers.attention import available_backends
    from workers.cuda_graphs import DEFAULT_BATCH_SIZES

    parser = subparsers.add_parser(
        "serve", help="Run the OpenAI-compatible HTTP server.",
        description="Serve a base model and its PEFT prefix-tuning adapters over an OpenAI-compatible HTTP API "
                    "(/v1/completions, /v1/chat/completions, /v1/models, /v1/load_prefix, /v1/unload_prefix, "
                    "/health, /metrics, /openapi.json, /docs). Choose a prefix by putting its name in the request's "
                    "`model`.")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="Hugging Face model directory. Omitted: the embedded SmolLM2-135M-Instruct, with the "
                             "demo prefixes in engine/demo_prefixes/ when the package ships them.")
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1",
                     help="Address to listen on (default: 127.0.0.1; 0.0.0.0 for all interfaces).")
    net.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000; 0 picks a free one).")
    net.add_argument("--api-key", default=None, metavar="KEY",
                     help="Require 'Authorization: Bearer KEY' on every route except /health (default: "
                          "$PREFIX_SERVE_API_KEY; neither set: no auth).")
    net.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="Names that select the base model in `model`; the first is reported in responses "
                          "(default: MODEL as given, or SmolLM2-135M-Instruct).")
    net.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                     help="Abort a request still unfinished this many seconds after it arrived, and answer 504 (or "
                          "an SSE error event once streaming) (default: no deadline).")
    net.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                     help="/health answers 503 when the engine loop has sent nothing, not even its heartbeat, for "
                          "this long: it is stopped, or stuck in one step. Raise it above the longest step a slow "
                          "device takes (default: %(default)s).")
    net.add_argument("--debug-endpoints", action="store_true",
                     help="Add GET /debug/engine_state (integrity check and KV block counts), for tests.")
    net.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="Logging level (default: INFO).")
    prefixes = parser.add_argument_group("prefixes")
    prefixes.add_argument("--prefix-dir", action="append", default=[], metavar="DIR",
                          help="Register every subdirectory of DIR holding a PEFT prefix adapter, named after the "
                               "subdirectory (configs are read at startup, tensors on first use; subdirectories "
                               "added later are found on first request). Also allows /v1/load_prefix paths under "
                               "DIR. Repeatable.")
    prefixes.add_argument("--allowed-prefix-root", action="append", default=[], metavar="DIR",
                          help="Allow /v1/load_prefix paths under DIR without registering its contents. "
                               "Repeatable. With neither this nor --prefix-dir, loading by path is refused (403).")
    engine = parser.add_argument_group("engine")
    # each option sets the EngineConfig field of its name (_engine_config), and takes that field's default
    default = {f.name: f.default for f in fields(EngineConfig)}
    engine.add_argument("--device", default=default["device"], help="cpu, cuda or cuda:N (default: %(default)s).")
    engine.add_argument("--dtype", default=default["dtype"], choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU, bfloat16 on CUDA (default: %(default)s).")
    engine.add_argument("--executor", default=default["executor"], choices=["inprocess", "mp", "ray"],
                        help="Where the model workers run: inside the engine process (inprocess, one rank), one "
                             "local process per rank (mp), or one Ray actor per rank in a placement group (ray; "
                             "ray.init() honours $RAY_ADDRESS) (default: inprocess for one rank, mp for several).")
    engine.add_argument("--tensor-parallel-size", type=int, default=default["tensor_parallel_size"], metavar="N",
                        help="Split the model over N ranks by attention head (Llama, Mistral, Qwen2); NCCL "
                             "between GPUs, gloo on CPU (default: %(default)s).")
    engine.add_argument("--placement-strategy", default=default["placement_strategy"],
                        choices=["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"],
                        help="How the ray executor places its ranks on the cluster's nodes (default: %(default)s; "
                             "ignored inside a caller's placement group, such as a Ray Serve replica's).")
    engine.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                        help="Serve from N engine replicas on Ray Serve (a local Ray instance, or the cluster of "
                             "$RAY_ADDRESS), each prefix routed to the replicas that hold it (docs/distributed.md). "
                             "1: one engine process, no Ray (default: %(default)s).")
    engine.add_argument("--data-parallel-routing", default="prefix", choices=["prefix", "load"],
                        help="How requests pick a replica: prefix (a prefix's requests go to the replicas that hold "
                             "it, within a load bound) or load (Ray Serve's default, by queue length alone; for "
                             "comparison) (default: %(default)s).")
    engine.add_argument("--block-size", type=int, default=default["block_size"],
                        help="Tokens per KV-cache block (default: %(default)s).")
    engine.add_argument("--num-kv-blocks", type=int, default=default["num_kv_blocks"],
                        help="KV-cache size in blocks (default: sized from memory).")
    engine.add_argument("--max-num-seqs", type=int, default=default["max_num_seqs"],
                        help="Most sequences in one batch (default: %(default)s).")
    engine.add_argument("--max-num-batched-tokens", type=int, default=default["max_num_batched_tokens"],
                        help="Token budget of one step (default: %(default)s).")
    engine.add_argument("--max-model-len", type=int, default=default["max_model_len"],
                        help="Context limit for prefix + prompt + output (default: the model's, capped by the "
                             "KV cache and by a sliding attention window).")
    engine.add_argument("--attention-backend", default=default["attention_backend"], choices=available_backends(),
                        help="Attention kernel (default: the best available for the device: on CPU, cpu, "
                             "prefix-serve's C++ kernel, when it builds, else torch).")
    engine.add_argument("--gpu-memory-utilization", type=float, default=default["gpu_memory_utilization"],
                        help="Share of GPU memory for weights and KV cache (default: %(default)s).")
    engine.add_argument("--cpu-kv-cache-gb", type=float, default=default["cpu_kv_cache_gb"],
                        help="KV-cache size on CPU, in GiB (default: %(default)s).")
    engine.add_argument("--kv-cache-prefault", action=argparse.BooleanOptionalAction,
                        default=default["kv_cache_prefault"],
                        help="CPU: write every page of the KV cache at startup, so serving never pays a block's "
                             "first-write page faults and a cache larger than the available memory fails at "
                             "startup; off, memory is taken as blocks are first used (default: off).")
    engine.add_argument("--prefix-host-cache-gb", type=float, default=default["prefix_host_cache_gb"], metavar="GB",
                        help="GiB of host memory for prefix KV (page-locked on GPUs), so a prefix evicted from the "
                             "device comes back without a disk read; least recently used first out (default: a "
                             "quarter of host memory, at most 64, on GPUs; 0 on CPU, where the KV cache is host "
                             "memory already).")
    engine.add_argument("--decode-steps", type=int, default=default["decode_steps"],
                        help="Decode steps run back to back on the device per engine step when nothing waiting "
                             "could start (not for requests with a seed); tokens then stream in groups of up to "
                             "this many (default: 16 on GPUs, 1 on CPU).")
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=default["async_scheduling"],
                        help="Schedule and send each engine step while the workers still run the one before, "
                             "reading sampled tokens one step late; the tokens are the same as without it. For GPUs, "
                             "where the host's work then overlaps the device's; no gain on CPU (default: off).")
    engine.add_argument("--cuda-graphs", default=default["cuda_graphs"], choices=["auto", "on", "off"],
                        help="Run pure-decode steps as CUDA graphs, one captured per batch size: auto (on CUDA "
                             "devices), on (on a CPU too, re-running the captured function; for tests) or off "
                             "(every step eager) (default: %(default)s).")
    engine.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=default["cuda_graph_sizes"],
                        metavar="B", help="Decode batch sizes to capture a CUDA graph for; a batch runs as the "
                                          "smallest that holds it, one larger than all of them eagerly (default: "
                                          f"{' '.join(map(str, DEFAULT_BATCH_SIZES))}).")
    engine.add_argument("--cuda-graph-memory-mb", type=float, default=default["cuda_graph_memory_mb"],
                        metavar="MB", help="Capture no further CUDA graph once the graphs hold this much device "
                                           "memory, in MiB; the sizes left run eagerly (default: %(default)s).")
    engine.add_argument("--fused-layers", default=default["fused_layers"], choices=["auto", "on", "off"],
                        help="Run Llama, Mistral and Qwen2 decoder layers with fused kernels (about 9 per layer "
                             "instead of 40): auto (on CUDA devices, and on CPUs where prefix-serve's C++ kernels "
                             "build), on (elsewhere too, with torch ops; for tests) or off (Hugging Face's layers) "
                             "(default: %(default)s).")
    parser.set_defaults(func=run)
    return parser


def _prefix_dirs(args) -> list[str]:
    dirs = []
    for directory in args.prefix_dir:
        if not Path(directory).is_dir():
            raise SystemExit(f"prefix-serve serve: --prefix-dir {directory!r} is not a directory.")
        dirs.append(str(Path(directory).resolve()))
    if args.model is None and DEMO_PREFIX_DIR.is_dir() and any(DEMO_PREFIX_DIR.glob("*/adapter_config.json")):
        dirs.insert(0, str(DEMO_PREFIX_DIR))
    return dirs


def _engine_config(args, prefix_dirs: list[str]):
    from dataclasses import fields

    from engine.config import EngineConfig

    # every option named after an EngineConfig field sets it (add_parser); the prefix roots are derived
    settings = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    roots = [d for d in prefix_dirs if d != str(DEMO_PREFIX_DIR)] + [str(Path(r).resolve())
                                                                     for r in args.allowed_prefix_root]
    return EngineConfig(**settings, allowed_prefix_roots=tuple(roots))


def run(args) -> int:
    configure_logging(args.log_level, "%(asctime)s %(name)s %(levelname)s %(message)s")
    config, options, names, api_key = settings_from_args(args)
    return asyncio.run(serve(config, options, names, args.host, args.port, api_key, args.debug_endpoints,
                             request_timeout=args.request_timeout, stall_timeout=args.stall_timeout,
                             data_parallel_size=args.data_parallel_size, routing=args.data_parallel_routing))


def settings_from_args(args) -> tuple:
    """The parsed `serve` options, checked, as (EngineConfig, EngineProcessOptions, served names, API key); a bad
    option raises SystemExit with a message. Shared with the Ray Serve application (`engine.serving.serve_app`)."""
    from engine.serving.engine_process import EngineProcessOptions
    from engine.model_loader import EMBEDDED_MODEL_NAME

    prefix_dirs = _prefix_dirs(args)
    for root in args.allowed_prefix_root:
        if not Path(root).is_dir():
            raise SystemExit(f"prefix-serve serve: --allowed-prefix-root {root!r} is not a directory.")
    names = args.served_model_name or []
    if args.model is None and len(names) > 1 and Path(names[-1]).is_dir():
        # `--served-model-name NAME MODEL_DIR` reads MODEL_DIR as a second name; serving the embedded model
        # instead would be a silent surprise
        raise SystemExit(f"prefix-serve serve: --served-model-name took the directory {names[-1]!r} as a name. Put "
                         "MODEL before the option: prefix-serve serve MODEL --served-model-name NAME.")
    if args.data_parallel_size < 1:
        raise SystemExit(f"prefix-serve serve: --data-parallel-size must be at least 1, got {args.data_parallel_size}.")
    if args.decode_steps is not None and args.decode_steps < 1:
        raise SystemExit(f"prefix-serve serve: --decode-steps must be at least 1, got {args.decode_steps}.")
    if args.request_timeout is not None and not 0 < args.request_timeout < float("inf"):
        raise SystemExit(f"prefix-serve serve: --request-timeout must be a positive number of seconds, got "
                         f"{args.request_timeout}.")
    if not 2 * HEARTBEAT_SECONDS <= args.stall_timeout < float("inf"):
        raise SystemExit(f"prefix-serve serve: --stall-timeout must be at least {2 * HEARTBEAT_SECONDS:g} seconds "
                         f"(the engine's heartbeat comes every {HEARTBEAT_SECONDS:g} s), got {args.stall_timeout}.")
    try:
        config = _engine_config(args, prefix_dirs)
    except InvalidConfigError as exc:
        field = getattr(exc, "field", "")
        message = f"--{field.replace('_', '-')}{str(exc)[len(field):]}" if hasattr(args, field) else str(exc)
        raise SystemExit(f"prefix-serve serve: {message} See prefix-serve serve --help.") from None
    options = EngineProcessOptions(prefix_dirs=tuple(prefix_dirs), debug=args.debug_endpoints,
                                   log_level=args.log_level)
    names = tuple(args.served_model_name or [args.model if args.model is not None else EMBEDDED_MODEL_NAME])
    api_key = args.api_key or os.environ.get("PREFIX_SERVE_API_KEY") or None
    return config, options, names, api_key


def registered_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves; HEAD, which aiohttp adds beside each GET, is left out."""
    routes = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if route.method != "HEAD" and path is not None:
            routes.append((route.method, path))
    return routes


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefix-serve")
    except PackageNotFoundError:
        return "0"


def max_prompt_chars(tokenizer, max_model_len: int) -> int | None:
    """A bound on the characters of a prompt that can fit the context: max_model_len tokens of the vocabulary's
    longest entry, times 4. A vocabulary entry spells the text it stands for with at least as many characters
    (byte-level vocabularies use one per byte); the 4 leaves room for normalizers that merge characters."""
    if tokenizer is None:
        return None
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary listing: no early check
        return None
    return 4 * max_model_len * max(longest, 1)


def _load_tokenizers(model_path: str) -> tuple:
    """Two copies of the model's tokenizer (a fast tokenizer must not be shared between threads), or Nones."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - a model without a tokenizer can still serve token-id prompts
        logger.warning("no tokenizer in %s (%s): only token-id prompts will work", model_path, exc)
        return None, None


async def serve(config, options, served_names: tuple[str, ...], host: str, port: int, api_key: str | None,
                debug_endpoints: bool, request_timeout: float | None = None,
                stall_timeout: float = DEFAULT_STALL_TIMEOUT, data_parallel_size: int = 1,
                routing: str = "prefix") -> int:
    """Start the engine process, then the HTTP server; run until SIGINT/SIGTERM or until the engine dies."""
    from prometheus_client import disable_created_metrics

    from engine.serving.async_engine import EngineStartupError
    from engine.serving.metrics import ServerMetrics

    try:
        client, info, tokenizer = await _start_engine(config, options, data_parallel_size, routing)
    except EngineStartupError as exc:
        print(f"prefix-serve: the engine failed to start:\n{exc}", file=sys.stderr, flush=True)
        return 1
    disable_created_metrics()  # the `_created` series only double the scrape size
    settings = ServerSettings(served_names, info["model_path"], info["max_model_len"], api_key, debug_endpoints,
                              vocab_size=info["vocab_size"], prefix_roots=tuple(config.allowed_prefix_roots),
                              request_timeout=request_timeout, stall_timeout=stall_timeout)
    server = OpenAIServer(client, tokenizer, settings, ServerMetrics())
    runner = web.AppRunner(server.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    await web.SockSite(runner, sock).start()
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    print(f"prefix-serve: serving model name(s) {', '.join(served_names)} at {url}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    print(f"prefix-serve: ready on {url}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(client.dead_event.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    print("prefix-serve: shutting down" + (f" ({client.dead})" if client.dead else ""), flush=True)
    await runner.cleanup()  # cancels open handlers, which abort their engine requests
    server.close()
    await asyncio.to_thread(client.shutdown)
    return 1 if client.dead and not stop.is_set() else 0


async def _start_engine(config, options, data_parallel_size: int = 1, routing: str = "prefix"):
    """Spawn the engine process (or deploy the engine replicas) and load the frontend's tokenizers; returns
    (client, ready info, tokenizer)."""
    from engine.serving.async_engine import AsyncEngineClient

    what = "the engine process" if data_parallel_size == 1 else f"{data_parallel_size} engine replicas on Ray Serve"
    print(f"prefix-serve: starting {what} for {config.model or 'the embedded SmolLM2-135M-Instruct'} "
          f"on {config.device} ...", flush=True)
    started = time.monotonic()
    if data_parallel_size > 1:
        from engine.serving.data_parallel import DataParallelClient

        client = DataParallelClient(config, options, data_parallel_size, routing=routing)
    else:
        client = AsyncEngineClient(config, options)
    # A model directory's tokenizers load while the engine process starts; the embedded model's path is known
    # only once the engine has resolved (and, the first time, converted) it.
    tokenizers = asyncio.ensure_future(asyncio.to_thread(_load_tokenizers, config.model)) \
        if config.model is not None and Path(config.model).is_dir() else None
    try:
        info = await asyncio.to_thread(client.start)
    except BaseException:
        if tokenizers is not None:
            await asyncio.gather(tokenizers, return_exceptions=True)
        raise
    if tokenizers is None:
        tokenizers = asyncio.ensure_future(asyncio.to_thread(_load_tokenizers, info["model_path"]))
    tokenizer, client.decode_tokenizer = await tokenizers  # encoding on the loop, decoding in the reader thread
    client.attach(asyncio.get_running_loop())
    print(f"prefix-serve: engine ready in {time.monotonic() - started:.1f} s (pid {info['pid']}): model "
          f"{info['model_path']}, max_model_len {info['max_model_len']}, {info['num_prefixes']} prefixes "
          f"registered", flush=True)
    return client, info, tokenizer

def main(argv: list[str] | None = None) -> int:
    """`python -m engine.serving.server [MODEL] [options]`: the `serve` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="prefix-serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
