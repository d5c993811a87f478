"""Async scheduling: step k+1 is scheduled and sent before step k's tokens are read, and the output stays token for
token that of one step at a time.

The differential test runs random workloads (greedy and seeded sampling, n > 1, stop tokens, EOS, stop strings,
max_tokens and the context limit, aborts mid-flight, preemption in a small KV cache, chunked prefill, decode runs,
a prefix whose file is gone) through the engine one forward per step, one step at a time (the reference), with
async scheduling, and, where the settings have them, with decode runs one step at a time, and compares every
request's outputs.
"""

from __future__ import annotations

import itertools
import random
import shutil

import pytest
from test_parity import PREFIXES, PROMPTS, _expected, _run

from engine import LLM, SamplingParams
from engine.step_messages import StepMessage
from scheduler.block_manager import BlockManager
from scheduler.request import Request, Sequence
from scheduler.scheduler import Scheduler, SchedulerConfig

PREFIX_NAMES = ("p5", "p8proj", "p16")


class LetterTokenizer:
    """Token t decodes to one letter, so that stop strings match generated text (the tiny models have no
    tokenizer)."""

    eos_token_id = None

    @staticmethod
    def decode(token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in token_ids)


def _workload(rng: random.Random, max_model_len: int) -> list[dict]:
    """Random requests: when each arrives (a step() call number), its prompt, prefix and sampling, and whether it
    is aborted (after how many tokens seen; 0: before any step reads it)."""
    requests = []
    for i in range(rng.randint(8, 14)):
        prefix = rng.choice([None, None, *PREFIX_NAMES, "doomed"])
        prompt = [rng.randrange(1, 128) for _ in range(rng.randint(1, 14))]
        seeded = rng.random() < 0.4
        params = SamplingParams(
            n=rng.choice([1, 1, 1, 2, 3]), max_tokens=rng.randint(1, min(20, max_model_len - len(prompt))),
            temperature=0.9 if seeded else 0.0, seed=rng.randrange(1000) if seeded else None,
            top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]),
            stop_token_ids=rng.sample(range(1, 128), rng.randint(0, 3)), ignore_eos=rng.random() < 0.5,
            stop=rng.choice([None, None, "q", ["x", "kk"]]))
        abort_after = rng.choice([None] * 6 + [0, 1, 3])
        requests.append({"id": f"r{i}", "arrival": rng.randint(0, 12), "prompt": prompt, "prefix": prefix,
                         "params": params, "abort_after": abort_after})
    return requests


def _serve(llm: LLM, requests: list[dict]) -> dict[str, tuple]:
    """Drive the engine through the workload; returns per request (finish reasons, token ids per sample, error)
    as last reported. Aborted requests report what was seen when they were aborted."""
    engine = llm.engine
    engine.outputs.tokenizer = LetterTokenizer()
    seen: dict[str, tuple] = {}
    pending = sorted(requests, key=lambda r: r["arrival"])
    calls = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0]["arrival"] <= calls:
            r = pending.pop(0)
            engine.add_request(r["id"], None, r["prompt"], r["params"], r["prefix"])
            seen[r["id"]] = ((), (), None)
            if r["abort_after"] == 0:
                engine.abort_request(r["id"])
        for out in engine.step():
            seen[out.request_id] = (tuple(c.finish_reason for c in out.outputs),
                                    tuple(tuple(c.token_ids) for c in out.outputs), out.error is not None)
        for r in requests:
            tokens = sum(map(len, seen.get(r["id"], ((), (), None))[1]))
            if r["abort_after"] and tokens >= r["abort_after"] and r["id"] in engine.requests:
                engine.abort_request(r["id"])
        engine.check_integrity()
        calls += 1
    assert engine.block_manager.num_used_blocks == 0
    return seen


def _llm(entry, tmp_path, async_scheduling: bool, **settings) -> LLM:
    """An engine with the three prefixes and "doomed", a prefix whose file is gone by the time a request needs it
    (its requests fail with a PrefixLoadError)."""
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, async_scheduling=async_scheduling,
              **settings)
    for name in PREFIX_NAMES:
        llm.load_prefix(name, str(entry["adapters"][name]))
    doomed = tmp_path / f"doomed-{async_scheduling}"
    shutil.rmtree(doomed, ignore_errors=True)
    shutil.copytree(entry["adapters"]["p5"], doomed)
    llm.load_prefix("doomed", str(doomed))  # checked while its file is there
    (doomed / "adapter_model.safetensors").unlink()
    return llm


