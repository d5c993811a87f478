"""AsyncEngineClient: the HTTP frontend's handle on the engine process (spawned, msgpack over pipes).

The event loop never blocks on the engine: a writer thread sends commands, and a reader thread receives each
step's batch, turns new token ids into text (incremental detokenization, here rather than in the engine loop)
and hands the results to the loop in one `call_soon_threadsafe` per batch. Each request gets `RequestUpdate`s
on an asyncio.Queue that its handler owns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import InvalidPromptError, PrefixServeError
from engine.sampling_params import SamplingParams
from engine.serving.engine_process import EngineProcessOptions, pack, run_engine_process, unpack

logger = logging.getLogger("prefix_serve.async_engine")


class EngineDeadError(PrefixServeError):
    """The engine process exited; the server cannot generate until it is restarted."""

    http_status = 503


class EngineStartupError(RuntimeError):
    """The engine process could not build its EngineCore (bad model directory, bad prefix directory, ...)."""


def raise_for(error: dict) -> None:
    """Re-raise an engine-side error payload as a PrefixServeError carrying the same HTTP status."""
    exc = PrefixServeError(error["message"])
    exc.http_status = int(error["status"])
    exc.error_type = error["type"]
    raise exc


@dataclass
class SampleUpdate:
    index: int  # which of the request's n samples
    token_ids: list[int]  # tokens new since the last update
    text: str  # text new since the last update ("" for non-streamed requests until they finish)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestUpdate:
    request_id: str
    tag: object  # whatever the caller passed to `add` (the prompt's index in a batched completion)
    samples: list[SampleUpdate]
    finished: bool
    time: float  # when the reader thread received it (time.monotonic)
    error: dict | None = None  # the engine died, or this request failed: {"status", "type", "message"}


class IncrementalDetokenizer:
    """Text deltas from token deltas without re-decoding the whole output each time.

    Decodes a window that starts one step back (so tokenizers that drop or merge leading spaces see their
    context), and holds back text that ends in a partial character, or whose end is the start of a stop string
    (only that end: text that cannot begin a stop string is sent at once).
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        upto = max(self.sent, len(self.text) - self._stop_start(self.text))
        delta, self.sent = self.text[self.sent:upto], upto
        return delta

    def _stop_start(self, text: str) -> int:
        """The length of the longest end of `text` that is a proper prefix of a stop string (0 when none is).

        Only the unsent end is searched: text already sent could not begin a stop string then, and text added
        since only extends it, so it cannot now. That keeps a token's cost to the stops times the held text."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text) - self.sent), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text (which has stop strings cut) after what was already sent."""
        sent = self.text[:self.sent]
        if not final_text.startswith(sent):  # tokenizers whose piecewise decode differs: keep what was sent
            logger.debug("incremental text %r is not a prefix of the final text %r", sent, final_text)
            return ""
        self.sent = len(final_text)
        return final_text[len(sent):]


