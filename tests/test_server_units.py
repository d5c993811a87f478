"""Server pieces tested in-process, without HTTP: OpenAI request parsing, incremental detokenization, the engine
loop's message protocol, and the `serve` command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import random
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from test_server_support import build_model, build_prefixes, build_tokenizer

from engine import wire
from engine.errors import InvalidPromptError, InvalidSamplingParamsError
from engine.sampling_params import SamplingParams
from engine.serving import protocol
from engine.serving.async_engine import AsyncEngineClient, IncrementalDetokenizer, StopPrefixAutomaton, _RequestState
from engine.serving.engine_process import VERSION, EngineLoop, EngineProcessOptions, EngineProtocolError, pack, unpack


# ---- protocol ---------------------------------------------------------------------------------------------------
def test_completion_defaults_follow_openai():
    req = protocol.parse_completion_request({"model": "m", "prompt": "hi"})
    params = req.params
    assert (params.max_tokens, params.temperature, params.top_p, params.n) == (16, 1.0, 1.0, 1)
    assert req.stream.stream is False and req.stream.include_usage is False
    chat = protocol.parse_chat_request({"messages": [{"role": "user", "content": "x"}]})
    assert chat.model is None and protocol.sampling_params(chat.params_body, 100).max_tokens == 100


def test_openai_fields_map_onto_sampling_params():
    body = {"prompt": [1, 2], "n": 3, "max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 4,
            "stop": ["x", "yz"], "top_k": 5, "ignore_eos": True, "stop_token_ids": [9], "stream": True,
            "stream_options": {"include_usage": True}}
    req = protocol.parse_completion_request(body)
    p = req.params
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.seed, p.top_k) == (3, 7, 0, 0.5, 4, 5)
    assert p.stop_strings == ["x", "yz"] and p.stop_token_ids == [9] and p.ignore_eos
    assert req.stream.include_usage and req.prompts == [[1, 2]]
    assert protocol.sampling_params({"max_completion_tokens": 3, "max_tokens": 9}, 16).max_tokens == 3


@pytest.mark.parametrize("body", [{"temperature": True}, {"n": 1.5}, {"max_tokens": "9"}, {"stop": 3},
                                  {"seed": "1"}, {"n": 2, "best_of": 3}, {"temperature": -0.1}, {"top_p": 0}])
def test_bad_sampling_fields_raise_invalid_sampling_params(body):
    with pytest.raises(InvalidSamplingParamsError) as err:
        protocol.sampling_params(body, 16)
    assert err.value.http_status == 400


def test_prompt_forms():
    assert protocol._prompts("a") == ["a"]
    assert protocol._prompts(["a", "b"]) == ["a", "b"]
    assert protocol._prompts([1, 2]) == [[1, 2]]
    assert protocol._prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in (None, [], [[]], [True, 1], 5, [1, "a"]):
        with pytest.raises(InvalidPromptError):
            protocol._prompts(bad)


@pytest.mark.parametrize("body", [{"echo": True}, {"logprobs": 1}, {"suffix": "x"}, {"presence_penalty": 0.5},
                                  {"logit_bias": {"1": 2}}, {"stream": 1}, {"stream_options": []}])
def test_unsupported_or_malformed_completion_fields_are_400(body):
    with pytest.raises(protocol.PrefixServeError) as err:
        protocol.parse_completion_request({"prompt": "x", **body})
    assert err.value.http_status == 400


def test_chat_messages_accept_text_parts_and_refuse_tools_and_images():
    req = protocol.parse_chat_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "tool_choice": "none"})
    assert req.messages == [{"role": "user", "content": "ab"}]
    for body in ({"messages": []}, {"messages": [{"content": "x"}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                 {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}):
        with pytest.raises(protocol.PrefixServeError):
            protocol.parse_chat_request(body)


def test_too_many_stop_token_ids_are_refused():
    """Each generated token is checked against every stop token id: a list of millions slowed every request."""
    limit = SamplingParams.MAX_STOP_TOKEN_IDS
    assert SamplingParams(stop_token_ids=list(range(limit))).stop_token_id_set == frozenset(range(limit))
    with pytest.raises(InvalidSamplingParamsError,
                       match=f"stop_token_ids takes at most {limit} ids, got {limit + 1}"):
        SamplingParams(stop_token_ids=list(range(limit + 1)))
    with pytest.raises(InvalidSamplingParamsError):
        protocol.sampling_params({"stop_token_ids": [7] * 5_000_000}, 16)


class _NoEngine:
    """An engine client for request-parsing tests: alive, but any request that reaches it fails the test."""

    alive, dead = True, None

    async def add(self, *args, **kwargs):
        raise AssertionError("the request should have been refused before reaching the engine")

    def abort(self, request_ids):
        pass


def _post(path: str, body: dict) -> tuple[int, dict]:
    """POST `body` to an in-process OpenAIServer (no engine behind it); returns (status, JSON body)."""
    from aiohttp.test_utils import TestClient, TestServer

    from engine.serving.metrics import ServerMetrics
    from engine.serving.server import OpenAIServer, ServerSettings

    async def post():
        server = OpenAIServer(_NoEngine(), None, ServerSettings(("base",), "/model", 64), ServerMetrics())
        async with TestClient(TestServer(server.build_app())) as http:
            response = await http.post(path, json=body)
            return response.status, await response.json()

    return asyncio.run(post())


def test_http_request_with_too_many_stop_token_ids_is_400():
    status, body = _post("/v1/completions", {"model": "base", "prompt": [1, 2], "stop_token_ids": list(range(5000))})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("stop_token_ids takes at most")


def test_error_body_has_openai_shape():
    body = protocol.error_body(404, "Unknown prefix 'x'.", "UnknownPrefixError")
    assert body == {"error": {"message": "Unknown prefix 'x'.", "type": "not_found_error", "param": None,
                              "code": "UnknownPrefixError"}}


def test_a_body_of_many_objects_is_parsed_with_the_garbage_collector_paused():
    """The cyclic collector made a body of millions of empty lists take seconds to build (issue 15 finding 2); the
    parse runs with it paused, and leaves it as it found it, also when the body is not JSON."""
    import gc

    collections = []

    def note(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    body = b'{"prompt": [' + b"[]," * 300_000 + b"[]]}"  # 300,001 new containers: gen-0 collections by the hundred
    gc.callbacks.append(note)
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            assert len(protocol.parse_json_body(body, None)["prompt"]) == 300_001
            with pytest.raises(protocol.BadRequestError, match="The request body is not valid JSON"):
                protocol.parse_json_body(body[:-1], None)
            assert gc.isenabled() == enabled
    finally:
        gc.enable()
        gc.callbacks.remove(note)
    assert collections == []

# ---- incremental detokenization ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_incremental_text_equals_a_full_decode_on_random_byte_tokens(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tokenizer)
        pieces, i = [], 0
        while i < len(ids):
            step = rng.choice((1, 1, 1, 2, 3))
            pieces.append(detok.add(ids[i:i + step]))
            i += step
        full = tokenizer.decode(ids, skip_special_tokens=True)
        pieces.append(detok.finish(full))
        assert "".join(pieces) == full, ids


def test_streamed_text_never_runs_past_a_stop_string(tokenizer):
    """Mimic the engine: it finishes at the first token whose decoded output contains the stop string."""
    rng = random.Random(1)
    checked = 0
    for _ in range(300):
        ids = [rng.randrange(6, len(tokenizer)) for _ in range(25)]
        text = tokenizer.decode(ids)
        spots = [i for i in range(1, len(text) - 3) if "\ufffd" not in text[i:i + 3]]
        if not spots:
            continue
        stop = text[rng.choice(spots):][:rng.choice((1, 2, 3))]
        end = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
        final = tokenizer.decode(ids[:end])
        final = final[:final.find(stop)]
        stops = (stop, "never a stop")
        detok = IncrementalDetokenizer(tokenizer, StopPrefixAutomaton(stops))
        pieces = []
        for t in ids[:end - 1]:
            pieces.append(detok.add([t]))
            held = detok.text[detok.sent:]
            assert held == "" or any(s.startswith(held) for s in stops), (held, stop)  # only a stop's possible start
        assert stop not in "".join(pieces)
        pieces.append(detok.finish(final))
        assert "".join(pieces) == final
        checked += 1
    assert checked > 100


def test_streamed_text_holds_back_only_what_could_start_a_stop_string():
    class Chars:  # one token per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    detok = IncrementalDetokenizer(Chars(), StopPrefixAutomaton((" The answer", "zz")))
    assert [detok.add([ord(c)]) for c in " Paris. T"] == ["", " P", "a", "r", "i", "s", ".", "", ""]
    assert detok.add([ord("h")]) == "" and detok.add([ord("x")]) == " Thx"
    assert detok.add([ord("z")]) == "" and detok.add([ord("a")]) == "za"


def _held_text(text: str, stops: tuple[str, ...]) -> str:
    """The plain reference: the longest end of `text` that is a proper prefix of some stop string."""
    return max((stop[:k] for stop in stops for k in range(len(stop)) if text.endswith(stop[:k])), key=len,
               default="")


class _Pieces:
    """A tokenizer whose token i decodes to vocab[i], so a stream's text is known exactly."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids)


