"""The engine loop in its own process: drains frontend messages, steps the EngineCore, sends back what changed.

The HTTP frontend (`engine.serving.async_engine`) and this loop talk over two pipes with versioned msgpack
messages, encoded by the project's one codec (`engine.wire`: each message is [version, map]).
The loop never waits on HTTP work: it reads only what has already arrived (`poll(0)`) and hands its outgoing
messages to a sender thread, so a slow or stalled frontend cannot hold a step back. It blocks only when it has
nothing to run, and then for at most half a heartbeat interval: a loop that sent nothing for HEARTBEAT_SECONDS
sends a heartbeat, so the frontend can tell a wedged engine (no message for several seconds) from an idle one.

What leaves the engine for a client names no server directory: errors and listed paths have the prefix roots cut
off (`PathRedactor`), and an unexpected error is reported by its type only (its text goes to the log).

Frontend -> engine, version 3:
  {"op": "add", "id", "tokens": [int], "params": SamplingParams (as its field list), "prefix": str | None}
  {"op": "abort", "ids": [request_id, ...]}
  {"op": "call", "call_id": int, "method": str, "args": {...}}    methods: see EngineLoop._call_*
  {"op": "shutdown"}
Engine -> frontend:
  {"op": "ready", "model_path", "max_model_len", "vocab_size", "num_prefixes", "pid"}
  {"op": "failed", "message"}      # startup failed (bad model, bad prefix directory, ...)
  {"op": "fatal", "message"}       # the loop crashed; the process exits next
  {"op": "heartbeat", "steps"}     # nothing else was sent for HEARTBEAT_SECONDS; the loop still turns
  {"op": "batch",
   "replies": [{"id" | "call_id", "ok": bool, "result" | "error": {"status", "type", "message"}}, ...],
   "outputs": [[request_id, finished, [[index, new_token_ids, finish_reason, stop_reason, final_text], ...]
                (, error: {"status", "type", "message"} when the request failed after it was accepted)], ...],
   "load_seconds": [float, ...],           # prefix loads since the last batch (for the latency histogram)
   "prefix_wait_seconds": [float, ...],    # admitted requests' waits for their prefix since the last batch
   "step_seconds": float | null}           # how long the step that produced these outputs took
A sample appears in "outputs" only when it gained tokens or finished. `final_text` is null until the sample
finishes; then it is the engine's text (stop strings already cut), and the frontend reconciles its own
incremental detokenization with it. Only new token ids travel, so a step's message grows with the batch, not
with the length of the outputs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from engine import wire
from engine.config import EngineConfig
from engine.errors import PrefixLoadError, PrefixServeError
from engine.peft_format import ADAPTER_CONFIG
from engine.sampling_params import SamplingParams
from engine.wire import ProtocolError as EngineProtocolError  # a message with the wrong version or shape

VERSION = 3
HEARTBEAT_SECONDS = 1.0  # the loop sends something at least this often (the frontend's /health watches it)
LOG_LINE_LIMIT = 2000  # characters of one log line; a request's values are quoted shorter still (errors.quote)
logger = logging.getLogger("prefix_serve.engine_process")


def pack(message: dict) -> bytes:
    return wire.encode(message, VERSION)


def unpack(data: bytes) -> dict:
    message = wire.decode(data, VERSION)
    if not isinstance(message, dict):
        raise EngineProtocolError(f"an engine message must be a map, got {type(message).__name__}")
    return message


class PathRedactor:
    """Cuts the server's prefix roots out of what goes to a client: a path under a root becomes relative to it
    (`task3/adapter_model.safetensors`), a root alone becomes `<prefix root>`."""

    def __init__(self, roots):
        forms = set()
        for root in roots:
            for form in (str(root), str(Path(root).resolve())):
                if form.rstrip("/"):  # "/" itself would cut every slash
                    forms.add(form.rstrip("/"))
        self._roots = sorted(forms, key=len, reverse=True)  # the longest first: nested roots

    def path(self, path: str) -> str:
        """A prefix's path as a client sees it: relative to its root, else its last component."""
        for root in self._roots:
            if path.startswith(root + "/"):
                return path[len(root) + 1:]
        return Path(path).name

    def text(self, message: str) -> str:
        for root in self._roots:
            message = message.replace(root + "/", "").replace(root, "<prefix root>")
        return message


