"""What a new user meets first (issue 15, finding 9): `serve` on a port in use, the shipped Prometheus configs,
latency histograms that can show a slow server, and the README's Python example."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- serve on a port in use ----------------------------------------------------------------------------------------

def test_serve_on_a_port_in_use_exits_with_one_line_before_loading_anything(monkeypatch, capsys):
    """It used to load the whole engine, then die on a raw `OSError: [Errno 98]` traceback."""
    from engine import cli
    from engine.serving import server

    def load_the_engine(args):
        raise AssertionError("serve started loading the engine before checking its port")

    monkeypatch.setattr(server, "run", load_the_engine)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)])
    message = str(exit_info.value.code)
    assert message == (f"prefix-serve serve: cannot listen on 127.0.0.1:{port}: the port is already in use; stop the "
                       "process that holds it or pick another --port.")
    assert capsys.readouterr().out == ""


def test_serve_port_check_lets_a_free_port_and_port_zero_through(monkeypatch):
    from engine import cli
    from engine.serving import server

    started = []
    monkeypatch.setattr(server, "run", lambda args: started.append(args.port) or 0)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        free = probe.getsockname()[1]
    assert cli.main(["serve", "--port", str(free)]) == 0
    assert cli.main(["serve", "--port", "0"]) == 0
    assert started == [free, 0]


# --- max_tokens beyond the context ----------------------------------------------------------------------------------

def test_server_refuses_an_explicit_max_tokens_beyond_the_context_but_a_chat_without_one_runs_to_it(tmp_path):
    """As vLLM does: a 400 that states the numbers, not a silent cap (which let one client hold a CPU server for
    thousands of tokens). A chat without max_tokens still means "up to the context"."""
    from test_server_support import ServerProcess, build_model, build_prefixes, http

    model = build_model(tmp_path / "model")
    build_prefixes(model, tmp_path / "prefixes", 2)  # task1 has 5 virtual tokens
    proc = ServerProcess([str(model), "--prefix-dir", str(tmp_path / "prefixes"), "--num-kv-blocks", "64",
                          "--log-level", "WARNING"]).wait_ready()
    try:
        chat = {"model": "task1", "messages": [{"role": "user", "content": "ahoy"}], "temperature": 0}
        for route, body in [("/v1/completions", {"model": "task1", "prompt": "ahoy", "max_tokens": 300}),
                            ("/v1/chat/completions", {**chat, "max_completion_tokens": 1000})]:
            status, data = http("POST", proc.url + route, body, key=None)
            error = json.loads(data)["error"]
            assert status == 400 and error["code"] == "InvalidSamplingParamsError", data
            assert re.fullmatch(r"max_tokens=\d+ and the prompt's (\d+) tokens exceed the maximum context of 256 "
                                r"tokens: set max_tokens to at most (\d+) or shorten the prompt\.", error["message"])
        status, data = http("POST", proc.url + "/v1/chat/completions", chat, key=None)
        reply = json.loads(data)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == 256 - 5 - reply["usage"]["prompt_tokens"]
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


# --- Prometheus and Grafana ------------------------------------------------------------------------------------------

def test_the_static_prometheus_config_passes_promtool():
    """Debian's Prometheus is built without kubernetes_sd_configs and refuses prometheus.yml; the static config
    beside it must pass `promtool check config` on any build."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    config = REPO_ROOT / "deploy" / "prometheus" / "prometheus-static.yml"
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_the_static_prometheus_config_scrapes_the_default_server():
    lines = (REPO_ROOT / "deploy" / "prometheus" / "prometheus-static.yml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "_sd_configs" not in text  # no service discovery, which a build may leave out
    assert re.search(r'^\s+- targets: \["127\.0\.0\.1:8000"\]', text, re.MULTILINE)
    assert re.search(r"^\s+metrics_path: /metrics$", text, re.MULTILINE)


def test_every_latency_histogram_resolves_a_30_second_latency():
    """With buckets topping out at 5 s, the dashboard's p99 read exactly 5 under load."""
    from prometheus_client.parser import text_string_to_metric_families

    from engine.serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    for histogram in (metrics.ttft, metrics.itl, metrics.e2e, metrics.prefix_load, metrics.prefix_wait,
                      metrics.engine_step):
        histogram.observe(30.0)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    names = ["time_to_first_token", "inter_token_latency", "e2e_request_latency", "prefix_load", "prefix_wait",
             "engine_step"]
    for name in (f"prefix_serve_{n}_seconds" for n in names):
        finite = [s for s in families[name].samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
        top = max(finite, key=lambda s: float(s.labels["le"]))
        assert float(top.labels["le"]) >= 60.0, name
        assert top.value == 1.0, f"{name}: a 30 s observation falls beyond the last finite bucket"


# --- the README ------------------------------------------------------------------------------------------------------

def test_readme_python_example_prints_the_whole_chat_reply(capsys):
    """`llm.chat(...)` with SamplingParams' default of 16 tokens printed cut-off JSON; the example must pass
    enough `max_tokens` for the reply it shows. Runs the README's block as written, on the embedded model."""
    from engine.model_loader import embedded_model_dir

    embedded_model_dir()  # the one-time conversion, if this is the first test to need it
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    reply = namespace["replies"][0].outputs[0]
    assert reply.finish_reason == "stop"
    assert json.loads(reply.text) == {"name": "Omar Costa", "age": 71, "job": "accountant", "city": "Cairo"}
    assert capsys.readouterr().out.rstrip().endswith(reply.text)
    namespace["llm"].shutdown()
