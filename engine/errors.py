"""Named exceptions for every error a user can cause.

Each one carries a message that says what went wrong and what to do about it. The HTTP server maps them to
OpenAI-style error bodies by their `http_status`. A message quotes what the user sent through `quote`, so a
10 MB value never makes a 10 MB message or log line.
"""

import reprlib

QUOTE_LIMIT = 200  # characters of a user's value that a message quotes

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = QUOTE_LIMIT
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 16


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to about `limit` characters, at a cost bounded by `limit` (not by the value's size).
    Like repr, it escapes lone surrogates, so the result can always be logged and encoded."""
    try:
        text = _repr.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


class PrefixServeError(Exception):
    """Base class for user-facing errors."""

    http_status = 400


class InvalidSamplingParamsError(PrefixServeError, ValueError):
    """A SamplingParams field is out of range."""


class InvalidConfigError(PrefixServeError, ValueError):
    """An engine setting (LLM(...) argument or server option) is out of range or names nothing that exists."""


class UnknownPrefixError(PrefixServeError, KeyError):
    """A request names a prefix that is not registered."""

    http_status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PrefixLoadError(PrefixServeError):
    """A registered prefix's adapter could not be read when a request needed it (its file was removed or
    damaged after registration). Only the requests that needed it fail; the next one tries the file again."""

    http_status = 500


class InvalidAdapterError(PrefixServeError, ValueError):
    """An adapter directory is not a usable PEFT prefix-tuning adapter (wrong type, corrupt, pickled)."""


class AdapterMismatchError(InvalidAdapterError):
    """A prefix adapter's shape does not match the base model (layers, KV heads, head dim)."""


class PromptTooLongError(PrefixServeError, ValueError):
    """Prefix plus prompt does not fit the model's context, or could never fit in the KV cache."""


class UnsupportedModelError(PrefixServeError, ValueError):
    """The base model's architecture is not one prefix-serve supports."""


class PrefixPathError(PrefixServeError, ValueError):
    """A prefix path from a request lies outside the configured prefix roots."""

    http_status = 403


class InvalidPromptError(PrefixServeError, ValueError):
    """A prompt is empty or holds token ids outside the vocabulary."""


class RequestTimeoutError(PrefixServeError):
    """A request did not finish within the server's request deadline (--request-timeout); it was aborted."""

    http_status = 504
