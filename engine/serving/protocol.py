"""OpenAI request parsing and response shaping: JSON bodies in, SamplingParams and prompts out, and back.

Pure functions, no I/O: `engine.serving.server` calls them. Errors a client can cause raise a named PrefixServeError
whose `http_status` becomes the response status; `error_body` renders any of them as OpenAI's error JSON.

Extensions beyond OpenAI's fields, as in vLLM: `top_k`, `ignore_eos`, `stop_token_ids` (sampling), and
`return_token_ids` (each choice then carries `token_ids`, and `prompt_token_ids` for completions).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from engine.errors import InvalidPromptError, InvalidSamplingParamsError, PrefixServeError
from engine.sampling_params import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                503: "service_unavailable_error"}


class BadRequestError(PrefixServeError):
    """The request body is not what the endpoint accepts (not JSON, wrong types, unsupported features)."""


class AuthenticationError(PrefixServeError):
    """The Bearer token is missing or wrong."""

    http_status = 401


class NotFoundError(PrefixServeError):
    """No such route."""

    http_status = 404


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


# ---- requests ---------------------------------------------------------------------------------------------------
def _bad(message: str, cls: type[PrefixServeError] = BadRequestError):
    raise cls(message)


def _field(body: dict, key: str, types: tuple, what: str, default=None):
    """body[key] if present and not null, checked against `types` (bools are never numbers here)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        _bad(f"'{key}' must be {what}, got {value!r}.", InvalidSamplingParamsError)
    return value


def _reject_unsupported(body: dict, fields: dict) -> None:
    for key, is_set in fields.items():
        value = body.get(key)
        if value is not None and is_set(value):
            _bad(f"'{key}' is not supported by prefix-serve; remove it from the request.")


def sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    """OpenAI sampling fields -> SamplingParams; out-of-range values raise InvalidSamplingParamsError (400)."""
    number, integer = (int, float), (int,)
    n = _field(body, "n", integer, "an integer", 1)
    best_of = _field(body, "best_of", integer, "an integer")
    if best_of is not None and best_of != n:
        _bad(f"best_of must equal n (best_of={best_of}, n={n}); prefix-serve returns every sample.",
             InvalidSamplingParamsError)
    max_tokens = _field(body, "max_completion_tokens", integer, "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", integer, "an integer", default_max_tokens)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        _bad(f"'stop' must be a string or a list of strings, got {stop!r}.", InvalidSamplingParamsError)
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not isinstance(stop_token_ids, list):
        _bad(f"'stop_token_ids' must be a list of integers, got {stop_token_ids!r}.", InvalidSamplingParamsError)
    return SamplingParams(
        n=n, max_tokens=max_tokens,
        temperature=_field(body, "temperature", number, "a number", 1.0),
        top_p=_field(body, "top_p", number, "a number", 1.0),
        top_k=_field(body, "top_k", integer, "an integer", -1),
        seed=_field(body, "seed", integer, "an integer"),
        stop=stop, stop_token_ids=stop_token_ids,
        ignore_eos=_field(body, "ignore_eos", (bool,), "true or false", False))


@dataclass
class StreamOptions:
    stream: bool
    include_usage: bool


def stream_options(body: dict) -> StreamOptions:
    stream = _field(body, "stream", (bool,), "true or false", False)
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        _bad(f"'stream_options' must be an object, got {options!r}.")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        _bad(f"'stream_options.include_usage' must be true or false, got {include_usage!r}.")
    return StreamOptions(stream, stream and include_usage)


def _common_unsupported(body: dict) -> None:
    _reject_unsupported(body, {"presence_penalty": lambda v: v != 0, "frequency_penalty": lambda v: v != 0,
                               "logit_bias": bool})


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # one entry per prompt: text, or token ids
    params: SamplingParams
    stream: StreamOptions
    return_token_ids: bool


def parse_completion_request(body: dict) -> CompletionRequest:
    _common_unsupported(body)
    _reject_unsupported(body, {"logprobs": lambda v: v is not False, "echo": bool, "suffix": bool})
    return CompletionRequest(model=_model(body), prompts=_prompts(body.get("prompt")),
                             params=sampling_params(body, COMPLETIONS_DEFAULT_MAX_TOKENS),
                             stream=stream_options(body), return_token_ids=_return_token_ids(body))


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        _bad(f"'model' must be a string, got {model!r}.")
    return model or None


def _return_token_ids(body: dict) -> bool:
    return bool(_field(body, "return_token_ids", (bool,), "true or false", False))


def _is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _prompts(prompt) -> list[str | list[int]]:
    """OpenAI accepts a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        return list(prompt)
    _bad("'prompt' must be a string, a list of strings, a non-empty list of token ids, or a list of such "
         f"lists; got {str(prompt)[:80]!r}.", InvalidPromptError)


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]  # [{"role", "content": str}], ready for the chat template
    params_body: dict  # sampling fields; the default max_tokens depends on the prompt's length
    stream: StreamOptions
    return_token_ids: bool
    add_generation_prompt: bool


def parse_chat_request(body: dict) -> ChatRequest:
    _common_unsupported(body)
    _reject_unsupported(body, {"logprobs": bool, "top_logprobs": bool, "tools": bool, "functions": bool,
                               "tool_choice": lambda v: v != "none",
                               "response_format": lambda v: not (isinstance(v, dict) and v.get("type") == "text")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        _bad("'messages' must be a non-empty list of {'role', 'content'} objects.", InvalidPromptError)
    add_generation_prompt = _field(body, "add_generation_prompt", (bool,), "true or false", True)
    return ChatRequest(model=_model(body), messages=[_message(m) for m in messages], params_body=body,
                       stream=stream_options(body), return_token_ids=_return_token_ids(body),
                       add_generation_prompt=add_generation_prompt)


def _message(message) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        _bad(f"Each message needs a string 'role' and a 'content'; got {str(message)[:80]!r}.", InvalidPromptError)
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                _bad("Only text content parts ({'type': 'text', 'text': ...}) are supported.", InvalidPromptError)
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        _bad(f"Message content must be a string or a list of text parts; got {content!r}.", InvalidPromptError)
    return {"role": message["role"], "content": content}


def parse_load_prefix(body: dict) -> tuple[str, str]:
    name, path = body.get("prefix_name"), body.get("prefix_path")
    if not isinstance(name, str) or not name:
        _bad("'prefix_name' must be a non-empty string.")
    if not isinstance(path, str) or not path:
        _bad("'prefix_path' must be a non-empty string (a PEFT prefix-tuning adapter directory).")
    if "\x00" in path:
        _bad("'prefix_path' cannot contain a NUL character.")
    return name, path


def parse_unload_prefix(body: dict) -> str:
    name = body.get("prefix_name")
    if not isinstance(name, str) or not name:
        _bad("'prefix_name' must be a non-empty string.")
    return name


# ---- responses --------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, stop_reason=None,
                      token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = prompt_token_ids
    return choice


def completion_response(request_id: str, model: str, choices: list[dict], usage_: dict | None,
                        created: int | None = None, chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "choices": choices, "system_fingerprint": None}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_choice(index: int, text: str, finish_reason: str | None, stop_reason=None,
                token_ids: list[int] | None = None) -> dict:
    choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason, "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None = None, stop_reason=None,
                      token_ids: list[int] | None = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_response(request_id: str, model: str, choices: list[dict], usage_: dict | None,
                  created: int | None = None, chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created or int(time.time()), "model": model, "choices": choices,
            "system_fingerprint": None}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None = None,
               created: int | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": created or int(time.time()), "owned_by": "prefix-serve",
            "root": root, "parent": parent}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card
