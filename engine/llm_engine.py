"""EngineCore: owns the scheduler, the prefixes and the executor, and turns steps into outputs.

A step reads: schedule -> execute on the workers -> update sequences and emit outputs. Prefix registrations
live in `PrefixLifecycle`, stop checks and output building in `OutputProcessor`.

Async scheduling (`EngineConfig.async_scheduling`) splits execute into submit and collect, and submits step k+1
before it collects step k, so that the host's work (scheduling, messages, stop checks, outputs) overlaps the
workers'. Step k's bookkeeping is done when it is submitted: computed counts advance, and the tokens it samples
count as pending (`Sequence.num_pending`); the workers feed them to step k+1 from their own copy of each
sequence. Step k's tokens reach the host when it is collected, one step late: a sequence that stopped in step k
was placed in step k+1 too, and its token from there is discarded. Two kinds of step are collected before the
next is scheduled, because what comes next depends on their result: one that materializes a prefix (a failed
load fails its requests and must be read again from the file) and one that forks an n > 1 request's samples.
The output is token for token that of one step at a time (tests/test_async_scheduling.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import InvalidPromptError, InvalidSamplingParamsError, PrefixServeError, PromptTooLongError
from engine.model_loader import resolve_model_path
from engine.model_spec import ModelSpec
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.prefix_lifecycle import PrefixLifecycle
from engine.prefix_registry import PrefixRegistry
from engine.sampling_params import SamplingParams
from engine.step_messages import (PrefixFetch, PrefixLoad, SamplingSettings, ScheduledSequence, SequenceState,
                                  StepMessage, StepResult, fork_children)
from scheduler.block_manager import BlockManager
from scheduler.request import Request, Sequence, SequenceStatus
from scheduler.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from workers.executor import make_executor
from workers.parallel import check_split
from workers.worker import WorkerConfig

logger = logging.getLogger("prefix_serve.engine")
# How long a step with nothing to run but prefix reads in flight waits in the workers for them to finish. The wait
# ends as soon as they are done, so this bounds how late the engine notices new requests (and admits the requests
# of reads that finished early) while a slow read runs.
PREFETCH_POLL_S = 0.1


@dataclass
class EngineStats:
    """Monotonic counters and last-step gauges, read by the metrics exporter."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    preemptions: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_loads: int = 0
    prefix_load_seconds: list[float] = field(default_factory=list)  # drained by the exporter
    # per request on a prefix, at its first admission: seconds from arrival until its prefix was resident or
    # staged (0 when it already was); drained by the exporter
    prefix_wait_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    decode_run_steps: int = 0  # forwards that ran inside decode runs (steps counts each run once)
    # async scheduling: steps collected after the next one was submitted, and steps that had to be collected
    # before the next could be scheduled (a prefix load or a fork)
    overlapped_steps: int = 0
    sync_fallbacks: int = 0


@dataclass
class _InFlight:
    """A step submitted to the workers whose result the engine has not read yet."""

    out: SchedulerOutput
    num_sampled: list[int]  # per scheduled sequence: the tokens this step samples for it (pending until read)
    overlaps: bool  # the next step may be scheduled before this one's result is read


