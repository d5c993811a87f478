"""The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`) and its plain HTML listing (`GET /docs`).

`document(routes)` describes the routes the aiohttp app has registered, each from its entry in ROUTES; a route
without an entry raises, and the document lists nothing else, so the spec cannot drift from the handlers. The
request schemas carry the limits the parser enforces, read from protocol's and SamplingParams' constants.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from engine.serving import protocol

_JSON = "application/json"
_INT64 = {"type": "integer", "minimum": 0, "maximum": SamplingParams.MAX_INT}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _strings(max_length: int | None = None) -> dict:
    return {"type": "string"} if max_length is None else {"type": "string", "maxLength": max_length}


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _INT64,
              "description": "Token ids, each below the vocabulary size; with one generated token they must fit "
                             "the context (max_model_len)."}
_SAMPLING = {
    "model": {"type": "string", "description": "A served base model name, or a registered prefix's name "
                                               f"(at most {protocol.MAX_NAME_BYTES} UTF-8 bytes)."},
    "n": {"type": "integer", "minimum": 1, "default": 1, "description": "Samples per prompt; at most "
                                                                        "--max-num-seqs."},
    "best_of": {"type": "integer", "description": "Must equal n."},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": SamplingParams.MAX_INT},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": SamplingParams.MAX_INT},
    "temperature": {"type": "number", "minimum": 0, "default": 1.0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
    "top_k": {"type": "integer", "minimum": -1, "maximum": SamplingParams.MAX_INT, "default": -1,
              "description": "-1 or 0: off."},
    "seed": {"type": ["integer", "null"], **{k: v for k, v in _INT64.items() if k != "type"}},
    "stop": {"oneOf": [{**_strings(SamplingParams.MAX_STOP_CHARS), "minLength": 1},
                       {"type": "array", "maxItems": SamplingParams.MAX_STOP_STRINGS,
                        "items": {**_strings(SamplingParams.MAX_STOP_CHARS), "minLength": 1}},
                       {"type": "null"}]},
    "stop_token_ids": {"type": ["array", "null"], "maxItems": SamplingParams.MAX_STOP_TOKEN_IDS, "items": _INT64},
    "ignore_eos": {"type": "boolean", "default": False},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "return_token_ids": {"type": "boolean", "default": False,
                         "description": "Each choice also carries token_ids (and prompt_token_ids for completions)."},
}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string"},
    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}
_NAME = {"type": "string", "minLength": 1, "description": f"At most {protocol.MAX_NAME_BYTES} UTF-8 bytes."}
_USAGE = {"type": "object", "properties": {k: {"type": "integer"} for k in
                                           ("prompt_tokens", "completion_tokens", "total_tokens")}}

SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"], "description": "The server's exception class, "
                                                                           "internal_error, engine_dead or "
                                                                           "engine_stalled."}}}}},
    "CompletionRequest": {
        "type": "object", "required": ["prompt"], "additionalProperties": True,
        "description": "Unknown fields are ignored; logprobs, echo, suffix, logit_bias and non-zero penalties "
                       "are refused.",
        "properties": {"prompt": {"oneOf": [
            {"type": "string"}, _TOKEN_IDS,
            {"type": "array", "minItems": 1, "maxItems": protocol.MAX_PROMPTS,
             "items": {"oneOf": [{"type": "string"}, _TOKEN_IDS]}}]}, **_SAMPLING}},
    "ChatCompletionRequest": {
        "type": "object", "required": ["messages"], "additionalProperties": True,
        "description": "Unknown fields are ignored; tools, functions, logprobs and non-text response formats "
                       "are refused.",
        "properties": {"messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
                       "add_generation_prompt": {"type": "boolean", "default": True}, **_SAMPLING}},
    "LoadPrefixRequest": {
        "type": "object", "required": ["prefix_name", "prefix_path"],
        "properties": {"prefix_name": _NAME, "prefix_path": {
            "type": "string", "minLength": 1,
            "description": f"A PEFT prefix-tuning adapter directory under a --prefix-dir or --allowed-prefix-root; "
                           f"at most {protocol.MAX_PATH_BYTES} bytes, each component at most "
                           f"{protocol.MAX_NAME_BYTES}."}}},
    "UnloadPrefixRequest": {"type": "object", "required": ["prefix_name"], "properties": {"prefix_name": _NAME}},
    "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _USAGE,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"},
            "finish_reason": {"type": ["string", "null"]}}}}}},
    "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _USAGE,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": {"type": ["string", "null"]},
            "message": {"type": "object", "properties": {"role": {"const": "assistant"},
                                                         "content": {"type": "string"}}}}}}}},
    "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "owned_by": {"type": "string"},
            "root": {"type": "string", "description": "The base model's name, or the prefix's directory "
                                                      "relative to its root."},
            "parent": {"type": ["string", "null"]}, "max_model_len": {"type": "integer"}}}}}},
    "LoadPrefixResponse": {"type": "object", "properties": {
        "status": {"const": "ok"}, "prefix_name": {"type": "string"},
        "prefix_path": {"type": "string", "description": "Relative to its root."},
        "num_virtual_tokens": {"type": "integer"}}},
    "UnloadPrefixResponse": {"type": "object", "properties": {"status": {"const": "ok"},
                                                              "prefix_name": {"type": "string"}}},
    "EngineState": {"type": "object", "description": "Integrity check, KV block and request counts."},
}

_STATUS_TEXT = {
    400: "Bad parameters, a body that is not a UTF-8 JSON object, a malformed or too long prompt, name or path.",
    401: "--api-key is set and the Bearer token is missing or wrong.",
    403: "The prefix path lies outside the allowed roots, or a file in it links outside them.",
    404: "`model` or `prefix_name` names no base model or registered prefix.",
    413: f"The body is {protocol.MAX_BODY_BYTES >> 20} MiB or more.",
    500: "PrefixLoadError: the request's prefix is registered but its file can no longer be read.",
    503: "The engine process has stopped (engine_dead) or has not reported for --stall-timeout seconds "
         "(engine_stalled).",
    504: "The request did not finish within --request-timeout seconds and was aborted.",
}


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    ok: dict  # the 200 response's content: {media type: {"schema": ...}}
    errors: tuple[int, ...]
    request: str | None = None  # the request body's schema name
    public: bool = False  # no API key needed


def _json(schema: str) -> dict:
    return {_JSON: {"schema": _ref(schema)}}


_GENERATE = (400, 401, 404, 413, 500, 503, 504)
ROUTES: dict[tuple[str, str], RouteDoc] = {
    ("POST", "/v1/completions"): RouteDoc(
        "Complete one or more prompts (OpenAI completions); `stream` answers as server-sent events.",
        {_JSON: {"schema": _ref("Completion")}, "text/event-stream": {"schema": {"type": "string"}}},
        _GENERATE, "CompletionRequest"),
    ("POST", "/v1/chat/completions"): RouteDoc(
        "Answer a conversation rendered with the model's chat template (OpenAI chat completions).",
        {_JSON: {"schema": _ref("ChatCompletion")}, "text/event-stream": {"schema": {"type": "string"}}},
        _GENERATE, "ChatCompletionRequest"),
    ("GET", "/v1/models"): RouteDoc("List the base model and every registered prefix.", _json("ModelList"),
                                    (401, 503, 504)),
    ("POST", "/v1/load_prefix"): RouteDoc("Register (or replace) a prefix from an adapter directory under an "
                                          "allowed root.", _json("LoadPrefixResponse"),
                                          (400, 401, 403, 413, 503, 504), "LoadPrefixRequest"),
    ("POST", "/v1/unload_prefix"): RouteDoc("Unregister a prefix; running requests on it finish normally.",
                                            _json("UnloadPrefixResponse"), (400, 401, 404, 413, 503, 504),
                                            "UnloadPrefixRequest"),
    ("GET", "/health"): RouteDoc("200 while the engine process runs and its loop reports; else 503.",
                                 {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}, (503,),
                                 public=True),
    ("GET", "/metrics"): RouteDoc("Prometheus metrics (docs/metrics.md).",
                                  {"text/plain": {"schema": {"type": "string"}}}, (401,)),
    ("GET", "/openapi.json"): RouteDoc("This document.", {_JSON: {"schema": {"type": "object"}}}, (401,)),
    ("GET", "/docs"): RouteDoc("The routes of this document as a plain HTML page.",
                               {"text/html": {"schema": {"type": "string"}}}, (401,)),
    ("GET", "/debug/engine_state"): RouteDoc("Integrity check and block counts (only with --debug-endpoints).",
                                             _json("EngineState"), (401, 503, 504)),
}


def document(routes: list[tuple[str, str]], version: str) -> dict:
    """The OpenAPI document of the registered (method, path) routes; raises KeyError for an undocumented one."""
    paths: dict[str, dict] = {}
    for method, path in routes:
        doc = ROUTES.get((method, path))
        if doc is None:
            raise KeyError(f"route {method} {path} has no entry in engine/serving/openapi.py ROUTES")
        responses = {"200": {"description": "OK", "content": doc.ok}}
        for status in doc.errors:
            responses[str(status)] = {"description": _STATUS_TEXT[status], "content": _json("Error")}
        operation = {"summary": doc.summary, "operationId": f"{method.lower()}{path.replace('/', '_')}",
                     "responses": responses}
        if doc.request is not None:
            operation["requestBody"] = {"required": True, "content": _json(doc.request)}
        if doc.public:
            operation["security"] = []
        paths.setdefault(path, {})[method.lower()] = operation
    return {"openapi": "3.1.0",
            "info": {"title": "prefix-serve", "version": version,
                     "description": "An OpenAI-compatible server for PEFT prefix-tuned models. Choose a prefix by "
                                    "putting its name in `model`. Every error has the body "
                                    "#/components/schemas/Error."},
            "paths": paths, "security": [{"bearer": []}],
            "components": {"schemas": SCHEMAS,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def docs_page(spec: dict) -> str:
    """A plain HTML listing of the document's routes (no scripts, nothing fetched from elsewhere)."""
    rows = "".join(f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                   f"<td>{html.escape(operation['summary'])}</td>"
                   f"<td>{', '.join(sorted(operation['responses']))}</td></tr>"
                   for path, operations in spec["paths"].items() for method, operation in operations.items())
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>prefix-serve API</title></head><body>"
            "<h1>prefix-serve API</h1><p>The machine-readable description is <a href=\"/openapi.json\">"
            "/openapi.json</a> (OpenAPI 3.1). Every route but /health needs <code>Authorization: Bearer KEY</code> "
            "when the server has an API key.</p><table border=\"1\"><tr><th>method</th><th>route</th>"
            f"<th>what it does</th><th>statuses</th></tr>{rows}</table></body></html>")