@dataclass
class _RequestState:
    sink: asyncio.Queue
    tag: object
    stream: bool
    stops: tuple[str, ...]
    detok: dict[int, IncrementalDetokenizer] = field(default_factory=dict)


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, options: EngineProcessOptions, decode_tokenizer=None):
        self.config = config
        self.options = options
        self.decode_tokenizer = decode_tokenizer  # used only by the reader thread
        self.info: dict = {}
        self.on_load_seconds = lambda seconds: None  # set by the metrics exporter
        self.on_step_seconds = lambda seconds: None
        self._process = None
        self._to_engine = None
        self._from_engine = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: dict[str, _RequestState] = {}
        self._pending: dict[object, asyncio.Future] = {}  # add replies by request id, call replies by call id
        self._call_ids = itertools.count()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.dead: str | None = None  # why the engine is gone, once it is
        self.dead_event: asyncio.Event | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 900.0) -> dict:
        """Spawn the engine process and wait until it has built its EngineCore. Blocking."""
        ctx = multiprocessing.get_context("spawn")
        engine_reads, self._to_engine = ctx.Pipe(duplex=False)
        self._from_engine, engine_writes = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=run_engine_process, name="prefix-serve-engine",
                                    args=(self.config, self.options, engine_reads, engine_writes), daemon=True)
        self._process.start()
        engine_reads.close()
        engine_writes.close()
        deadline = time.monotonic() + timeout
        while not self._from_engine.poll(0.2):
            if not self._process.is_alive():
                raise EngineStartupError(f"the engine process exited with code {self._process.exitcode}")
            if time.monotonic() > deadline:
                self._process.kill()
                raise EngineStartupError(f"the engine was not ready after {timeout:.0f} s")
        try:
            msg = unpack(self._from_engine.recv_bytes())
        except EOFError:
            self._process.join(5)
            raise EngineStartupError(f"the engine process exited with code {self._process.exitcode}") from None
        if msg["op"] != "ready":
            self._process.join(5)
            raise EngineStartupError(msg.get("message", "unknown error"))
        self.info = msg
        return msg

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the reader and writer threads; results are delivered on `loop`."""
        self._loop = loop
        self.dead_event = asyncio.Event()
        threading.Thread(target=self._read_loop, name="engine-reader", daemon=True).start()
        threading.Thread(target=self._write_loop, name="engine-writer", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        if self._process.is_alive():
            self._send({"op": "shutdown"})
            self._out.put(None)
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
        self._out.put(None)

    @property
    def alive(self) -> bool:
        return self.dead is None and self._process is not None and self._process.is_alive()

    # ---- requests -------------------------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefix: str | None,
                  sink: asyncio.Queue, tag: object = None, stream: bool = True) -> None:
        """Queue a request in the engine. Raises the engine's validation error (with its HTTP status)."""
        if self.dead is not None:
            raise EngineDeadError(f"The engine process is not running ({self.dead}).")
        try:
            data = pack({"op": "add", "id": request_id, "tokens": list(prompt_token_ids), "params": _wire(params),
                         "prefix": prefix})
        except (OverflowError, TypeError, ValueError) as exc:  # e.g. a token id beyond 64 bits
            raise InvalidPromptError(f"The request holds a value that cannot be sent to the engine: {exc}.") from None
        self._requests[request_id] = _RequestState(sink, tag, stream, tuple(params.stop_strings))
        future = self._loop.create_future()
        self._pending[request_id] = future
        self._out.put(data)
        try:
            reply = await future
        except BaseException:
            self.abort([request_id])
            raise
        if not reply["ok"]:
            self._requests.pop(request_id, None)
            raise_for(reply["error"])

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests now (client gone or cancelled); the engine frees their blocks at once."""
        ids = [rid for rid in request_ids if self._requests.pop(rid, None) is not None]
        if ids and self.dead is None:
            self._send({"op": "abort", "ids": ids})

    async def call(self, method: str, **args):
        """A request/response command to the engine loop (load_prefix, stats, debug_state, ...)."""
        if self.dead is not None:
            raise EngineDeadError(f"The engine process is not running ({self.dead}).")
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._pending[call_id] = future
        self._send({"op": "call", "call_id": call_id, "method": method, "args": args})
        try:
            reply = await future
        except BaseException:
            self._pending.pop(call_id, None)
            raise
        if not reply["ok"]:
            raise_for(reply["error"])
        return reply["result"]

    # ---- threads --------------------------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        self._out.put(pack(message))

    def _write_loop(self) -> None:
        while (data := self._out.get()) is not None:
            try:
                self._to_engine.send_bytes(data)
            except (BrokenPipeError, OSError):
                return

    def _read_loop(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                msg = unpack(self._from_engine.recv_bytes())
                if msg["op"] == "fatal":
                    reason = "the engine loop crashed"
                    logger.error("engine loop crashed:\n%s", msg.get("message"))
                    continue
                deliveries = self._updates(msg)
                self._loop.call_soon_threadsafe(self._deliver, msg.get("replies", ()), deliveries,
                                                msg.get("load_seconds", ()), msg.get("step_seconds"))
        except (EOFError, OSError):
            pass
        except RuntimeError:  # the event loop closed: the server is shutting down
            return
        except Exception:  # noqa: BLE001 - a protocol error: treat the engine as gone
            logger.exception("engine reader failed")
            reason = "the engine sent a message this frontend cannot read"
        try:
            self._loop.call_soon_threadsafe(self._engine_died, reason)
        except RuntimeError:  # the event loop closed first
            pass

    def _updates(self, msg: dict) -> list[tuple[asyncio.Queue, RequestUpdate]]:
        """Turn a batch's outputs into per-request updates (runs in the reader thread)."""
        now = time.monotonic()
        deliveries = []
        for request_id, finished, samples, *error in msg.get("outputs", ()):
            state = self._requests.get(request_id)
            if state is None:  # aborted meanwhile
                continue
            updates = [self._sample_update(state, *sample) for sample in samples]
            deliveries.append((state.sink, RequestUpdate(request_id, state.tag, updates, finished, now,
                                                         error[0] if error else None)))
            if finished:
                self._requests.pop(request_id, None)
        return deliveries

    def _sample_update(self, state: _RequestState, index, token_ids, finish_reason, stop_reason,
                       final_text) -> SampleUpdate:
        text = ""
        if state.stream and self.decode_tokenizer is not None:
            detok = state.detok.get(index)
            if detok is None:
                detok = state.detok[index] = IncrementalDetokenizer(self.decode_tokenizer, state.stops)
            # The finishing update's tokens may run past a stop string: take the rest from the engine's text.
            text = detok.add(token_ids) if final_text is None else detok.finish(final_text)
        elif final_text is not None:
            text = final_text
        return SampleUpdate(index, token_ids, text, finish_reason, stop_reason)

    def _deliver(self, replies, deliveries, load_seconds, step_seconds) -> None:
        for reply in replies:
            future = self._pending.pop(reply["call_id"] if "call_id" in reply else reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply)
        for sink, update in deliveries:
            sink.put_nowait(update)
        for seconds in load_seconds:
            self.on_load_seconds(seconds)
        if step_seconds is not None:
            self.on_step_seconds(step_seconds)

    def _engine_died(self, reason: str) -> None:
        if self.dead is not None:
            return
        code = self._process.exitcode if self._process is not None else None
        self.dead = reason if code is None else f"{reason}, exit code {code}"
        error = {"status": 503, "type": "EngineDeadError", "message": f"The engine process stopped ({self.dead})."}
        for future in self._pending.values():
            if not future.done():
                future.set_result({"ok": False, "error": error})
        self._pending.clear()
        for request_id, state in self._requests.items():
            state.sink.put_nowait(RequestUpdate(request_id, state.tag, [], True, time.monotonic(), error))
        self._requests.clear()
        self.dead_event.set()


def _wire(params: SamplingParams) -> dict:
    """SamplingParams as constructor keywords; the engine process rebuilds (and re-validates) it."""
    return {"n": params.n, "max_tokens": params.max_tokens, "temperature": float(params.temperature),
            "top_p": float(params.top_p), "top_k": params.top_k, "seed": params.seed, "stop": params.stop_strings,
            "stop_token_ids": params.stop_token_ids, "ignore_eos": params.ignore_eos}
