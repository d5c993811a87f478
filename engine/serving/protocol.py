"""OpenAI request parsing and response shaping: JSON bodies in, SamplingParams and prompts out, and back.

Pure functions, no I/O: `engine.serving.server` calls them. Errors a client can cause raise a named PrefixServeError
whose `http_status` becomes the response status; `error_body` renders any of them as OpenAI's error JSON.

Extensions beyond OpenAI's fields, as in vLLM: `top_k`, `ignore_eos`, `stop_token_ids` (sampling), and
`return_token_ids` (each choice then carries `token_ids`, and `prompt_token_ids` for completions).

What a request may hold is bounded here, before anything reaches the engine: the body's size and charset, the
length and form of names and paths (they become file names), valid Unicode in every text the model sees, and the
length and range of token-id prompts. Messages quote what was sent through `quote` (a few hundred characters).
"""

from __future__ import annotations

import codecs
import gc
import json
import re
import time
import uuid
from dataclasses import dataclass

from engine.errors import InvalidPromptError, InvalidSamplingParamsError, PrefixServeError, PromptTooLongError, quote
from engine.sampling_params import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# The body is parsed on the event loop, holding the GIL: this bounds how long one body can hold back every stream.
# 8 MiB of the costliest shape (millions of empty lists, about 250 MB of new objects) took 0.11-0.14 s to parse in
# a fresh server on two cores, and 0.9-1.8 s in one that had served the reliability tests, most of it the kernel's
# page faults (docs/reliability.md). A prompt that fills a 128k context is under 1 MiB, as text or as token ids.
MAX_BODY_BYTES = 8 << 20
MAX_NAME_BYTES = 255  # a model or prefix name; a prefix name is also a directory name (NAME_MAX)
MAX_PATH_BYTES = 4096  # a prefix path (PATH_MAX); each of its components is at most MAX_NAME_BYTES
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escapes give strings no encoder accepts

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


# ---- bounds and forms -------------------------------------------------------------------------------------------
def parse_json_body(raw: bytes, charset: str | None) -> dict:
    """A request body -> a JSON object. The cyclic garbage collector is paused while it parses: a body of
    millions of empty lists otherwise took several collections, and seconds, to build."""
    try:
        text = raw.decode(codecs.lookup(charset).name if charset else "utf-8")
    except LookupError:  # an unknown charset, or a codec that is not a text encoding
        _bad(f"Content-Type names the charset {quote(charset, 60)}, which this server cannot read; send JSON as "
             "UTF-8.")
    except UnicodeDecodeError as exc:
        _bad(f"The request body is not valid {exc.encoding} text: {exc.reason} at byte {exc.start}.")
    collecting = gc.isenabled()
    gc.disable()
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, as is an over-long integer
        _bad(f"The request body is not valid JSON: {quote(str(exc))}")
    finally:
        if collecting:
            gc.enable()
    if not isinstance(body, dict):
        _bad("The request body must be a JSON object.")
    return body


def check_text(text: str, what: str, cls: type[PrefixServeError] = InvalidPromptError) -> str:
    """Refuse a string that is not valid Unicode: a lone surrogate (JSON "\\ud800") cannot be tokenized, encoded
    for the engine or written to a file name."""
    match = _SURROGATE.search(text)
    if match is not None:
        _bad(f"{what} holds a lone UTF-16 surrogate (U+{ord(match.group()):04X}) at character {match.start()}, "
             "which is not valid Unicode text.", cls)
    return text


def check_name(name, what: str) -> str:
    """A model or prefix name: a non-empty string of at most MAX_NAME_BYTES UTF-8 bytes, without NUL."""
    if not isinstance(name, str) or not name:
        _bad(f"{what} must be a non-empty string.")
    check_text(name, what, BadRequestError)
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        _bad(f"{what} is {size} bytes long; names have at most {MAX_NAME_BYTES} bytes (UTF-8).")
    if "\x00" in name:
        _bad(f"{what} cannot contain a NUL character.")
    return name


def check_path_form(path, what: str = "'prefix_path'") -> str:
    """A path from a request, checked for form only (no file-system access): a non-empty string of valid
    Unicode without NUL, at most MAX_PATH_BYTES bytes, each component at most MAX_NAME_BYTES."""
    if not isinstance(path, str) or not path:
        _bad(f"{what} must be a non-empty string (a PEFT prefix-tuning adapter directory).")
    check_text(path, what, BadRequestError)
    if "\x00" in path:
        _bad(f"{what} cannot contain a NUL character.")
    size = len(path.encode())
    if size > MAX_PATH_BYTES:
        _bad(f"{what} is {size} bytes long; paths have at most {MAX_PATH_BYTES} bytes.")
    longest = max(len(part.encode()) for part in path.split("/"))
    if longest > MAX_NAME_BYTES:
        _bad(f"{what} has a component of {longest} bytes; each has at most {MAX_NAME_BYTES} bytes.")
    return path


# ---- requests ---------------------------------------------------------------------------------------------------
def _bad(message: str, cls: type[PrefixServeError] = BadRequestError):
    raise cls(message)


