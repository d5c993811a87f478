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
import sys
import time

import openai
import pytest
from test_server_support import (API_KEY, ServerProcess, build_model, build_prefixes, cpu_ticks, http,
                                 wait_for)

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
    # each replica's histograms come with its label: one prefix-load observation per load, steps on every replica
    # that loaded one
    timed = {r: x for (name, r), x in values.items() if name == "prefix_serve_prefix_load_seconds_count"}
    assert timed == loads
    steps = {r: x for (name, r), x in values.items() if name == "prefix_serve_engine_step_seconds_count"}
    assert all(steps[r] > 0 for r, x in loads.items() if x > 0)


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
    status, body = http("POST", server.url + "/v1/completions", {"model": "task20", "prompt": "x", "max_tokens": 2})
    assert status == 404 and b"Unknown prefix 'task20': it was unloaded." in body
    with pytest.raises(openai.BadRequestError):  # errors are the single server's
        client.completions.create(model=PREFIXES[0], prompt="x", max_tokens=2, temperature=-1)


def test_a_killed_replica_fails_its_streams_cleanly_and_serve_restarts_it(stack, offline):
    server, client = stack["server"], _client(stack["server"])
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", "ServeReplica:prefix-serve:EngineReplica"],
                                           capture_output=True, text=True, check=False).stdout.split()]
    assert len(pids) == 2, pids
    streams = [client.completions.create(model=prefix, prompt="long", max_tokens=200, temperature=0.0, stream=True,
                                         extra_body={"ignore_eos": True}) for prefix in PREFIXES]
    for stream in streams:
        next(stream)
    # a replica that runs streams (the prefixes' homes come from hashing, so one replica may hold them all): the
    # one whose engine works hardest while they run
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(0.3)
    os.kill(max(pids, key=lambda pid: cpu_ticks(pid) - before[pid]), signal.SIGKILL)
    start, failed = time.monotonic(), 0
    for stream in streams:  # the killed replica's streams end with an error, the others complete
        try:
            list(stream)
        except openai.APIError:
            failed += 1
    assert failed > 0  # the killed replica's
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


# ---- the Serve application of deploy/ (serve run / serve deploy / KubeRay RayService) -------------------------
def _manifest_config() -> dict:
    import yaml

    from test_server_support import REPO_ROOT

    service = yaml.safe_load((REPO_ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO_ROOT / "deploy" / "serve" / "prefix-serve.yaml").read_text())
    assert embedded == shipped, "deploy/kuberay/rayservice.yaml's serveConfigV2 differs from deploy/serve/"
    return embedded


def test_the_rayservice_application_runs_from_its_manifest(tmp_path, offline, stack):
    """`serve run` on the serveConfigV2 of deploy/kuberay/rayservice.yaml, changed only where this machine differs
    (the model and prefix paths, CPU instead of GPUs, a free port): the OpenAI API answers through Serve's proxy,
    with the API key, and greedy output equals offline generation."""
    import socket

    import yaml

    config = _manifest_config()
    app = config["applications"][0]
    cli = app["args"]["cli"].replace("/models/base", str(stack["model"])).replace(
        "/models/prefixes", str(stack["root"] / "prefixes")).replace("--device cuda", "--device cpu")
    app["args"]["cli"] = cli + f" --api-key {API_KEY} --block-size 4 --num-kv-blocks 256"
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "num_gpus": 0, "num_cpus": 0.5}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    from test_server_support import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance of its own
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "serve"), "run", str(path)],
                            cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return http("GET", url + "/health", key=None)[0] == 200
            except OSError:
                return False

        assert wait_for(healthy, timeout=240, interval=1), "the Serve application did not come up"
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        out = client.completions.create(model=PREFIXES[2], prompt=PROMPTS[0], max_tokens=8, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == _expected(offline, PROMPTS[0], PREFIXES[2])
        text = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=PREFIXES[3], prompt=PROMPTS[1], max_tokens=8, temperature=0.0, stream=True,
            extra_body={"ignore_eos": True}))
        assert text == _expected(offline, PROMPTS[1], PREFIXES[3])
        assert http("GET", url + "/v1/models", key="wrong")[0] == 401
        status, body = http("GET", url + "/metrics")
        assert status == 200 and b"prefix_serve_http_requests_total" in body
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_dashboard_queries_return_data_from_a_real_prometheus(stack, tmp_path):
    """Debian's `prometheus` scrapes the 2-replica server; every query of the Grafana dashboard returns data, and
    the per-replica panels one series per replica."""
    import json
    import shutil
    import socket
    import urllib.parse
    import urllib.request

    from test_server_support import REPO_ROOT

    binary = shutil.which("prometheus")
    if binary is None:
        print("SKIPPED: no prometheus binary (apt-get install prometheus)")
        pytest.skip("no prometheus binary on this machine (Debian: apt-get install prometheus)")
    server, client = stack["server"], _client(stack["server"])
    for prefix in PREFIXES:  # traffic in the scrape window
        client.completions.create(model=prefix, prompt=PROMPTS[0], max_tokens=4, temperature=0.0)
    (tmp_path / "key").write_text(API_KEY)
    target = server.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: prefix-serve\n    authorization: {{credentials_file: {tmp_path / 'key'}}}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())["data"]["result"]
        except OSError:
            return []

    try:
        assert wait_for(lambda: query('prefix_serve_engine_up'), timeout=60), "prometheus scraped nothing"
        for prefix in PREFIXES:  # more traffic once it scrapes, so rates over the window are defined
            client.completions.create(model=prefix, prompt=PROMPTS[1], max_tokens=4, temperature=0.0)
        time.sleep(4)
        dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "prefix-serve-dashboard.json").read_text())
        empty, replicas = [], {}
        for panel in dashboard["panels"]:
            for target_ in panel.get("targets", []):
                expr = target_["expr"].replace("$instance", ".*")
                result = wait_for(lambda e=expr: query(e), timeout=10, interval=1)
                if not result:
                    empty.append((panel["title"], expr))
                if "by (replica)" in expr:
                    replicas[panel["title"]] = len(result)
        assert not empty, empty
        assert replicas and all(count == 2 for count in replicas.values()), replicas
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_data_parallel_size_below_one_is_refused_with_its_name():
    from engine.serving.server import main

    with pytest.raises(SystemExit, match="--data-parallel-size must be at least 1, got 0"):
        main(["--data-parallel-size", "0"])
