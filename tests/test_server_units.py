"""Server pieces tested in-process, without HTTP: OpenAI request parsing, incremental detokenization, the engine
loop's message protocol, and the `serve` command line.
"""

from __future__ import annotations

import argparse
import random
from collections import deque
from pathlib import Path

import msgpack
import pytest
from test_server_support import build_model, build_prefixes, build_tokenizer

from engine.serving import protocol
from engine.serving.async_engine import IncrementalDetokenizer
from engine.serving.engine_process import EngineLoop, EngineProcessOptions, EngineProtocolError, pack, unpack
from engine.errors import InvalidPromptError, InvalidSamplingParamsError


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


def test_error_body_has_openai_shape():
    body = protocol.error_body(404, "Unknown prefix 'x'.", "UnknownPrefixError")
    assert body == {"error": {"message": "Unknown prefix 'x'.", "type": "not_found_error", "param": None,
                              "code": "UnknownPrefixError"}}


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
        detok = IncrementalDetokenizer(tokenizer, stops)
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

    detok = IncrementalDetokenizer(Chars(), (" The answer", "zz"))
    assert [detok.add([ord(c)]) for c in " Paris. T"] == ["", " P", "a", "r", "i", "s", ".", "", ""]
    assert detok.add([ord("h")]) == "" and detok.add([ord("x")]) == " Thx"
    assert detok.add([ord("z")]) == "" and detok.add([ord("a")]) == "za"


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
    params = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    conn.put({"op": "add", "id": "a", "tokens": [7, 8, 9], "params": params, "prefix": "task0"})  # lazily found
    conn.put({"op": "add", "id": "b", "tokens": [7, 8], "params": {**params, "max_tokens": 50}, "prefix": None})
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
    assert len(tokens["a"]) == len(tokens["b"]) == 3

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
    with pytest.raises(EngineProtocolError, match="version 2"):
        unpack(msgpack.packb({"v": 2, "op": "abort"}))


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
                   "--allowed-prefix-root", "--debug-endpoints", "--num-kv-blocks", "--executor", "--decode-steps"):
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
    ({"host_prefix_cache_size": -1}, "host_prefix_cache_size must be"),
])
def test_every_engine_setting_is_checked_when_the_config_is_made(setting, message):
    from engine.config import EngineConfig
    from engine.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match=message):
        EngineConfig(**setting)


def test_numpy_numbers_are_good_settings():
    import numpy as np

    from engine.config import EngineConfig

    EngineConfig(max_num_seqs=np.int64(8), gpu_memory_utilization=np.float32(0.5), cpu_kv_cache_gb=1)


def test_serve_refuses_a_bad_setting_before_starting_the_engine():
    from engine.cli import main

    with pytest.raises(SystemExit, match="--max-num-batched-tokens must be an integer of at least 1, got 0"):
        main(["serve", "--max-num-batched-tokens", "0", "--port", "0"])


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