def test_held_back_text_equals_a_brute_force_reference_on_random_streams():
    rng = random.Random(2)
    vocab = ["a", "b", "c", "ab", "ba", "aab", "abc", "cab", "bb", "aaaa"]
    for _ in range(500):
        stops = tuple({"".join(rng.choice("abc") for _ in range(rng.randint(1, 7)))
                       for _ in range(rng.randint(1, 5))})
        detok, text, sent = IncrementalDetokenizer(_Pieces(vocab), StopPrefixAutomaton(stops)), "", 0
        for _ in range(rng.randint(1, 40)):
            token = rng.randrange(len(vocab))
            text += vocab[token]
            upto = max(sent, len(text) - len(_held_text(text, stops)))
            assert detok.add([token]) == text[sent:upto], (stops, text)
            sent = upto


def test_samples_sharing_a_stop_automaton_each_hold_what_the_reference_holds():
    """The automaton grows as texts reach new prefixes; interleaved samples must not disturb each other."""
    rng = random.Random(4)
    for _ in range(200):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 8))]
        automaton = StopPrefixAutomaton(stops)
        texts, states = ["", ""], [StopPrefixAutomaton.ROOT] * 2
        for _ in range(60):
            sample, piece = rng.randrange(2), "".join(rng.choice("ab") for _ in range(rng.randint(1, 3)))
            texts[sample] += piece
            states[sample] = automaton.advance(states[sample], piece)
            assert automaton.hold(states[sample]) == len(_held_text(texts[sample], tuple(stops))), (stops, texts)


