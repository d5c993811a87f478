"""prefix-serve: serve many PEFT prefix-tuned tasks on one frozen LLM.

Public API: LLM, SamplingParams, RequestOutput, CompletionOutput and the named errors. Names are resolved
on first use, so that importing one module of the package (a contract type such as `engine.errors`, as workers
do) does not import torch, transformers and the engine core with it.
"""

import importlib

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    **{name: "engine.errors" for name in (
        "PrefixServeError", "AdapterMismatchError", "InvalidAdapterError", "InvalidConfigError", "InvalidPromptError",
        "InvalidSamplingParamsError", "PrefixLoadError", "PrefixPathError", "PromptTooLongError",
        "UnknownPrefixError", "UnsupportedModelError")},
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
