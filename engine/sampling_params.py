"""SamplingParams: how to pick each next token, with the same fields and meanings as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidSamplingParamsError


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

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidSamplingParamsError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}.")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer or None, got {self.seed!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad(f"stop must be a non-empty string or a list of them, got {self.stop!r}.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_wire(self) -> dict:
        """The fields a worker needs to sample, as plain msgpack-able values."""
        return {"temperature": float(self.temperature), "top_p": float(self.top_p),
                "top_k": int(self.top_k), "seed": self.seed}
