"""The HTTP boundary, in-process (aiohttp's test client, a fake engine client): what is refused before the engine,
with which status and how short a message; aborts that must happen however a handler ends; request deadlines;
/health and the engine's heartbeat; what leaves the server of its directories; the OpenAPI document.

Each test of an issue-15 finding failed before its fix (docs/reliability.md lists them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

import pytest
from test_server_support import build_model, build_prefixes, build_tokenizer

from engine.errors import PrefixPathError
from engine.sampling_params import SamplingParams
from engine.serving import protocol

ROOT_MARKER = "/srv/secret-roots"  # a prefix root that no answer may name


class FakeEngine:
    """An engine client that accepts every request and answers calls from `results`; records adds and aborts.
    `reach` says what the tests expect: False fails any request that gets this far."""

    def __init__(self, reach: bool = True, updates: bool = True):
        self.reach = reach
        self.updates = updates  # False: accepted requests never produce anything (a wedged engine)
        self.alive, self.dead, self.silent_for = True, None, 0.0
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.calls: list[tuple[str, dict]] = []
        self.results = {"list_prefixes": [], "load_prefix": None}
        self.on_add = None  # called (on the event loop) right after a request is accepted

    async def add(self, request_id, tokens, params, prefix, sink, tag=None, stream=True):
        assert self.reach, f"the request should have been refused before reaching the engine ({tokens[:5]})"
        self.added.append(request_id)
        if self.on_add is not None:
            asyncio.get_running_loop().call_soon(self.on_add)

    def abort(self, request_ids):
        self.aborted.extend(request_ids)

    async def call(self, method, **args):
        assert self.reach, f"the call {method} should have been refused before reaching the engine"
        self.calls.append((method, args))
        if not self.updates:
            await asyncio.Event().wait()  # never answers
        result = self.results.get(method)
        if isinstance(result, BaseException):
            raise result
        return result


def _settings(**overrides):
    from engine.serving.server import ServerSettings

    return replace(ServerSettings(("base",), "/srv/models/base", 64, vocab_size=100), **overrides)


def _server(engine, settings=None, tokenizer=None):
    from engine.serving.metrics import ServerMetrics
    from engine.serving.server import OpenAIServer

    return OpenAIServer(engine, tokenizer, settings or _settings(), ServerMetrics())


def _request(engine, method: str, path: str, *, settings=None, tokenizer=None, headers=None, body=None,
             raw: bytes | None = None) -> tuple[int, dict | str, float]:
    """One request to an in-process server; returns (status, JSON body or text, seconds it took)."""
    from aiohttp.test_utils import TestClient, TestServer

    async def run():
        server = _server(engine, settings, tokenizer)
        async with TestClient(TestServer(server.build_app())) as http:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            start = time.perf_counter()
            response = await http.request(method, path, data=data,
                                          headers={"Content-Type": "application/json", **(headers or {})})
            text = await response.text()
            seconds = time.perf_counter() - start
        server.close()
        try:
            return response.status, json.loads(text), seconds
        except ValueError:
            return response.status, text, seconds

    return asyncio.run(run())


def _message(body) -> str:
    return body["error"]["message"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


# ---- finding 2: prefix paths are checked at the boundary ---------------------------------------------------------
@pytest.mark.parametrize("path, fragment", [
    ("/a" * 600_000, "bytes long"),  # 1.2 MB: the engine spent seconds resolving such a path, every stream frozen
    ("/srv/" + "a" * 300 + "/x", "component of 300 bytes"),
    ("/srv/x\x00y", "NUL"),
    ("/srv/\ud800", "surrogate"),
    ("", "non-empty string"),
])
def test_a_malformed_prefix_path_is_400_before_any_file_system_work(path, fragment, monkeypatch):
    from engine.serving import server

    def no_file_system(*args):
        raise AssertionError("a malformed path was resolved")

    monkeypatch.setattr(server, "allowed_path", no_file_system, raising=False)
    engine = FakeEngine(reach=False)
    status, body, seconds = _request(engine, "POST", "/v1/load_prefix", body={"prefix_name": "x", "prefix_path": path},
                                     settings=_settings(prefix_roots=("/srv",)))
    assert status == 400 and fragment in _message(body), body
    assert len(_message(body)) < 300 and seconds < 1.0


def test_a_path_outside_the_roots_is_403_in_the_frontend_and_names_no_root(tmp_path):
    roots = tmp_path / "roots"
    (roots / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    engine = FakeEngine(reach=False)
    for path in (str(tmp_path / "outside"), str(roots / "a" / ".." / ".." / "outside"), "relative/dir"):
        status, body, _ = _request(engine, "POST", "/v1/load_prefix", body={"prefix_name": "x", "prefix_path": path},
                                   settings=_settings(prefix_roots=(str(roots),)))
        assert status == 403 and "outside the allowed prefix roots" in _message(body), body
        assert str(tmp_path) not in json.dumps(body)


def test_an_allowed_path_reaches_the_engine_resolved(tmp_path):
    root = tmp_path / "root"
    (root / "task").mkdir(parents=True)
    engine = FakeEngine()
    engine.results["load_prefix"] = {"name": "t", "path": "task", "num_virtual_tokens": 3}
    status, body, _ = _request(engine, "POST", "/v1/load_prefix",
                               body={"prefix_name": "t", "prefix_path": str(root / "task" / ".." / "task")},
                               settings=_settings(prefix_roots=(str(root),)))
    assert status == 200 and body["prefix_path"] == "task", body
    assert engine.calls == [("load_prefix", {"name": "t", "path": str((root / "task").resolve())})]


# ---- finding 8: a file symlink may not lead out of the roots -----------------------------------------------------
def test_file_and_directory_symlinks_that_leave_the_roots_are_refused(tmp_path):
    from engine.prefix_registry import allowed_path

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    (root / "inner" / "adapter_model.safetensors").write_bytes(b"x")
    evil = root / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    fine = root / "fine"
    fine.mkdir()
    (fine / "adapter_model.safetensors").symlink_to(root / "inner" / "adapter_model.safetensors")  # stays inside
    roots = [root.resolve()]
    with pytest.raises(PrefixPathError, match="adapter_config.json in the prefix directory links to a file outside"):
        allowed_path(str(evil), roots)
    with pytest.raises(PrefixPathError, match="outside the allowed prefix roots"):
        allowed_path(str(root / "dirlink"), roots)
    assert allowed_path(str(fine), roots) == str(fine.resolve())
    with pytest.raises(PrefixPathError) as err:
        allowed_path(str(evil), roots)
    assert str(tmp_path) not in str(err.value)


# ---- finding 4: an accepted request is aborted however its handler ends ------------------------------------------
def test_a_handler_cancelled_after_the_engine_accepted_but_before_start_returned_aborts_its_requests():
    """The window of issue 15 (3-4.5% of disconnects under load): the engine has acknowledged every prompt, and
    the handler is cancelled before Generation.start() has returned to _generate."""
    engine = FakeEngine()

    async def scenario():
        server = _server(engine)
        not_streamed = protocol.StreamOptions(False, False)
        task = asyncio.ensure_future(server._generate(None, time.monotonic(), "cmpl", None, [[1, 2], [3]],
                                                      SamplingParams(max_tokens=5), not_streamed, False, chat=False))
        engine.on_add = lambda: task.cancel() if len(engine.added) == 2 else None  # both accepted, then cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        server.close()

    asyncio.run(scenario())
    assert len(engine.added) == 2 and sorted(engine.aborted) == sorted(engine.added)


# ---- finding 5: malformed input is a 400 with a short message ----------------------------------------------------
@pytest.mark.parametrize("route, body, fragment", [
    ("/v1/completions", {"model": "m" * 300, "prompt": "hi"}, "300 bytes long"),
    ("/v1/completions", {"model": "m" * 5_000_000, "prompt": "hi"}, "5000000 bytes long"),  # 10 MB: now a 413
    ("/v1/completions", {"model": "\ud800", "prompt": "hi"}, "surrogate"),
    ("/v1/completions", {"model": "base", "prompt": "a\ud800b"}, "The prompt holds a lone UTF-16 surrogate (U+D800)"),
    ("/v1/completions", {"model": "base", "prompt": ["ok", "\udfff"]}, "Prompt 1 holds a lone"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "stop": ["\ud800"]}, "A stop string holds"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "stop": [""] + ["x" * 4096] * 255}, "non-empty"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "stop": [0] * 1_000_000}, "at most 256 strings"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "A message holds"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
     "surrogate"),
    ("/v1/load_prefix", {"prefix_name": "\ud800", "prefix_path": "/srv/x"}, "'prefix_name' holds a lone"),
    ("/v1/load_prefix", {"prefix_name": "x" * 256, "prefix_path": "/srv/x"}, "256 bytes long"),
    ("/v1/load_prefix", {"prefix_name": "x", "prefix_path": "/srv/\udc80"}, "'prefix_path' holds a lone"),
    ("/v1/unload_prefix", {"prefix_name": "\ud800"}, "surrogate"),
])
def test_malformed_input_is_400_with_a_short_message(tokenizer, route, body, fragment):
    engine = FakeEngine(reach=False)
    status, answer, _ = _request(engine, "POST", route, body=body, tokenizer=tokenizer,
                                 settings=_settings(prefix_roots=("/srv",)))
    assert status == 400 and fragment in _message(answer), answer
    assert len(_message(answer)) < 400


@pytest.mark.parametrize("content_type, raw, fragment", [
    ("application/json; charset=bogus", b'{"prompt": "hi"}', "charset"),
    ("application/json; charset=base64", b'{"prompt": "hi"}', "charset"),
    ("application/json", b'{"prompt": "\xff"}', "not valid utf-8 text"),
    ("application/json", b"[" * 100_000, "not valid JSON"),
    ("application/json", b'{"max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ("application/json", b'["a JSON array"]', "must be a JSON object"),
])
def test_a_body_that_is_not_a_utf8_json_object_is_400(content_type, raw, fragment):
    status, answer, _ = _request(FakeEngine(reach=False), "POST", "/v1/completions", raw=raw,
                                 headers={"Content-Type": content_type})
    assert status == 400 and fragment in _message(answer), answer
    assert len(_message(answer)) < 300


def test_a_body_over_the_limit_is_413():
    raw = b'{"prompt": "' + b"a" * protocol.MAX_BODY_BYTES + b'"}'
    status, answer, _ = _request(FakeEngine(reach=False), "POST", "/v1/completions", raw=raw)
    assert status == 413 and answer["error"]["type"] == "invalid_request_error"


def test_a_call_whose_arguments_cannot_be_sent_leaves_no_pending_reply():
    """AsyncEngineClient.call() registered its reply future before encoding: every failed call leaked it."""
    from engine.config import EngineConfig
    from engine.serving.async_engine import AsyncEngineClient
    from engine.serving.engine_process import EngineProcessOptions

    client = AsyncEngineClient(EngineConfig(), EngineProcessOptions())

    async def scenario():
        client._loop = asyncio.get_running_loop()
        for _ in range(3):
            with pytest.raises(protocol.BadRequestError, match="cannot be sent to the engine"):
                await client.call("load_prefix", name="\ud800", path="/x")

    asyncio.run(scenario())
    assert client._pending == {} and client._out.empty()


def test_an_unexpected_error_is_500_naming_its_type_only_and_its_log_lines_are_clipped(caplog):
    from engine.serving.engine_process import LOG_LINE_LIMIT, ClippedFormatter

    engine = FakeEngine()
    engine.results["list_prefixes"] = RuntimeError(f"{ROOT_MARKER}/task " + "x" * 1_000_000)
    with caplog.at_level(logging.ERROR, logger="prefix_serve.server"):
        status, body, _ = _request(engine, "GET", "/v1/models")
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "RuntimeError" in _message(body) and ROOT_MARKER not in _message(body)
    formatted = ClippedFormatter("%(message)s").format(caplog.records[-1])
    assert "RuntimeError" in formatted and max(map(len, formatted.split("\n"))) < LOG_LINE_LIMIT + 50


def test_messages_quote_at_most_about_200_characters_of_a_value():
    from engine.errors import quote

    assert len(quote("x" * 10_000_000)) < 210 and len(quote([[0] * 1000] * 1000)) < 210
    assert quote("\ud800") == "'\\ud800'"  # escaped: loggable and encodable
    assert quote(10**4000).startswith("1000")


# ---- finding 7: token-id prompts are bounded before the engine ---------------------------------------------------
@pytest.mark.parametrize("prompt, fragment", [
    ([1] * 2_000_000, "2000000 token ids"),  # 4 MB of ids; 48 MB took the engine 264 MB before its 400
    ([[1] * 64], "64 token ids"),
    ([1, 2, 100], "integers in [0, 100)"), ([1, -1], "integers in [0, 100)"), ([1, 2.0], "integers in [0, 100)"),
    ([[1]] * (protocol.MAX_PROMPTS + 1), f"at most {protocol.MAX_PROMPTS}"),
])
def test_token_id_prompts_are_bounded_before_the_engine(prompt, fragment):
    status, answer, seconds = _request(FakeEngine(reach=False), "POST", "/v1/completions",
                                       body={"model": "base", "prompt": prompt})
    assert status == 400 and fragment in _message(answer), answer
    assert seconds < 1.0


def test_a_prompt_of_exactly_the_context_less_one_token_reaches_the_engine():
    engine = FakeEngine(updates=False)
    status, answer, _ = _request(engine, "POST", "/v1/completions", body={"prompt": [1] * 63, "max_tokens": 1},
                                 settings=_settings(request_timeout=0.2))
    assert status == 504 and len(engine.added) == 1  # accepted; then the deadline (no engine to answer)


# ---- finding 6: deadlines and health -----------------------------------------------------------------------------
def test_a_request_past_its_deadline_is_aborted_and_answered_504():
    engine = FakeEngine(updates=False)
    status, answer, seconds = _request(engine, "POST", "/v1/completions", body={"prompt": [1, 2], "n": 2},
                                       settings=_settings(request_timeout=0.3))
    assert status == 504 and answer["error"]["code"] == "RequestTimeoutError", answer
    assert "--request-timeout" in _message(answer) and 0.3 <= seconds < 2
    assert engine.aborted == engine.added and len(engine.added) == 1


def test_a_stream_past_its_deadline_ends_with_an_error_event():
    engine = FakeEngine(updates=False)
    status, text, _ = _request(engine, "POST", "/v1/chat/completions",
                               body={"messages": [{"role": "user", "content": "hi"}], "stream": True},
                               settings=_settings(request_timeout=0.3), tokenizer=_ChatTokenizer())
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and json.loads(events[-2])["error"]["code"] == "RequestTimeoutError" and events[-1] == "[DONE]"
    assert engine.aborted == engine.added


def test_engine_calls_past_the_deadline_are_504():
    engine = FakeEngine(updates=False)
    status, answer, _ = _request(engine, "GET", "/v1/models", settings=_settings(request_timeout=0.2))
    assert status == 504 and answer["error"]["code"] == "RequestTimeoutError"


class _ChatTokenizer:
    """Just enough tokenizer for a chat request: every character is a token."""

    chat_template = "x"

    def get_vocab(self):
        return {"a": 0}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=True):
        return type("Encoded", (), {"input_ids": [ord(c) % 50 for c in text]})()


def test_health_is_503_once_the_engine_has_been_silent_past_the_stall_timeout():
    engine = FakeEngine()
    engine.silent_for = 1.5  # heartbeats come every second
    status, _, _ = _request(engine, "GET", "/health", settings=_settings(stall_timeout=5.0, api_key="k"))
    assert status == 200
    engine.silent_for = 5.5
    status, answer, _ = _request(engine, "GET", "/health", settings=_settings(stall_timeout=5.0))
    assert status == 503 and answer["error"]["code"] == "engine_stalled" and "5.5 s" in _message(answer)
    engine.alive, engine.dead = False, "the engine process exited"
    status, answer, _ = _request(engine, "GET", "/health")
    assert status == 503 and answer["error"]["code"] == "engine_dead"


def test_metrics_of_a_stalled_engine_come_at_once_without_asking_it():
    """A wedged engine made /metrics wait 30 s for its statistics."""
    engine = FakeEngine(updates=False)
    engine.silent_for = 60.0
    status, text, seconds = _request(engine, "GET", "/metrics")
    assert status == 200 and "prefix_serve_engine_up 1.0" in text and seconds < 1.0 and engine.calls == []


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory):
    from engine.config import EngineConfig
    from engine.llm_engine import EngineCore

    root = tmp_path_factory.mktemp("boundary")
    model = build_model(root / "model")
    build_prefixes(model, root / "prefixes", 1)
    engine = EngineCore(EngineConfig(model=str(model), num_kv_blocks=32,
                                     allowed_prefix_roots=(str(root / "prefixes"),)))
    yield engine, root
    engine.shutdown()


class _Idle:
    """The engine loop's read end with nothing ever arriving."""

    def poll(self, timeout=None):
        time.sleep(min(timeout or 0, 0.01))
        return False


