"""Scheduler decode runs: when a step is stretched to several tokens per sequence, and how far."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.request import Request, Sequence
from scheduler.scheduler import Scheduler, SchedulerConfig


def _scheduler(decode_steps=8, num_blocks=64, max_num_seqs=8, max_model_len=None, budget=256) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, decode_steps=decode_steps,
                             max_model_len=max_model_len)
    return Scheduler(config, BlockManager(num_blocks, block_size=4))


def _add(sched: Scheduler, seq_id: int, prompt_len=5, **params) -> Sequence:
    params.setdefault("temperature", 0.0)
    prompt = list(range(1, prompt_len + 1))
    request = Request(f"r{seq_id}", None, prompt, SamplingParams(**params), None, 0)
    seq = Sequence(seq_id, request, list(prompt))
    request.sequences.append(seq)
    sched.add(seq)
    return seq


def _step(sched: Scheduler):
    """Schedule one step and apply it as the engine does, sampling token 7 everywhere."""
    out = sched.schedule()
    for item in out.scheduled:
        samples = item.seq.num_uncomputed == item.num_tokens  # its last known token is computed this step
        item.seq.num_computed_tokens += item.num_tokens * item.num_steps
        if samples:
            item.seq.token_ids.extend([7] * item.num_steps)
    return out


def test_pure_greedy_decode_runs_decode_steps_tokens_with_blocks_for_all_of_them():
    sched = _scheduler(decode_steps=8)
    seqs = [_add(sched, i, max_tokens=100) for i in range(3)]
    assert _step(sched).num_steps == 1  # the prefill step
    out = _step(sched)
    assert out.num_steps == 8 and len(out.scheduled) == 3
    for seq in seqs:  # 5 prompt tokens + the first output token, then 8 more in the run: 13 slots, 4 blocks
        assert len(sched.block_manager.tables[seq.seq_id]) == 4
        assert seq.num_computed_tokens == 13 and len(seq.token_ids) == 14
    assert all(item.table_from == 2 for item in out.scheduled)  # blocks 2 and 3 are new: sent to the worker
    sched.check_integrity()


def test_each_sequence_runs_as_far_as_its_max_tokens_and_the_context_limit_allow():
    sched = _scheduler(decode_steps=8)
    long, short = _add(sched, 0, max_tokens=100), _add(sched, 1, max_tokens=4)
    _step(sched)
    out = _step(sched)  # sequence 1 has 1 of 4 tokens: 3 more, then it leaves the run; 0 runs all 8
    assert out.num_steps == 8 and [item.num_steps for item in out.scheduled] == [8, 3]
    assert len(short.token_ids) - 5 == 4 and long.num_computed_tokens == 13
    assert len(sched.block_manager.tables[1]) == 2  # 8 tokens, 2 blocks: none reserved past max_tokens
    sched.check_integrity()
    sched = _scheduler(decode_steps=8, max_model_len=10)
    _add(sched, 0, max_tokens=100)
    _add(sched, 1, max_tokens=100, prompt_len=3)
    _step(sched)
    out = _step(sched)  # 6 and 4 tokens in the streams; 4 and 6 more reach the 10-token context
    assert out.num_steps == 6 and [item.num_steps for item in out.scheduled] == [4, 6]
    sched = _scheduler(decode_steps=8)
    _add(sched, 0, max_tokens=2)
    _step(sched)
    assert _step(sched).num_steps == 1  # one token left: no run


def test_no_run_while_a_waiting_sequence_could_start():
    sched = _scheduler(decode_steps=8, max_num_seqs=2)
    _add(sched, 0, max_tokens=100)
    _step(sched)
    _add(sched, 1, max_tokens=100)
    assert _step(sched).num_steps == 1  # sequence 1 is admitted and prefills next to 0's decode
    _add(sched, 2, max_tokens=100)
    out = _step(sched)  # 2 must wait for a free seat (max_num_seqs=2): running the decode as a run loses nothing
    assert out.num_steps == 8 and {i.seq.seq_id for i in out.scheduled} == {0, 1}


def test_no_run_for_seeded_sampling_or_without_free_blocks():
    sched = _scheduler(decode_steps=8)
    _add(sched, 0, max_tokens=100)
    _add(sched, 1, max_tokens=100, temperature=0.8)
    _step(sched)
    assert _step(sched).num_steps == 8  # unseeded sampling runs on the device
    _add(sched, 2, max_tokens=100, temperature=0.8, seed=3)
    _step(sched)
    assert _step(sched).num_steps == 1  # a seeded row samples on the host, one token per step
    sched = _scheduler(decode_steps=8, num_blocks=4)
    _add(sched, 0, prompt_len=11, max_tokens=100)
    _step(sched)
    assert _step(sched).num_steps == 1  # 12 tokens fill 3 blocks; 8 more would need 2 of the 1 left
    sched.check_integrity()


def test_the_first_output_token_is_never_inside_a_run():
    """A chunked prefill whose last chunk is one prompt token looks like a decode step; a run there would hold
    the first token back until the run ends (found by a differential test)."""
    sched = _scheduler(decode_steps=8, budget=4)
    seq = _add(sched, 0, prompt_len=5, max_tokens=100)
    assert _step(sched).scheduled[0].num_tokens == 4
    out = _step(sched)  # the last prompt token: it samples the first output token, alone
    assert out.scheduled[0].num_tokens == 1 and out.num_steps == 1 and len(seq.token_ids) == 6
    assert _step(sched).num_steps == 8
    sched.check_integrity()


def test_decode_steps_one_never_stretches():
    sched = _scheduler(decode_steps=1)
    _add(sched, 0, max_tokens=100)
    _step(sched)
    assert _step(sched).num_steps == 1
