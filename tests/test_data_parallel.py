"""Data parallelism: `serve --data-parallel-size 2` puts two engine replicas on Ray Serve behind the one server.

One server runs for the module (a local Ray instance; about 30 s to start on two cores): the unmodified openai
client against it, greedy output equal to offline generation from either replica, each prefix materialized about
once, load/unload reaching every replica, per-replica metrics, and a replica killed under a stream.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import openai
import pytest
from test_server_support import API_KEY, ServerProcess, build_model, build_prefixes, http, wait_for

pytest.importorskip("ray.serve", reason="Ray Serve (ray[serve]) is not installed")

PREFIXES = [f"task{i}" for i in range(8)]
PROMPTS = ["hello there", "the quick brown fox", "one two three", "a b c d e f"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    model = build_model(root / "model")
    build_prefixes(model, root / "prefixes", 8)
    build_prefixes(model, root / "loadable", 1, first_seed=20)
    server = ServerProcess([str(model), "--prefix-dir", str(root / "prefixes"), "--allowed-prefix-root",
                            str(root / "loadable"), "--api-key", API_KEY, "--block-size", "4", "--num-kv-blocks",
                            "256", "--data-parallel-size", "2", "--log-level", "WARNING"], startup_timeout=300)
    try:
        yield {"root": root, "model": model, "server": server.wait_ready()}
    finally:
        server.stop(timeout=60)


@pytest.fixture(scope="module")
def offline(stack):
    from engine import LLM

    llm = LLM(model=str(stack["model"]), block_size=4)
    for name in PREFIXES:
        llm.load_prefix(name, str(stack["root"] / "prefixes" / name))
    llm.load_prefix("task20", str(stack["root"] / "loadable" / "task20"))
    return llm


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _expected(offline, prompt: str, prefix: str | None, max_tokens: int = 8) -> str:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return offline.generate(prompt, params, prefix=prefix, use_tqdm=False)[0].outputs[0].text


def _metrics(server) -> dict[tuple[str, str], float]:
    """(series name, replica) -> value, for the prefix_serve_* series that carry a replica label."""
    status, body = http("GET", server.url + "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        match = re.match(r'(prefix_serve_\w+)\{replica="([^"]+)"\} (\S+)', line)
        if match:
            values[(match.group(1), match.group(2))] = float(match.group(3))
    return values


def test_greedy_output_equals_offline_and_each_prefix_is_materialized_about_once(stack, offline):
    server, client = stack["server"], _client(stack["server"])
    for round_ in range(3):  # every prefix three times: after its first request it stays where it is
        for i, prefix in enumerate(PREFIXES):
            prompt = PROMPTS[(i + round_) % len(PROMPTS)]
            out = client.completions.create(model=prefix, prompt=prompt, max_tokens=8, temperature=0.0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == _expected(offline, prompt, prefix)
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=PREFIXES[0], prompt=PROMPTS[0], max_tokens=8, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True}))
    assert text == _expected(offline, PROMPTS[0], PREFIXES[0])
    # the replicas post their stats every second; both appear with their own label
    assert wait_for(lambda: len({r for (_, r) in _metrics(server)}) == 2, timeout=20)
    values = wait_for(lambda: (v := _metrics(server)) and sum(
        x for (name, _), x in v.items() if name == "prefix_serve_prefix_loads_total") >= len(PREFIXES) and v,
        timeout=20)
    loads = {r: x for (name, r), x in values.items() if name == "prefix_serve_prefix_loads_total"}
    print("prefix loads per replica:", loads)
    # 8 prefixes, 25 requests: routed by prefix, each is loaded once (random routing would load most twice)
    assert sum(loads.values()) <= len(PREFIXES) + 1


def test_load_and_unload_reach_every_replica(stack, offline):
    server, client = stack["server"], _client(stack["server"])
    path = str(stack["root"] / "loadable" / "task20")
    status, body = http("POST", server.url + "/v1/load_prefix", {"prefix_name": "task20", "prefix_path": path})
    assert status == 200, body
    assert "task20" in [m.id for m in client.models.list().data]
    expected = _expected(offline, PROMPTS[1], "task20")
    # concurrent requests spread it past one replica once that one is full; each replica serves it right
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda _: client.completions.create(
            model="task20", prompt=PROMPTS[1], max_tokens=8, temperature=0.0,
            extra_body={"ignore_eos": True}).choices[0].text, range(16)))
    assert texts == [expected] * 16
    status, _ = http("POST", server.url + "/v1/unload_prefix", {"prefix_name": "task20"})
    assert status == 200
    assert "task20" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="task20", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # errors are the single server's
        client.completions.create(model=PREFIXES[0], prompt="x", max_tokens=2, temperature=-1)


def test_a_killed_replica_fails_its_streams_cleanly_and_serve_restarts_it(stack, offline):
    server, client = stack["server"], _client(stack["server"])
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", "ServeReplica:prefix-serve:EngineReplica"],
                                           capture_output=True, text=True, check=False).stdout.split()]
    assert len(pids) == 2, pids
    streams = [client.completions.create(model=prefix, prompt="long", max_tokens=200, temperature=0.0, stream=True,
                                         extra_body={"ignore_eos": True}) for prefix in PREFIXES[:4]]
    for stream in streams:
        next(stream)
    os.kill(pids[0], signal.SIGKILL)
    start, failed = time.monotonic(), 0
    for stream in streams:  # the killed replica's streams end with an error, the others complete
        try:
            list(stream)
        except openai.APIError:
            failed += 1
    assert failed > 0  # the killed replica's (the routing spreads four prefixes over both replicas)
    assert time.monotonic() - start < 60
    # Serve replaces the replica; every prefix is served again, with the same output
    def all_served() -> bool:
        try:
            return all(client.completions.create(model=p, prompt=PROMPTS[0], max_tokens=8, temperature=0.0,
                                                 extra_body={"ignore_eos": True}).choices[0].text
                       == _expected(offline, PROMPTS[0], p) for p in PREFIXES)
        except openai.APIError:
            return False

    assert wait_for(all_served, timeout=120, interval=2)
    assert server.proc.poll() is None