def test_an_idle_engine_loop_sends_a_heartbeat_every_interval(engine_setup, monkeypatch):
    from engine.serving import engine_process
    from engine.serving.engine_process import EngineLoop, EngineProcessOptions, unpack

    monkeypatch.setattr(engine_process, "HEARTBEAT_SECONDS", 0.05)
    sent = []
    loop = EngineLoop(engine_setup[0], EngineProcessOptions(), _Idle(), sent.append)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        loop.run_once()
    beats = [unpack(m) for m in sent]
    assert all(b["op"] == "heartbeat" for b in beats) and 5 <= len(beats) <= 11, len(beats)


def test_the_reader_notes_heartbeats_without_delivering_them():
    import multiprocessing

    from engine.config import EngineConfig
    from engine.serving.async_engine import AsyncEngineClient
    from engine.serving.engine_process import EngineProcessOptions, pack

    reads, writes = multiprocessing.Pipe(duplex=False)
    client = AsyncEngineClient(EngineConfig(), EngineProcessOptions())
    client._from_engine = reads

    async def scenario():
        client._loop = asyncio.get_running_loop()
        client._last_heard -= 100
        assert client.silent_for > 99
        writes.send_bytes(pack({"op": "heartbeat", "steps": 3}))
        writes.close()
        await asyncio.to_thread(client._read_loop)  # returns at EOF
        await asyncio.sleep(0.01)  # whatever the reader scheduled has run

    client.dead_event = None
    client._engine_died = lambda reason: None
    delivered = []
    client._deliver = lambda *args: delivered.append(args)
    asyncio.run(scenario())
    assert client.silent_for < 5 and delivered == []