def _field(body: dict, key: str, types: tuple, what: str, default=None):
    """body[key] if present and not null, checked against `types` (bools are never numbers here)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        _bad(f"'{key}' must be {what}, got {quote(value)}.", InvalidSamplingParamsError)
    if float not in types and value.bit_length() > 64:  # JSON integers may have thousands of digits
        _bad(f"'{key}' must be {what} of at most 64 bits, got {quote(value, 40)}.", InvalidSamplingParamsError)
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
    return SamplingParams(
        n=n, max_tokens=max_tokens,
        temperature=_field(body, "temperature", number, "a number", 1.0),
        top_p=_field(body, "top_p", number, "a number", 1.0),
        top_k=_field(body, "top_k", integer, "an integer", -1),
        seed=_field(body, "seed", integer, "an integer"),
        stop=_stop(body.get("stop")), stop_token_ids=_stop_token_ids(body.get("stop_token_ids")),
        ignore_eos=_field(body, "ignore_eos", (bool,), "true or false", False))


def _stop(stop) -> str | list[str] | None:
    """Forms and counts first, with short messages; SamplingParams then checks the lengths."""
    if stop is None:
        return None
    if not isinstance(stop, (str, list)):
        _bad(f"'stop' must be a string or a list of strings, got {quote(stop)}.", InvalidSamplingParamsError)
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > SamplingParams.MAX_STOP_STRINGS:
        _bad(f"stop takes at most {SamplingParams.MAX_STOP_STRINGS} strings, got {len(stops)}.",
             InvalidSamplingParamsError)
    for text in stops:
        if not isinstance(text, str) or not text:
            _bad(f"stop must be a non-empty string or a list of them; one is {quote(text, 80)}.",
                 InvalidSamplingParamsError)
        check_text(text, "A stop string", InvalidSamplingParamsError)
    return stop


def _stop_token_ids(ids) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, list):
        _bad(f"'stop_token_ids' must be a list of integers, got {quote(ids)}.", InvalidSamplingParamsError)
    if len(ids) > SamplingParams.MAX_STOP_TOKEN_IDS:
        _bad(f"stop_token_ids takes at most {SamplingParams.MAX_STOP_TOKEN_IDS} ids, got {len(ids)}.",
             InvalidSamplingParamsError)
    for token in ids:
        if type(token) is not int or not 0 <= token <= SamplingParams.MAX_INT:
            _bad(f"stop_token_ids must be non-negative integers of at most 64 bits; one is {quote(token, 40)}.",
                 InvalidSamplingParamsError)
    return ids


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
        _bad(f"'stream_options' must be an object, got {quote(options)}.")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        _bad(f"'stream_options.include_usage' must be true or false, got {quote(include_usage)}.")
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


def parse_completion_request(body: dict, max_model_len: int | None = None,
                             vocab_size: int | None = None) -> CompletionRequest:
    """`max_model_len` and `vocab_size` bound token-id prompts here, before they travel to the engine."""
    _common_unsupported(body)
    _reject_unsupported(body, {"logprobs": lambda v: v is not False, "echo": bool, "suffix": bool})
    return CompletionRequest(model=_model(body), prompts=_prompts(body.get("prompt"), max_model_len, vocab_size),
                             params=sampling_params(body, COMPLETIONS_DEFAULT_MAX_TOKENS),
                             stream=stream_options(body), return_token_ids=_return_token_ids(body))


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        _bad(f"'model' must be a string, got {quote(model)}.")
    return model or None


def _return_token_ids(body: dict) -> bool:
    return bool(_field(body, "return_token_ids", (bool,), "true or false", False))


def _token_ids(ids: list, max_model_len: int | None, vocab_size: int | None) -> list[int]:
    """A token-id prompt, its length checked before its elements (a list of millions is refused at once)."""
    if max_model_len is not None and len(ids) + 1 > max_model_len:
        raise PromptTooLongError(f"The prompt has {len(ids)} token ids; with one generated token that exceeds the "
                                 f"maximum context of {max_model_len} tokens.")
    bound = vocab_size if vocab_size is not None else 1 << 63
    if not all(type(t) is int and 0 <= t < bound for t in ids):
        bad = next(t for t in ids if not (type(t) is int and 0 <= t < bound))
        _bad(f"Prompt token ids must be integers in [0, {bound}); got {quote(bad, 40)}.", InvalidPromptError)
    return ids


def _prompts(prompt, max_model_len: int | None = None, vocab_size: int | None = None) -> list[str | list[int]]:
    """OpenAI accepts a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [check_text(prompt, "The prompt")]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return [_token_ids(prompt, max_model_len, vocab_size)]
        if isinstance(first, (str, list)):
            if len(prompt) > MAX_PROMPTS:
                _bad(f"'prompt' lists {len(prompt)} prompts; one request takes at most {MAX_PROMPTS}.",
                     InvalidPromptError)
            if all(isinstance(p, str) or isinstance(p, list) and p for p in prompt):
                return [check_text(p, f"Prompt {i}") if isinstance(p, str) else
                        _token_ids(p, max_model_len, vocab_size) for i, p in enumerate(prompt)]
    _bad("'prompt' must be a string, a list of strings, a non-empty list of token ids, or a list of such "
         f"lists; got {quote(prompt, 80)}.", InvalidPromptError)


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
        _bad(f"Each message needs a string 'role' and a 'content'; got {quote(message, 80)}.", InvalidPromptError)
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
        _bad(f"Message content must be a string or a list of text parts; got {quote(content)}.", InvalidPromptError)
    return {"role": check_text(message["role"], "A message's role"), "content": check_text(content, "A message")}


def parse_load_prefix(body: dict) -> tuple[str, str]:
    """(name, path), checked for form; the path's place (under an allowed root) is checked by the caller."""
    return check_name(body.get("prefix_name"), "'prefix_name'"), check_path_form(body.get("prefix_path"))


def parse_unload_prefix(body: dict) -> str:
    return check_name(body.get("prefix_name"), "'prefix_name'")


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