def test_long_stop_strings_cost_little_per_streamed_token():
    """Issue 15: 255 stops of 4,096 characters that never match, and one that begins like the output, kept the
    frontend's one reader thread busy for minutes (stops x held text^2 per token), stalling every stream."""
    rng = random.Random(3)
    alphabet = "abcdefghij"
    chunks = ["".join(rng.choice(alphabet) for _ in range(13)) for _ in range(300)]  # 3,900 characters
    output = "".join(chunks)
    limit = SamplingParams.MAX_STOP_CHARS
    stops = ["".join(rng.choice(alphabet) for _ in range(limit)) for _ in range(SamplingParams.MAX_STOP_STRINGS - 1)]
    stops.append(output + "Z" * (limit - len(output)))  # the output keeps looking like its start: all of it is held
    SamplingParams(stop=stops)  # within the documented limits
    detok = IncrementalDetokenizer(_Pieces([*chunks, "!"]), StopPrefixAutomaton(stops))
    start = time.perf_counter()
    for token in range(len(chunks)):
        assert detok.add([token]) == ""
        assert time.perf_counter() - start < 1.0, f"{token} tokens took over a second"
    assert detok.add([len(chunks)]) == output + "!"  # no longer a stop's start: all of it goes out


# ---- the engine loop, in-process --------------------------------------------------------------------------------
class FakeConnection:
    """The engine loop's read end: messages queued by the test, no waiting."""

    def __init__(self):
        self.inbox: deque[bytes] = deque()

    def put(self, message: dict) -> None:
        self.inbox.append(pack(message))

    def poll(self, timeout=None) -> bool:
        return bool(self.inbox)

    def recv_bytes(self) -> bytes:
        return self.inbox.popleft()


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory):
    from engine.config import EngineConfig
    from engine.llm_engine import EngineCore

    root = tmp_path_factory.mktemp("loop")
    model = build_model(root / "model")
    build_prefixes(model, root / "prefixes", 2)
    engine = EngineCore(EngineConfig(model=str(model), num_kv_blocks=64))
    yield engine, root
    engine.shutdown()