# ---- finding 8: what leaves the engine names no server directory -------------------------------------------------
def test_engine_errors_and_listed_paths_are_relative_to_their_root(engine_setup):
    from engine.serving.engine_process import EngineLoop, EngineProcessOptions, PathRedactor, pack, unpack

    engine, root = engine_setup
    prefixes = root / "prefixes"
    broken = prefixes / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    sent = []
    loop = EngineLoop(engine, EngineProcessOptions(prefix_dirs=(str(prefixes),)), None, sent.append)
    for message in ({"op": "add", "id": "a", "tokens": [1], "params": SamplingParams(max_tokens=1), "prefix": "broken"},
                    {"op": "call", "call_id": 1, "method": "load_prefix",
                     "args": {"name": "again", "path": str(prefixes / "task0")}},
                    {"op": "call", "call_id": 2, "method": "list_prefixes", "args": {}},
                    {"op": "call", "call_id": 3, "method": "load_prefix", "args": {"name": "x", "path": str(root)}}):
        loop._handle(unpack(pack(message)))
    loop._flush()
    replies = unpack(sent[0])["replies"]
    assert replies[0]["error"]["message"].startswith("broken/adapter_config.json is not valid JSON"), replies[0]
    assert replies[1]["result"]["path"] == "task0"
    assert dict(replies[2]["result"])["again"] == "task0"
    assert replies[3]["error"]["status"] == 403
    assert str(root) not in json.dumps(replies)
    engine.unload_prefix("again")
    redactor = PathRedactor(["/srv/a", "/srv/a/b", "/"])
    assert redactor.text("no /srv/a/b/c or /srv/a/d, /srv/a alone") == "no c or d, <prefix root> alone"
    assert redactor.path("/elsewhere/p") == "p"


