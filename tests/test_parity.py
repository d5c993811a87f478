"""Greedy outputs must equal the PEFT-forward referee token for token (fp32, CPU), with prefixes mixed."""

from __future__ import annotations

import functools

import pytest

from engine import LLM, SamplingParams
from tiny_models import peft_forward_greedy

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [30, 31],
           [40, 41, 42, 43, 44, 45, 46, 47, 48], [50, 51, 52, 53, 54, 55, 56]]
PREFIXES = ["p5", "p8proj", None, "p16", "p5"]
MAX_TOKENS = 10


@functools.lru_cache(maxsize=None)
def _referee(model_dir, adapter_dir, prompt: tuple[int, ...]) -> list[int]:
    return peft_forward_greedy(model_dir, adapter_dir, list(prompt), MAX_TOKENS)


def _expected(zoo_entry) -> list[list[int]]:
    adapters = zoo_entry["adapters"]
    return [_referee(zoo_entry["model"], adapters[p] if p else None, tuple(prompt))
            for prompt, p in zip(PROMPTS, PREFIXES)]


def make_resident(llm: LLM) -> None:
    """Materialize each prefix of PREFIXES with a one-token request, so that a later batch finds them all in KV
    blocks.

    A test that needs a preemption uses this: prefixes not yet resident are read in the background, and when a
    read finishes late (a loaded machine) its sequences start late, after the others have finished and freed the
    blocks the preemption needed."""
    names = sorted({p for p in PREFIXES if p})
    llm.generate([{"prompt_token_ids": [1]}] * len(names), SamplingParams(max_tokens=1, temperature=0.0),
                 prefix=names, use_tqdm=False)
    engine = llm.engine
    assert all(engine.block_manager.is_resident(engine.prefixes.resolve(name)[0]) for name in names)


def _run(zoo_entry, resident: bool = False, **llm_kwargs) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(zoo_entry["model"]), skip_tokenizer_init=True, **llm_kwargs)
    for name, path in zoo_entry["adapters"].items():
        llm.load_prefix(name, str(path))
    if resident:
        make_resident(llm)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, prefix=PREFIXES, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_prefix_batch_matches_peft_forward(tiny_zoo, arch, block_size):
    entry = tiny_zoo(arch)
    expected = _expected(entry)
    # the prefixes matter: a prefixed prompt's referee differs from the same prompt without its prefix
    bare = _referee(entry["model"], None, tuple(PROMPTS[1]))
    assert bare != expected[1]
    llm, got = _run(entry, block_size=block_size)
    assert got == expected
    llm.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_prefill_matches_peft_forward(tiny_zoo, arch):
    entry = tiny_zoo(arch)
    llm, got = _run(entry, block_size=4, max_num_batched_tokens=6)
    assert got == _expected(entry)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_preemption_keeps_greedy_output_identical(tiny_zoo, arch):
    entry = tiny_zoo(arch)
    # 5 sequences of up to 16+17+10 tokens in 4-token blocks cannot all fit in 24 blocks at once
    llm, got = _run(entry, resident=True, block_size=4, num_kv_blocks=24)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == _expected(entry)
    llm.check_integrity()


def test_ray_executor_matches_peft_forward(tiny_zoo):
    entry = tiny_zoo("llama")
    llm, got = _run(entry, block_size=4, executor="ray")
    try:
        assert got == _expected(entry)
    finally:
        llm.shutdown()


