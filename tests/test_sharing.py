"""Sharing is real: sequences of one task hold the prefix's blocks once, counted as blocks in use."""

from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, SamplingParams
from workers.kv_cache import KVCache


@pytest.mark.parametrize("count", [32, 64])
def test_running_sequences_of_one_prefix_hold_its_blocks_once(tiny_zoo, count):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=512)
    llm.load_prefix("p16", str(entry["adapters"]["p16"]))  # P = 16: exactly 4 blocks
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(count):
        engine.add_request(f"r{i}", None, [1 + i % 7, 2, 3, 4, 5, 6], params, "p16")
    engine.step()  # all admitted and prefilled in one step
    engine.step()
    bm = engine.block_manager
    assert len(engine.scheduler.running) == count
    prefix_blocks = bm._prefixes[next(iter(bm.resident_prefixes()))].block_ids
    assert len(prefix_blocks) == 4
    distinct = {b for table in bm.tables.values() for b in table}
    own = sum(len(table) - 4 for table in bm.tables.values())
    assert all(table[:4] == prefix_blocks for table in bm.tables.values())
    # 16 prefix + 6 prompt + 2 generated tokens = 24 = 6 blocks per sequence, 4 of them shared
    assert own == count * 2
    assert bm.num_used_blocks == len(distinct) == 4 + own  # not count * 6
    engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 4  # the prefix stays cached, unpinned


def test_prefix_is_materialized_once_and_hits_afterwards(tiny_zoo):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=256)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [i + 1, 2]} for i in range(6)], params, prefix="p5", use_tqdm=False)
    llm.generate([{"prompt_token_ids": [9, 9]}], params, prefix="p5", use_tqdm=False)
    stats = llm.engine.stats
    assert (stats.prefix_loads, stats.prefix_misses, stats.prefix_hits) == (1, 1, 6)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_cpu_kv_cache_takes_memory_only_for_blocks_written():
    spec = type("Spec", (), {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64})
    before = _rss_bytes()
    cache = KVCache(spec, 4096, 16, torch.float32, "cpu")  # 4096 blocks x 32 KiB = 128 MiB
    assert cache.data.shape == (4, 2, 4096, 16, 2, 64)
    assert _rss_bytes() - before < 16 << 20
    cache.write_prefix(torch.ones(4, 2, 32, 2, 64), [7, 3])
    assert cache.data[:, :, [7, 3]].eq(1).all() and cache.data[:, :, 0].eq(0).all()
    assert _rss_bytes() - before < 16 << 20  # two blocks written, not the whole cache


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_a_prefaulted_cpu_kv_cache_takes_its_memory_at_startup_and_one_too_large_fails_clearly(tiny_zoo):
    from engine.errors import InvalidConfigError
    from workers import kv_cache

    spec = type("Spec", (), {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64})
    before = _rss_bytes()
    cache = KVCache(spec, 2048, 16, torch.float32, "cpu", prefault=True)  # 64 MiB
    assert _rss_bytes() - before > 56 << 20
    assert cache.data.eq(0).all()
    too_big = kv_cache.available_memory_bytes() // (4 * 2 * 16 * 2 * 64 * 4) + 1024
    with pytest.raises(InvalidConfigError, match="lower cpu_kv_cache_gb"):
        KVCache(spec, too_big, 16, torch.float32, "cpu", prefault=True)
    del cache
    entry = tiny_zoo("llama")  # the engine setting reaches the worker's cache: 128 MiB resident, or not
    for prefault in (False, True):
        before = _rss_bytes()
        llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, cpu_kv_cache_gb=0.125,
                  kv_cache_prefault=prefault)
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
        grew = _rss_bytes() - before
        assert grew > 120 << 20 if prefault else grew < 64 << 20, (prefault, grew)
        del llm, out


@pytest.mark.parametrize("size, kept", [(None, 0), (0.01, 1)])
def test_cpu_keeps_no_host_copy_of_resident_prefixes_by_default(tiny_zoo, size, kept):
    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64,
              prefix_host_cache_gb=size)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), prefix="p5", use_tqdm=False)
    assert llm.engine.stats.prefix_loads == 1
    assert len(llm.engine.executor.worker.host_prefixes._entries) == kept


def test_the_host_prefix_tier_keeps_to_its_byte_budget_least_recently_used_out_first():
    from workers.kv_cache import HostPrefixCache

    kv = {name: torch.full((2, 2, size, 1, 4), float(i)) for i, (name, size) in
          enumerate([("a", 8), ("b", 8), ("c", 16), ("huge", 64)])}  # 512, 512, 1024 and 4096 bytes
    cache = HostPrefixCache(capacity_bytes=1536)
    reads = []

    def get(name):
        return cache.get(name, lambda: reads.append(name) or kv[name])

    get("a"), get("b")
    assert cache.nbytes == 1024 and reads == ["a", "b"]
    get("a")  # a hit: "b" is now the least recently used
    get("c")  # 2048 bytes > 1536: "b" leaves
    assert list(cache._entries) == ["a", "c"] and cache.nbytes == 1536
    assert torch.equal(get("huge"), kv["huge"]) and "huge" not in cache._entries  # larger than the budget
    get("b")
    assert reads == ["a", "b", "c", "huge", "b"] and cache.nbytes <= 1536
    cache.discard("b")
    assert cache.nbytes == sum(t.numel() * 4 for t in cache._entries.values())
