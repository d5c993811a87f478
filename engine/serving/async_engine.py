"""AsyncEngineClient: the HTTP frontend's handle on the engine process (spawned, msgpack over pipes).

The event loop never blocks on the engine: a writer thread sends commands, and a reader thread receives each
step's batch, turns new token ids into text (incremental detokenization, here rather than in the engine loop)
and hands the results to the loop in one `call_soon_threadsafe` per batch. Each request gets `RequestUpdate`s
on an asyncio.Queue that its handler owns. The reader notes when the engine last sent anything (a batch or a
heartbeat): `silent_for` is how /health tells a wedged engine from a busy one.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import InvalidPromptError, PrefixServeError, quote
from engine.sampling_params import SamplingParams
from engine.serving.engine_process import EngineProcessOptions, pack, run_engine_process, unpack
from engine.serving.protocol import BadRequestError

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


def _pack_or_refuse(message: dict, error: type[PrefixServeError]) -> bytes:
    """The encoded message, or `error` (a 400) when it holds a value the engine's codec cannot carry."""
    try:
        return pack(message)
    except (OverflowError, TypeError, ValueError) as exc:
        raise error(f"The request holds a value that cannot be sent to the engine: {quote(str(exc))}.") from None


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


class StopPrefixAutomaton:
    """How much of a growing text's end could begin a stop string, kept up to date character by character.

    An Aho-Corasick automaton over one request's stop strings, built only as far as its outputs lead it and shared
    by its samples (each keeps its own state). A node is a prefix of some stop: it is named by the first sorted
    stop that has it and its length (packed in one int), and the sorted stops that have it form a range, so a
    child is two binary searches on one character, with no copy of the text. A sample's state is the longest end
    of its text that is a node. Each node, once reached, keeps its failure link (its longest proper end that is a
    node) and its hold: the longest end of it, itself included, that is a *proper* prefix of a stop (text that
    ends a whole stop is the engine's to cut).

    Cost: amortized O(log stops) per character, plus linking each node the first time a text reaches it, at most
    once per node of the stops' trie. A request's total is thus bounded by its outputs' length plus its stops'
    total length, however the stops are arranged (a scan per token cost stops x held text^2, on every token). The
    tables are flat arrays of 3 ints per prefix length, allocated per stop as the text first reaches it.
    """

    ROOT = 0  # the empty prefix: first stop 0, length 0
    _UNKNOWN = -1

    def __init__(self, stops: Iterable[str]):
        self._stops = sorted(set(stops))
        self._stride = max(map(len, self._stops)) + 1
        # per first stop: (failure link, hold, end of the stops' range) for each prefix length of it
        self._tables: dict[int, array] = {}
        self._record(self.ROOT, link=self.ROOT, hold=0)
        self._table(0)[2] = len(self._stops)

    def advance(self, state: int, text: str) -> int:
        """The state after `state` reads `text`."""
        for char in text:
            state = self._step(state, char)
        return state

    def hold(self, state: int) -> int:
        """How many characters at the end of the text read so far could begin a stop string."""
        first, length = divmod(state, self._stride)
        return self._tables[first][3 * length + 1]

    def _step(self, node: int, char: str) -> int:
        """The state after `char`. Nodes reached for the first time are ends of the new text, found longest first
        on the way down the old state's failure chain; each links to the next one found."""
        new = []
        known = self.ROOT
        while True:
            child = self._child(node, char)
            if child is not None:
                if self._link(child) != self._UNKNOWN:  # its failure chain, and so the rest of the new one, is known
                    known = child
                    break
                new.append(child)
            if node == self.ROOT:
                break
            node = self._link(node)
        link = known
        for node in reversed(new):
            self._record(node, link, node % self._stride if self._is_proper(node) else self.hold(link))
            link = node
        return link

    def _child(self, node: int, char: str) -> int | None:
        first, length = divmod(node, self._stride)
        end = self._tables[first][3 * length + 2]

        def next_char(stop: str) -> str:  # "" for the stop that is the node itself: it sorts first
            return stop[length:length + 1]

        child_first = bisect_left(self._stops, char, first, end, key=next_char)
        if child_first == end or next_char(self._stops[child_first]) != char:
            return None
        table, slot = self._table(child_first), 3 * (length + 1) + 2
        if table[slot] == self._UNKNOWN:
            table[slot] = bisect_right(self._stops, char, child_first, end, key=next_char)
        return child_first * self._stride + length + 1

    def _is_proper(self, node: int) -> bool:
        """Whether some stop is longer than this prefix: the first stop is, or others share the prefix."""
        first, length = divmod(node, self._stride)
        return len(self._stops[first]) > length or self._tables[first][3 * length + 2] > first + 1

    def _link(self, node: int) -> int:
        first, length = divmod(node, self._stride)
        return self._tables[first][3 * length]

    def _record(self, node: int, link: int, hold: int) -> None:
        first, length = divmod(node, self._stride)
        table = self._table(first)
        table[3 * length], table[3 * length + 1] = link, hold

    def _table(self, first: int) -> array:
        table = self._tables.get(first)
        if table is None:
            table = self._tables[first] = array("i", [self._UNKNOWN]) * (3 * (len(self._stops[first]) + 1))
        return table