def test_parallel_greedy_samples_all_match_referee_and_share_prompt_blocks(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    params = SamplingParams(n=3, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, prefix="p5", use_tqdm=False)[0]
    expected = _referee(entry["model"], entry["adapters"]["p5"], tuple(PROMPTS[0]))
    assert [c.token_ids for c in out.outputs] == [expected] * 3
    assert [c.index for c in out.outputs] == [0, 1, 2]
    llm.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_runs_match_peft_forward(tiny_zoo, arch):
    """Several greedy forwards per engine step, tokens fed back on the device; runs stop at max_tokens."""
    entry = tiny_zoo(arch)
    llm, got = _run(entry, block_size=4, decode_steps=4)
    assert got == _expected(entry)
    # prefills and mixed steps run one forward; once all five decode, runs of 4 and the final 1 forward
    assert llm.engine.stats.decode_run_steps >= 4
    llm.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_sequences_leave_a_decode_run_at_their_own_max_tokens(tiny_zoo):
    """Requests of different lengths share one run; each leaves the batch when its max_tokens is reached."""
    entry = tiny_zoo("llama")
    max_tokens = [3, 10, 5, 8, 2]
    expected = [e[:m] for e, m in zip(_expected(entry), max_tokens)]
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, decode_steps=8)
    for name, path in entry["adapters"].items():
        llm.load_prefix(name, str(path))
    # The prefixes are made resident first. Otherwise the bare prompt starts while they are read in the
    # background, and how many steps run before the reads finish depends on the machine's speed.
    used = sorted({p for p in PREFIXES if p})
    llm.generate([{"prompt_token_ids": [1, 2]}] * len(used), SamplingParams(max_tokens=1), prefix=used,
                 use_tqdm=False)
    steps, run_steps = llm.engine.stats.steps, llm.engine.stats.decode_run_steps
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, prefix=PREFIXES, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # every prompt's prefill (first tokens), one run of 8 forwards that rows leave after 2, 8 (of the 9 it
    # needs), 4, 7 and 1 of them, and one forward for the last token of the 10-token request
    assert llm.engine.stats.steps - steps == 3 and llm.engine.stats.decode_run_steps - run_steps == 8
    llm.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_decode_run_discards_tokens_after_a_stop_token(tiny_zoo):
    entry = tiny_zoo("llama")
    expected = _expected(entry)
    stop = expected[2][3]  # prompt 2's fourth token: inside a run of 8 for every sequence
    cut = [e[:e.index(stop) + 1] if stop in e else e for e in expected]
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, decode_steps=8)
    for name, path in entry["adapters"].items():
        llm.load_prefix(name, str(path))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, prefix=PREFIXES, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == cut
    assert outs[2].outputs[0].finish_reason == "stop"
    assert llm.engine.stats.decode_run_steps > 0
    assert llm.engine.stats.generation_tokens == sum(map(len, cut))
    llm.check_integrity()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_decoder_layers_match_peft_forward(tiny_zoo, arch):
    """The fused forward (workers/fused_decoder.py; on CPU with the C++ kernels) against the referee; GPT-2 keeps
    Hugging Face's forward."""
    entry = tiny_zoo(arch)
    llm, got = _run(entry, block_size=4, fused_layers="on")
    runner = llm.engine.executor.worker.runner
    assert (runner.fused is None) == (arch == "gpt2")
    assert arch == "gpt2" or runner.fused.ops.name == "cpp"
    assert got == _expected(entry)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_path_matches_peft_forward(tiny_zoo, arch):
    """The defaults on CPU run the C++ kernels (tests above); the torch reference attention under Hugging Face's
    layers, the referee of those kernels, is held to the same standard."""
    entry = tiny_zoo(arch)
    llm, got = _run(entry, block_size=4, attention_backend="torch", fused_layers="off")
    runner = llm.engine.executor.worker.runner
    assert runner.fused is None and runner.backend.name == "torch"
    assert got == _expected(entry)


def test_sliding_window_model_is_served_exactly_within_its_window(tiny_zoo, tmp_path, caplog):
    """A model with a sliding attention window (here a Mistral of window 24) is served up to the window's length,
    where full attention and the model's windowed attention agree; the referee applies the window itself."""
    import json
    import shutil

    from engine.errors import PromptTooLongError

    entry = tiny_zoo("mistral")
    model = tmp_path / "mistral-window"
    shutil.copytree(entry["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["sliding_window"] = 24
    (model / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="prefix_serve.engine"):
        llm = LLM(model=str(model), skip_tokenizer_init=True, block_size=4, max_model_len=200)
    assert llm.engine.max_model_len == 24
    assert "capped at 24: the model attends through a sliding window of 24 tokens" in caplog.text
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    prompt = list(range(60, 70))
    # the most max_tokens the 24-token context allows this prompt; the prefix's 5 virtual tokens take room too
    params = SamplingParams(max_tokens=24 - len(prompt), temperature=0.0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, prefix="p5", use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 24 - 5 - len(prompt)
    assert out.token_ids == peft_forward_greedy(model, entry["adapters"]["p5"], prompt, len(out.token_ids))
    with pytest.raises(PromptTooLongError, match="exceeds the maximum context of 24 tokens"):
        llm.generate([{"prompt_token_ids": list(range(60, 79))}], params, prefix="p5", use_tqdm=False)


def test_attention_window_reads_each_config_style():
    import transformers as tf

    from engine.model_spec import attention_window

    assert attention_window(tf.MistralConfig(sliding_window=4096)) == 4096
    assert attention_window(tf.MistralConfig(sliding_window=None)) is None
    assert attention_window(tf.Qwen2Config()) is None  # use_sliding_window defaults to False
    assert attention_window(tf.Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1,
                                           num_hidden_layers=3)) == 64
    assert attention_window(tf.LlamaConfig()) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_layers_through_mkl_match_peft_forward(tiny_zoo, arch, monkeypatch):
    """Without oneDNN (or on a CPU that is not x86) the linear layers run through MKL and return transposed views,
    which the fused layers' C++ kernels must take too (before session 24, AVX2 hosts, which then used MKL, failed
    here)."""
    from workers import model_runner

    monkeypatch.setattr(model_runner, "onednn_linears_help", lambda: False)
    entry = tiny_zoo(arch)
    llm, got = _run(entry, block_size=4)
    runner = llm.engine.executor.worker.runner
    assert not any(hasattr(m, "packed_weight") for m in runner.decoder.modules())
    assert arch == "gpt2" or runner.fused.ops.name == "cpp"
    assert got == _expected(entry)


def test_linear_layers_take_onednn_on_x86_from_avx2_up(monkeypatch):
    import torch

    from workers.model_runner import onednn_linears_help

    for capability, expected in (("AVX512", True), ("AVX2", True), ("AVX512_AMX", True), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert onednn_linears_help() is (expected and torch.backends.mkldnn.is_available()), capability
