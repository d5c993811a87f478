"""`prefix-serve bench` end to end on a tiny model: every setup runs in its child and lands in the JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench
from engine.cli import build_parser


def test_engine_args_and_prefix_layouts_of_the_benchmarks():
    import random

    from benchmarks.common import parse_engine_args, percentile_ms, prefix_assignment

    assert parse_engine_args("fused_layers=off,decode_steps=4,async_scheduling=True") == {
        "fused_layers": "off", "decode_steps": 4, "async_scheduling": True}
    with pytest.raises(SystemExit, match="expected FIELD=VALUE, got 'fused_layers'"):
        parse_engine_args("fused_layers")
    names = [f"p{i}" for i in range(100)]
    assert prefix_assignment(names, 3, "one", random.Random(0)) == ["p0"] * 3
    uniform = prefix_assignment(names, 2000, "uniform", random.Random(0))
    zipf = prefix_assignment(names, 2000, "zipf", random.Random(0))
    assert 300 < zipf.count("p0") < 480 and uniform.count("p0") < 60  # Zipf(1.0): p0 is 1 / H(100), about 19%
    assert percentile_ms([0.001, 0.002, 0.003, 0.004], 0.5) == 3.0 and percentile_ms([], 0.99) == 0.0


def _run(tmp_path, *argv) -> dict:
    out = tmp_path / "results.json"
    argv = ["bench", *argv, "--max-tokens", "2", "--threads", "1", "--json", str(out)]
    args = build_parser("bench").parse_args(argv)
    assert bench.run(args) == 0
    return json.loads(out.read_text())


def test_mixed_workload_runs_ours_and_both_baselines(tiny_zoo, tmp_path, capsys):
    results = _run(tmp_path, "--workload", "mixed", "--model", str(tiny_zoo("llama")["model"]), "--repeat", "2",
                   "--peft-groups", "2", "--warm-runs", "1")["mixed"]
    assert set(results) == {"ours", "hf_static", "peft_grouped"}
    assert results["ours"]["tokens"] == results["hf_static"]["tokens"] == 64 * 2
    assert results["peft_grouped"]["tokens"] == 2 * 4 * 2  # two groups of four requests
    assert results["ours"]["prefix_blocks"] == 16  # one block per resident prefix (P=16, block size 16)
    assert all(len(r["rounds_tok_s"]) == 2 and r["seconds"] > 0 for r in results.values())
    assert all(len(r["rounds_warm_tok_s"]) == 2 and r["warm_tok_s"] == max(r["rounds_warm_tok_s"])
               for r in results.values())
    table = capsys.readouterr().out
    assert "best of 2 interleaved rounds" in table and "PEFT, each prefix's group batched" in table
    ratios = [a / b for a, b in zip(results["ours"]["rounds_tok_s"], results["hf_static"]["rounds_tok_s"])]
    assert (f"  transformers static batch of 64, NO prefix: {ratios[0]:.2f}, {ratios[1]:.2f} "
            f"(median {(ratios[0] + ratios[1]) / 2:.2f})") in table
    warm = [a / b for a, b in zip(results["ours"]["rounds_warm_tok_s"], results["hf_static"]["rounds_warm_tok_s"])]
    assert f"  warm, transformers static batch of 64, NO prefix: {warm[0]:.2f}, {warm[1]:.2f}" in table
    assert "warm tok/s" in table and "(warm: the best of 1 more runs in the same process" in table


def test_scaling_workload_reports_every_configuration_and_the_paired_run(tiny_zoo, tmp_path):
    results = _run(tmp_path, "--workload", "scaling", "--model", str(tiny_zoo("llama")["model"]),
                   "--counts", "1,5")["scaling"]
    assert set(results) == {"1-any", "5-uniform", "5-zipf", "paired"}
    assert results["1-any"]["distinct_used"] == results["1-any"]["max_prefix_blocks"] == 1
    assert results["5-uniform"]["registered"] == 5 and results["5-uniform"]["distinct_used"] == 5
    assert results["5-uniform"]["prefix_loads"] == results["5-uniform"]["max_prefix_blocks"] == 5
    assert len(results["paired"]["rates"]["one"]) == len(results["paired"]["rates"]["spread"]) == 3
    assert results["paired"]["ratio"] > 0
    assert results["5-uniform"]["waits"] == 128 and results["5-uniform"]["wait_p99_ms"] >= 0


def test_scaling_workload_with_a_kv_cache_too_small_for_the_prefixes_in_use_evicts_and_reads_them_again(
        tiny_zoo, tmp_path, capsys):
    # 24 requests over 20 prefixes (P=16: one block each, and 16 tokens of the tiny model's block of 16) and a
    # cache of 12 blocks: the distinct prefixes in use do not fit at once
    results = _run(tmp_path, "--workload", "scaling", "--model", str(tiny_zoo("llama")["model"]),
                   "--counts", "1,20", "--num-prompts", "24", "--kv-blocks", "12")["scaling"]
    spread = results["20-uniform"]
    assert spread["kv_blocks"] == 12 and spread["distinct_used"] > 12
    assert spread["prefix_evictions"] > 0 and spread["prefix_loads"] > spread["distinct_used"] - 1
    assert spread["tokens"] == 24 * 2 and spread["waits"] == 24
    assert "wait p99 ms" in capsys.readouterr().out


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
    decode = run["decode_phase"]
    assert decode["engine_steps"] > 0 and 0 < decode["share_of_wall_time"] < 1
    assert decode["forwards"] > decode["engine_steps"] and 0 < decode["rows_per_forward"] <= 24
    assert ours["kernel_profile"]["top"] and ours["step_b256"]["eager_ms"] > 0
    part("ours", "--small", "--device", "cpu", "--dir", str(work), "--out", str(out / "ours_async.json"),
         "--decode-steps", "4", "--async-scheduling", "--no-profile")  # gpu_check.sh's ours_async part
    overlapped = json.loads((out / "ours_async.json").read_text())
    assert overlapped["async_scheduling"] and overlapped["run"]["tokens"] == run["tokens"]
    part("scale", "--small", "--device", "cpu", "--dir", str(work), "--out", str(out / "scale.json"),
         "--scale-prefixes", "40", "--scale-rounds", "1")  # gpu_check.sh's scale part
    scale = json.loads((out / "scale.json").read_text())
    assert scale["registered"] == 40 and set(scale["runs"]) == {"one", "uniform", "zipf"}
    for label, (got,) in scale["runs"].items():
        assert got["tokens"] == 24 * 8 and got["prefix_loads"] == got["prefixes_used"], (label, got)
    assert scale["runs"]["one"][0]["prefixes_used"] == 1 and scale["runs"]["uniform"][0]["prefixes_used"] > 8
    table = part("summary", "--results", str(out))
    assert "decode runs <= 4" in table and "kernels of one eager decode step" in table
    assert "rows per forward" in table and "ours with async scheduling" in table
    assert "scale: 40 registered, 24 req on one prefix" in table and "scale: spread zipf" in table


def test_gpu_bench_bandwidths_and_the_roofline_rows_of_the_summary(tmp_path):
    """The bandwidth probes run on a CPU too (small sizes), and the summary turns a GPU run's numbers into the
    copy roofline (the issue's) and the read-bandwidth one."""
    from benchmarks.gpu_bench import _throughput_rows, copy_bandwidth, read_bandwidth, roofline_tok_s

    assert copy_bandwidth(1 << 20, 2, device="cpu") > 0 and read_bandwidth(1 << 20, 2, device="cpu") > 0
    engine = {"weight_bytes": 2_000_000_000, "kv_bytes_per_token": 32768}
    decode = {"tok_s": 100_000.0, "share_of_wall_time": 0.6, "engine_steps": 10, "forwards": 160,
              "ms_per_forward": 2.5, "rows_per_forward": 256.0}
    ours = {"engine": engine, "max_num_seqs": 256, "copy_bandwidth": 4.0e12, "read_bandwidth": 5.0e12,
            "run": {"tok_s": 80_000.0, "decode_phase": decode}}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    table = "\n".join(" ".join(row) for row in _throughput_rows(tmp_path))
    copy_roof = roofline_tok_s(4.0e12, 2_000_000_000, 32768, 256, 224)
    read_roof = roofline_tok_s(5.0e12, 2_000_000_000, 32768, 256, 224)
    assert f"{copy_roof:,.0f} tok/s" in table and f"{100_000 / copy_roof:.1%} of roofline" in table
    assert f"roofline at it {read_roof:,.0f} tok/s" in table and f"reach {100_000 / read_roof:.1%}" in table
    assert "160 forwards in 10 engine steps, 256.0 rows per forward" in table


def test_sampling_benchmark_prints_both_draws_and_their_ratio():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sampling", "--rows", "2", "--vocab", "512",
                           "--repeat", "1"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.endswith("x")]
    assert len(lines) == 4 and all("ms" in line for line in lines)
