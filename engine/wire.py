"""The one msgpack codec of the project: versioned messages whose dataclasses travel as arrays of their fields.

Both process boundaries use it: engine -> workers (`engine.step_messages`) and frontend <-> engine process
(`engine.serving.engine_process`). A message is `[version, body]`; `decode` refuses any other version with a
`ProtocolError`, so two sides of different releases fail loudly instead of misreading each other.

A dataclass is encoded as the list of its init fields, in declaration order, and rebuilt by calling the class
with them (so a class that validates in `__post_init__`, like `SamplingParams`, validates again on arrival).
Field types say what to rebuild: a dataclass, `list[D]`, `dict[str, D]` or `D | None` of a dataclass `D`; any
other field (ints, strings, lists of them) is taken as msgpack gives it. Tuples arrive as lists.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

import msgpack

from engine.errors import PrefixServeError


class ProtocolError(RuntimeError):
    """A message has another version or a shape this side cannot read."""


def encode(body, version: int) -> bytes:
    return msgpack.packb([version, body], default=_as_fields, use_bin_type=True)


def decode(data: bytes, version: int, cls: type | None = None):
    """The body of a message of `version`, rebuilt as `cls` when given (else plain msgpack values)."""
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"a message is not valid msgpack: {exc}") from None
    if not (isinstance(message, list) and len(message) == 2):
        raise ProtocolError(f"a message must be [version, body], got {type(message).__name__}")
    if message[0] != version:
        raise ProtocolError(f"message version {message[0]!r}, but this side speaks version {version}")
    return message[1] if cls is None else build(cls, message[1])


def build(cls: type, value):
    """Rebuild a `cls` dataclass from its encoded field list (see the module docstring)."""
    try:
        return _builder(cls)(value)
    except PrefixServeError:  # the class's own validation (bad SamplingParams) stays the user's error
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"a {cls.__name__} message has the wrong shape: {exc}") from None


def _as_fields(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, name) for name in _init_fields(type(obj))]
    raise TypeError(f"cannot encode {type(obj).__name__}")


@functools.cache
def _init_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


@functools.cache
def _builder(tp):
    """A function that rebuilds values of type `tp` from msgpack values, or None when they need nothing."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        converters = tuple(_builder(hints[name]) for name in _init_fields(tp))
        if not any(converters):
            return lambda values: tp(*values)
        return lambda values: tp(*(v if c is None or v is None else c(v) for c, v in zip(converters, values)))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and (item := _builder(args[0])) is not None:
        return lambda values: [item(v) for v in values]
    if origin is dict and len(args) == 2 and (item := _builder(args[1])) is not None:
        return lambda values: {k: item(v) for k, v in values.items()}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _builder(options[0])
    return None
