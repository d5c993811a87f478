"""The OpenAI-compatible server, driven over HTTP by the unmodified `openai` client.

One real server (`python -m engine.serving.server`, the `serve` subcommand) runs for the whole module on a tiny random
Llama with a byte-level tokenizer, eight prefixes and an API key. Greedy outputs must equal offline
`LLM.generate` token for token, streamed text must equal non-streamed text, counters must move by exactly the
workload's amounts, and after concurrent streams and client disconnects no KV block may be leaked.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal

import openai
import pytest
from test_server_support import (API_KEY, ServerProcess, build_model, build_prefixes, http,  # noqa: I001
                                 wait_for)

BASE = "tiny-base"
PREFIXES = [f"task{i}" for i in range(8)]
NUM_KV_BLOCKS = 512
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model = build_model(root / "model")
    prefixes = build_prefixes(model, root / "prefixes", 8)
    loadable = build_prefixes(model, root / "loadable", 1, first_seed=20)  # task20, loaded via /v1/load_prefix
    outside = build_prefixes(model, root / "outside", 1, first_seed=30)  # task30, outside every allowed root
    return {"root": root, "model": model, "prefixes": prefixes, "loadable": loadable, "outside": outside}


@pytest.fixture(scope="module")
def launched(stack):
    """The server process, started but perhaps not ready yet (it boots while `offline` builds)."""
    proc = ServerProcess([str(stack["model"]), "--prefix-dir", str(stack["root"] / "prefixes"),
                          "--allowed-prefix-root", str(stack["root"] / "loadable"), "--served-model-name", BASE,
                          "--api-key", API_KEY, "--debug-endpoints", "--num-kv-blocks", str(NUM_KV_BLOCKS),
                          "--max-num-seqs", "128", "--log-level", "WARNING",
                          # runs of 4 forwards on CPU too, and each step scheduled while the one before runs;
                          # `offline` runs one forward per step, one step at a time
                          "--decode-steps", "4", "--async-scheduling"])
    yield proc
    code = proc.stop()
    assert code == proc.expected_exit_code, f"server exited with {code}:\n{proc.output()[-3000:]}"


@pytest.fixture(scope="module")
def server(launched, offline):
    return launched.wait_ready()


@pytest.fixture(scope="module")
def offline(stack, launched):
    """Offline LLM on the same model and prefixes: the reference for greedy outputs."""
    from engine import LLM

    llm = LLM(str(stack["model"]), num_kv_blocks=NUM_KV_BLOCKS)
    for name, path in stack["prefixes"].items():
        llm.load_prefix(name, str(path))
    yield llm
    llm.shutdown()


def greedy(llm, prompts: list, prefixes: list, max_tokens: int, **params) -> list:
    from engine import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return [o.outputs[0] for o in llm.generate(prompts, sp, prefix=prefixes, use_tqdm=False)]


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)


def aclient(server, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)


def engine_state(server) -> dict:
    status, body = http("GET", server.url + "/debug/engine_state")
    assert status == 200, body
    return json.loads(body)


def assert_no_leak(server) -> dict:
    """Once idle: integrity holds, no block is used, every block is free or caches an idle prefix."""
    state = wait_for(lambda: (s := engine_state(server))["requests"] == 0 and s["used_blocks"] == 0 and s)
    state = state or engine_state(server)
    assert state["integrity_ok"], state["integrity_error"]
    assert state["requests"] == 0 and state["running"] == 0 and state["waiting"] == 0 and state["tracked"] == 0
    assert state["block_tables"] == 0 and state["used_blocks"] == 0
    assert state["free_blocks"] + state["cached_blocks"] == state["num_blocks"] == NUM_KV_BLOCKS
    return state


def scrape(server) -> dict:
    """Every sample of /metrics, parsed with prometheus_client's own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http("GET", server.url + "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("prefix_serve_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def stream_completion(ac: openai.AsyncOpenAI, extra_body: dict | None = None,
                            **kwargs) -> tuple[str, list[int], str, list]:
    stream = await ac.completions.create(stream=True, extra_body={"return_token_ids": True, **(extra_body or {})},
                                         **kwargs)
    text, ids, finish, chunks = [], [], None, []
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            text.append(choice.text)
            ids.extend(choice.model_extra.get("token_ids") or [])
            finish = choice.finish_reason or finish
    return "".join(text), ids, finish, chunks


# ---- completions and chat ---------------------------------------------------------------------------------------
PROMPTS = ["the quick brown fox", [1, 60, 61, 62, 63, 64], "café crème 🙂", "ahoy matey"]
MODELS = [BASE, "task0", "task3", "task7"]


