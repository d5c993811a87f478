"""Prefix reads off the step path (issue 18): a prefix on neither tier is read in a background thread while its
requests wait; the other sequences keep stepping, a failed read fails only its requests, and nothing staged
outlives the requests that wanted it. The slow and failing reads are injected by monkeypatching the worker's
read function (in-process executor), so the tests need no special files."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
from test_parity import MAX_TOKENS, PREFIXES, PROMPTS, _expected, _referee

import workers.worker
from engine import LLM, SamplingParams
from engine.llm_engine import PREFETCH_POLL_S
from scheduler.block_manager import BlockManager
from scheduler.request import Request, Sequence
from scheduler.scheduler import Scheduler, SchedulerConfig

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
DELAY_S = 1.5


def _engine(entry, **kwargs) -> LLM:
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64, **kwargs)
    for name, path in entry["adapters"].items():
        llm.load_prefix(name, str(path))
    return llm


def _patch_reads(monkeypatch, slow: dict[str, object]) -> list[tuple[str, str]]:
    """Reads of the adapters named in `slow` (tiny_zoo's directories are `<arch>-<name>`) first call its hook
    (sleep, wait, raise). Returns the log of (adapter name, thread name) of every read."""
    original = workers.worker.read_prefix_kv
    reads = []

    def read(path, spec, dtype):
        name = str(path).rstrip("/").rsplit("/", 1)[-1].split("-", 1)[-1]
        reads.append((name, threading.current_thread().name))
        if name in slow:
            slow[name]()
        return original(path, spec, dtype)

    monkeypatch.setattr(workers.worker, "read_prefix_kv", read)
    return reads


def _referee_tokens(entry, prefix: str | None, prompt: list[int]) -> list[int]:
    return _referee(entry["model"], entry["adapters"][prefix] if prefix else None, tuple(prompt))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_slow_prefix_read_does_not_delay_the_other_sequences_steps(tiny_zoo, monkeypatch, async_scheduling):
    entry = tiny_zoo("llama")
    llm = _engine(entry, async_scheduling=async_scheduling)
    engine = llm.engine
    engine.emit_unfinished = True  # an output per request per step, to time each step
    reads = _patch_reads(monkeypatch, {"p8proj": lambda: time.sleep(DELAY_S)})
    fast_prompt, slow_prompt = PROMPTS[0], PROMPTS[1]
    engine.add_request("fast", None, fast_prompt, GREEDY, "p5")
    engine.step()  # "fast" is running
    engine.add_request("slow", None, slow_prompt, GREEDY, "p8proj")
    started = time.monotonic()
    token_times, done = {"fast": [], "slow": []}, {}
    calls = []
    original_submit = engine.executor._submit  # every message to the worker, collected at once or a step later
    monkeypatch.setattr(engine.executor, "_submit", lambda step: calls.append(1) or original_submit(step))
    while engine.has_unfinished_requests():
        for out in engine.step():
            token_times[out.request_id].append(time.monotonic() - started)
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    # "fast" ran all its steps while "slow"'s prefix was read, each step soon after the one before
    fast = token_times["fast"]
    # (the first step, before the timing, returned the first token; with async scheduling it is read a step later)
    assert len(fast) == MAX_TOKENS - 1 + async_scheduling and fast[-1] < DELAY_S
    assert max(b - a for a, b in zip([0.0] + fast, fast)) < 0.5
    assert token_times["slow"][0] >= DELAY_S
    # then the engine had nothing to run but the read: it waited in the worker instead of spinning (a spinning
    # engine makes thousands of calls in that time; this one about one per PREFETCH_POLL_S)
    assert len(calls) < 2 * MAX_TOKENS + DELAY_S / PREFETCH_POLL_S + 5
    assert all(thread.startswith("prefix-fetch") for _, thread in reads)
    assert done == {"fast": _referee_tokens(entry, "p5", fast_prompt),
                    "slow": _referee_tokens(entry, "p8proj", slow_prompt)}
    waits = engine.stats.prefix_wait_seconds
    assert len(waits) == 2 and waits[0] < 0.5 and DELAY_S <= waits[1] < DELAY_S + 1.0
    assert engine.executor.worker.fetcher.num_staged == 0


def test_a_failed_read_fails_only_its_requests_and_the_next_request_reads_again(tiny_zoo, monkeypatch):
    entry = tiny_zoo("llama")
    llm = _engine(entry)
    engine = llm.engine
    failures = [OSError("disk on fire")]

    def fail_once():
        if failures:
            raise failures.pop()

    reads = _patch_reads(monkeypatch, {"p16": fail_once})
    prompts, prefixes = [[1, 2, 3], [4, 5], [6, 7, 8]], ["p16", "p5", "p16"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, prefix=prefixes, use_tqdm=False)
    for i in (0, 2):
        assert outs[i].outputs[0].finish_reason == "error" and outs[i].outputs[0].token_ids == []
        assert "could not be loaded" in outs[i].error and "OSError: disk on fire" in outs[i].error
    assert outs[1].error is None and outs[1].outputs[0].token_ids == _referee_tokens(entry, "p5", prompts[1])
    assert [name for name, _ in reads].count("p16") == 1  # one read for both requests
    assert engine.executor.worker.fetcher.num_staged == 0  # the failed read was dropped
    retry = llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, prefix="p16", use_tqdm=False)[0]
    assert retry.error is None and retry.outputs[0].token_ids == _referee_tokens(entry, "p16", prompts[0])
    assert [name for name, _ in reads].count("p16") == 2
    assert engine.stats.finished["error"] == 2
    engine.check_integrity()


@pytest.mark.parametrize("action", ["abort", "unload"])
def test_a_read_in_flight_leaves_nothing_staged_when_its_request_or_registration_goes(tiny_zoo, monkeypatch,
                                                                                       action):
    entry = tiny_zoo("llama")
    llm = _engine(entry)
    engine = llm.engine
    fetcher = engine.executor.worker.fetcher
    gate = threading.Event()
    _patch_reads(monkeypatch, {"p16": gate.wait})
    results = []  # weak references to what the read returned
    original_read = fetcher._read_for_device

    def read_and_watch(*args):
        kv = original_read(*args)
        results.append(weakref.ref(kv))
        return kv

    monkeypatch.setattr(fetcher, "_read_for_device", read_and_watch)
    engine.add_request("r", None, [1, 2, 3], GREEDY, "p16")
    assert engine.step() == []  # nothing to run: it waited for the read, which is held at the gate
    assert fetcher.num_staged == 1
    if action == "abort":  # no request wants the read any more: dropped at once, though the engine is idle
        engine.abort_request("r")
        assert fetcher.num_staged == 0
        gate.set()
    else:  # the accepted request still runs on the old registration; its staged read goes once it is loaded
        engine.unload_prefix("p16")
        assert fetcher.num_staged == 1
        gate.set()
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        assert outputs[-1].outputs[0].token_ids == _referee_tokens(entry, "p16", [1, 2, 3])
    deadline = time.monotonic() + 5
    while not results and time.monotonic() < deadline:  # the read finishes in its thread
        time.sleep(0.01)
    time.sleep(0.05)
    gc.collect()
    assert results and results[0]() is None  # no one holds the read's tensor
    assert fetcher.num_staged == 0 and not fetcher._unreported and not engine.scheduler._fetches
    assert not engine.executor.worker.host_prefixes._entries
    engine.check_integrity()
    assert engine.block_manager.prefix_blocks() == 0


def test_a_read_that_fails_while_the_engine_talks_to_the_workers_between_steps_still_fails_its_request(
        tiny_zoo, monkeypatch):
    """A reload sends the workers a message between steps; its answer reports the failed read, and the next
    step returns the failed request's output (the serving loop steps while such an output is pending)."""
    entry = tiny_zoo("llama")
    llm = _engine(entry)
    engine = llm.engine
    gate = threading.Event()

    def fail_at_gate():
        gate.wait()
        raise OSError("gone")

    still_reading = threading.Event()
    _patch_reads(monkeypatch, {"p16": fail_at_gate, "p8proj": still_reading.wait})
    engine.add_request("r", None, [1, 2, 3], GREEDY, "p16")
    engine.add_request("other", None, [4, 5], GREEDY, "p8proj")  # its read is still running throughout
    assert engine.step() == []
    gate.set()
    fetcher = engine.executor.worker.fetcher
    deadline = time.monotonic() + 5
    while not fetcher._staged[engine.prefixes.resolve("p16")[0]].done() and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.load_prefix("p5", str(entry["adapters"]["p5"]))  # a reload: the old p5 registration is forgotten
    outputs = engine.step()  # nothing to run: it waits for "other"'s read, and returns "r"'s failure too
    assert [o.request_id for o in outputs] == ["r"] and "OSError: gone" in outputs[0].error
    still_reading.set()
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].request_id == "other" and outputs[-1].error is None
    assert fetcher.num_staged == 0


