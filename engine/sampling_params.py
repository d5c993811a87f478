"""SamplingParams: how to pick each next token, with the same fields and meanings as vLLM's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidSamplingParamsError, quote


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stop_strings: list[str] = field(init=False, repr=False)
    # stop_token_ids as the engine checks each generated token against them: in O(1), however many there are
    stop_token_id_set: frozenset[int] = field(init=False, repr=False, compare=False)

    # Below this, dividing logits by the temperature overflows fp32: such a request samples greedily, as in vLLM.
    MIN_TEMPERATURE = 1e-5
    MAX_INT = 2**63 - 1  # every integer crosses msgpack and torch as an int64
    # every streamed token is checked against each stop string's possible starts: bound that work
    MAX_STOP_STRINGS = 256
    MAX_STOP_CHARS = 4096
    MAX_STOP_TOKEN_IDS = 256  # each step checks every sample's new tokens against them (5 million slowed all 10x)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        self.stop_token_id_set = frozenset(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidSamplingParamsError(msg)

        def is_int(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= self.MAX_INT

        def is_number(value) -> bool:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return False
            try:
                return math.isfinite(value)
            except OverflowError:  # an int beyond any float
                return False

        if not is_int(self.n, 1):
            bad(f"n must be an integer >= 1, got {quote(self.n)}.")
        if not is_int(self.max_tokens, 1):
            bad(f"max_tokens must be an integer >= 1, got {quote(self.max_tokens)}.")
        if not is_number(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0 (0 means greedy), got {quote(self.temperature)}.")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {quote(self.top_p)}.")
        if not is_int(self.top_k, -1):
            bad(f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {quote(self.top_k)}.")
        if self.seed is not None and not is_int(self.seed, 0):
            bad(f"seed must be an integer in [0, 2**63) or None, got {quote(self.seed)}.")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad(f"stop must be a non-empty string or a list of them, got {quote(self.stop)}.")
        if (len(self.stop_strings) > self.MAX_STOP_STRINGS
                or any(len(s) > self.MAX_STOP_CHARS for s in self.stop_strings)):
            longest = max(map(len, self.stop_strings))
            bad(f"stop takes at most {self.MAX_STOP_STRINGS} strings of at most {self.MAX_STOP_CHARS} characters "
                f"each, got {len(self.stop_strings)} strings, the longest {longest} characters.")
        if len(self.stop_token_ids) > self.MAX_STOP_TOKEN_IDS:  # before the per-id check and its message
            bad(f"stop_token_ids takes at most {self.MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}.")
        if any(not is_int(t, 0) for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {quote(self.stop_token_ids)}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < self.MIN_TEMPERATURE

    def to_wire(self) -> dict:
        """The fields a worker needs to sample, as plain msgpack-able values."""
        return {"temperature": 0.0 if self.greedy else float(self.temperature), "top_p": float(self.top_p),
                "top_k": int(self.top_k), "seed": self.seed}