SETTINGS = [{"num_kv_blocks": 24, "max_model_len": 32},  # preemption; the context limit ends prefixed requests
            {"num_kv_blocks": 40, "max_num_batched_tokens": 7, "max_num_seqs": 6},  # chunked prefill, a seat limit
            {"num_kv_blocks": 30, "decode_steps": 4},  # decode runs, preemption
            {"num_kv_blocks": 64, "decode_steps": 3, "max_num_batched_tokens": 9}]


def test_async_scheduling_is_token_identical_to_one_step_at_a_time_on_random_workloads(tiny_zoo, tmp_path):
    entry = tiny_zoo("llama")
    """The reference is one forward per step, one step at a time; with decode runs in the settings, the same
    settings one step at a time are compared with it too (the differential test of decode runs)."""
    totals = dict.fromkeys(("stop", "length", "context", "abort", "error", "forks", "seeded", "preemptions",
                            "overlapped", "steps"), 0)
    for case in range(6):
        settings = SETTINGS[case % len(SETTINGS)]
        requests = _workload(random.Random(case), settings.get("max_model_len", 200))
        runs = [(False, {**settings, "decode_steps": 1}), (True, settings)]
        if "decode_steps" in settings:
            runs.append((False, settings))
        results, stats = [], []
        for mode, engine_settings in runs:
            llm = _llm(entry, tmp_path, mode, **engine_settings)
            results.append(_serve(llm, requests))
            stats.append(llm.engine.stats)
            llm.shutdown()
        reference = results[0]
        for r, other in itertools.product(requests, results[1:]):
            want, got = reference[r["id"]], other[r["id"]]
            if r["abort_after"] is None:
                assert got == want, f"case {case}, {r}"
            else:  # aborted once it had shown abort_after tokens; each run may have shown more by then
                for a, b in zip(want[1], got[1]):
                    assert a[:len(b)] == b[:len(a)], f"case {case}, {r}"
        for r in requests:
            want = reference[r["id"]]
            if r["abort_after"] is None:
                for reason, tokens in zip(*want[:2]):
                    totals[reason] += 1
                    totals["context"] += reason == "length" and len(tokens) < r["params"].max_tokens
                totals["forks"] += r["params"].n > 1 and len(want[1]) > 1
                totals["seeded"] += r["params"].seed is not None and not want[2]
        stats = dict(zip((False, True), stats[:2]))
        totals["abort"] += stats[True].finished.get("abort", 0)
        totals["error"] += stats[True].finished.get("error", 0)
        totals["preemptions"] += stats[True].preemptions
        totals["overlapped"] += stats[True].overlapped_steps
        totals["steps"] += stats[True].steps
        assert stats[False].overlapped_steps == stats[False].sync_fallbacks == 0
    # the workloads exercised what they are meant to, and async scheduling overlapped most steps
    assert all(totals[key] > 0 for key in totals), totals
    assert totals["overlapped"] > totals["steps"] / 2, totals


def test_async_greedy_output_matches_peft_forward_under_preemption_and_decode_runs(tiny_zoo):
    entry = tiny_zoo("llama")
    expected = _expected(entry)
    llm, got = _run(entry, resident=True, block_size=4, num_kv_blocks=24, async_scheduling=True)
    assert got == expected
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.stats.overlapped_steps > 0
    llm.check_integrity()
    llm.shutdown()
    llm, got = _run(entry, resident=True, block_size=4, decode_steps=4, max_num_batched_tokens=6, async_scheduling=True)
    assert got == expected
    assert llm.engine.stats.decode_run_steps > 0 and llm.engine.stats.overlapped_steps > 0
    llm.shutdown()


def test_async_scheduling_through_two_tensor_parallel_worker_processes_matches_peft_forward(tiny_zoo):
    """The mp executor: steps go down each rank's pipe, step k+1 written before step k's answers are read."""
    entry = tiny_zoo("llama")
    llm, got = _run(entry, block_size=4, tensor_parallel_size=2, async_scheduling=True)
    try:
        assert got == _expected(entry)
        assert llm.engine.stats.overlapped_steps > 0
    finally:
        llm.shutdown()