def error_payload(exc: BaseException, redactor: PathRedactor | None = None) -> dict:
    """An exception as the frontend needs it: HTTP status, a type name and a message for the user. An error that
    is not a PrefixServeError is a bug: its text may hold anything, so only its type goes to the client."""
    if isinstance(exc, PrefixServeError):
        message = str(exc) if redactor is None else redactor.text(str(exc))
        return {"status": exc.http_status, "type": type(exc).__name__, "message": message}
    return {"status": 500, "type": "InternalServerError",
            "message": f"Internal error in the engine ({type(exc).__name__}); the server log has the details."}


class ClippedFormatter(logging.Formatter):
    """Cuts every line of a log record (a traceback's lines too) to LOG_LINE_LIMIT characters, so no value a
    client sent can make a huge log line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if len(text) <= LOG_LINE_LIMIT:
            return text
        return "\n".join(line if len(line) <= LOG_LINE_LIMIT else f"{line[:LOG_LINE_LIMIT]}... ({len(line)} chars)"
                         for line in text.split("\n"))


def configure_logging(level: str, fmt: str) -> None:
    """logging.basicConfig with a ClippedFormatter (the server's and the engine process's logs); like
    basicConfig, nothing changes where logging is configured already."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(ClippedFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


@dataclass(frozen=True)
class EngineProcessOptions:
    """What the engine process needs besides the EngineConfig."""

    prefix_dirs: tuple[str, ...] = ()  # every subdirectory is a prefix; unknown names are looked up here too
    debug: bool = False  # allow the `debug_state` call (integrity check and block counts)
    log_level: str = "INFO"


@dataclass
class _Tracked:
    """What has already been sent for one request: tokens per sample and which samples finished."""

    sent: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


