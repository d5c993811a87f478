"""EngineCore: owns the scheduler, the prefix registry and the executor, and turns steps into outputs.

A step reads: schedule -> execute on the workers -> update sequences and emit outputs.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import InvalidPromptError, InvalidSamplingParamsError, PrefixServeError, PromptTooLongError
from engine.model_loader import ModelSpec, resolve_model_path
from engine.outputs import CompletionOutput, RequestOutput
from engine.prefix_registry import PrefixRegistry
from engine.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.request import Request, Sequence, SequenceStatus
from scheduler.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from workers import messages
from workers.executor import make_executor
from workers.worker import WorkerConfig

logger = logging.getLogger("prefix_serve.engine")


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
    steps: int = 0
    decode_run_steps: int = 0  # forwards that ran inside decode runs (steps counts each run once)


class EngineCore:
    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig

        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.spec = ModelSpec.from_config(AutoConfig.from_pretrained(self.model_path))
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.registry = PrefixRegistry(self.spec, list(config.allowed_prefix_roots))
        worker_config = WorkerConfig(
            model_path=self.model_path, device=config.device, dtype=config.resolved_dtype(),
            block_size=config.block_size, num_blocks=config.num_kv_blocks,
            attention_backend=config.attention_backend,
            host_prefix_cache_size=config.resolved_host_prefix_cache_size(),
            cpu_kv_cache_bytes=int(config.cpu_kv_cache_gb * (1 << 30)),
            gpu_memory_utilization=config.gpu_memory_utilization)
        self.executor = make_executor(config.executor, worker_config, self.spec)
        self.attention_backend = self.executor.attention_backend
        self.block_manager = BlockManager(self.executor.num_blocks, config.block_size)
        # A sequence must fit the model's positions and, alone, the KV cache (one block spare for copy-on-write).
        cache_tokens = (self.executor.num_blocks - 1) * config.block_size
        self.max_model_len = min(self.spec.max_model_len, config.max_model_len or cache_tokens, cache_tokens)
        if (config.max_model_len or 0) > self.max_model_len:
            if self.max_model_len == cache_tokens:
                reason = f"the KV cache holds {cache_tokens} tokens"
            elif self.max_model_len == self.spec.sliding_window:
                reason = (f"the model attends through a sliding window of {self.spec.sliding_window} tokens, "
                          "served only up to its length")
            else:
                reason = "the model has no more positions"
            logger.warning("max_model_len %d is capped at %d: %s.", config.max_model_len, self.max_model_len, reason)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.resolved_decode_steps(), self.max_model_len),
                                   self.block_manager)
        self.eos_token_ids = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._seq_ids = itertools.count()
        self._prefix_keys: dict[str, str] = {}  # prefix name -> cache key of its current registration
        self._prefix_paths: dict[str, str] = {}  # cache key -> adapter path (kept while its blocks may be resident)
        self._registrations = itertools.count()
        self._retired: set[str] = set()  # keys of unloaded prefixes whose blocks may still be in use
        self._key_requests: dict[str, int] = {}  # cache key -> unfinished requests on it (running or waiting)
        self._stream: set[str] = set()  # requests that want text after every step
        # step() reports every request that changed; offline callers that only read finished outputs turn
        # this off and skip building an output per running request per step
        self.emit_unfinished = True

    # ---- prefixes -------------------------------------------------------------------------------------------
    def load_prefix(self, name: str, path: str, check_path: bool = False) -> None:
        """Register a PEFT prefix adapter (config and tensor header checked now; its data is read when a request
        first needs it). A failed check raises and changes nothing."""
        if check_path:
            self.registry.check_path_allowed(path)
        info = self.registry.register(name, path, check_tensor=True)  # on failure the old registration stays
        self._retire_prefix(name)
        key = f"{name}#{next(self._registrations)}"
        self._prefix_keys[name] = key
        self._prefix_paths[key] = info.path

    def register_prefix_dir(self, root: str) -> list[str]:
        """Register every adapter subdirectory of `root` lazily (config only; tensors on first use)."""
        names = self.registry.register_dir(root)
        for name in names:
            self._retire_prefix(name)
            key = f"{name}#{next(self._registrations)}"
            self._prefix_keys[name] = key
            self._prefix_paths[key] = self.registry.get(name).path
        return names

    def unload_prefix(self, name: str) -> None:
        """New requests can no longer use it; running ones finish on its blocks, which are freed after them."""
        self.registry.unregister(name)
        self._retire_prefix(name)

    def _retire_prefix(self, name: str) -> None:
        key = self._prefix_keys.pop(name, None)
        if key is not None:
            self._retired.add(key)
            self._evict_retired()

    def _evict_retired(self) -> None:
        """Free the blocks of unloaded or replaced prefixes once no unfinished request needs them. A request
        accepted before the unload still runs on the old registration, even if it waits or was preempted (it
        may have to load the prefix again, from the old path)."""
        for key in list(self._retired):
            if self._key_requests.get(key):
                continue
            self.block_manager.evict_prefix(key)
            if not self.block_manager.is_resident(key):
                self._retired.discard(key)
                del self._prefix_paths[key]
                self.executor.forget_prefix(key)

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
            num_prefix_tokens = self.registry.ensure_tensor_ok(prefix).num_virtual_tokens
            key = self._prefix_keys[prefix]
        total = num_prefix_tokens + len(prompt_token_ids)
        if total + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"The prompt has {len(prompt_token_ids)} tokens and the prefix {num_prefix_tokens}; together "
                f"with one generated token that exceeds the maximum context of {self.max_model_len} tokens.")
        request = Request(request_id, prompt, prompt_token_ids, params, key, num_prefix_tokens, prefix_name=prefix)
        seq = Sequence(next(self._seq_ids), request, list(prompt_token_ids), needs_fork=params.n > 1,
                       fork_ids=[next(self._seq_ids) for _ in range(params.n - 1)])
        request.sequences.append(seq)
        self.requests[request_id] = request
        if key is not None:
            self._key_requests[key] = self._key_requests.get(key, 0) + 1
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

    def _forget(self, request: Request) -> None:
        """A finished or aborted request leaves the engine: counted, and its prefix released."""
        if self.requests.pop(request.request_id, None) is None:
            return  # already gone
        self._stream.discard(request.request_id)
        self._count_finished(request)
        key = request.prefix
        if key is not None:
            self._key_requests[key] -= 1
            if not self._key_requests[key]:
                del self._key_requests[key]
        if self._retired:
            self._evict_retired()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> update. Returns outputs of requests that changed."""
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled and not scheduled.dropped_seq_ids:
            return []
        result = messages.unpack(self.executor.execute(self._step_message(scheduled)))
        if not scheduled.scheduled:  # only sequences to forget (e.g. aborted while nothing else runs)
            return []
        failed = self._fail_prefix_loads(scheduled, result["failed_loads"]) if result.get("failed_loads") else []
        return failed + self._update(scheduled, result)

    def _fail_prefix_loads(self, out: SchedulerOutput, failed: dict[str, str]) -> list[RequestOutput]:
        """Fail the requests whose prefix the worker could not materialize (it left their sequences out), and
        drop the prefix's blocks, so the next request that names it reads its file again."""
        now = time.monotonic()
        outputs = []
        for key, reason in failed.items():
            path = self._prefix_paths.get(key)  # read first: the last request's end may retire the key
            logger.error("prefix %s (%s) could not be materialized: %s", key, path, reason)
            for item in out.scheduled:
                request = item.seq.request
                if item.is_new and request.prefix == key and request.request_id in self.requests:
                    for seq in request.sequences:
                        self.scheduler.finish(seq, "error")
                    output = self._output(request, now)
                    output.error = f"The prefix {request.prefix_name!r} could not be loaded from {path}: {reason}"
                    outputs.append(output)
            self.block_manager.evict_prefix(key)  # no sequence holds it any more
        return outputs

    def _step_message(self, out: SchedulerOutput) -> bytes:
        loads = [{"name": e.name, "path": self._prefix_paths[e.name], "blocks": e.block_ids,
                  "num_tokens": e.num_tokens} for e in out.prefix_loads]
        seqs = []
        for item in out.scheduled:
            seq = item.seq
            entry = {"id": seq.seq_id, "n": item.num_tokens}
            if item.is_new:
                entry.update(new=1, tokens=seq.token_ids, prompt_len=len(seq.request.prompt_token_ids),
                             prefix_len=seq.num_prefix_tokens, computed=seq.num_computed_tokens,
                             table=self.block_manager.tables[seq.seq_id], sampling=seq.request.params.to_wire(),
                             index=seq.sample_index, fork_ids=seq.fork_ids if seq.needs_fork else [],
                             prefix=seq.request.prefix)
            elif item.table_from < len(self.block_manager.tables[seq.seq_id]):
                entry.update(table_from=item.table_from,
                             table_tail=self.block_manager.tables[seq.seq_id][item.table_from:])
            if item.num_steps != out.num_steps:
                entry["k"] = item.num_steps  # leaves the run after its first k forwards
            seqs.append(entry)
        return messages.pack({"drop": out.dropped_seq_ids, "prefix_loads": loads,
                              "copies": [[c.src, c.dst] for c in out.copies], "seqs": seqs,
                              "steps": out.num_steps})

    def _update(self, out: SchedulerOutput, result: dict) -> list[RequestOutput]:
        now = time.monotonic()
        stats = self.stats
        stats.steps += 1
        if out.num_steps > 1:
            stats.decode_run_steps += out.num_steps
        stats.preemptions += out.num_preempted
        stats.prefix_loads += len(out.prefix_loads)
        stats.prefix_load_seconds.extend(result.get("load_seconds", ()))
        admitted_on_prefix = 0
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_tokens * item.num_steps
            admitted_on_prefix += item.is_new and item.seq.request.prefix is not None
        # an admission that had to materialize its prefix is a miss; every other one found it resident
        stats.prefix_misses += len(out.prefix_loads)
        stats.prefix_hits += admitted_on_prefix - len(out.prefix_loads)
        by_id = {item.seq.seq_id: item.seq for item in out.scheduled}
        changed: dict[str, Request] = {}
        for seq_id, tokens in result["sampled"]:
            seq = by_id[seq_id]
            if seq.status is SequenceStatus.FINISHED:  # its request failed this step (_fail_prefix_loads)
                continue
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
                stats.prompt_tokens += len(request.prompt_token_ids)
            if out.num_steps > 1:  # a decode run: one token per step, the ones after a stop are discarded
                stopped = self._take_run(seq, tokens)
            else:  # one step: the first token, and at a forking prompt's end one more per forked sample
                new_seqs = [seq]
                if seq.needs_fork:
                    new_seqs += self._fork(seq, tokens[1:])
                seq.token_ids.append(tokens[0])
                stopped = False
                for s in new_seqs:
                    stats.generation_tokens += 1
                    stopped |= self._check_stop(s)
            if self.emit_unfinished or (stopped and request.finished) or request.request_id in self._stream:
                changed[request.request_id] = request
        return [self._output(r, now) for r in changed.values()]

    def _fork(self, parent: Sequence, first_tokens: list[int]) -> list[Sequence]:
        children = []
        for offset, (child_id, token) in enumerate(zip(parent.fork_ids, first_tokens), start=1):
            child = Sequence(child_id, parent.request, parent.token_ids + [token], sample_index=offset,
                             num_computed_tokens=parent.num_computed_tokens)
            self.scheduler.add_running_fork(parent, child)
            parent.request.sequences.append(child)
            children.append(child)
        parent.needs_fork = False
        return children

    def _take_run(self, seq: Sequence, tokens: list[int]) -> bool:
        """Append a decode run's tokens up to and including the first that stops the sequence; whether one did.

        A run never passes `max_tokens` or the context limit (the scheduler sees to it), so without stop strings
        only a stop token or EOS can end it early, and one `_check_stop` on the last kept token decides."""
        params = seq.request.params
        if params.stop_strings and self.tokenizer is not None:  # text may match at any token: check each
            for token in tokens:
                seq.token_ids.append(token)
                self.stats.generation_tokens += 1
                if self._check_stop(seq):
                    return True
            return False
        stops = params.stop_token_ids if params.ignore_eos else [*params.stop_token_ids, *self.eos_token_ids]
        kept = len(tokens)
        if stops:
            kept = next((i for i, token in enumerate(tokens, start=1) if token in stops), kept)
        seq.token_ids.extend(tokens[:kept])
        self.stats.generation_tokens += kept
        return self._check_stop(seq)

    def _check_stop(self, seq: Sequence) -> bool:
        """Finish the sequence if its newest token ends it; returns whether it did."""
        params = seq.request.params
        token = seq.token_ids[-1]
        reason, stop_reason = None, None
        if token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif params.stop_strings and self.tokenizer is not None:
            reason, stop_reason = self._find_stop_string(seq)
        if reason is None:
            num_tokens = len(seq.token_ids)
            if (num_tokens - len(seq.request.prompt_token_ids) >= params.max_tokens
                    or num_tokens + seq.request.num_prefix_tokens >= self.max_model_len):
                reason = "length"
            else:
                return False
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)
        if not isinstance(stop_reason, str):
            seq.output_text = self._decode(seq)
        return True

    def _find_stop_string(self, seq: Sequence) -> tuple[str | None, str | None]:
        """Look for a stop string near the end of the output; decode all of it only when one may be there."""
        stops = seq.request.params.stop_strings
        window = max(map(len, stops)) + 4  # every token decodes to at least one character, mostly
        tail = self.tokenizer.decode(seq.output_token_ids[-window:], skip_special_tokens=True)
        if not any(stop in tail for stop in stops):
            return None, None
        text = self._decode(seq)
        hits = [(text.find(stop), stop) for stop in stops if stop in text]
        cut, stop = min(hits)
        seq.output_text = text[:cut]
        return "stop", stop

    def _decode(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)

    def _output(self, request: Request, now: float) -> RequestOutput:
        finished = request.finished
        want_text = finished or request.request_id in self._stream
        completions = []
        for seq in sorted(request.sequences, key=lambda s: s.sample_index):
            text = seq.output_text if seq.status is SequenceStatus.FINISHED else (
                self._decode(seq) if want_text else "")
            completions.append(CompletionOutput(seq.sample_index, text, list(seq.output_token_ids),
                                                seq.finish_reason, seq.stop_reason))
        output = RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, finished,
                               prefix=request.prefix_name,
                               metrics={"arrival_time": request.arrival_time,
                                        "first_token_time": request.first_token_time, "now": now})
        if finished:
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
