"""prefix-serve: serve many PEFT prefix-tuned tasks on one frozen LLM.

Public API: LLM, SamplingParams, RequestOutput, CompletionOutput and the named errors.
"""

from engine.errors import (AdapterMismatchError, InvalidAdapterError, InvalidPromptError,
                           InvalidSamplingParamsError, PrefixPathError, PrefixServeError, PromptTooLongError,
                           UnknownPrefixError, UnsupportedModelError)
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "PrefixServeError", "AdapterMismatchError",
           "InvalidAdapterError", "InvalidPromptError", "InvalidSamplingParamsError", "PrefixPathError",
           "PromptTooLongError", "UnknownPrefixError", "UnsupportedModelError"]