def _batches(sent: list[bytes]) -> list[dict]:
    batches = [unpack(b) for b in sent]
    sent.clear()
    return batches


def test_engine_loop_sends_only_new_tokens_and_an_abort_frees_blocks_at_once(engine_setup):
    engine, root = engine_setup
    conn, sent = FakeConnection(), []
    loop = EngineLoop(engine, EngineProcessOptions(prefix_dirs=(str(root / "prefixes"),), debug=True), conn,
                      sent.append)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    conn.put({"op": "add", "id": "a", "tokens": [7, 8, 9], "params": params, "prefix": "task0"})  # lazily found
    conn.put({"op": "add", "id": "b", "tokens": [7, 8], "params": replace(params, max_tokens=50), "prefix": None})
    conn.put({"op": "add", "id": "c", "tokens": [7], "params": params, "prefix": "nope"})
    conn.put({"op": "add", "id": "d", "tokens": [7] * 300, "params": params, "prefix": None})
    for _ in range(3):  # the first also answers the adds
        loop.run_once()
    batches = _batches(sent)
    replies = {r["id"]: r for b in batches for r in b["replies"]}
    assert replies["a"]["ok"] and replies["b"]["ok"]
    assert replies["c"]["error"]["status"] == 404 and replies["d"]["error"]["status"] == 400
    assert "300" in replies["d"]["error"]["message"]
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    for batch in batches:
        for request_id, finished, samples in batch["outputs"]:
            for index, new_ids, *_ in samples:
                assert index == 0 and len(new_ids) == 1  # one new token per step, never the whole output
                tokens[request_id].extend(new_ids)
    # "b" runs from the first step; "a" joins once its prefix's background read is reported (after step 1 on all
    # but a very slow machine), so it does not hold "b" back
    assert len(tokens["b"]) == 3 and 1 <= len(tokens["a"]) <= 2

    conn.put({"op": "abort", "ids": ["b"]})
    conn.put({"op": "call", "call_id": 1, "method": "debug_state", "args": {}})
    loop.run_once()  # the abort is handled before the call, and both before the step that finishes "a"
    while engine.has_unfinished_requests():
        loop.run_once()
    batches = _batches(sent)
    state = next(r for b in batches for r in b["replies"] if r.get("call_id") == 1)["result"]
    assert state["integrity_ok"] and state["requests"] == 1 and state["block_tables"] == 1
    finals = [(rid, s) for b in batches for rid, done, samples in b["outputs"] for s in samples if done]
    assert [rid for rid, _ in finals] == ["a"]  # "b" was aborted: nothing more is sent for it
    assert finals[0][1][2] == "length" and isinstance(finals[0][1][4], str)  # the final text comes with the finish

    conn.put({"op": "call", "call_id": 2, "method": "unload_prefix", "args": {"name": "task0"}})
    conn.put({"op": "add", "id": "e", "tokens": [7], "params": params, "prefix": "task0"})
    conn.put({"op": "call", "call_id": 3, "method": "debug_state", "args": {}})
    conn.put({"op": "shutdown"})
    loop.run_once()
    replies = [r for b in _batches(sent) for r in b["replies"]]
    assert replies[0]["ok"] and replies[1]["error"]["status"] == 404  # unloaded names are not found lazily again
    state = replies[2]["result"]
    assert state["integrity_ok"] and state["used_blocks"] == 0 and state["requests"] == 0
    assert not loop.running


def test_messages_of_another_protocol_version_are_refused():
    assert unpack(pack({"op": "abort", "ids": []}))["op"] == "abort"
    with pytest.raises(EngineProtocolError, match=f"version {VERSION + 1}, but this side speaks version {VERSION}"):
        unpack(wire.encode({"op": "abort"}, VERSION + 1))
    with pytest.raises(EngineProtocolError):  # the dict messages of version 1
        unpack(msgpack.packb({"v": 1, "op": "abort"}))