def test_models_name_no_absolute_path():
    engine = FakeEngine()
    engine.results["list_prefixes"] = [["task0", "task0"]]
    status, body, _ = _request(engine, "GET", "/v1/models")
    assert status == 200 and [m["root"] for m in body["data"]] == ["base", "task0"]


# ---- /openapi.json and /docs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("debug", [False, True])
def test_the_openapi_document_lists_every_registered_route_and_nothing_else(debug):
    from engine.serving import openapi
    from engine.serving.server import registered_routes

    server = _server(FakeEngine(), _settings(debug_endpoints=debug))
    app = server.build_app()
    routes = set(registered_routes(app))
    documented = {(method.upper(), path) for path, ops in server.openapi["paths"].items() for method in ops}
    assert routes == documented and len(routes) == 9 + debug
    assert (("GET", "/debug/engine_state") in routes) == debug
    with pytest.raises(KeyError, match="has no entry"):
        openapi.document([*routes, ("GET", "/v1/new_route")], "0")
    server.close()


def test_the_openapi_document_refers_only_to_schemas_it_defines_and_states_the_limits():
    from engine.serving import openapi

    spec = openapi.document(list(openapi.ROUTES), "0")
    refs = {m for m in __import__("re").findall(r'"#/components/schemas/(\w+)"', json.dumps(spec))}
    assert refs <= set(spec["components"]["schemas"]) and "Error" in refs
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "200" in codes and ("401" in codes) == (path != "/health"), (method, path)
    prompt = spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert prompt["oneOf"][2]["maxItems"] == protocol.MAX_PROMPTS
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["stop_token_ids"]["maxItems"] == \
        SamplingParams.MAX_STOP_TOKEN_IDS
    try:
        import jsonschema
    except ImportError:
        return
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_openapi_and_docs_need_the_api_key_and_list_the_routes():
    settings = _settings(api_key="k")
    for path in ("/openapi.json", "/docs"):
        assert _request(FakeEngine(), "GET", path, settings=settings)[0] == 401
    status, spec, _ = _request(FakeEngine(), "GET", "/openapi.json", settings=settings,
                               headers={"Authorization": "Bearer k"})
    assert status == 200 and spec["openapi"].startswith("3.1") and "/v1/completions" in spec["paths"]
    status, page, _ = _request(FakeEngine(), "GET", "/docs", settings=settings, headers={"Authorization": "Bearer k"})
    assert status == 200 and page.startswith("<!doctype html>") and "/openapi.json" in page
    assert all(path in page for path in spec["paths"]) and "<script" not in page


def test_serve_takes_a_request_deadline_and_a_stall_timeout():
    import argparse

    from engine.serving import server

    parser = argparse.ArgumentParser(prog="prefix-serve")
    server.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert args.request_timeout is None and args.stall_timeout == server.DEFAULT_STALL_TIMEOUT == 5.0
    with pytest.raises(SystemExit, match="--request-timeout must be a positive number"):
        server.run(parser.parse_args(["serve", "--request-timeout", "0"]))
    with pytest.raises(SystemExit, match="--stall-timeout must be at least 2"):
        server.run(parser.parse_args(["serve", "--stall-timeout", "1"]))

