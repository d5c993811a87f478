"""The engine <-> worker contract: typed step messages, encoded once per step by `engine.wire`.

One `StepMessage` goes to every worker (every tensor-parallel rank gets the same bytes); each step carries only
what changed. The worker answers with a `StepResult` (only the rank that samples has tokens to report) and, once
at start-up, describes itself with a `WorkerInfo`.

Order inside a step: forget prefixes and sequences, drop the `unstage`d reads, start the `prefetch` reads (in
the background), materialize `prefix_loads`, make the copy-on-write `copies`, then run the forward(s) over
`seqs`, in batch order; last, when nothing ran and `wait_s` is set, wait up to that long for the reads to finish,
and report the reads that finished since the last step (`fetched`, `failed_fetches`). `num_steps` > 1 is a decode run of that many forwards,
each sequence taking part in the first `num_steps` of them given in its entry (all of them when None).

A prefix that could not be materialized (its file unreadable or replaced by now) is named in
`StepResult.failed_loads`: the new sequences that start on it are left out of the step (not remembered, not
run), and the engine fails their requests. Everything else in the step runs as usual.

Prefetch: a prefix on neither the device nor the worker's host tier is read from disk off the step path. The
engine names it in `prefetch`; each worker reads its own slice in a background thread into a staging area and
holds it there (whatever the host tier's budget) until a `prefix_loads` entry materializes it or `unstage` /
`forget_prefixes` drops it. The engine admits the requests on that prefix only after rank 0 reported it in
`fetched`; a rank whose own read is still running when the load arrives waits for it. A failed read is named in
`failed_fetches` and its requests fail; the engine unstages it, so the next request that names it reads again.

A contract module: it imports nothing else of the project but the codec and the sampling parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import wire
from engine.sampling_params import SamplingParams

VERSION = 7


class _Message:
    """A top-level message: encoded whole, with this module's version."""

    __slots__ = ()

    def encode(self) -> bytes:
        return wire.encode(self, VERSION)

    @classmethod
    def decode(cls, data: bytes):
        return wire.decode(data, VERSION, cls)


@dataclass(slots=True)
class SamplingSettings:
    """What a worker needs to sample a sequence's tokens."""

    temperature: float  # 0: greedy
    top_p: float
    top_k: int
    seed: int | None

    @staticmethod
    def of(params: SamplingParams) -> "SamplingSettings":
        return SamplingSettings(0.0 if params.greedy else float(params.temperature), float(params.top_p),
                                int(params.top_k), params.seed)


@dataclass(slots=True)
class SequenceState:
    """A sequence's whole state, sent when the worker has none for it (new, or resumed after preemption)."""

    tokens: list[int]  # prompt + output so far, without the prefix
    prompt_len: int
    prefix_len: int
    num_computed: int  # KV-stream index of the first token not in the cache
    block_table: list[int]
    sampling: SamplingSettings
    sample_index: int  # which of the request's n samples
    fork_ids: list[int]  # at the prompt's end, fork n - 1 samples with these ids
    prefix: str | None  # the prefix key it starts on (its blocks are at the head of block_table)


def fork_children(fork_ids: list[int], first_tokens: list[int]) -> list[tuple[int, int, int]]:
    """(child id, sample-index offset, first token) of each sample an n > 1 request forks at its prompt's end.

    The prompt's last forward samples n tokens: the first is the parent's, the k-th (k >= 1) starts child k,
    which shares the parent's prompt and blocks. Engine and worker both fork with this, so they agree."""
    return [(child_id, k, token) for k, (child_id, token) in enumerate(zip(fork_ids, first_tokens), start=1)]


@dataclass(slots=True)
class ScheduledSequence:
    seq_id: int
    num_tokens: int  # tokens this step (in a decode run: 1 per forward)
    state: SequenceState | None = None  # set when the worker has no state for it
    table_from: int | None = None  # the block table changed from this entry on: it now ends with table_tail
    table_tail: list[int] | None = None
    num_steps: int | None = None  # in a decode run: takes part in only the first num_steps forwards


@dataclass(slots=True)
class PrefixLoad:
    """Materialize a prefix's KV (read from its adapter) into these blocks."""

    key: str
    path: str
    block_ids: list[int]
    num_tokens: int


@dataclass(slots=True)
class PrefixFetch:
    """Start reading a prefix's KV from its adapter into the worker's staging area, in the background."""

    key: str
    path: str
    num_tokens: int


@dataclass(slots=True)
class StepMessage(_Message):
    seqs: list[ScheduledSequence] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)  # finished, aborted or preempted sequences: forget them
    prefix_loads: list[PrefixLoad] = field(default_factory=list)
    copies: list[list[int]] = field(default_factory=list)  # [src_block, dst_block], after the loads
    num_steps: int = 1
    forget_prefixes: list[str] = field(default_factory=list)  # unloaded or replaced: drop any host or staged copy
    prefetch: list[PrefixFetch] = field(default_factory=list)
    unstage: list[str] = field(default_factory=list)  # no request waits for these reads any more: drop them
    wait_s: float = 0.0  # nothing to run: wait up to this long for the prefetches to finish (no busy polling)


@dataclass(slots=True)
class StepResult(_Message):
    # [seq_id, tokens]: one token, or n at the end of a prompt whose request forks n samples, or one per forward
    # the sequence took part in, in a decode run
    sampled: list[list] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    failed_loads: dict[str, str] = field(default_factory=dict)  # prefix key -> why it could not be materialized
    # prefetches staged since the last step, ready to load -> seconds since the read finished (the time a request
    # waited for its prefix ends then, not when the step that saw it ends)
    fetched: dict[str, float] = field(default_factory=dict)
    failed_fetches: dict[str, str] = field(default_factory=dict)  # prefetches whose read failed -> why


@dataclass(slots=True)
class WorkerInfo(_Message):
    """What a worker tells the engine once it is up. With several ranks the engine takes the fewest blocks."""

    num_blocks: int  # KV blocks the engine may hand out
    attention_backend: str  # the backend the worker chose (or was told to use)
    weight_bytes: int = 0  # the model weights this worker holds (with tensor parallelism: its shard)