def test_the_scheduler_admits_the_requests_behind_one_whose_prefix_is_being_read():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(32, 4))
    seqs = []
    for i, prefix in enumerate(["slow", None, "fast", None]):
        request = Request(f"r{i}", None, [1, 2, 3], GREEDY, prefix, 4 if prefix else 0)
        seqs.append(Sequence(i, request, [1, 2, 3]))
        scheduler.add(seqs[-1])
    out = scheduler.schedule()
    assert [item.seq.seq_id for item in out.scheduled] == [1, 3]  # no head-of-line blocking
    assert out.prefetch == [("slow", 4), ("fast", 4)] and scheduler.num_fetching == 2
    assert scheduler.prefixes_fetched({"fast": 0.0}, {}) == []
    out = scheduler.schedule()
    assert [item.seq.seq_id for item in out.scheduled if item.is_new] == [2] and out.prefetch == []
    assert [entry.name for entry in out.prefix_loads] == ["fast"]
    assert scheduler.prefixes_fetched({}, {"slow": "OSError: gone"}) == [seqs[0]]
    scheduler.finish(seqs[0], "error")
    assert scheduler.schedule().unstage == ["slow"] and not scheduler._fetches
    scheduler.check_integrity()


def test_a_load_on_a_rank_whose_read_is_still_running_waits_for_that_read():
    """A tensor-parallel rank slower than rank 0 gets the load before its own read is done: it must wait for
    that read, not read a second time."""
    import torch

    from workers.kv_cache import HostPrefixCache
    from workers.prefix_fetch import PrefixFetcher

    gate, calls = threading.Event(), []

    def read(path, num_tokens):
        calls.append(path)
        gate.wait()
        return torch.full((1, 2, num_tokens, 1, 2), 7.0)

    fetcher = PrefixFetcher(read, HostPrefixCache(0))
    fetcher.prefetch("k", "/adapters/k", 3)
    assert fetcher.completed() == ({}, {})
    threading.Timer(0.2, gate.set).start()
    kv = fetcher.take("k", "/adapters/k", 3)
    assert kv.shape == (1, 2, 3, 1, 2) and kv.eq(7).all() and calls == ["/adapters/k"]
    assert fetcher.num_staged == 0 and fetcher.completed() == ({}, {})  # taken: nothing left to report
    fetcher.close()


