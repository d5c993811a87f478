"""Sampling: seeds, top-k, top-p, stop token ids, EOS, ignore_eos and max_tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from workers.sampler import SampleRow, sample

PROMPT = {"prompt_token_ids": [3, 4, 5, 6]}


@pytest.fixture(scope="module")
def llm(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    return llm


def _tokens(llm, params, prompts=(PROMPT,), prefix="p5"):
    return [o.outputs[0].token_ids for o in llm.generate(list(prompts), params, prefix=prefix, use_tqdm=False)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = _tokens(llm, params)[0]
    others = [{"prompt_token_ids": [9, 10, 11]}] * 3
    batched = _tokens(llm, [SamplingParams(max_tokens=5, temperature=0.8)] * 3 + [params], others + [PROMPT])[-1]
    assert alone == batched
    different = _tokens(llm, SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert different != alone


def test_parallel_samples_with_a_seed_differ_from_each_other(llm):
    out = llm.generate(PROMPT, SamplingParams(n=4, max_tokens=10, temperature=1.5, seed=3, ignore_eos=True),
                       prefix="p5", use_tqdm=False)[0]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert len(samples) == 4 and len(set(samples)) > 1
    llm.check_integrity()


def test_top_k_one_is_greedy(llm):
    greedy = _tokens(llm, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert _tokens(llm, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True)) == greedy


def test_stop_token_ids_end_the_sequence_on_that_token(llm):
    greedy = _tokens(llm, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    stop = greedy[3]
    cut = greedy.index(stop)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop]), prefix="p5",
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:cut + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), prefix="p5",
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_eos_stops_unless_ignore_eos(tmp_path, tiny_zoo):
    entry = tiny_zoo("llama")
    probe = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4)
    greedy = _tokens(probe, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), prefix=None)[0]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(entry["model"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = greedy[2]
    (model_dir / "config.json").write_text(json.dumps(config))
    for decode_steps in (1, 8):  # 8: EOS arrives inside a decode run, whose later tokens are dropped
        llm = LLM(model=str(model_dir), skip_tokenizer_init=True, block_size=4, decode_steps=decode_steps)
        stopped = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0].outputs[0]
        assert stopped.token_ids == greedy[:greedy.index(greedy[2]) + 1] and stopped.finish_reason == "stop"
        assert llm.engine.stats.generation_tokens == len(stopped.token_ids)
        ignored = _tokens(llm, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), prefix=None)[0]
        assert ignored == greedy
        assert (llm.engine.stats.decode_run_steps > 0) == (decode_steps > 1)


def test_top_k_and_top_p_only_draw_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(40):
        top_k = sample(logits, [SampleRow(1.0, 1.0, 2, seed, 0, 0)])[0][0]
        top_p = sample(logits, [SampleRow(1.0, 0.7, -1, seed, 0, 0)])[0][0]
        assert top_k in (0, 1) and top_p in (0, 1)
    seen = {sample(logits, [SampleRow(1.0, 1.0, -1, seed, 0, 0)])[0][0] for seed in range(200)}
    assert seen == {0, 1, 2, 3}


def test_host_sampling_draws_the_filtered_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor([probs]))

    def frequencies(temperature: float, top_p: float, top_k: int) -> torch.Tensor:
        draws = [sample(logits, [SampleRow(temperature, top_p, top_k, seed, 0, 0)])[0][0] for seed in range(6000)]
        return torch.bincount(torch.tensor(draws), minlength=4) / len(draws)

    assert torch.allclose(frequencies(1.0, 1.0, -1), torch.tensor(probs), atol=0.025)
    flat = torch.tensor(probs).sqrt() / torch.tensor(probs).sqrt().sum()  # temperature 2: p ~ sqrt(probs)
    assert torch.allclose(frequencies(2.0, 1.0, -1), flat, atol=0.025)
    for top_p, top_k in ((1.0, 2), (0.7, -1)):  # both keep 0.5 and 0.3, renormalized
        assert torch.allclose(frequencies(1.0, top_p, top_k), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.025)


def test_a_top_p_too_small_for_float32_keeps_the_top_token():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert sample(logits, [SampleRow(1.0, 1e-300, -1, 3, 0, 0)]) == [[1]]


def test_top_p_beyond_the_largest_1024_tokens_sorts_the_whole_vocabulary():
    weights = torch.arange(3000, 0, -1, dtype=torch.float32)  # p_i ~ 3000 - i: the top 1024 hold 0.566
    logits = torch.log(weights / weights.sum())[None]
    probs = torch.softmax(logits[0], dim=-1)  # as the sampler computes them, so the boundary is the same
    nucleus = int((probs.cumsum(0) - probs < 0.6).sum())  # the smallest head whose mass reaches 0.6
    assert nucleus > 1024
    draws = [sample(logits, [SampleRow(1.0, 0.6, -1, seed, 0, 0)])[0][0] for seed in range(400)]
    assert max(draws) < nucleus and any(d >= 1024 for d in draws)


def _device_draws(logits_row, rows: int, temperature: float, top_k: int, top_p: float,
                  filtered: bool = True) -> torch.Tensor:
    from workers.sampler import sample_on_device

    torch.manual_seed(0)
    logits = torch.log(torch.tensor(logits_row)).repeat(rows, 1)
    full = torch.full((rows,), 1.0)
    return sample_on_device(logits, full * temperature, torch.full((rows,), top_k), full * top_p, filtered)


def test_device_sampling_draws_the_filtered_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = torch.bincount(_device_draws(probs, 20000, 1.0, -1, 1.0), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor(probs), atol=0.015)
    # temperature 2 flattens: p ~ sqrt(probs)
    flat = torch.tensor(probs).sqrt() / torch.tensor(probs).sqrt().sum()
    for filtered in (True, False):  # False: no row uses top-k or top-p, so no sort
        counts = torch.bincount(_device_draws(probs, 20000, 2.0, 0, 1.0, filtered), minlength=4) / 20000
        assert torch.allclose(counts, flat, atol=0.015)
    # top-k 2 renormalizes the first two; top-p 0.7 keeps 0.5 + 0.3 (the mass before 0.15 is 0.8 >= 0.7)
    for draws in (_device_draws(probs, 20000, 1.0, 2, 1.0), _device_draws(probs, 20000, 1.0, -1, 0.7)):
        counts = torch.bincount(draws, minlength=4) / 20000
        assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    assert set(_device_draws(probs, 500, 1.0, -1, 0.4).tolist()) == {0}


def test_device_sampling_rows_keep_their_own_settings():
    from workers.sampler import sample_on_device

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    tokens = sample_on_device(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([-1, 1, -1]),
                              torch.tensor([1.0, 1.0, 0.5]))
    assert tokens.tolist() == [2, 0, 2]  # greedy; top-k 1; top-p 0.5 keeps only the 0.6 token


def test_decode_runs_sample_unseeded_rows_and_leave_seeded_ones_reproducible(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, decode_steps=4)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    outs = _tokens(llm, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), [PROMPT] * 3)
    assert llm.engine.stats.decode_run_steps > 0
    assert all(len(t) == 12 for t in outs) and len({tuple(t) for t in outs}) > 1  # samples, not argmax
    runs = llm.engine.stats.decode_run_steps
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    single = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4)
    single.load_prefix("p5", str(entry["adapters"]["p5"]))
    assert _tokens(llm, seeded) == _tokens(single, seeded)
    assert llm.engine.stats.decode_run_steps == runs  # the seeded request ran step by step
    llm.check_integrity()