class EngineLoop:
    """Owns the EngineCore; `run` drains commands, steps and publishes until told to shut down."""

    def __init__(self, engine, options: EngineProcessOptions, receive, send):
        self.engine = engine
        self.options = options
        self._receive = receive  # multiprocessing Connection (read end)
        self._send = send  # callable(bytes), non-blocking for the loop
        self._tracked: dict[str, _Tracked] = {}
        self._replies: list[dict] = []
        self._unloaded: set[str] = set()  # names unloaded by the user: never re-registered lazily
        self._running = True
        self._last_sent = time.monotonic()
        self.redactor = PathRedactor([*engine.config.allowed_prefix_roots, *options.prefix_dirs])

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        while self._running:
            self.run_once()

    def run_once(self) -> None:
        """Handle what has arrived (waiting only when idle), answer it, then step once if there is work."""
        self._drain(block=not self.engine.has_unfinished_requests())
        self._flush()
        if self._running and self.engine.has_unfinished_requests():
            steps, start = self.engine.stats.steps, time.perf_counter()
            outputs = self.engine.step()
            ran = self.engine.stats.steps > steps  # False when nothing could be scheduled
            self._publish(outputs, time.perf_counter() - start if ran else None)

    @property
    def running(self) -> bool:
        return self._running

    def _drain(self, block: bool, limit: int = 4096) -> None:
        """Handle the messages that have arrived (at most `limit`, so a flood cannot starve the step); wait for
        one only when there is nothing to run, and not past half a heartbeat interval."""
        timeout = HEARTBEAT_SECONDS / 2 if block else 0.0
        for _ in range(limit):
            if not (self._running and self._receive.poll(timeout)):
                return
            try:
                data = self._receive.recv_bytes()
            except (EOFError, OSError):  # the frontend is gone: stop
                self._running = False
                return
            self._handle(unpack(data))
            timeout = 0.0

    def _flush(self, outputs: list | None = None, step_seconds: float | None = None) -> None:
        stats = self.engine.stats
        load_seconds, stats.prefix_load_seconds = stats.prefix_load_seconds, []
        waits, stats.prefix_wait_seconds = stats.prefix_wait_seconds, []
        now = time.monotonic()
        if self._replies or outputs or load_seconds or waits or step_seconds is not None:
            self._send(pack({"op": "batch", "replies": self._replies, "outputs": outputs or [],
                             "load_seconds": load_seconds, "prefix_wait_seconds": waits,
                             "step_seconds": step_seconds}))
            self._replies = []
            self._last_sent = now
        elif now - self._last_sent >= HEARTBEAT_SECONDS:
            self._send(pack({"op": "heartbeat", "steps": stats.steps}))
            self._last_sent = now

    def _publish(self, outputs, step_seconds: float | None = None) -> None:
        wire = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            samples = []
            for comp in out.outputs:
                sent = tracked.sent.get(comp.index, 0)
                finished_now = comp.finish_reason is not None and comp.index not in tracked.done
                if len(comp.token_ids) == sent and not finished_now:
                    continue
                tracked.sent[comp.index] = len(comp.token_ids)
                final_text = None
                if finished_now:
                    tracked.done.add(comp.index)
                    final_text = comp.text
                samples.append([comp.index, comp.token_ids[sent:], comp.finish_reason, comp.stop_reason,
                                final_text])
            if out.finished:
                del self._tracked[out.request_id]
            if out.error is not None:
                wire.append([out.request_id, True, samples, error_payload(PrefixLoadError(out.error), self.redactor)])
            elif samples or out.finished:
                wire.append([out.request_id, out.finished, samples])
        self._flush(wire, step_seconds)

    # ---- commands -------------------------------------------------------------------------------------------
    def _handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "add":
            self._add(msg)
        elif op == "abort":
            for request_id in msg["ids"]:
                self._tracked.pop(request_id, None)
                self.engine.abort_request(request_id)
        elif op == "call":
            self._call(msg)
        elif op == "shutdown":
            self._running = False
        else:
            raise EngineProtocolError(f"unknown op {op!r}")

    def _add(self, msg: dict) -> None:
        request_id = msg["id"]
        try:
            params = wire.build(SamplingParams, msg["params"])  # validated again here
            prefix = msg.get("prefix")
            if prefix is not None and prefix not in self.engine.registry:
                self._register_lazily(prefix)
            self.engine.add_request(request_id, None, msg["tokens"], params, prefix, stream=False)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client that caused it
            if not isinstance(exc, PrefixServeError):
                logger.exception("add_request %s failed", request_id)
            self._replies.append({"id": request_id, "ok": False, "error": error_payload(exc, self.redactor)})
            return
        self._tracked[request_id] = _Tracked()
        self._replies.append({"id": request_id, "ok": True})

    def _register_lazily(self, name: str) -> None:
        """A name that is not registered yet may be a subdirectory added to a --prefix-dir after startup."""
        if name in self._unloaded or not _is_plain_name(name):
            return
        for root in self.options.prefix_dirs:
            candidate = Path(root) / name
            try:
                found = (candidate / ADAPTER_CONFIG).is_file()
            except (OSError, ValueError):  # a name the file system refuses: no such prefix
                return
            if found:
                self.engine.load_prefix(name, str(candidate))
                return

    def _call(self, msg: dict) -> None:
        handler = getattr(self, "_call_" + str(msg.get("method")), None)
        try:
            if handler is None:
                raise EngineProtocolError(f"unknown engine call {msg.get('method')!r}")
            result = handler(**msg.get("args", {}))
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, PrefixServeError):
                logger.exception("engine call %s failed", msg.get("method"))
            self._replies.append({"call_id": msg["call_id"], "ok": False, "error": error_payload(exc, self.redactor)})
            return
        self._replies.append({"call_id": msg["call_id"], "ok": True, "result": result})

    def _call_ping(self) -> str:
        return "pong"

    def _call_load_prefix(self, name: str, path: str) -> dict:
        """`path` was checked (form, allowed roots, symlinks) by the frontend before it came here; the check runs
        again, cheaply, since the engine is what reads the files."""
        self.engine.load_prefix(name, path, check_path=True)
        self._unloaded.discard(name)
        info = self.engine.registry.get(name)
        return {"name": name, "path": self.redactor.path(info.path), "num_virtual_tokens": info.num_virtual_tokens}

    def _call_unload_prefix(self, name: str) -> dict:
        self.engine.unload_prefix(name)
        self._unloaded.add(name)
        return {"name": name}

    def _call_list_prefixes(self) -> list:
        """[name, path relative to its root] per registered prefix."""
        registry = self.engine.registry
        return [[name, self.redactor.path(registry.get(name).path)] for name in registry.names()]

    def _call_stats(self) -> dict:
        engine, stats, bm = self.engine, self.engine.stats, self.engine.block_manager
        return {"running": engine.num_running(), "waiting": engine.num_waiting(), "kv_usage": bm.usage(),
                "resident_prefixes": len(bm.resident_prefixes()), "registered_prefixes": len(engine.registry),
                "prefix_blocks": bm.prefix_blocks(), "num_blocks": bm.num_blocks,
                "prompt_tokens": stats.prompt_tokens, "generation_tokens": stats.generation_tokens,
                "finished": dict(stats.finished), "preemptions": stats.preemptions,
                "prefix_hits": stats.prefix_hits, "prefix_misses": stats.prefix_misses,
                "prefix_loads": stats.prefix_loads, "steps": stats.steps}

    def _call_debug_state(self) -> dict:
        """Integrity check and block counts, for leak tests. Only with --debug-endpoints."""
        if not self.options.debug:
            raise EngineProtocolError("debug calls are disabled; start the server with --debug-endpoints")
        engine, bm = self.engine, self.engine.block_manager
        try:
            engine.check_integrity()
            error = None
        except AssertionError as exc:
            error = str(exc) or "integrity check failed"
        return {"integrity_ok": error is None, "integrity_error": error, "num_blocks": bm.num_blocks,
                "free_blocks": bm.num_free_blocks, "cached_blocks": bm.num_cached_blocks,
                "used_blocks": bm.num_used_blocks, "block_tables": len(bm.tables),
                "requests": len(engine.requests), "running": engine.num_running(), "waiting": engine.num_waiting(),
                "resident_prefixes": len(bm.resident_prefixes()), "tracked": len(self._tracked),
                "steps": engine.stats.steps, "decode_run_steps": engine.stats.decode_run_steps,
                "overlapped_steps": engine.stats.overlapped_steps, "sync_fallbacks": engine.stats.sync_fallbacks}