class EngineCore:
    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig

        self.config = config
        self.model_path = resolve_model_path(config.model)
        hf_config = AutoConfig.from_pretrained(self.model_path)
        self.spec = ModelSpec.from_config(hf_config)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.registry = PrefixRegistry(self.spec, list(config.allowed_prefix_roots))
        worker_config = WorkerConfig(
            model_path=self.model_path, device=config.device, dtype=config.resolved_dtype(),
            block_size=config.block_size, num_blocks=config.num_kv_blocks,
            attention_backend=config.attention_backend, cuda_graphs=config.cuda_graphs,
            cuda_graph_sizes=config.cuda_graph_sizes, cuda_graph_memory_mb=config.cuda_graph_memory_mb,
            fused_layers=config.fused_layers, prefix_host_cache_bytes=config.prefix_host_cache_bytes(),
            cpu_kv_cache_bytes=int(config.cpu_kv_cache_gb * (1 << 30)), kv_cache_prefault=config.kv_cache_prefault,
            gpu_memory_utilization=config.gpu_memory_utilization, tensor_parallel_size=config.tensor_parallel_size)
        if config.tensor_parallel_size > 1:  # a bad split is refused here, before any worker starts
            check_split(hf_config, config.tensor_parallel_size)
        self.executor = make_executor(config.resolved_executor(), worker_config, self.spec,
                                      config.placement_strategy, threaded=config.async_scheduling)
        num_blocks = self.executor.info.num_blocks
        self.attention_backend = self.executor.info.attention_backend
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.max_model_len = self._max_model_len(num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.resolved_decode_steps(), self.max_model_len),
                                   self.block_manager)
        self.prefixes = PrefixLifecycle(self.registry, self.block_manager)
        eos_token_ids = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos_token_ids.add(self.tokenizer.eos_token_id)
        self.outputs = OutputProcessor(self.tokenizer, eos_token_ids, self.max_model_len, self.scheduler.finish)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._seq_ids = itertools.count()
        self._stream: set[str] = set()  # requests that want text after every step
        self._in_flight: deque[_InFlight] = deque()  # steps submitted and not collected, oldest first
        self._max_in_flight = 1 if config.async_scheduling else 0  # left in flight when step() returns
        self._outputs_between_steps: list[RequestOutput] = []  # failed reads reported to a message between steps
        # step() reports every request that changed; offline callers that only read finished outputs turn
        # this off and skip building an output per running request per step
        self.emit_unfinished = True

    def _max_model_len(self, num_blocks: int) -> int:
        """A sequence must fit the model's positions and, alone, the KV cache (one block spare for copy-on-write)."""
        config = self.config
        cache_tokens = (num_blocks - 1) * config.block_size
        max_model_len = min(self.spec.max_model_len, config.max_model_len or cache_tokens, cache_tokens)
        if (config.max_model_len or 0) > max_model_len:
            if max_model_len == cache_tokens:
                reason = f"the KV cache holds {cache_tokens} tokens"
            elif max_model_len == self.spec.sliding_window:
                reason = (f"the model attends through a sliding window of {self.spec.sliding_window} tokens, "
                          "served only up to its length")
            else:
                reason = "the model has no more positions"
            logger.warning("max_model_len %d is capped at %d: %s.", config.max_model_len, max_model_len, reason)
        return max_model_len

    # ---- prefixes (see PrefixLifecycle) ---------------------------------------------------------------------
    def load_prefix(self, name: str, path: str, check_path: bool = False) -> None:
        self.prefixes.load(name, path, check_path)
        self._send_forgotten()

    def register_prefix_dir(self, root: str) -> list[str]:
        names = self.prefixes.register_dir(root)
        self._send_forgotten()
        return names

    def unload_prefix(self, name: str) -> None:
        self.prefixes.unload(name)
        self._send_forgotten()

    def _send_forgotten(self) -> None:
        """Tell the workers now, not with the next step, to drop the host copies of retired registrations: an
        idle server may not step again for a long time."""
        forget, unstage = self.prefixes.take_forgotten(), self.scheduler.take_unstaged()
        if not (forget or unstage):
            return
        message = StepMessage(forget_prefixes=forget, unstage=unstage)
        if self._in_flight:  # async scheduling: after the steps in flight; a later step() reads its result
            self._submit(message, SchedulerOutput())
        else:
            # the answer reports the reads that finished meanwhile, as a step's does; the next step returns the
            # outputs of requests whose read failed
            self._outputs_between_steps += self._prefixes_fetched(self.executor.execute(message))

    def prefix_names(self) -> list[str]:
        return self.registry.names()

    # ---- requests -------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidPromptError("This engine was started with skip_tokenizer_init=True: pass prompts as "
                                     "{'prompt_token_ids': [...]}.")
        return self.tokenizer(prompt).input_ids

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, prefix: str | None = None, stream: bool = False) -> None:
        """Validate and queue a request. Errors a user can cause raise a PrefixServeError and change nothing."""
        if request_id in self.requests:
            raise PrefixServeError(f"Request id {request_id!r} is already in use.")
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenize(prompt or "")
        if params.n > self.scheduler.config.max_num_seqs:
            raise InvalidSamplingParamsError(
                f"n={params.n} exceeds max_num_seqs={self.scheduler.config.max_num_seqs}: a request's samples run "
                "in one batch.")
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise InvalidPromptError("The prompt is empty: give at least one token.")
        if any(not isinstance(t, int) or not 0 <= t < self.spec.vocab_size for t in prompt_token_ids):
            raise InvalidPromptError(f"Prompt token ids must be integers in [0, {self.spec.vocab_size}).")
        num_prefix_tokens, key = 0, None
        if prefix is not None:
            key, num_prefix_tokens = self.prefixes.resolve(prefix)
        total = num_prefix_tokens + len(prompt_token_ids)
        if total + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"The prompt has {len(prompt_token_ids)} tokens and the prefix {num_prefix_tokens}; together "
                f"with one generated token that exceeds the maximum context of {self.max_model_len} tokens.")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:  # refused, as vLLM does, not capped
            raise InvalidSamplingParamsError(
                f"max_tokens={params.max_tokens} and the prompt's {len(prompt_token_ids)} tokens exceed the maximum "
                f"context of {self.max_model_len} tokens: set max_tokens to at most "
                f"{self.max_model_len - len(prompt_token_ids)} or shorten the prompt.")
        request = Request(request_id, prompt, prompt_token_ids, params, key, num_prefix_tokens, prefix_name=prefix)
        seq = Sequence(next(self._seq_ids), request, list(prompt_token_ids), needs_fork=params.n > 1,
                       fork_ids=[next(self._seq_ids) for _ in range(params.n - 1)])
        request.sequences.append(seq)
        self.requests[request_id] = request
        if key is not None:
            self.prefixes.hold(key)
        if stream:
            self._stream.add(request_id)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.sequences:
            self.scheduler.finish(seq, "abort")
        self._forget(request)
        if not self.requests:  # an idle engine may not step again soon: drop a read no one waits for now
            self._send_forgotten()

    def _forget(self, request: Request) -> None:
        """A finished or aborted request leaves the engine: counted, and its prefix released."""
        if self.requests.pop(request.request_id, None) is None:
            return  # already gone
        self._stream.discard(request.request_id)
        self._count_finished(request)
        if request.prefix is not None:
            self.prefixes.release(request.prefix)

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, a step in flight to collect (async scheduling), or the outputs of requests that failed
        between steps, which the next step returns: the loop steps on."""
        return bool(self.requests or self._in_flight or self._outputs_between_steps)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> update. Returns outputs of requests that changed.

        Execute is submit, then collect: one step at a time, each step is collected at once. With async
        scheduling one step stays in flight, and a step() collects the step before the one it submitted. When
        nothing can run but prefix reads (and no step is in flight), it waits in the workers for the reads."""
        outputs, self._outputs_between_steps = self._outputs_between_steps, []
        submitted = False
        if self._in_flight and not self._in_flight[-1].overlaps:
            self.stats.sync_fallbacks += 1  # what may be scheduled next depends on the step in flight
        else:
            scheduled = self.scheduler.schedule()
            if not scheduled.scheduled and not self._in_flight and self.scheduler.num_fetching:
                outputs += self._wait_for_prefixes(scheduled)  # only prefix reads to wait for
                scheduled = self.scheduler.schedule()
            message = self._step_message(scheduled)
            if message is not None:
                self._submit(message, scheduled)
                submitted = True
        if len(self._in_flight) > self._max_in_flight or (self._in_flight and not submitted):
            outputs += self._collect()
        return outputs

    def _submit(self, message: StepMessage, out: SchedulerOutput) -> None:
        """Send a step and do its bookkeeping now, as if it had run: computed counts advance, and the tokens it
        samples are pending until it is collected."""
        num_sampled = []
        for item in out.scheduled:
            seq = item.seq
            samples = seq.num_uncomputed == item.num_tokens  # its last token is computed: it samples the next
            num_sampled.append(item.num_steps if samples else 0)
            seq.num_computed_tokens += item.num_tokens * item.num_steps
            seq.num_pending += num_sampled[-1]
        # a prefix load may fail, and a fork adds sequences: what follows depends on the result
        overlaps = not out.prefix_loads and not any(n and item.seq.needs_fork
                                                    for item, n in zip(out.scheduled, num_sampled))
        self.executor.submit(message)
        self._in_flight.append(_InFlight(out, num_sampled, overlaps))

    def _collect(self) -> list[RequestOutput]:
        """Read the oldest step's result: the prefix reads it reports, its tokens, stop checks and outputs."""
        step = self._in_flight.popleft()
        result = self.executor.collect()
        out = step.out
        for item, num_sampled in zip(out.scheduled, step.num_sampled):
            item.seq.num_pending -= num_sampled
        outputs = self._prefixes_fetched(result)
        if not out.scheduled:  # only sequences or prefixes to forget, or reads to start
            return outputs
        self.stats.overlapped_steps += bool(self._in_flight)
        outputs += self._fail_prefix_loads(out, result.failed_loads) if result.failed_loads else []
        return outputs + self._update(out, result)

    def collect_in_flight(self) -> list[RequestOutput]:
        """Read the steps in flight (async scheduling) without scheduling another, so that no worker runs after."""
        outputs = []
        while self._in_flight:
            outputs += self._collect()
        return outputs

    def _wait_for_prefixes(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Nothing can run until a prefix read finishes: send what this schedule produced and wait in the
        workers, briefly, for the reads to finish (no busy polling)."""
        message = self._step_message(out) or StepMessage()
        message.wait_s = PREFETCH_POLL_S
        return self._prefixes_fetched(self.executor.execute(message))

    def _prefixes_fetched(self, result: StepResult) -> list[RequestOutput]:
        """Reads reported done make their requests admissible; a failed read fails the requests waiting for it."""
        if not (result.fetched or result.failed_fetches):
            return []
        doomed = self.scheduler.prefixes_fetched(result.fetched, result.failed_fetches)
        now = time.monotonic()
        outputs = []
        for request in {seq.request.request_id: seq.request for seq in doomed}.values():
            if request.request_id in self.requests:
                outputs.append(self._fail_request(request, result.failed_fetches[request.prefix], now))
        return outputs

    def _fail_request(self, request: Request, reason: str, now: float) -> RequestOutput:
        """Finish a request whose prefix could not be read, with the error its client sees."""
        path = self.prefixes.path(request.prefix)  # read first: the request's end may retire the key
        logger.error("prefix %s (%s) could not be read: %s", request.prefix, path, reason)
        for seq in request.sequences:
            self.scheduler.finish(seq, "error")
        output = self._output(request, now)
        output.error = f"The prefix {request.prefix_name!r} could not be loaded from {path}: {reason}"
        return output

    def _step_message(self, out: SchedulerOutput) -> StepMessage | None:
        """What the workers need for this step: only what changed (None when nothing did)."""
        forget = self.prefixes.take_forgotten()
        if not (out.scheduled or out.dropped_seq_ids or forget or out.prefetch or out.unstage):
            return None
        tables = self.block_manager.tables
        seqs = []
        for item in out.scheduled:
            seq = item.seq
            entry = ScheduledSequence(seq.seq_id, item.num_tokens)
            if item.is_new:
                entry.state = SequenceState(
                    seq.token_ids, len(seq.request.prompt_token_ids), seq.num_prefix_tokens, seq.num_computed_tokens,
                    tables[seq.seq_id], SamplingSettings.of(seq.request.params), seq.sample_index,
                    seq.fork_ids if seq.needs_fork else [], seq.request.prefix)
            elif item.table_from < len(tables[seq.seq_id]):
                entry.table_from, entry.table_tail = item.table_from, tables[seq.seq_id][item.table_from:]
            if item.num_steps != out.num_steps:
                entry.num_steps = item.num_steps  # leaves the run after its first num_steps forwards
            seqs.append(entry)
        loads = [PrefixLoad(e.name, self.prefixes.path(e.name), e.block_ids, e.num_tokens) for e in out.prefix_loads]
        fetches = [PrefixFetch(key, self.prefixes.path(key), num_tokens) for key, num_tokens in out.prefetch]
        return StepMessage(seqs, out.dropped_seq_ids, loads, [[c.src, c.dst] for c in out.copies], out.num_steps,
                           forget, fetches, out.unstage)

    def _fail_prefix_loads(self, out: SchedulerOutput, failed: dict[str, str]) -> list[RequestOutput]:
        """Fail the requests whose prefix the worker could not materialize (it left their sequences out), and
        drop the prefix's blocks, so the next request that names it reads its file again."""
        now = time.monotonic()
        outputs = []
        for key, reason in failed.items():
            for item in out.scheduled:
                request = item.seq.request
                if item.is_new and request.prefix == key and request.request_id in self.requests:
                    outputs.append(self._fail_request(request, reason, now))
            self.block_manager.evict_prefix(key)  # no sequence holds it any more
        return outputs

    def _update(self, out: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        now = time.monotonic()
        stats = self.stats
        stats.steps += 1
        if out.num_steps > 1:
            stats.decode_run_steps += out.num_steps
        stats.preemptions += out.num_preempted
        stats.prefix_loads += len(out.prefix_loads)
        stats.prefix_load_seconds.extend(result.load_seconds)
        admitted_on_prefix = 0
        for item in out.scheduled:
            if item.is_new and item.seq.request.prefix is not None:
                admitted_on_prefix += 1
                if item.seq.request.prefix_wait is None:
                    self._record_prefix_wait(item.seq)
        # an admission that had to materialize its prefix is a miss; every other one found it resident
        stats.prefix_misses += len(out.prefix_loads)
        stats.prefix_hits += admitted_on_prefix - len(out.prefix_loads)
        by_id = {item.seq.seq_id: item.seq for item in out.scheduled}
        changed: dict[str, Request] = {}
        for seq_id, tokens in result.sampled:
            seq = by_id[seq_id]
            if seq.status is SequenceStatus.FINISHED:
                # its request failed this step (_fail_prefix_loads); or, with async scheduling, it was aborted or
                # stopped in the step before: its token is one too many
                continue
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
                stats.prompt_tokens += len(request.prompt_token_ids)
            if out.num_steps > 1:  # a decode run: one token per forward, the ones after a stop are discarded
                kept, stopped = self.outputs.append_run(seq, tokens)
                stats.generation_tokens += kept
            else:  # one step: the first token, and at a forking prompt's end one more per forked sample
                new_seqs = [seq, *self._fork(seq, tokens[1:])] if seq.needs_fork else [seq]
                seq.token_ids.append(tokens[0])
                stats.generation_tokens += len(new_seqs)
                stopped = False
                for s in new_seqs:
                    stopped |= self.outputs.check_stop(s)
            if self.emit_unfinished or (stopped and request.finished) or request.request_id in self._stream:
                changed[request.request_id] = request
        return [self._output(r, now) for r in changed.values()]

    def _record_prefix_wait(self, seq: Sequence) -> None:
        """A request's first admission: how long it waited for its prefix (failed requests are not counted)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        request = seq.request
        ready = request.prefix_ready_time if request.prefix_ready_time is not None else request.arrival_time
        request.prefix_wait = max(0.0, ready - request.arrival_time)
        self.stats.prefix_wait_seconds.append(request.prefix_wait)

    def _fork(self, parent: Sequence, first_tokens: list[int]) -> list[Sequence]:
        children = []
        for child_id, offset, token in fork_children(parent.fork_ids, first_tokens):
            child = Sequence(child_id, parent.request, parent.token_ids + [token], sample_index=offset,
                             num_computed_tokens=parent.num_computed_tokens)
            self.scheduler.add_running_fork(parent, child)
            parent.request.sequences.append(child)
            children.append(child)
        parent.needs_fork = False
        return children

    def _output(self, request: Request, now: float) -> RequestOutput:
        output = self.outputs.make_output(request, now,
                                          want_text=request.finished or request.request_id in self._stream)
        if output.finished:
            self._forget(request)
        return output

    def _count_finished(self, request: Request) -> None:
        reasons = {seq.finish_reason for seq in request.sequences}
        reason = next(r for r in ("error", "abort", "length", "stop") if r in reasons or r == "stop")
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    # ---- checks ---------------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self._in_flight.clear()