# ---- the engine client's reader thread --------------------------------------------------------------------------
def _client_reading(pipe_end) -> AsyncEngineClient:
    """An AsyncEngineClient with no engine process: it reads engine messages from `pipe_end`."""
    from engine.config import EngineConfig

    client = AsyncEngineClient(EngineConfig(), EngineProcessOptions())
    client._from_engine = pipe_end
    client._process = SimpleNamespace(is_alive=lambda: True, exitcode=None)  # a running engine process
    return client


def test_a_message_the_frontend_cannot_read_marks_the_engine_dead_and_fails_open_requests():
    """EngineProtocolError is a RuntimeError, which the reader took for a closed event loop: it ended silently,
    open requests hung and /health stayed 200."""
    reads, writes = multiprocessing.Pipe(duplex=False)
    client = _client_reading(reads)

    async def scenario():
        sink = asyncio.Queue()
        client._requests["r"] = _RequestState(sink, 0, True, None)  # no stop strings
        client.attach(asyncio.get_running_loop())
        assert client.alive
        writes.send_bytes(msgpack.packb({"v": 2, "op": "batch", "outputs": []}))
        try:
            return await asyncio.wait_for(sink.get(), 2)
        finally:
            client._out.put(None)  # ends the writer thread

    update = asyncio.run(scenario())
    assert update.request_id == "r" and update.finished and update.error["status"] == 503
    assert "cannot read" in update.error["message"]
    assert "cannot read" in client.dead and client.dead_event.is_set() and not client.alive


def test_the_reader_ends_quietly_when_the_event_loop_closed_first(caplog):
    reads, writes = multiprocessing.Pipe(duplex=False)
    client = _client_reading(reads)
    client._loop = loop = asyncio.new_event_loop()
    loop.close()  # the server shut down before the engine's last batch arrived
    writes.send_bytes(pack({"op": "batch", "replies": [], "outputs": []}))
    with caplog.at_level(logging.ERROR, logger="prefix_serve.async_engine"):
        client._read_loop()  # returns instead of failing to schedule the batch
    assert client.dead is None and not caplog.records


# ---- command line -----------------------------------------------------------------------------------------------
def test_serve_help_lists_its_options():
    from engine.serving import server

    parser = argparse.ArgumentParser(prog="prefix-serve")
    server.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert args.func is server.run and args.model is None and args.port == 8000 and args.host == "127.0.0.1"
    sub = parser._subparsers._group_actions[0].choices["serve"]
    text = sub.format_help()
    for option in ("MODEL", "--prefix-dir", "--served-model-name", "--host", "--port", "--device", "--api-key",
                   "--allowed-prefix-root", "--debug-endpoints", "--num-kv-blocks", "--executor", "--decode-steps",
                   "--cuda-graphs", "--cuda-graph-sizes", "--cuda-graph-memory-mb", "--fused-layers"):
        assert option in text, option
    with pytest.raises(SystemExit, match="--decode-steps must be at least 1"):
        server.run(parser.parse_args(["serve", "--decode-steps", "0"]))
    with pytest.raises(SystemExit, match="--served-model-name took the directory .* Put MODEL before the option"):
        server.run(parser.parse_args(["serve", "--served-model-name", "base", str(Path(__file__).parent)]))


def test_decode_steps_setting_is_checked():
    from engine.config import EngineConfig

    assert EngineConfig(device="cuda").resolved_decode_steps() == 16
    assert EngineConfig().resolved_decode_steps() == 1
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="decode_steps must be an integer"):
            EngineConfig(decode_steps=bad).resolved_decode_steps()


