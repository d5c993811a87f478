"""Sequences as the scheduler sees them: tokens, how many are computed, and which prefix they hang off.

Indices count in the sequence's KV stream, which starts with the prefix's P virtual tokens. So a prefixed
sequence starts with `num_computed_tokens = P` (its prefix is already in the cache), and its first prompt token
has index P, which is also its position id (PEFT starts a request's positions at P).

With async scheduling a step's sampled tokens reach the host one step late: until then they count as
`num_pending`, part of the stream (the workers have them, and the next step computes them) but not yet in
`token_ids`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.peft_format import stream_index
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One user request; it owns `params.n` sequences once its prompt is prefilled."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    prefix: str | None
    num_prefix_tokens: int
    prefix_name: str | None = None  # the user's name; `prefix` is the cache key of its registration
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    prefix_ready_time: float | None = None  # when its prefix was staged for it, if it had to wait for a read
    prefix_wait: float | None = None  # seconds from arrival to its prefix being ready, set at first admission
    sequences: list["Sequence"] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.status is SequenceStatus.FINISHED for seq in self.sequences) and (
            len(self.sequences) == self.params.n or any(s.finish_reason in ("abort", "error") for s in self.sequences))


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    token_ids: list[int]  # prompt + output, without the prefix
    sample_index: int = 0  # which of the request's n samples this is
    num_computed_tokens: int = 0  # KV-stream index of the first token not yet in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    needs_fork: bool = False  # the request wants n > 1 and this sequence has not been forked yet
    fork_ids: list[int] = field(default_factory=list)  # seq ids reserved for the n - 1 forked samples
    num_pending: int = 0  # output tokens sampled by steps in flight, not yet read by the host (async scheduling)

    @property
    def num_prefix_tokens(self) -> int:
        return self.request.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        """Length of the KV stream: prefix + prompt + output, including the output tokens still in flight."""
        return stream_index(self.num_prefix_tokens, len(self.token_ids) + self.num_pending)

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, including those in flight."""
        return len(self.token_ids) + self.num_pending - len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.request.prompt_token_ids):]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def restart(self) -> None:
        """Wait with nothing of its own in the cache (on arrival, or preempted to be recomputed): only the prefix
        counts as computed."""
        self.num_computed_tokens = stream_index(self.num_prefix_tokens, 0)
        self.status = SequenceStatus.WAITING
