"""EngineConfig: settings are normalized when the config is made, and reach the engine as plain Python values."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams

# 70 tokens: longer than a 64-token step budget, so the prompt is chunked
LONG_PROMPT = [(7 * i) % 90 + 3 for i in range(70)]
SHORT_PROMPT = [5, 6, 7]


def _greedy_tokens(entry, **settings) -> list[list[int]]:
    llm = LLM(str(entry["model"]), skip_tokenizer_init=True, block_size=4, num_kv_blocks=128, **settings)
    llm.load_prefix("p5", str(entry["adapters"]["p5"]))
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": LONG_PROMPT}, {"prompt_token_ids": SHORT_PROMPT}], params,
                        prefix=["p5", None], use_tqdm=False)
    llm.check_integrity()
    return [o.outputs[0].token_ids for o in outs]


def test_numpy_integer_settings_generate_as_plain_ints(tiny_zoo):
    """np.int64 settings used to reach the worker's msgpack message (a chunk size, a decode run's length),
    which raised TypeError inside the step."""
    entry = tiny_zoo("llama")
    plain = _greedy_tokens(entry, max_num_batched_tokens=64, decode_steps=4)
    numpy = _greedy_tokens(entry, max_num_batched_tokens=np.int64(64), decode_steps=np.int64(4))
    assert numpy == plain
    assert [len(t) for t in plain] == [9, 9]


def test_numpy_numbers_are_stored_as_plain_python_numbers():
    from engine.config import EngineConfig

    config = EngineConfig(max_num_seqs=np.int64(8), decode_steps=np.int32(4), gpu_memory_utilization=np.float32(0.5),
                          cuda_graph_sizes=np.array([4, 1, 4]), cuda_graph_memory_mb=np.float64(256))
    assert type(config.max_num_seqs) is int and type(config.decode_steps) is int
    assert type(config.gpu_memory_utilization) is float and type(config.cuda_graph_memory_mb) is float
    assert config.cuda_graph_sizes == (1, 4) and all(type(size) is int for size in config.cuda_graph_sizes)


def test_llm_checks_its_settings_before_loading_a_model():
    from engine.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="fused_layers must be auto") as err:
        LLM("/no/such/model", fused_layers="sometimes")
    assert err.value.field == "fused_layers"