@pytest.mark.parametrize("setting, message", [
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an integer of at least 1"),  # hung every request
    ({"block_size": 0}, "block_size must be"), ({"max_num_seqs": 0}, "max_num_seqs must be"),
    ({"num_kv_blocks": 0}, "num_kv_blocks must be"), ({"max_model_len": -1}, "max_model_len must be"),
    ({"dtype": "fp8"}, "dtype must be"), ({"executor": "mpi"}, "executor must be"),
    ({"attention_backend": "flash"}, "attention_backend 'flash' is not one of"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be"), ({"cpu_kv_cache_gb": 0}, "cpu_kv_cache_gb"),
    ({"cpu_kv_cache_gb": float("inf")}, "cpu_kv_cache_gb must be a finite"), ({"max_num_seqs": True}, "max_num_seqs"),
    ({"prefix_host_cache_gb": -1}, "prefix_host_cache_gb must be"),
    ({"kv_cache_prefault": "yes"}, "kv_cache_prefault must be True or False, got 'yes'"),
    ({"prefix_host_cache_gb": float("nan")}, "prefix_host_cache_gb must be"),
    ({"cuda_graphs": "sometimes"}, "cuda_graphs must be auto, on or off, got 'sometimes'"),
    ({"cuda_graphs": True}, "cuda_graphs must be auto"), ({"fused_layers": "1"}, "fused_layers must be auto"),
    ({"cuda_graph_sizes": []}, "cuda_graph_sizes must be a non-empty list of integers of at least 1"),
    ({"cuda_graph_sizes": (1, 0)}, "cuda_graph_sizes must be"), ({"cuda_graph_sizes": "1,2"}, "cuda_graph_sizes"),
    ({"cuda_graph_sizes": [2.0]}, "cuda_graph_sizes must be"), ({"cuda_graph_sizes": 8}, "cuda_graph_sizes must be"),
    ({"cuda_graph_memory_mb": -1}, "cuda_graph_memory_mb must be a finite number of at least 0"),
    ({"cuda_graph_memory_mb": float("nan")}, "cuda_graph_memory_mb must be"),
])
def test_every_engine_setting_is_checked_when_the_config_is_made(setting, message):
    from engine.config import EngineConfig
    from engine.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match=message) as err:
        EngineConfig(**setting)
    assert err.value.field == next(iter(setting))  # the server names the option from it


def test_numpy_numbers_are_good_settings():
    import numpy as np

    from engine.config import EngineConfig

    EngineConfig(max_num_seqs=np.int64(8), gpu_memory_utilization=np.float32(0.5), cpu_kv_cache_gb=1)


def test_serve_refuses_a_bad_setting_before_starting_the_engine():
    from engine.cli import main

    with pytest.raises(SystemExit, match="--max-num-batched-tokens must be an integer of at least 1, got 0"):
        main(["serve", "--max-num-batched-tokens", "0", "--port", "0"])
    with pytest.raises(SystemExit, match=r"--cuda-graph-sizes must be a non-empty list .*, got \[4, 0\]"):
        main(["serve", "--cuda-graph-sizes", "4", "0", "--port", "0"])
    with pytest.raises(SystemExit, match="--cuda-graph-memory-mb must be a finite number of at least 0"):
        main(["serve", "--cuda-graph-memory-mb", "-1", "--port", "0"])


def test_serve_defaults_are_the_engine_configs_and_each_engine_option_sets_its_field():
    from engine.cli import build_parser
    from engine.config import EngineConfig
    from engine.serving.server import _engine_config

    parser = build_parser("serve")
    assert _engine_config(parser.parse_args(["serve"]), []) == EngineConfig()
    args = parser.parse_args(["serve", "--cuda-graphs", "on", "--cuda-graph-sizes", "8", "1", "4",
                              "--cuda-graph-memory-mb", "256", "--fused-layers", "off", "--max-num-seqs", "8"])
    config = _engine_config(args, [])
    assert (config.cuda_graphs, config.cuda_graph_sizes, config.cuda_graph_memory_mb, config.fused_layers,
            config.max_num_seqs) == ("on", (1, 4, 8), 256.0, "off", 8)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parser.parse_args(["serve", "--fused-layers", "sometimes"])


# ---- metric names: docs and dashboard agree with what the server exports ----------------------------------------
def _exported_metric_names() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    from engine.serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.http_requests.labels("/v1/completions", "200").inc()
    families = text_string_to_metric_families(metrics.render().decode())
    return {f.name for f in families if not f.name.endswith("_created")}  # the server turns `_created` off


def test_every_exported_metric_is_documented_and_the_dashboard_uses_only_exported_ones():
    import json
    import re

    from test_server_support import REPO_ROOT

    exported = _exported_metric_names()
    assert all(name.startswith("prefix_serve_") for name in exported)
    docs = (REPO_ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(prefix_serve_\w+)`", docs))
    # prometheus-client names a counter family without its `_total` suffix
    assert {n if n in documented else n + "_total" for n in exported} == documented
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "prefix-serve-dashboard.json").read_text())
    used = set(re.findall(r"prefix_serve_\w+", json.dumps(dashboard)))
    series = {n + suffix for n in exported for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    assert used and used <= series, used - series
