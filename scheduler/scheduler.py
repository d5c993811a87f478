"""Continuous batching: each step picks which sequences advance by how many tokens, under one token budget.

There are no prefill and decode phases. A sequence only tracks `num_computed_tokens` against `num_tokens`; a
step gives each running sequence what it still lacks (one token when decoding, a chunk when prefilling), then
admits waiting sequences while the budget, `max_num_seqs` and free blocks allow. A prefixed sequence starts with
its prefix already computed, so admitting it costs no prefill for the prefix.

When the running sequences need more blocks than exist, the newest one is preempted: its blocks are freed and
it is recomputed later from its tokens, which gives the same greedy output.

Prefetch: a waiting sequence whose prefix is not resident is admitted only once the workers hold the prefix's KV
staged in host memory. Until then it is passed over, and the sequences behind it are considered, so a slow read
blocks only the requests on that prefix. The first such sequence asks the workers to read the prefix
(`SchedulerOutput.prefetch`); `prefixes_fetched` reports the reads done. Past `max_num_seqs` passed-over
sequences a step stops looking, which bounds the reads one step starts. A staged read is held for the waiting
sequences that need it: until one of them is admitted (it is materialized) or all of them have left (unstaged).

Decode runs: when a step is pure decode (greedy or unseeded sampling) and nothing waiting could be admitted
anyway, the step is stretched to up to `decode_steps` forwards. The worker runs them back to back, each fed the
previous one's sampled tokens on the device, and reports the tokens together. This spreads the host's per-step
work (scheduling, messages, input packing, the wait for sampled tokens) over several tokens. Each sequence takes
part in as many of the run's forwards as its `max_tokens` and the context limit leave it (at least one); it then
drops out of the batch, so one sequence near its end does not shorten the run for the others. A sequence that
stops on a stop token inside a run has its later tokens discarded by the engine.

Async scheduling: the engine may schedule a step while the previous one is still running, so a sequence's
newest tokens may still be in flight (`Sequence.num_pending`). They count as part of the stream, so a decoding
sequence is scheduled its next token at once, fed on the worker from the token it has there. A sequence whose
tokens in flight already reach `max_tokens` or the context limit gets no further step: it finishes when they are
read. One that turns out to have stopped was placed in a step too many; the engine discards that token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from time import monotonic

from scheduler.block_manager import BlockManager, CopyOnWrite, PrefixEntry
from scheduler.request import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    decode_steps: int = 1  # longest decode run (see the module docstring); 1: one token per step
    max_model_len: int | None = None  # a decode run stops short of this many KV-stream tokens


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int
    is_new: bool  # the worker has no state for it yet (first admission or resumed after preemption)
    table_from: int  # block-table entries from here on changed this step
    num_steps: int = 1  # in a decode run: the run's first forwards this sequence takes part in, one token each


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[CopyOnWrite] = field(default_factory=list)
    prefix_loads: list[PrefixEntry] = field(default_factory=list)
    dropped_seq_ids: list[int] = field(default_factory=list)  # finished, aborted or preempted since last step
    num_preempted: int = 0
    num_steps: int = 1  # > 1: a decode run of this many forwards; each sequence advances item.num_steps tokens
    prefetch: list[tuple[str, int]] = field(default_factory=list)  # (prefix key, tokens): start reading these
    unstage: list[str] = field(default_factory=list)  # prefix reads no waiting sequence needs any more


@dataclass
class PrefixFetch:
    """A prefix the workers are reading (or hold staged), and the waiting sequences seen needing it: the read is
    dropped when all of them leave without being admitted, and fails them when it fails."""

    waiters: set[Sequence] = field(default_factory=set)
    ready_at: float | None = None  # when the workers reported it staged (monotonic seconds)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._dropped: list[int] = []
        self._holds_prefix: set[int] = set()
        self.num_preemptions = 0
        self._fetches: dict[str, PrefixFetch] = {}  # prefix key -> its read, from prefetch until materialized
        self._unstage: list[str] = []

    # ---- queue ----------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.restart()
        self.waiting.append(seq)

    def add_running_fork(self, parent: Sequence, child: Sequence) -> None:
        """A child of an n > 1 request shares its parent's blocks and prefix pin from the start."""
        self.block_manager.fork(parent.seq_id, child.seq_id)
        if parent.request.prefix is not None:
            self.block_manager.acquire_prefix(parent.request.prefix, parent.num_prefix_tokens)
            self._holds_prefix.add(child.seq_id)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence (done or aborted) and release everything it holds at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
            self._stop_waiting_for_prefix(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.num_pending and self._reaches_length(seq):  # finishes when its tokens in flight are read
                index += 1
                continue
            num_new = min(seq.num_uncomputed, budget)
            if num_new == 1 and bm.has_room_in_place(seq.seq_id, seq.num_computed_tokens):
                # a decode token that fits its own last block: nothing to allocate, copy or check
                out.scheduled.append(ScheduledSeq(seq, 1, False, len(bm.tables[seq.seq_id])))
                budget -= 1
                index += 1
                continue
            while bm.blocks_needed(seq.seq_id, seq.num_computed_tokens, num_new) > bm.num_available_blocks():
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.scheduled.append(self._advance(seq, num_new, is_new=False, out=out))
                budget -= num_new
                index += 1
        index = passed_over = 0
        while (index < len(self.waiting) and budget > 0 and not out.num_preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[index]
            if seq.num_pending:  # preempted with a token in flight: the host must know its tokens to recompute it
                break
            if not self._prefix_ready(seq, out):  # its prefix is still being read: look at the ones behind it
                index += 1
                passed_over += 1
                if passed_over >= self.config.max_num_seqs:
                    break
                continue
            num_new = min(seq.num_uncomputed, budget)
            if self._admission_cost(seq, num_new) > bm.num_available_blocks(keep_prefix=seq.request.prefix):
                break
            del self.waiting[index]
            self._admit(seq, out)
            out.scheduled.append(self._advance(seq, num_new, is_new=True, out=out))
            budget -= num_new
        if self.config.decode_steps > 1:
            self._stretch_decode(out)
        out.dropped_seq_ids, self._dropped = self._dropped, []
        out.unstage, self._unstage = self._unstage, []
        return out

    # ---- prefix reads ---------------------------------------------------------------------------------------
    def _prefix_ready(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Whether the sequence's prefix is resident or staged in the workers; if neither, its read is started
        (once) and the sequence waits for it."""
        key = seq.request.prefix
        if key is None or self.block_manager.is_resident(key):
            return True
        fetch = self._fetches.get(key)
        if fetch is None:
            fetch = self._fetches[key] = PrefixFetch()
            out.prefetch.append((key, seq.num_prefix_tokens))
        fetch.waiters.add(seq)
        if fetch.ready_at is None:
            return False
        request = seq.request
        if request.prefix_ready_time is None:  # it arrived while the read ran, or after it
            request.prefix_ready_time = max(request.arrival_time, fetch.ready_at)
        return True

    def prefixes_fetched(self, ready: dict[str, float], failed: dict[str, str]) -> list[Sequence]:
        """The workers' report of finished reads (ready key -> seconds since its read finished). Ready prefixes
        become admissible; returns the waiting sequences of the failed ones, which the caller fails (their reads
        are dropped, so a later request reads again)."""
        now = monotonic()
        for key, age in ready.items():
            fetch = self._fetches.get(key)
            if fetch is not None and fetch.ready_at is None:  # None: unstaged meanwhile
                fetch.ready_at = now - age
                for seq in fetch.waiters:
                    if seq.request.prefix_ready_time is None:
                        seq.request.prefix_ready_time = max(seq.request.arrival_time, fetch.ready_at)
        doomed = []
        for key in failed:
            fetch = self._fetches.pop(key, None)
            if fetch is not None:
                doomed.extend(fetch.waiters)
                self._unstage.append(key)
        return doomed

    def _stop_waiting_for_prefix(self, seq: Sequence) -> None:
        """A waiting sequence left (aborted or failed): a read that no one waits for any more is dropped."""
        fetch = self._fetches.get(seq.request.prefix) if seq.request.prefix is not None else None
        if fetch is None or seq not in fetch.waiters:
            return
        fetch.waiters.discard(seq)
        if not fetch.waiters:
            del self._fetches[seq.request.prefix]
            self._unstage.append(seq.request.prefix)

    @property
    def num_fetching(self) -> int:
        """Prefix reads in flight (requested, not yet reported)."""
        return sum(fetch.ready_at is None for fetch in self._fetches.values())

    def take_unstaged(self) -> list[str]:
        """The reads to drop, for a message sent outside a step (an abort on an idle engine)."""
        unstage, self._unstage = self._unstage, []
        return unstage

    def _stretch_decode(self, out: SchedulerOutput) -> None:
        """Turn a pure decode step into a run of up to `decode_steps` tokens per sequence (see above)."""
        if (not out.scheduled or out.num_preempted or out.prefix_loads or out.copies
                or (self.waiting and len(self.running) < self.config.max_num_seqs)):
            return
        limit = self.config.decode_steps
        max_len = self.config.max_model_len
        lengths = []
        for item in out.scheduled:
            seq = item.seq
            params = seq.request.params
            generated = seq.num_generated
            if item.is_new or seq.num_uncomputed != 1 or seq.needs_fork or generated == 0 or (
                    not params.greedy and params.seed is not None):
                # a seeded row draws from its own generator on the host, token by token; a prompt's last token
                # (a prefill chunk of one) samples the first output token, which must not wait for a run's end
                return
            # the tokens it may still generate: this step's first one is already within both bounds
            length = min(limit, params.max_tokens - generated)
            if max_len is not None:
                length = min(length, max_len - seq.num_tokens)
            lengths.append(max(length, 1))
        steps = max(lengths)
        if steps < 2:
            return
        # The first token's slot is private already (found in place, or copied, and a copy cancels the run); the
        # others fall in the same block or in new ones. So a run needs only whole new blocks, no copies.
        bm = self.block_manager
        needs = [bm.blocks_needed(item.seq.seq_id, item.seq.num_computed_tokens, length)
                 for item, length in zip(out.scheduled, lengths)]
        if sum(needs) > bm.num_available_blocks():
            return
        for item, length, need in zip(out.scheduled, lengths, needs):
            item.num_steps = length
            if need:
                result = bm.append_slots(item.seq.seq_id, item.seq.num_computed_tokens, length)
                assert not result.copies
                item.table_from = min(item.table_from, result.table_from)
        out.num_steps = steps

    def _reaches_length(self, seq: Sequence) -> bool:
        """Whether the sequence's tokens, counting those in flight, reach `max_tokens` or the context limit."""
        max_len = self.config.max_model_len
        return seq.num_generated >= seq.request.params.max_tokens or (max_len is not None and
                                                                     seq.num_tokens >= max_len)

    def _admission_cost(self, seq: Sequence, num_new: int) -> int:
        bm = self.block_manager
        prefix = seq.request.prefix
        if prefix is None:
            return bm.blocks_needed(None, seq.num_computed_tokens, num_new)
        prefix_blocks = bm.blocks_for(seq.num_prefix_tokens)
        load = 0 if bm.is_resident(prefix) else prefix_blocks
        return load + bm.blocks_needed(None, seq.num_computed_tokens, num_new, prefix_blocks=prefix_blocks)

    def _admit(self, seq: Sequence, out: SchedulerOutput) -> None:
        entry = None
        if seq.request.prefix is not None:
            entry, is_new = self.block_manager.acquire_prefix(seq.request.prefix, seq.num_prefix_tokens)
            self._holds_prefix.add(seq.seq_id)
            if is_new:
                out.prefix_loads.append(entry)
                self._materialized(seq.request.prefix)
        self.block_manager.allocate(seq.seq_id, entry)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _materialized(self, key: str) -> None:
        """The workers take the staged read into KV blocks this step; its other waiters now find it resident."""
        self._fetches.pop(key, None)

    def _advance(self, seq: Sequence, num_new: int, is_new: bool, out: SchedulerOutput) -> ScheduledSeq:
        result = self.block_manager.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
        out.copies.extend(result.copies)
        return ScheduledSeq(seq, num_new, is_new, 0 if is_new else result.table_from)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.restart()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.seq_id in self.block_manager.tables:
            self.block_manager.free(seq.seq_id)
            self._dropped.append(seq.seq_id)
        if seq.seq_id in self._holds_prefix:
            self._holds_prefix.discard(seq.seq_id)
            self.block_manager.release_prefix(seq.request.prefix)

    def check_integrity(self) -> None:
        bm = self.block_manager
        bm.check_integrity()
        assert set(bm.tables) == {s.seq_id for s in self.running}, "block tables do not match running sequences"
