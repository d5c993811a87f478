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
