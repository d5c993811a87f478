"""Tensor parallelism on CPU (gloo): two ranks, greedy output token-identical to the PEFT-forward referee.

Each engine here spawns its ranks (mp) or starts Ray actors, so the tests share engines where they can.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.errors import InvalidConfigError, UnsupportedModelError
from test_parity import MAX_TOKENS, PREFIXES, PROMPTS, _expected, make_resident

# block size 4 over short prompts; 14 blocks cannot hold all five sequences at once (forced preemption), and a
# 6-token budget cuts the longer prompts into chunks
SETTINGS = dict(skip_tokenizer_init=True, block_size=4, num_kv_blocks=14, max_num_batched_tokens=6)


def _generate(llm: LLM, entry) -> list[list[int]]:
    for name, path in entry["adapters"].items():
        llm.load_prefix(name, str(path))
    make_resident(llm)  # a late read would leave nothing to preempt
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, prefix=PREFIXES, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])  # GQA, MQA (one KV head on both ranks), biases
def test_two_local_ranks_match_peft_forward(tiny_zoo, arch):
    entry = tiny_zoo(arch)
    llm = LLM(model=str(entry["model"]), tensor_parallel_size=2, **SETTINGS)
    try:
        assert llm.engine.config.resolved_executor() == "mp"
        got = _generate(llm, entry)
        assert llm.engine.scheduler.num_preemptions > 0
        assert got == _expected(entry)
        llm.check_integrity()
        assert llm.engine.block_manager.num_used_blocks == 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_two_ray_ranks_match_peft_forward(tiny_zoo, arch):
    entry = tiny_zoo(arch)
    llm = LLM(model=str(entry["model"]), tensor_parallel_size=2, executor="ray", **SETTINGS)
    try:
        got = _generate(llm, entry)
        assert llm.engine.scheduler.num_preemptions > 0
        assert got == _expected(entry)
        llm.check_integrity()
        if arch != "llama":
            return
        # a rank that dies fails the next step at once, though rank 0 would wait for it in a collective
        import ray

        from workers.executor import WorkerFailedError

        ray.kill(llm.engine.executor.actors[1])
        start = time.monotonic()
        with pytest.raises(WorkerFailedError, match="rank 1"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()


def test_decode_runs_and_sampling_across_ranks(tiny_zoo):
    """Decode runs feed rank 0's tokens to rank 1 on the device; n > 1, seeded sampling and sampling inside a run
    work across ranks, the deterministic ones token for token as on one rank."""
    entry = tiny_zoo("qwen2")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:3]]
    greedy = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, ignore_eos=True)]  # sampled in the run
    seeded = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    results = {}
    for size in (1, 2):
        llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, decode_steps=4,
                  tensor_parallel_size=size)
        try:
            llm.load_prefix("p5", str(entry["adapters"]["p5"]))
            outs = llm.generate(prompts, greedy, prefix=["p5", None, "p5"], use_tqdm=False)
            assert llm.engine.stats.decode_run_steps > 0
            assert len(outs[2].outputs[0].token_ids) == 8
            results[size] = [[c.token_ids for c in o.outputs] for o in outs[:2]]
            outs = llm.generate(prompts, seeded, prefix=["p5", None, "p5"], use_tqdm=False)
            results[size].append([o.outputs[0].token_ids for o in outs])
            llm.check_integrity()
        finally:
            llm.shutdown()
    assert results[2] == results[1]


def test_tp_rank_holds_half_the_weights_and_more_blocks(tiny_zoo):
    """At the same per-device KV budget, a rank of two holds half the layer weights and twice the blocks."""
    from workers.parallel import ShardPlan

    import transformers as tf

    entry = tiny_zoo("llama")
    config = tf.AutoConfig.from_pretrained(entry["model"])
    plans = [ShardPlan.of(config, rank, 2) for rank in range(2)]
    assert [list(p.q_heads) for p in plans] == [[0, 1], [2, 3]]
    assert [list(p.kv_heads) for p in plans] == [[0], [1]]
    one = LLM(model=str(entry["model"]), skip_tokenizer_init=True, cpu_kv_cache_gb=0.001)
    two = LLM(model=str(entry["model"]), skip_tokenizer_init=True, cpu_kv_cache_gb=0.001, tensor_parallel_size=2)
    try:
        blocks = one.engine.block_manager.num_blocks, two.engine.block_manager.num_blocks
        weights = one.engine.executor.info.weight_bytes, two.engine.executor.info.weight_bytes
        print(f"tp=1: {weights[0]} weight bytes, {blocks[0]} blocks; tp=2: {weights[1]} per rank, {blocks[1]}")
        assert blocks[1] >= 2 * blocks[0] - 1
        # the layers' projections halve; the embedding, LM head and norms are replicated
        hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
        replicated = 4 * (2 * vocab * hidden + (2 * layers + 1) * hidden)
        assert weights[1] - replicated == (weights[0] - replicated) // 2
    finally:
        one.shutdown()
        two.shutdown()


def test_mqa_ranks_share_their_one_kv_head(tiny_zoo):
    import transformers as tf

    from workers.parallel import ShardPlan

    config = tf.AutoConfig.from_pretrained(tiny_zoo("mistral")["model"])
    assert [list(ShardPlan.of(config, rank, 2).kv_heads) for rank in range(2)] == [[0], [0]]


def test_unsplittable_models_are_refused_by_name(tiny_zoo, tmp_path):
    import json

    entry = tiny_zoo("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(InvalidConfigError, match="does not divide the model's 4 attention heads"):
        LLM(model=str(entry["model"]), skip_tokenizer_init=True, tensor_parallel_size=3)
    model = tmp_path / "llama-3kv"
    model.mkdir()
    config = json.loads((entry["model"] / "config.json").read_text())
    config.update(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfigError, match="cannot split the model's 3 KV heads"):
        LLM(model=str(model), skip_tokenizer_init=True, tensor_parallel_size=2)
    with pytest.raises(UnsupportedModelError, match="model type 'gpt2' cannot be split"):
        LLM(model=str(tiny_zoo("gpt2")["model"]), skip_tokenizer_init=True, tensor_parallel_size=2)
    with pytest.raises(InvalidConfigError, match="'inprocess' runs one worker"):
        LLM(model=str(entry["model"]), skip_tokenizer_init=True, tensor_parallel_size=2, executor="inprocess")


def test_a_rank_that_raises_or_dies_fails_the_step_at_once_and_stops_the_others(tiny_zoo, request):
    from workers.executor import WorkerFailedError

    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, tensor_parallel_size=2)
    request.addfinalizer(llm.shutdown)  # a no-op once a failure stopped the ranks
    procs = list(llm.engine.executor._procs)
    with pytest.raises(WorkerFailedError, match="failed: ProtocolError"):
        llm.engine.executor._execute(b"not a step")  # every rank raises on it
    for proc in procs:
        proc.join(timeout=10)
        assert not proc.is_alive()
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, tensor_parallel_size=2)
    request.addfinalizer(llm.shutdown)
    procs = list(llm.engine.executor._procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="rank 1"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 10
    for proc in procs:
        proc.join(timeout=10)
        assert not proc.is_alive()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_server_with_two_ranks_serves_and_a_dead_rank_ends_it_cleanly(tmp_path):
    """`serve --tensor-parallel-size 2`: the same greedy text as one rank; when a rank dies, the open stream gets
    an error at once and the server exits non-zero (as when the engine process dies)."""
    import re

    import openai
    from test_server_support import API_KEY, ServerProcess, build_model, build_prefixes

    model = build_model(tmp_path / "model")
    build_prefixes(model, tmp_path / "prefixes", 2)
    llm = LLM(model=str(model), block_size=4)
    llm.load_prefix("task1", str(tmp_path / "prefixes" / "task1"))
    expected = llm.generate("hello there", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                            prefix="task1", use_tqdm=False)[0].outputs[0].text
    server = ServerProcess([str(model), "--prefix-dir", str(tmp_path / "prefixes"), "--api-key", API_KEY,
                            "--block-size", "4", "--tensor-parallel-size", "2", "--log-level", "WARNING"])
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        out = client.completions.create(model="task1", prompt="hello there", max_tokens=12, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected
        stream = client.completions.create(model="task1", prompt="long", max_tokens=200, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(stream)
        engine_pid = int(re.search(r"engine ready in .* \(pid (\d+)\)", server.output()).group(1))
        ranks = [pid for pid in _children(engine_pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(ranks) == 2, ranks
        server.expected_exit_code = 1
        start = time.monotonic()
        os.kill(ranks[-1], signal.SIGKILL)
        with pytest.raises(openai.APIError):
            list(stream)
        assert time.monotonic() - start < 10
        assert server.proc.wait(timeout=60) == 1
        assert "died" in server.output() or "failed" in server.output()
    finally:
        server.stop()


def test_a_frontend_that_exits_without_shutdown_does_not_wait_forever_for_its_engine_process(tmp_path):
    """The engine process is not daemonic (it starts the rank processes), so multiprocessing would join it at exit,
    and it waits for its pipe to close: the client stops it first when the frontend exits on an exception."""
    import subprocess
    import sys
    import textwrap

    from test_server_support import REPO_ROOT, build_model

    model = build_model(tmp_path / "model")
    code = textwrap.dedent(f"""
        from engine.config import EngineConfig
        from engine.serving.async_engine import AsyncEngineClient
        from engine.serving.engine_process import EngineProcessOptions
        client = AsyncEngineClient(EngineConfig(model={str(model)!r}, num_kv_blocks=64), EngineProcessOptions())
        client.start()
        raise SystemExit("the frontend failed before shutdown()")
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "the frontend failed" in done.stderr
    assert time.monotonic() - start < 60
