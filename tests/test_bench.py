"""`prefix-serve bench` end to end on a tiny model: every setup runs in its child and lands in the JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench
from engine.cli import build_parser


def _run(tmp_path, *argv) -> dict:
    out = tmp_path / "results.json"
    argv = ["bench", *argv, "--max-tokens", "2", "--threads", "1", "--json", str(out)]
    args = build_parser("bench").parse_args(argv)
    assert bench.run(args) == 0
    return json.loads(out.read_text())


def test_mixed_workload_runs_ours_and_both_baselines(tiny_zoo, tmp_path, capsys):
    results = _run(tmp_path, "--workload", "mixed", "--model", str(tiny_zoo("llama")["model"]), "--repeat", "2",
                   "--peft-groups", "2")["mixed"]
    assert set(results) == {"ours", "hf_static", "peft_grouped"}
    assert results["ours"]["tokens"] == results["hf_static"]["tokens"] == 64 * 2
    assert results["peft_grouped"]["tokens"] == 2 * 4 * 2  # two groups of four requests
    assert results["ours"]["prefix_blocks"] == 16  # one block per resident prefix (P=16, block size 16)
    assert all(len(r["rounds_tok_s"]) == 2 and r["seconds"] > 0 for r in results.values())
    table = capsys.readouterr().out
    assert "best of 2 interleaved rounds" in table and "PEFT, each prefix's group batched" in table


def test_scaling_workload_reports_every_configuration_and_the_paired_run(tiny_zoo, tmp_path):
    results = _run(tmp_path, "--workload", "scaling", "--model", str(tiny_zoo("llama")["model"]),
                   "--counts", "1,5")["scaling"]
    assert set(results) == {"1-any", "5-uniform", "5-zipf", "paired"}
    assert results["1-any"]["distinct_used"] == results["1-any"]["max_prefix_blocks"] == 1
    assert results["5-uniform"]["registered"] == 5 and results["5-uniform"]["distinct_used"] == 5
    assert results["5-uniform"]["prefix_loads"] == results["5-uniform"]["max_prefix_blocks"] == 5
    assert len(results["paired"]["rates"]["one"]) == len(results["paired"]["rates"]["spread"]) == 3
    assert results["paired"]["ratio"] > 0


def test_repeat_below_one_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="--repeat must be at least 1"):
        _run(tmp_path, "--workload", "mixed", "--repeat", "0")


def test_gpu_bench_small_on_cpu_runs_ours_with_decode_runs_and_the_summary(tmp_path):
    """The GPU script's parts on a tiny model on CPU (`--small`): checks the script, not a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()

    def part(*argv):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", *argv], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    part("setup", "--small", "--device", "cpu", "--dir", str(work), "--out", str(out / "setup.json"))
    part("ours", "--small", "--device", "cpu", "--dir", str(work), "--out", str(out / "ours.json"),
         "--decode-steps", "4")
    ours = json.loads((out / "ours.json").read_text())
    run = ours["run"]
    assert run["tokens"] == 24 * 8 and run["decode_steps"] == 4
    assert run["forwards"] > run["steps"]  # some engine steps ran several forwards
    assert run["decode_phase"]["engine_steps"] > 0 and 0 < run["decode_phase"]["share_of_wall_time"] < 1
    assert ours["kernel_profile"]["top"] and ours["step_b256"]["eager_ms"] > 0
    table = part("summary", "--results", str(out))
    assert "decode runs <= 4" in table and "kernels of one eager decode step" in table
