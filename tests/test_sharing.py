"""Sharing is real: sequences of one task hold the prefix's blocks once, counted as blocks in use."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


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