class IncrementalDetokenizer:
    """Text deltas from token deltas without re-decoding the whole output each time.

    Decodes a window that starts one step back (so tokenizers that drop or merge leading spaces see their
    context), and holds back text that ends in a partial character, or whose end is the start of a stop string
    (only that end: text that cannot begin a stop string is sent at once). A StopPrefixAutomaton over the
    request's stop strings finds that end, so many long stop strings cannot hold up the reader thread that serves
    every stream.
    """

    def __init__(self, tokenizer, stop_prefixes: StopPrefixAutomaton | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop_prefixes = stop_prefixes
        self._stop_state = StopPrefixAutomaton.ROOT

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new_text = after[len(before):]
            self.text += new_text
            if self._stop_prefixes is not None:
                self._stop_state = self._stop_prefixes.advance(self._stop_state, new_text)
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        # Text once sent could not begin a stop string, and text added since only extends it, so the held end
        # always lies within the unsent text.
        held = self._stop_prefixes.hold(self._stop_state) if self._stop_prefixes is not None else 0
        upto = max(self.sent, len(self.text) - held)
        delta, self.sent = self.text[self.sent:upto], upto
        return delta

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
    stop_prefixes: StopPrefixAutomaton | None  # shared by the request's samples
    detok: dict[int, IncrementalDetokenizer] = field(default_factory=dict)


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, options: EngineProcessOptions, decode_tokenizer=None):
        self.config = config
        self.options = options
        self.decode_tokenizer = decode_tokenizer  # used only by the reader thread
        self.info: dict = {}
        self.on_load_seconds = lambda seconds: None  # set by the metrics exporter
        self.on_prefix_wait_seconds = lambda seconds: None
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
        self._last_heard = time.monotonic()  # when the engine last sent a message (set by the reader thread)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 900.0) -> dict:
        """Spawn the engine process and wait until it has built its EngineCore. Blocking."""
        ctx = multiprocessing.get_context("spawn")
        engine_reads, self._to_engine = ctx.Pipe(duplex=False)
        self._from_engine, engine_writes = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=run_engine_process, name="prefix-serve-engine",
                                    args=(self.config, self.options, engine_reads, engine_writes),
                                    daemon=False)  # not daemonic: it starts the model's rank processes (mp)
        self._process.start()
        # multiprocessing joins a non-daemonic child at exit, and this one waits for its pipe to close: if the
        # frontend exits without shutdown() (an exception), stop it first rather than hang
        atexit.register(self._stop_at_exit)
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
        self._last_heard = time.monotonic()
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

    def _stop_at_exit(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()

    @property
    def alive(self) -> bool:
        return self.dead is None and self._process is not None and self._process.is_alive()

    @property
    def silent_for(self) -> float:
        """Seconds since the engine last sent anything; its loop sends at least a heartbeat every second, so a
        long silence means it is stopped, or stuck in one step."""
        return time.monotonic() - self._last_heard

    # ---- requests -------------------------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefix: str | None,
                  sink: asyncio.Queue, tag: object = None, stream: bool = True) -> None:
        """Queue a request in the engine. Raises the engine's validation error (with its HTTP status)."""
        if self.dead is not None:
            raise EngineDeadError(f"The engine process is not running ({self.dead}).")
        data = _pack_or_refuse({"op": "add", "id": request_id, "tokens": list(prompt_token_ids), "params": params,
                                "prefix": prefix}, InvalidPromptError)  # e.g. a token id beyond 64 bits
        stop_prefixes = StopPrefixAutomaton(params.stop_strings) if stream and params.stop_strings else None
        self._requests[request_id] = _RequestState(sink, tag, stream, stop_prefixes)
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
        # encoded before a reply is awaited: a value that cannot be sent (a lone surrogate) leaves nothing behind
        data = _pack_or_refuse({"op": "call", "call_id": call_id, "method": method, "args": args}, BadRequestError)
        future = self._loop.create_future()
        self._pending[call_id] = future
        self._out.put(data)
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
                self._last_heard = time.monotonic()
                if msg["op"] == "heartbeat":
                    continue
                if msg["op"] == "fatal":
                    reason = "the engine loop crashed"
                    logger.error("engine loop crashed:\n%s", msg.get("message"))
                    continue
                deliveries = self._updates(msg)
                self._loop.call_soon_threadsafe(self._deliver, msg.get("replies", ()), deliveries,
                                                msg.get("load_seconds", ()), msg.get("step_seconds"),
                                                msg.get("prefix_wait_seconds", ()))
        except (EOFError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - a protocol error: treat the engine as gone
            # call_soon_threadsafe raises RuntimeError once the server has closed its loop, and then there is no one
            # left to tell. EngineProtocolError is a RuntimeError too, so the loop's state decides, not the type.
            if isinstance(exc, RuntimeError) and self._loop.is_closed():
                return
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
                detok = state.detok[index] = IncrementalDetokenizer(self.decode_tokenizer, state.stop_prefixes)
            # The finishing update's tokens may run past a stop string: take the rest from the engine's text.
            text = detok.add(token_ids) if final_text is None else detok.finish(final_text)
        elif final_text is not None:
            text = final_text
        return SampleUpdate(index, token_ids, text, finish_reason, stop_reason)

    def _deliver(self, replies, deliveries, load_seconds, step_seconds, prefix_waits=()) -> None:
        for reply in replies:
            future = self._pending.pop(reply["call_id"] if "call_id" in reply else reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply)
        for sink, update in deliveries:
            sink.put_nowait(update)
        for seconds in load_seconds:
            self.on_load_seconds(seconds)
        for seconds in prefix_waits:
            self.on_prefix_wait_seconds(seconds)
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
