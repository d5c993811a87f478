"""Data and tensor parallelism together: `serve --data-parallel-size 2 --tensor-parallel-size 2` on CPU, two Ray
Serve replicas whose engines each run two rank processes (the mp executor, gloo). A module of its own so that its
server does not run beside test_data_parallel.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_server_support import API_KEY, ServerProcess, build_model, build_prefixes, descendants

pytest.importorskip("ray.serve", reason="Ray Serve (ray[serve]) is not installed")


def _rank_processes(replica_pid: int) -> list[int]:
    """The rank processes under a replica: its engine process's children that multiprocessing spawned."""
    found = []
    for pid in descendants(replica_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline and descendants(pid) == []:
            found.append(pid)
    return found


def test_two_replicas_of_two_ranks_each_give_the_greedy_text_of_one_engine(tmp_path):
    import subprocess

    import openai

    from engine import LLM, SamplingParams

    model = build_model(tmp_path / "model")
    names = list(build_prefixes(model, tmp_path / "prefixes", 6))
    prompts = ["hello there", "the quick brown fox", "one two three"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(model), block_size=4)
    for name in names:
        llm.load_prefix(name, str(tmp_path / "prefixes" / name))
    expected = {(name, prompt): llm.generate(prompt, params, prefix=name, use_tqdm=False)[0].outputs[0].text
                for name in names for prompt in prompts}
    server = ServerProcess([str(model), "--prefix-dir", str(tmp_path / "prefixes"), "--api-key", API_KEY,
                            "--block-size", "4", "--num-kv-blocks", "256", "--data-parallel-size", "2",
                            "--tensor-parallel-size", "2", "--log-level", "WARNING"], startup_timeout=600)
    try:
        server.wait_ready()
        replicas = [int(p) for p in subprocess.run(["pgrep", "-f", "ServeReplica:prefix-serve:EngineReplica"],
                                                   capture_output=True, text=True, check=False).stdout.split()]
        assert len(replicas) == 2, replicas
        assert [len(_rank_processes(pid)) for pid in replicas] == [2, 2]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        for (name, prompt), text in expected.items():
            out = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0.0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == text, (name, prompt)
    finally:
        server.stop(timeout=120)
