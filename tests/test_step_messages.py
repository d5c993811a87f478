"""The engine <-> worker contract: typed step messages, the one codec, and what travels through it."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import SamplingParams, wire
from engine.errors import InvalidSamplingParamsError
from engine.step_messages import (VERSION, PrefixLoad, SamplingSettings, ScheduledSequence, SequenceState,
                                  StepMessage, StepResult, WorkerInfo, fork_children)

ints = st.lists(st.integers(0, 2**31 - 1), max_size=6)
settings_ = st.builds(SamplingSettings, st.floats(0, 2, allow_nan=False), st.floats(0.01, 1), st.integers(-1, 50),
                      st.none() | st.integers(0, 2**63 - 1))
states = st.builds(SequenceState, ints, st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), ints, settings_,
                   st.integers(0, 7), ints, st.none() | st.text(max_size=8))
entries = st.builds(ScheduledSequence, st.integers(0, 2**40), st.integers(1, 64), st.none() | states,
                    st.none() | st.integers(0, 9), st.none() | ints, st.none() | st.integers(1, 16))
messages = st.builds(StepMessage, st.lists(entries, max_size=5), ints,
                     st.lists(st.builds(PrefixLoad, st.text(max_size=8), st.text(max_size=8), ints,
                                        st.integers(1, 64)), max_size=3),
                     st.lists(st.lists(st.integers(0, 999), min_size=2, max_size=2), max_size=3),
                     st.integers(1, 16), st.lists(st.text(max_size=8), max_size=3))
results = st.builds(StepResult, st.lists(st.tuples(st.integers(0, 99), ints).map(list), max_size=4),
                    st.lists(st.floats(0, 10, allow_nan=False), max_size=3),
                    st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3))


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_step_message_survives_the_round_trip_unchanged(message):
    assert StepMessage.decode(message.encode()) == message


@settings(max_examples=100, deadline=None)
@given(results)
def test_every_step_result_survives_the_round_trip_unchanged(result):
    assert StepResult.decode(result.encode()) == result


def test_worker_info_round_trips():
    assert WorkerInfo.decode(WorkerInfo(123, "torch", 9).encode()) == WorkerInfo(123, "torch", 9)


def test_a_message_of_another_version_is_refused_by_name():
    data = wire.encode(StepMessage(), VERSION - 1)
    with pytest.raises(wire.ProtocolError, match=f"message version {VERSION - 1}, but this side speaks version "
                                                 f"{VERSION}"):
        StepMessage.decode(data)


@pytest.mark.parametrize("data", [b"\xc1", msgpack.packb({"v": VERSION}), msgpack.packb([VERSION, [1, 2, 3, 4, 5,
                                                                                                   6, 7, 8]])])
def test_a_malformed_message_is_a_protocol_error_not_a_crash_elsewhere(data):
    with pytest.raises(wire.ProtocolError):
        StepMessage.decode(data)


def test_sampling_params_travel_whole_and_are_validated_again_on_arrival():
    params = SamplingParams(n=2, max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=["a", "b"],
                            stop_token_ids=[4], ignore_eos=True)
    back = wire.decode(wire.encode(params, 1), 1, SamplingParams)
    assert back == params and back.stop_strings == ["a", "b"]
    bad = wire.encode([1, 0], 1)  # n=1, max_tokens=0
    with pytest.raises(InvalidSamplingParamsError, match="max_tokens"):
        wire.decode(bad, 1, SamplingParams)


def test_sampling_settings_are_what_the_worker_samples_with():
    assert SamplingSettings.of(SamplingParams(temperature=1e-9, top_k=5, seed=3)) == SamplingSettings(0.0, 1.0, 5, 3)


def test_forked_samples_take_the_tokens_after_the_parents_in_order():
    assert fork_children([10, 11, 12], [7, 8, 9]) == [(10, 1, 7), (11, 2, 8), (12, 3, 9)]


def test_one_step_is_encoded_once_whatever_the_number_of_workers(tiny_zoo, monkeypatch):
    """The executor hands every worker the same bytes: the engine encodes a step message once."""
    from engine import LLM

    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    encodes = []
    original = StepMessage.encode
    monkeypatch.setattr(StepMessage, "encode", lambda self: encodes.append(1) or original(self))
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(encodes) == llm.engine.stats.steps  # one encode per step


def test_unloading_a_prefix_drops_the_workers_host_copy_through_the_step_contract(tiny_zoo):
    from engine import LLM

    entry = tiny_zoo("llama")
    llm = LLM(model=str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64,
              prefix_host_cache_gb=0.01)
    llm.load_prefix("a", str(entry["adapters"]["p5"]))
    llm.load_prefix("b", str(entry["adapters"]["p8proj"]))
    params = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate([{"prompt_token_ids": [1, 2]}] * 2, params, prefix=["a", "b"], use_tqdm=False)
    host = llm.engine.executor.worker.host_prefixes._entries
    assert len(host) == 2
    llm.unload_prefix("a")
    assert [key.split("#")[0] for key in host] == ["b"]
    llm.load_prefix("b", str(entry["adapters"]["p16"]))  # a reload retires the old registration too
    assert not host