def test_completions_equal_offline_generate_with_prefixes_mixed_streaming_and_not(server, offline):
    cases = [(p, m) for p in PROMPTS for m in MODELS][::2] + [(PROMPTS[1], "task5"), (PROMPTS[2], "task6")]
    expected = greedy(offline, [p if isinstance(p, str) else {"prompt_token_ids": p} for p, _ in cases],
                      [None if m == BASE else m for _, m in cases], max_tokens=12)

    async def run():
        async with aclient(server) as ac:
            plain = [ac.completions.create(model=m, prompt=p, max_tokens=12, extra_body={"return_token_ids": True},
                                           **GREEDY) for p, m in cases]
            streamed = [stream_completion(ac, model=m, prompt=p, max_tokens=12, **GREEDY) for p, m in cases]
            return await asyncio.gather(asyncio.gather(*plain), asyncio.gather(*streamed))

    runs_before = engine_state(server)["decode_run_steps"]
    plain, streamed = asyncio.run(run())
    assert engine_state(server)["decode_run_steps"] > runs_before  # the server ran decode runs of 4
    for (prompt, model), want, got, (s_text, s_ids, s_finish, _) in zip(cases, expected, plain, streamed):
        choice = got.choices[0]
        assert choice.model_extra["token_ids"] == want.token_ids, (prompt, model)
        assert choice.text == want.text and choice.finish_reason == want.finish_reason
        assert got.model == model
        assert (s_ids, s_text, s_finish) == (want.token_ids, want.text, want.finish_reason), (prompt, model)
        assert got.usage.completion_tokens == len(want.token_ids)


def test_chat_equals_offline_generate_on_the_chat_template_streaming_and_not(server, offline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(offline.engine.model_path))
    conversations = [[{"role": "user", "content": "ahoy, where is the ship?"}],
                     [{"role": "system", "content": "answer in SQL"}, {"role": "user", "content": "all users"}]]
    cases = [(c, m) for c in conversations for m in (BASE, "task2")]
    prompt_ids = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False).input_ids for c, _ in cases]
    expected = greedy(offline, [{"prompt_token_ids": ids} for ids in prompt_ids],
                      [None if m == BASE else m for _, m in cases], max_tokens=10)
    sync = client(server)
    for (messages, model), want in zip(cases, expected):
        got = sync.chat.completions.create(model=model, messages=messages, max_tokens=10,
                                           extra_body={"return_token_ids": True}, **GREEDY)
        assert got.choices[0].model_extra["token_ids"] == want.token_ids
        assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
        assert got.usage.prompt_tokens == len(prompt_ids[cases.index((messages, model))])
        chunks = list(sync.chat.completions.create(model=model, messages=messages, max_tokens=10, stream=True,
                                                   extra_body={"return_token_ids": True}, **GREEDY))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])] == want.token_ids
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
        assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)


def test_chat_without_max_tokens_may_use_the_whole_remaining_context(server):
    messages = [{"role": "user", "content": "ahoy matey " * 35}]
    got = client(server).chat.completions.create(model="task1", messages=messages, extra_body={"ignore_eos": True},
                                                 **GREEDY)
    context_left = 256 - 5 - got.usage.prompt_tokens  # task1 has 5 virtual tokens
    assert 16 < context_left < 100
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == context_left


def test_n_samples_and_prompt_lists_give_one_choice_each_in_openai_order(server, offline):
    prompts = ["the lazy dog", "SELECT name"]
    want = greedy(offline, prompts, "task4", max_tokens=6)
    got = client(server).completions.create(model="task4", prompt=prompts, n=2, max_tokens=6,
                                            extra_body={"return_token_ids": True}, **GREEDY)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.model_extra["token_ids"] for c in got.choices] == [want[0].token_ids] * 2 + [want[1].token_ids] * 2
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want) * 2

    chunks = list(client(server).completions.create(model="task4", prompt=prompts, n=2, max_tokens=6, stream=True,
                                                    **GREEDY))
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: want[0].text, 1: want[0].text, 2: want[1].text, 3: want[1].text}


