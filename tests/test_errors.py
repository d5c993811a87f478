"""Errors a user can cause raise named exceptions with messages that say what to do, and lose nothing else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import (LLM, AdapterMismatchError, InvalidAdapterError, InvalidPromptError, InvalidSamplingParamsError,
                    PromptTooLongError, SamplingParams, UnknownPrefixError, UnsupportedModelError)
from engine.model_spec import ModelSpec

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_llm(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    return llm


def _still_serves(llm):
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, prefix="p5", use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    llm.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_adapter_for_another_model_names_the_field_and_both_values(tiny_zoo, llama_llm):
    qwen_adapter = tiny_zoo("qwen2")["adapters"]["p5"]  # 3 layers; the llama has 2
    with pytest.raises(AdapterMismatchError, match=r"num_layers is 3 in the adapter but the model needs 2"):
        llama_llm.load_prefix("wrong", str(qwen_adapter))
    assert "wrong" not in llama_llm.engine.prefix_names()
    _still_serves(llama_llm)


def test_lora_adapter_is_rejected_as_not_prefix_tuning(tmp_path, tiny_zoo, llama_llm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_zoo("llama")["model"]))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(InvalidAdapterError, match="LORA adapter, not a prefix-tuning adapter"):
        llama_llm.load_prefix("lora", str(tmp_path / "lora"))
    _still_serves(llama_llm)


def test_pickled_adapter_is_refused_with_a_safetensors_hint(tmp_path, tiny_zoo, llama_llm):
    src = tiny_zoo("llama")["adapters"]["p5"]
    dst = tmp_path / "pickled"
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    (dst / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InvalidAdapterError, match="never loads.*safe_serialization=True"):
        llama_llm.load_prefix("pickled", str(dst))


def test_corrupt_safetensors_is_a_clear_error(tmp_path, tiny_zoo, llama_llm):
    dst = tmp_path / "corrupt"
    shutil.copytree(tiny_zoo("llama")["adapters"]["p5"], dst)
    (dst / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(InvalidAdapterError, match="not a readable safetensors file"):
        llama_llm.load_prefix("corrupt", str(dst))
    _still_serves(llama_llm)


def test_tensor_shape_must_match_its_config(tmp_path, tiny_zoo, llama_llm):
    from safetensors.torch import save_file

    dst = tmp_path / "short"
    shutil.copytree(tiny_zoo("llama")["adapters"]["p5"], dst)
    save_file({"prompt_embeddings": torch.zeros(3, 2 * 2 * 32)}, str(dst / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match=r"shape \[3, 128\].*need \[5, 128\]"):
        llama_llm.load_prefix("short", str(dst))


def test_unknown_prefix_names_the_prefix_and_loses_nothing(llama_llm):
    with pytest.raises(UnknownPrefixError, match="Unknown prefix 'nope'.*p5"):
        llama_llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}], GREEDY, prefix=["p5", "nope"],
                           use_tqdm=False)
    assert not llama_llm.engine.has_unfinished_requests()
    _still_serves(llama_llm)


def test_prompt_longer_than_the_context_states_the_lengths(llama_llm):
    with pytest.raises(PromptTooLongError, match="prompt has 300 tokens and the prefix 5"):
        llama_llm.generate({"prompt_token_ids": [1] * 300}, GREEDY, prefix="p5", use_tqdm=False)
    _still_serves(llama_llm)


def test_max_tokens_beyond_the_context_is_refused_with_the_numbers(llama_llm):
    """As in vLLM: prompt tokens + max_tokens above max_model_len is a 400, not a silent cap at the context."""
    limit = llama_llm.engine.max_model_len
    too_many = SamplingParams(max_tokens=limit - 9, temperature=0.0)
    with pytest.raises(InvalidSamplingParamsError,
                       match=rf"max_tokens={limit - 9} and the prompt's 10 tokens exceed the maximum context of "
                             rf"{limit} tokens: set max_tokens to at most {limit - 10}"):
        llama_llm.generate({"prompt_token_ids": [1] * 10}, too_many, use_tqdm=False)
    assert InvalidSamplingParamsError.http_status == 400
    assert not llama_llm.engine.has_unfinished_requests()
    exact = SamplingParams(max_tokens=limit - 10, temperature=0.0, ignore_eos=True)
    out = llama_llm.generate({"prompt_token_ids": [1] * 10}, exact, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == limit - 10 and out.finish_reason == "length"
    _still_serves(llama_llm)


def test_prompt_that_could_never_fit_the_kv_cache_is_rejected(tiny_zoo):
    llm = LLM(model=str(tiny_zoo("llama")["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=8)
    with pytest.raises(PromptTooLongError, match="maximum context of 28 tokens"):
        llm.generate({"prompt_token_ids": [1] * 40}, GREEDY, use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1] * 20}, GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.5, "temperature must be a finite number >= 0"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("temperature", 10**400, "temperature must be a finite number"),
    ("top_p", float("nan"), r"top_p must be in \(0, 1\]"),
    ("top_k", 2**63, "top_k must be -1"),
    ("seed", 2**64, r"seed must be an integer in \[0, 2\*\*63\)"),
    ("max_tokens", 10**23, "max_tokens must be an integer >= 1"),
    ("n", True, "n must be an integer"),
    ("stop_token_ids", [2**70], "stop_token_ids must be non-negative integers"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_k", -3, "top_k must be -1"),
    ("n", 0, "n must be an integer >= 1"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("seed", -1, "seed must be an integer in"),
    ("stop", [""], "stop must be a non-empty string"),
    ("stop", [f"s{i}" for i in range(257)], "stop takes at most 256 strings of at most 4096 characters each, got 257"),
    ("stop", "x" * 4097, "the longest 4097 characters"),
])
def test_invalid_sampling_params_raise_a_named_error(field, value, message):
    with pytest.raises(InvalidSamplingParamsError, match=message):
        SamplingParams(**{field: value})


def test_bad_prompts_are_named_errors(llama_llm):
    with pytest.raises(InvalidPromptError, match="empty"):
        llama_llm.generate({"prompt_token_ids": []}, GREEDY, use_tqdm=False)
    with pytest.raises(InvalidPromptError, match=r"integers in \[0, 128\)"):
        llama_llm.generate({"prompt_token_ids": [5, 999]}, GREEDY, use_tqdm=False)
    with pytest.raises(InvalidPromptError, match="skip_tokenizer_init=True"):
        llama_llm.generate("text needs a tokenizer", GREEDY, use_tqdm=False)
    _still_serves(llama_llm)


def test_unsupported_architecture_is_named():
    from transformers import OPTConfig

    with pytest.raises(UnsupportedModelError, match="'opt' is not supported.*llama"):
        ModelSpec.from_config(OPTConfig())


def test_model_path_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        LLM(model=str(tmp_path))


def test_unloading_a_prefix_in_use_lets_running_requests_finish_and_frees_its_blocks(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    engine = llm.engine
    engine.add_request("r1", None, [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), "p5")
    engine.step()
    engine.unload_prefix("p5")
    with pytest.raises(UnknownPrefixError):
        engine.add_request("r2", None, [1, 2, 3], GREEDY, "p5")
    assert engine.block_manager.prefix_blocks() == 2  # still pinned by r1
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        engine.check_integrity()
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
    assert engine.block_manager.prefix_blocks() == 0 and engine.block_manager.num_free_blocks == 64


def test_an_aborted_request_is_forgotten_by_the_worker_even_when_nothing_else_runs(llama_llm):
    engine = llama_llm.engine
    engine.add_request("gone", None, [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0), "p5")
    engine.step()
    assert len(engine.executor.worker.seqs) == 1
    engine.abort_request("gone")
    assert engine.step() == []
    assert engine.executor.worker.seqs == {}
    engine.check_integrity()


def test_prefix_config_is_checked_at_registration(tmp_path, tiny_zoo, llama_llm):
    dst = tmp_path / "noconfig"
    dst.mkdir()
    with pytest.raises(InvalidAdapterError, match="adapter_config.json is missing"):
        llama_llm.load_prefix("x", str(dst))
    bad = tmp_path / "badjson"
    shutil.copytree(tiny_zoo("llama")["adapters"]["p5"], bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        llama_llm.load_prefix("x", str(bad))
    cfg = json.loads((tiny_zoo("llama")["adapters"]["p5"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING"


def test_a_temperature_too_small_to_divide_by_samples_greedily(llama_llm):
    tiny = SamplingParams(max_tokens=4, temperature=1e-45, ignore_eos=True)
    assert tiny.greedy and tiny.to_wire()["temperature"] == 0.0
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [9, 8]}]
    got = llama_llm.generate(prompts, tiny, prefix="p5", use_tqdm=False)
    want = llama_llm.generate(prompts, GREEDY, prefix="p5", use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_n_above_max_num_seqs_is_refused(tiny_zoo):
    llm = LLM(model=str(tiny_zoo("llama")["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64,
              max_num_seqs=4)
    with pytest.raises(InvalidSamplingParamsError, match="n=5 exceeds max_num_seqs=4"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(n=5, max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_failed_reload_keeps_the_old_adapter_and_a_failed_new_name_is_not_registered(tmp_path, tiny_zoo,
                                                                                          llama_llm):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_zoo("llama")["adapters"]["p5"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(InvalidAdapterError):
        llama_llm.load_prefix("p5", str(bad))
    with pytest.raises(InvalidAdapterError):
        llama_llm.load_prefix("fresh", str(bad))
    assert "fresh" not in llama_llm.engine.prefix_names()
    with pytest.raises(InvalidAdapterError, match="NUL"):
        llama_llm.load_prefix("nul", str(bad) + "\x00x")
    _still_serves(llama_llm)  # p5 still answers, from its old files


@pytest.mark.parametrize("tp", [1, 2])  # with two tensor-parallel ranks, each reads the file
def test_a_prefix_whose_file_vanished_fails_only_its_requests_and_is_retried_later(tmp_path, tiny_zoo, tp,
                                                                                    request):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64,
              tensor_parallel_size=tp)
    request.addfinalizer(llm.shutdown)  # the rank processes go, pass or fail
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    doomed = tmp_path / "doomed"
    shutil.copytree(entry["adapters"]["p5"], doomed)
    llm.load_prefix("doomed", str(doomed))  # checked and registered; its KV is read on first use
    weights = doomed / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    engine = llm.engine
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("ok1", None, [1, 2, 3], params, "p5")
    engine.step()  # ok1 is running when the doomed prefix's requests arrive
    engine.add_request("bad1", None, [4, 5], params, "doomed")
    engine.add_request("bad2", None, [6], SamplingParams(n=2, max_tokens=3), "doomed")
    engine.add_request("ok2", None, [7, 8], params, None)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.check_integrity()
    for rid in ("bad1", "bad2"):
        assert finished[rid].outputs[0].finish_reason == "error" and finished[rid].outputs[0].token_ids == []
        assert "could not be loaded" in finished[rid].error and "doomed" in finished[rid].error
    want = llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [7, 8]}], params,
                        prefix=["p5", None], use_tqdm=False)
    for rid, ref in zip(("ok1", "ok2"), want):
        assert finished[rid].error is None and finished[rid].outputs[0].token_ids == ref.outputs[0].token_ids
    assert engine.stats.finished["error"] == 2
    assert engine.block_manager.num_used_blocks == 0 and not engine.block_manager.is_resident(
        engine.prefixes.resolve("doomed")[0])
    shutil.copy(entry["adapters"]["p16"] / "adapter_model.safetensors", weights)  # a valid file, 16 tokens not 5
    out = llm.generate({"prompt_token_ids": [4, 5]}, params, prefix="doomed", use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "16 virtual tokens" in out.error
    weights.write_bytes(saved)  # the right file is back: the next request reads it again and runs
    out = llm.generate({"prompt_token_ids": [4, 5]}, params, prefix="doomed", use_tqdm=False)[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 5


@pytest.mark.parametrize("action", ["unload", "reload"])
def test_requests_accepted_before_an_unload_or_reload_run_on_the_old_adapter_even_when_queued(tiny_zoo, action):
    entry = tiny_zoo("llama")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    ref.load_prefix("a", str(entry["adapters"]["p5"]))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    want = [o.outputs[0].token_ids for o in ref.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          prefix="a", use_tqdm=False)]
    # 8 blocks: 2 hold the prefix and each sequence needs 4 or 5 of its own, so two cannot both finish without
    # a preemption; the third waits for a seat (max_num_seqs=2)
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=8, max_num_seqs=2)
    llm.load_prefix("a", str(entry["adapters"]["p5"]))
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", None, prompt, params, "a")
    engine.step()
    if action == "unload":
        engine.unload_prefix("a")
    else:
        engine.load_prefix("a", str(entry["adapters"]["p16"]))
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert [got[f"r{i}"] for i in range(3)] == want
    assert engine.stats.preemptions >= 1
    assert engine.block_manager.num_used_blocks == 0
    if action == "unload":  # nothing of the old registration is left
        assert engine.block_manager.prefix_blocks() == 0 and not engine.prefixes._retired