def test_two_tensor_parallel_ranks_with_prefetch_match_the_referee(tiny_zoo, request):
    entry = tiny_zoo("llama")
    # 14 blocks of 4 cannot hold every prefix and sequence at once: prefixes are evicted and read again
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=14,
              tensor_parallel_size=2, executor="mp")
    request.addfinalizer(llm.shutdown)
    for name, path in entry["adapters"].items():
        llm.load_prefix(name, str(path))
    want = _expected(entry)
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, prefix=PREFIXES, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
    stats = llm.engine.stats
    assert stats.prefix_loads > len(set(PREFIXES) - {None})  # evicted prefixes were fetched again
    assert len(stats.prefix_wait_seconds) == 2 * sum(p is not None for p in PREFIXES)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_a_prefix_written_on_the_copy_stream_is_seen_by_the_next_kernel_on_the_compute_stream():
    """The GPU path of KVCache.write_prefix (its own stream, ordered before the next forward). Its blocks were
    just freed: a kernel queued before still reads them, and must see the old values, not the prefix."""
    import torch

    from workers.kv_cache import KVCache

    spec = type("Spec", (), {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64})
    cache = KVCache(spec, 64, 16, torch.float32, "cuda")
    cache.data.fill_(3.0)
    big = torch.randn(4096, 4096, device="cuda")
    before = [big @ big for _ in range(8)]  # keeps the compute stream busy
    old = cache.data[:, :, [5, 9]].clone()  # queued before the write: must read the old blocks
    kv = torch.randn(2, 2, 20, 2, 64).pin_memory()
    cache.write_prefix(kv, [5, 9])
    after = cache.data[:, :, [5, 9]].clone()  # queued after: must read the prefix
    torch.cuda.synchronize()
    assert old.eq(3.0).all() and len(before) == 8
    flat = after.reshape(2, 2, 32, 2, 64)[:, :, :20]
    assert torch.equal(flat.cpu(), kv)