def test_a_sequence_that_stops_is_dropped_and_its_extra_token_discarded(tiny_zoo):
    """Its stop token is read one step late, when it already runs in the next step: that step's token for it is
    not reported, and the workers are told to forget it with the step after."""
    entry = tiny_zoo("llama")
    stop = _expected(entry)[2][3]  # the 4th token of prompt 2 (bare model)
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])
    engine.add_request("r", None, PROMPTS[2], params, PREFIXES[2])
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    final = seen[-1].outputs[0]
    assert final.finish_reason == "stop" and final.token_ids == _expected(entry)[2][:4]
    # the stop token was sampled in the 4th step; the 5th was already sent, and its token was discarded
    assert engine.stats.steps == 5 and engine.stats.generation_tokens == 4
    assert engine.executor.worker.seqs == {}  # dropped with the step after
    out = llm.generate({"prompt_token_ids": PROMPTS[2]}, params, prefix=PREFIXES[2], use_tqdm=False)[0]
    assert out.outputs[0].token_ids == final.token_ids
    assert not engine.has_unfinished_requests()  # generate() returns once the step sent after the stop is read
    llm.shutdown()


def test_async_scheduling_falls_back_to_one_step_at_a_time_for_prefix_loads_and_forks(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, async_scheduling=True)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, prefix="p5", use_tqdm=False)
    assert llm.engine.stats.sync_fallbacks == 1  # the step that loaded p5
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, prefix="p5", use_tqdm=False)
    assert llm.engine.stats.sync_fallbacks == 1  # p5 is resident now
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(n=3, max_tokens=6, temperature=0.0,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    assert llm.engine.stats.sync_fallbacks == 2  # the prompt's last step forks 3 samples
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1 and len(out.outputs[0].token_ids) == 6
    llm.shutdown()


def test_an_unload_while_a_step_is_in_flight_reaches_the_worker_after_that_step(tiny_zoo):
    """The workers drop an unloaded prefix's host copy at once (an idle server may not step again soon); with a
    step in flight the message queues behind it instead of being run and read out of turn."""
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64,
              prefix_host_cache_gb=0.01, async_scheduling=True)
    llm.load_prefix("a", str(entry["adapters"]["p5"]))
    llm.load_prefix("b", str(entry["adapters"]["p8proj"]))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": [1, 2]}] * 2, params,
                                                         prefix=["a", "b"], use_tqdm=False)]
    engine = llm.engine
    engine.add_request("r", None, [1, 2], params, "b")
    engine.step()  # submits the prefill
    engine.step()  # submits the first decode and reads the prefill
    assert len(engine._in_flight) == 1
    llm.unload_prefix("a")
    assert len(engine._in_flight) == 2  # queued behind the step in flight
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].outputs[0].token_ids == want[1]
    host = engine.executor.worker.host_prefixes._entries
    assert [key.split("#")[0] for key in host] == ["b"]
    llm.shutdown()


def test_a_sequence_whose_tokens_in_flight_reach_max_tokens_gets_no_further_step():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(16, block_size=4))
    seqs = []
    for seq_id, max_tokens in ((0, 2), (1, 10)):
        request = Request(f"r{seq_id}", None, [1, 2, 3], SamplingParams(max_tokens=max_tokens), None, 0)
        seqs.append(Sequence(seq_id, request, [1, 2, 3]))
        request.sequences.append(seqs[-1])
        sched.add(seqs[-1])
    sched.schedule()
    for seq in seqs:  # as the engine does when it sends the prefill: the first output token is in flight
        seq.num_computed_tokens, seq.num_pending = 3, 1
    assert [(i.seq.seq_id, i.num_tokens) for i in sched.schedule().scheduled] == [(0, 1), (1, 1)]
    for seq in seqs:  # the second token in flight too: sequence 0 has its 2 tokens, 1 goes on
        seq.num_computed_tokens, seq.num_pending = 4, 2
    assert [(i.seq.seq_id, i.num_tokens) for i in sched.schedule().scheduled] == [(1, 1)]
    sched.check_integrity()


def test_a_worker_error_in_the_worker_thread_is_raised_in_the_engine_thread(tiny_zoo):
    from engine.wire import ProtocolError

    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, async_scheduling=True)
    executor = llm.engine.executor
    executor._submit(b"not a step")
    executor.submit(StepMessage())
    with pytest.raises(ProtocolError):
        executor.collect()
    assert executor.collect().sampled == []  # the thread goes on with the next step
    llm.shutdown()
    assert executor._thread is None


def test_the_setting_is_off_by_default_checked_and_a_serve_option():
    from engine.cli import build_parser
    from engine.config import EngineConfig
    from engine.errors import InvalidConfigError
    from engine.serving.server import _engine_config

    assert EngineConfig().async_scheduling is False
    with pytest.raises(InvalidConfigError, match="async_scheduling must be True or False"):
        EngineConfig(async_scheduling="yes")
    parser = build_parser("serve")
    assert _engine_config(parser.parse_args(["serve", "--async-scheduling"]), []).async_scheduling is True
    assert _engine_config(parser.parse_args(["serve", "--no-async-scheduling"]), []).async_scheduling is False