def _is_plain_name(name: str) -> bool:
    """One directory name: no separators, not `.` or `..`, and short enough for the file system."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and len(name.encode("utf-8", "surrogatepass")) <= 255)


class _Sender:
    """Sends byte messages from a thread, so the engine loop never blocks on a full pipe."""

    def __init__(self, conn):
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-sender", daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        self._queue.put(data)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                return

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


def run_engine_process(config: EngineConfig, options: EngineProcessOptions, receive, send) -> None:
    """Entry point of the spawned engine process: build the EngineCore, say ready, loop."""
    configure_logging(options.log_level, "%(asctime)s engine %(levelname)s %(message)s")
    sender = _Sender(send)
    try:
        from engine.llm_engine import EngineCore

        engine = EngineCore(config)
        for root in options.prefix_dirs:
            engine.register_prefix_dir(root)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it and exits
        message = str(exc) if isinstance(exc, PrefixServeError) else traceback.format_exc()
        sender.send(pack({"op": "failed", "message": message}))
        sender.close()
        return
    sender.send(pack({"op": "ready", "model_path": engine.model_path, "max_model_len": engine.max_model_len,
                      "vocab_size": engine.spec.vocab_size, "num_prefixes": len(engine.registry),
                      "pid": os.getpid()}))
    loop = EngineLoop(engine, options, receive, sender.send)
    try:
        loop.run()
    except Exception:  # an engine bug: tell the frontend why, then exit (it fails the open requests)
        logger.exception("engine loop crashed")
        sender.send(pack({"op": "fatal", "message": traceback.format_exc()}))
        raise SystemExit(1) from None
    finally:
        sender.close()
        engine.shutdown()


__all__ = ["EngineLoop", "EngineProcessOptions", "run_engine_process", "pack", "unpack", "VERSION",
           "HEARTBEAT_SECONDS", "EngineProtocolError", "error_payload", "PathRedactor", "configure_logging"]
