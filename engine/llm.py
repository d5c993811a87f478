"""LLM: the offline Python API, shaped like vLLM's, with prefixes chosen per prompt."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from engine.config import EngineConfig
from engine.errors import InvalidPromptError
from engine.llm_engine import EngineCore
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

PromptType = str | dict


class LLM:
    def __init__(self, model: str | None = None, **settings):
        """`model`: a Hugging Face model directory; None serves the embedded SmolLM2-135M-Instruct. `settings`: any
        other field of `EngineConfig` (engine/config.py) by keyword, such as device="cuda" or block_size=16; each
        one left out takes that field's default, which is written only there. A bad value raises
        InvalidConfigError naming the setting."""
        self.config = EngineConfig(model=model, **settings)
        self.engine = EngineCore(self.config)
        self.engine.emit_unfinished = False  # generate() only reads finished outputs
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def load_prefix(self, name: str, path: str) -> None:
        """Register a PEFT PREFIX_TUNING adapter directory under `name`."""
        self.engine.load_prefix(name, path)

    def unload_prefix(self, name: str) -> None:
        self.engine.unload_prefix(name)

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prefix: str | None | Seq[str | None] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; each prompt may use a different prefix (or None for the bare model).

        All prompts are validated before any is queued, so a bad one raises without starting the others. A
        prompt whose prefix cannot be read when it is needed (its file removed or damaged after `load_prefix`)
        comes back with finish_reason "error" and the reason in `RequestOutput.error`; the others are unaffected.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        count = len(prompts)
        params = self._per_prompt(sampling_params or SamplingParams(), count, "sampling_params")
        prefixes = self._per_prompt(prefix, count, "prefix", scalar=(str, type(None)))
        requests = [(*self._split_prompt(p), sp, pf) for p, sp, pf in zip(prompts, params, prefixes)]
        for _, _, _, pf in requests:
            if pf is not None:
                self.engine.registry.ensure_tensor_ok(pf)
        ids = []
        try:
            for text, token_ids, sp, pf in requests:
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, text, token_ids, sp, pf)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             prefix: str | None | Seq[str | None] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted by the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(c)} for c in conversations]
        return self.generate(prompts, sampling_params, prefix=prefix, use_tqdm=use_tqdm)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidPromptError("This model has no tokenizer chat template; use generate() with a prompt.")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
            self.engine.collect_in_flight()  # async scheduling: no worker runs once generate returns
        finally:
            if bar is not None:
                bar.close()
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [finished[i] for i in ids]

    @staticmethod
    def _per_prompt(value, count: int, what: str, scalar=(SamplingParams,)):
        if isinstance(value, scalar):
            return [value] * count
        value = list(value)
        if len(value) != count:
            raise ValueError(f"{what} has {len(value)} entries but there are {count} prompts.")
        return value

    @staticmethod
    def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
        if isinstance(prompt, str):
            return prompt, None
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], None
        raise InvalidPromptError(f"A prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', "
                                 f"got {type(prompt).__name__}.")

    def check_integrity(self) -> None:
        self.engine.check_integrity()

    def shutdown(self) -> None:
        self.engine.shutdown()