def test_stream_usage_only_with_include_usage(server):
    sync = client(server)
    chunks = list(sync.completions.create(model="task0", prompt=[5, 6, 7], max_tokens=5, stream=True,
                                          stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True}, **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.total_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(sync.completions.create(model="task0", prompt=[5, 6, 7], max_tokens=5, stream=True, **GREEDY))
    assert all(c.usage is None and c.choices for c in plain)


def test_stop_string_cuts_the_text_the_same_way_streaming_and_not(server, offline):
    want = greedy(offline, ["the quick brown fox"], None, max_tokens=24, ignore_eos=True)[0].text
    clean = [i for i in range(2, len(want) - 2) if "\ufffd" not in want[i:i + 2]]
    if not clean:
        pytest.skip("the random model's output has no clean two-character stop string")
    stop = want[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]
    cut = want[:want.find(stop)]
    sync = client(server)
    got = sync.completions.create(model=BASE, prompt="the quick brown fox", max_tokens=24, stop=[stop],
                                  extra_body={"ignore_eos": True}, **GREEDY)
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.choices[0].model_extra["stop_reason"] == stop
    chunks = list(sync.completions.create(model=BASE, prompt="the quick brown fox", max_tokens=24, stop=stop,
                                          stream=True, extra_body={"ignore_eos": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- models and prefix management -------------------------------------------------------------------------------
def test_models_lists_the_base_model_and_every_prefix_with_its_parent(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert models[BASE].model_extra["parent"] is None
    assert set(PREFIXES) <= set(models)
    assert all(models[p].model_extra["parent"] == BASE for p in PREFIXES)
    # a root names no server directory: the base model's name, a prefix's directory under its root
    assert models[BASE].model_extra["root"] == BASE
    assert all(models[p].model_extra["root"] == p for p in PREFIXES)


def test_load_use_and_unload_a_prefix_while_a_request_runs_on_it(server, stack, offline):
    sync = client(server)
    path = str(stack["loadable"]["task20"])
    status, body = http("POST", server.url + "/v1/load_prefix", {"prefix_name": "task20", "prefix_path": path})
    assert status == 200, body
    assert json.loads(body)["num_virtual_tokens"] == 3
    offline.load_prefix("task20", path)
    # 200 tokens (was 100): the stream must outlast the three HTTP calls below, and the tiny model is fast
    want = greedy(offline, ["ahoy"], "task20", max_tokens=200, ignore_eos=True)[0]
    assert "task20" in {m.id for m in sync.models.list().data}

    resident_before = engine_state(server)["resident_prefixes"]
    stream = sync.completions.create(model="task20", prompt="ahoy", max_tokens=200, stream=True,
                                     extra_body={"ignore_eos": True, "return_token_ids": True}, **GREEDY)
    chunks = [next(stream)]
    assert engine_state(server)["requests"] == 1  # the first token was flushed long before the last
    status, body = http("POST", server.url + "/v1/unload_prefix", {"prefix_name": "task20"})
    assert status == 200, body
    assert engine_state(server)["requests"] == 1  # still running on the unloaded prefix
    with pytest.raises(openai.NotFoundError):
        sync.completions.create(model="task20", prompt="ahoy", max_tokens=2)
    chunks += list(stream)  # the running request finishes on the unloaded prefix's blocks
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == want.token_ids
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "task20" not in {m.id for m in sync.models.list().data}
    state = assert_no_leak(server)
    assert state["resident_prefixes"] == resident_before  # its blocks were freed after its last user finished
    offline.unload_prefix("task20")


def test_a_subdirectory_added_to_the_prefix_dir_after_startup_is_found_on_first_use(server, stack):
    late = stack["root"] / "prefixes" / "late_task"
    shutil.copytree(stack["prefixes"]["task1"], late)
    got = client(server).completions.create(model="late_task", prompt="hello", max_tokens=3, **GREEDY)
    assert got.choices[0].finish_reason in ("stop", "length") and got.model == "late_task"


# ---- errors -----------------------------------------------------------------------------------------------------
def assert_serves_normally(server):
    got = client(server).completions.create(model="task0", prompt="ok", max_tokens=2, **GREEDY)
    assert got.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("params, fragment", [
    ({"temperature": -1}, "temperature"), ({"n": 0}, "n must"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 1.5}, "top_p"), ({"seed": -3}, "seed"), ({"extra_body": {"stop": 5}}, "stop"),
    ({"extra_body": {"stream": "yes"}}, "stream"), ({"extra_body": {"temperature": True}}, "temperature"),
    ({"logprobs": 2}, "logprobs"), ({"extra_body": {"prompt": []}}, "prompt"),
    ({"extra_body": {"seed": 2**64}}, "seed"),
    ({"extra_body": {"top_k": 2**63}}, "top_k"), ({"extra_body": {"stop_token_ids": [2**70]}}, "stop_token_ids"),
    ({"extra_body": {"max_tokens": 10**23}}, "max_tokens"), ({"n": 1000}, "exceeds max_num_seqs"),
    ({"extra_body": {"prompt": [2**70]}}, "must be integers in [0, 320)"),
    ({"extra_body": {"prompt": [320]}}, "must be integers in [0, 320)")])
def test_bad_parameters_are_400_and_the_server_keeps_serving(server, params, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).completions.create(model="task0", prompt="hi", **params)
    assert err.value.status_code == 400 and fragment in err.value.message
    assert err.value.body["type"] == "invalid_request_error"
    assert_serves_normally(server)


def test_odd_json_and_nul_in_a_path_are_400(server, stack):
    assert http("POST", server.url + "/v1/completions", raw=b"[" * 100_000)[0] == 400  # nests past recursion
    for value in (b"NaN", b"Infinity"):  # Python's JSON parser reads these; the openai client cannot send them
        status, body = http("POST", server.url + "/v1/completions",
                            raw=b'{"model": "task0", "prompt": "hi", "temperature": ' + value + b"}")
        assert status == 400 and "temperature must be a finite number" in json.loads(body)["error"]["message"]
    status, body = http("POST", server.url + "/v1/load_prefix",
                        {"prefix_name": "nul", "prefix_path": str(stack["root"] / "loadable") + "\x00"})
    assert status == 400 and "NUL" in json.loads(body)["error"]["message"]
    assert_serves_normally(server)


def test_extreme_but_valid_sampling_values_are_served(server):
    got = client(server).completions.create(model="task0", prompt="hi", max_tokens=3, temperature=1.0,
                                            top_p=1e-300, extra_body={"top_k": 2**62})
    assert got.choices[0].finish_reason in ("stop", "length")
    status, body = http("POST", server.url + "/v1/completions",
                        raw=b'{"model": "task0", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}")
    assert status == 400 and "temperature must be a finite number" in json.loads(body)["error"]["message"]
    assert_serves_normally(server)


def test_a_prompt_with_more_characters_than_any_context_holds_is_refused_untokenized(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).completions.create(model="task0", prompt="ab" * 3_000_000, max_tokens=2)
    assert "characters" in err.value.message and "not tokenized" in err.value.message
    assert_serves_normally(server)


def test_a_failed_load_prefix_changes_nothing(server, stack):
    bad = stack["root"] / "loadable" / "truncated"
    shutil.copytree(stack["loadable"]["task20"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    for name in ("task0", "never_loaded"):
        status, body = http("POST", server.url + "/v1/load_prefix", {"prefix_name": name, "prefix_path": str(bad)})
        assert status == 400 and "safetensors" in json.loads(body)["error"]["message"]
    assert "never_loaded" not in {m.id for m in client(server).models.list().data}
    assert_serves_normally(server)  # task0 keeps its adapter


def test_a_prefix_whose_file_vanished_fails_its_request_with_500_and_nothing_else(server, stack, offline):
    doomed = stack["root"] / "loadable" / "doomed"
    shutil.copytree(stack["loadable"]["task20"], doomed)
    status, body = http("POST", server.url + "/v1/load_prefix", {"prefix_name": "doomed", "prefix_path": str(doomed)})
    assert status == 200, body
    weights = doomed / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()

    async def both():
        ac = aclient(server)
        bad = ac.completions.create(model="doomed", prompt=["one", "two"], max_tokens=4, **GREEDY)
        good = ac.completions.create(model="task4", prompt="ahoy matey", max_tokens=6, **GREEDY)
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(both())
    assert isinstance(bad, openai.InternalServerError) and "could not be loaded" in bad.message, bad
    assert str(stack["root"]) not in bad.message and "doomed" in bad.message  # relative to its root
    assert good.choices[0].text == greedy(offline, ["ahoy matey"], ["task4"], 6)[0].text
    assert_no_leak(server)
    status, body = http("POST", server.url + "/v1/completions", {"model": "doomed", "prompt": "one", "max_tokens": 4,
                                                                  "temperature": 0, "stream": True})
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and events[-1]["error"]["code"] == "PrefixLoadError", body  # as a non-streamed 500 says
    weights.write_bytes(saved)  # back again: the next request reads the file and runs
    got = client(server).completions.create(model="doomed", prompt="one", max_tokens=3, **GREEDY)
    assert got.choices[0].finish_reason in ("stop", "length")
    http("POST", server.url + "/v1/unload_prefix", {"prefix_name": "doomed"})


def test_unknown_model_or_prefix_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        client(server).chat.completions.create(model="no-such-task", messages=[{"role": "user", "content": "x"}])
    assert "no-such-task" in err.value.message
    status, body = http("POST", server.url + "/v1/unload_prefix", {"prefix_name": "no-such-task"})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    assert_serves_normally(server)


def test_missing_or_wrong_api_key_is_401_except_on_health(server):
    for key in (None, "wrong-key"):
        for method, route in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            status, body = http(method, server.url + route, {"model": BASE, "prompt": "x"}, key=key)
            assert status == 401, (key, route)
            assert json.loads(body)["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", server.url + "/health", key=None)[0] == 200
    assert_serves_normally(server)


def test_a_prompt_that_is_too_long_is_400_with_the_lengths(server):
    with pytest.raises(openai.BadRequestError) as err:  # fits alone, not after task2's 7 virtual tokens
        client(server).completions.create(model="task2", prompt=[9] * 250, max_tokens=2)
    assert "250" in err.value.message and "256" in err.value.message and "7" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # refused by the frontend, before the engine
        client(server).completions.create(model="task2", prompt=[9] * 300, max_tokens=2)
    assert "300 token ids" in err.value.message and "256" in err.value.message
    assert_serves_normally(server)


def test_loading_a_prefix_outside_the_allowed_roots_is_403_and_bad_bodies_are_400(server, stack):
    status, body = http("POST", server.url + "/v1/load_prefix",
                        {"prefix_name": "evil", "prefix_path": str(stack["outside"]["task30"])})
    assert status == 403 and "outside the allowed prefix roots" in json.loads(body)["error"]["message"]
    assert str(stack["root"]) not in body.decode()  # neither the roots nor the path
    # a file symlink inside an allowed root that leads out of the roots is refused as well
    linked = stack["root"] / "loadable" / "linked"
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(stack["outside"]["task30"] / name)
    status, body = http("POST", server.url + "/v1/load_prefix", {"prefix_name": "evil", "prefix_path": str(linked)})
    assert status == 403 and "links to a file outside" in json.loads(body)["error"]["message"]
    assert str(stack["root"]) not in body.decode()
    assert "evil" not in {m.id for m in client(server).models.list().data}
    assert http("POST", server.url + "/v1/load_prefix", {"prefix_name": "x"})[0] == 400
    assert http("POST", server.url + "/v1/completions", raw=b"{not json")[0] == 400
    status, body = http("GET", server.url + "/v1/no-such-route")
    assert status == 404 and "error" in json.loads(body)
    assert_serves_normally(server)


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_counters_move_by_exactly_the_workload(server):
    sync = client(server)
    assert_no_leak(server)
    before = scrape(server)
    workload = [(BASE, [11, 12, 13, 14, 15], 6, 1), ("task0", [20] * 7, 6, 1), ("task1", [30] * 9, 6, 1),
                ("task2", [40, 41, 42, 43], 3, 2)]
    for model, prompt, max_tokens, n in workload:
        sync.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, n=n,
                                extra_body={"ignore_eos": True}, temperature=0.8, seed=1)
    # alone and greedy: 1 token from the prefill step, then decode runs of 4, 4 and 3
    runs_before = engine_state(server)["decode_run_steps"]
    sync.completions.create(model="task3", prompt=[50, 51], max_tokens=12, extra_body={"ignore_eos": True},
                            **GREEDY)
    assert engine_state(server)["decode_run_steps"] - runs_before == 11
    after = scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("prefix_serve_prompt_tokens_total") == 5 + 7 + 9 + 4 + 2
    assert delta("prefix_serve_generation_tokens_total") == 6 + 6 + 6 + 3 * 2 + 12
    assert delta("prefix_serve_requests_finished_total", reason="length") == 5
    assert delta("prefix_serve_requests_finished_total", reason="stop") == 0
    assert delta("prefix_serve_requests_finished_total", reason="abort") == 0
    assert delta("prefix_serve_prefix_cache_hits_total") + delta("prefix_serve_prefix_cache_misses_total") == 4
    assert delta("prefix_serve_time_to_first_token_seconds_count") == 5
    assert delta("prefix_serve_e2e_request_latency_seconds_count") == 5
    # one interval per token after the first, also for the tokens a decode run brings together
    assert delta("prefix_serve_inter_token_latency_seconds_count") == 5 + 5 + 5 + 2 + 11
    assert delta("prefix_serve_http_requests_total", route="/v1/completions", status="200") == 5
    assert delta("prefix_serve_prefix_load_seconds_count") == delta("prefix_serve_prefix_loads_total")
    # one wait per request on a prefix, observed at its admission
    assert delta("prefix_serve_prefix_wait_seconds_count") == delta("prefix_serve_prefix_cache_hits_total") + delta(
        "prefix_serve_prefix_cache_misses_total")
    assert delta("prefix_serve_engine_step_seconds_count") == delta("prefix_serve_engine_steps_total") > 0
    assert after[("prefix_serve_num_requests_running", ())] == 0
    assert after[("prefix_serve_kv_cache_usage_ratio", ())] == 0
    assert after[("prefix_serve_engine_up", ())] == 1
    assert after[("prefix_serve_registered_prefixes", ())] >= len(PREFIXES)
    assert {name for _, labels in after for name, _ in labels} <= {"reason", "route", "status", "le"}


# ---- concurrency ------------------------------------------------------------------------------------------------
def test_64_concurrent_streams_over_8_prefixes_finish_and_10_disconnects_are_aborted_leaking_nothing(server):
    before = scrape(server)

    async def full(ac, i):
        return await stream_completion(ac, model=PREFIXES[i % 8], prompt=f"request {i}", max_tokens=8,
                                       temperature=0.7, seed=i, extra_body={"ignore_eos": True})

    async def disconnect(i):
        async with aclient(server) as ac:  # its own connection pool: closing it closes the TCP connection
            stream = await ac.completions.create(model=PREFIXES[i], prompt=f"leaving {i}", max_tokens=200,
                                                 stream=True, extra_body={"ignore_eos": True}, **GREEDY)
            received = 0
            async for _ in stream:
                received += 1
                if received == 2:
                    break
            await stream.close()
        return received

    async def give_up(i):  # a non-streaming client that leaves mid-request: its connection closes when cancelled
        async with aclient(server) as ac:  # its own connection pool, as above
            await ac.completions.create(model=PREFIXES[i], prompt="patience", max_tokens=230,
                                        extra_body={"ignore_eos": True}, **GREEDY)

    async def run():
        # The two that give up leave as soon as the engine holds them (it runs 230 tokens alone in a fraction of a
        # second): a client that leaves before its request reached the engine has nothing to abort, and a fixed
        # client timeout raced that under load.
        quitters = [asyncio.ensure_future(give_up(i)) for i in range(2)]
        assert await asyncio.to_thread(wait_for, lambda: engine_state(server)["requests"] == 2, 30.0, 0.005)
        assert not any(q.done() for q in quitters)  # still generating
        for q in quitters:
            q.cancel()
        await asyncio.gather(*quitters, return_exceptions=True)
        async with aclient(server) as ac:
            return await asyncio.gather(asyncio.gather(*[full(ac, i) for i in range(64)]),
                                        asyncio.gather(*[disconnect(i) for i in range(8)]))

    finished, left = asyncio.run(run())
    assert left == [2] * 8
    assert all(len(ids) == 8 and finish == "length" for _, ids, finish, _ in finished)
    assert assert_no_leak(server)["overlapped_steps"] > 0  # async scheduling: steps ran while the next was scheduled
    after = scrape(server)
    aborts, lengths = (after[key] - before.get(key, 0) for key in (
        ("prefix_serve_requests_finished_total", (("reason", "abort"),)),
        ("prefix_serve_requests_finished_total", (("reason", "length"),))))
    # The two that gave up are always aborted. A leaving stream is aborted unless its 200 tokens were all made
    # before its client closed the connection (a tiny model on a loaded machine can be that quick): either way
    # every request is counted once. Abort exactness under a storm is tests/test_reliability.py's.
    assert aborts >= 2 and lengths >= 64 and (aborts - 2) + (lengths - 64) == 8


# ---- engine failure (last: it ends the module's server) ---------------------------------------------------------
def test_when_the_engine_process_dies_streams_get_an_error_and_the_server_exits_nonzero(server):
    pid = int(re.search(r"engine ready in .* \(pid (\d+)\)", server.output()).group(1))
    stream = client(server).completions.create(model="task0", prompt="long", max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True}, **GREEDY)
    next(stream)
    server.expected_exit_code = 1  # so that a supervisor (Kubernetes, systemd) restarts it
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="engine process stopped"):
        list(stream)
    assert wait_for(lambda: server.proc.poll() is not None, timeout=60)
    assert "shutting down (the engine process exited" in server.output()
