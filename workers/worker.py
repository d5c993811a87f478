"""Worker: owns one device's model runner and KV cache, and mirrors the state of the sequences it runs.

It is a plain object: the in-process executor calls it directly and the Ray executor wraps it in an actor.
Both hand it the encoded `StepMessage` of `engine.step_messages` and get back an encoded `StepResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from engine.errors import InvalidConfigError
from engine.model_spec import ModelSpec
from engine.peft_format import token_index
from engine.step_messages import (PrefixLoad, SamplingSettings, ScheduledSequence, SequenceState, StepMessage,
                                  StepResult, WorkerInfo, fork_children)
from workers.attention import default_backend_name
from workers.cuda_graphs import CudaGraphConfig
from workers.host_allocator import retain_freed_memory
from workers.kv_cache import HostPrefixCache, KVCache, extend_slots, host_memory_bytes, read_prefix_kv, slot_of
from workers.model_runner import ModelRunner, StepInputs, load_model
from workers.parallel import ShardPlan, broadcast_from_first
from workers.prefix_fetch import PrefixFetcher, describe_failure
from workers.sampler import SampleRow, greedy_tokens, sample, sample_on_device


@dataclass
class WorkerConfig:
    model_path: str
    device: str
    dtype: str
    block_size: int
    num_blocks: int | None  # None: size the cache from memory (see kv_cache_num_blocks)
    attention_backend: str | None  # None: the best one for the device, chosen where the worker runs
    # EngineConfig's fields of the same names, checked there; no defaults here, so each has one (EngineConfig's)
    cuda_graphs: str
    cuda_graph_sizes: tuple[int, ...] | None
    cuda_graph_memory_mb: float
    fused_layers: str
    prefix_host_cache_bytes: int | None = 0  # None: a quarter of this host's memory, at most 64 GiB
    cpu_kv_cache_bytes: int = 2 << 30
    kv_cache_prefault: bool = False  # CPU: write every page of the KV cache at startup
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1  # ranks of one model; each worker is one rank (workers/parallel.py)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


logger = logging.getLogger("prefix_serve.worker")


class Worker:
    """One rank of the model. With tensor parallelism its process group is already up (the executor starts it):
    it holds its heads' shard of the weights and of every KV block, runs every step with the other ranks, and
    rank 0 samples and shares the tokens."""

    def __init__(self, config: WorkerConfig, spec: ModelSpec, rank: int = 0):
        self.rank = rank
        self.full_spec = spec  # the whole model's shape; prefix files hold every KV head
        self.shard = None
        if config.tensor_parallel_size > 1:
            from transformers import AutoConfig

            self.shard = ShardPlan.of(AutoConfig.from_pretrained(config.model_path), rank,
                                      config.tensor_parallel_size)
            spec = self.shard.local_spec(spec)  # this rank's heads: its KV cache and attention see only these
            config = self._eager_only(config)
        self.config = config
        self.spec = spec
        if str(config.device).startswith("cuda") and not torch.cuda.is_available():
            fix = ("Install a CUDA build of torch" if torch.version.cuda is None
                   else "Check CUDA_VISIBLE_DEVICES and the NVIDIA driver")
            raise InvalidConfigError(f"device {config.device!r} asks for a GPU, but this torch ({torch.__version__}) "
                                     f"sees none. {fix}, or use device 'cpu'.")
        if not str(config.device).startswith("cuda"):
            retain_freed_memory()  # a CPU step's large tensors reuse the last step's pages (host_allocator.py)
        dtype = _dtype(config.dtype)
        model = load_model(config.model_path, dtype, config.device, self.shard)
        num_blocks = config.num_blocks or self._num_blocks_from_memory(dtype)
        # One block more than the engine manages: the model runner's scratch block, which the padding rows of a
        # CUDA-graph decode batch write to. kv_cache.num_blocks stays the count the engine may hand out.
        self.kv_cache = KVCache(spec, num_blocks + 1, config.block_size, dtype, config.device,
                                prefault=config.kv_cache_prefault)
        self.kv_cache.num_blocks = num_blocks
        # Chosen here, not in the engine: a Ray worker may see a GPU that the engine's process does not.
        self.attention_backend = config.attention_backend or default_backend_name(config.device)
        graphs = CudaGraphConfig(config.cuda_graphs, config.cuda_graph_sizes, config.cuda_graph_memory_mb)
        self.runner = ModelRunner(model, spec, self.kv_cache, self.attention_backend, scratch_block=num_blocks,
                                  cuda_graphs=graphs, fused_layers=config.fused_layers, computes_logits=rank == 0)
        budget = config.prefix_host_cache_bytes
        if budget is None:
            budget = min(host_memory_bytes() // 4, 64 << 30)
        self.host_prefixes = HostPrefixCache(budget, pin=str(config.device).startswith("cuda"))
        self.fetcher = PrefixFetcher(self._read_prefix, self.host_prefixes)
        self.seqs: dict[int, SequenceState] = {}  # what the engine sent, kept current as tokens are added

    def _eager_only(self, config: WorkerConfig) -> WorkerConfig:
        """Tensor-parallel ranks run Hugging Face's layers eagerly: the fused layers and the CUDA graphs do not
        contain the all-reduces yet."""
        if str(config.device).startswith("cuda") and self.rank == 0 and "off" not in (config.cuda_graphs,
                                                                                     config.fused_layers):
            logger.info("tensor_parallel_size %d: CUDA graphs and fused layers are off; every step runs eagerly.",
                        config.tensor_parallel_size)
        return dataclasses.replace(config, cuda_graphs="off", fused_layers="off")

    def _num_blocks_from_memory(self, dtype: torch.dtype) -> int:
        """CPU: a fixed budget. CUDA: what is left of gpu_memory_utilization x total after the weights load,
        keeping a margin for activations."""
        per_block = KVCache.bytes_per_block(self.spec, self.config.block_size, dtype)
        if str(self.config.device).startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            used = total - free
            activations = 2 << 30
            budget = int(total * self.config.gpu_memory_utilization) - used - activations
        else:
            budget = self.config.cpu_kv_cache_bytes
        if budget < per_block * 4:
            raise RuntimeError(f"Not enough memory for a KV cache: {budget} bytes left, one block needs {per_block}."
                               " Lower the model size or raise gpu_memory_utilization.")
        return budget // per_block

    def info(self) -> bytes:
        return WorkerInfo(self.kv_cache.num_blocks, self.attention_backend, self.runner.weight_bytes).encode()

    def execute(self, data: bytes) -> bytes:
        """Run one step (see `engine.step_messages` for what it holds and in which order it is done)."""
        msg = StepMessage.decode(data)
        for seq_id in msg.drop:
            self.seqs.pop(seq_id, None)
        self._stage_prefixes(msg)
        result = StepResult()
        for load in msg.prefix_loads:
            try:
                result.load_seconds.append(self._materialize_prefix(load))
            except Exception as exc:  # noqa: BLE001 - the requests on this prefix fail; the step goes on
                result.failed_loads[load.key] = describe_failure(exc)
        if self.shard is not None and msg.prefix_loads:
            self._agree_on_failed_loads(msg.prefix_loads, result.failed_loads)
        self.kv_cache.copy_blocks(msg.copies)
        entries = msg.seqs
        if result.failed_loads:
            entries = [e for e in entries if not (e.state is not None and e.state.prefix in result.failed_loads)]
        scheduled = [self._update_state(entry) for entry in entries]
        if scheduled and msg.num_steps > 1:
            result.sampled = self._run_decode(scheduled, [entry.num_steps or msg.num_steps for entry in entries])
        elif scheduled:
            result.sampled = self._run(scheduled)
        self._report_fetches(result, wait_s=0.0 if scheduled else msg.wait_s)
        return result.encode()

    def _stage_prefixes(self, msg: StepMessage) -> None:
        """Drop the host and staged copies the engine no longer wants, then start this step's prefix reads in the
        background (unstage before prefetch: a key may be dropped and asked for again in one message)."""
        for key in msg.forget_prefixes:
            self.host_prefixes.discard(key)
            self.fetcher.discard(key)
        for key in msg.unstage:
            self.fetcher.discard(key)
        for fetch in msg.prefetch:
            self.fetcher.prefetch(fetch.key, fetch.path, fetch.num_tokens)

    def _report_fetches(self, result: StepResult, wait_s: float) -> None:
        """Report the reads that finished. A step that ran nothing may first wait (up to `wait_s`) for them, so
        an engine whose only work is a read in flight does not spin."""
        if wait_s:
            self.fetcher.wait(wait_s)
        result.fetched, result.failed_fetches = self.fetcher.completed()

    def _read_prefix(self, path: str, num_tokens: int) -> torch.Tensor:
        """This rank's slice of a prefix's KV from its file (called in the fetcher's threads)."""
        kv = read_prefix_kv(path, self.full_spec, self.kv_cache.data.dtype)
        if kv.shape[2] != num_tokens:  # the file was replaced since it was registered
            raise ValueError(f"its tensor holds {kv.shape[2]} virtual tokens, but it was registered with {num_tokens}")
        if self.shard is not None:  # this rank's KV heads only
            kv = kv[:, :, :, self.shard.kv_heads.start: self.shard.kv_heads.stop].contiguous()
        return kv

    def _materialize_prefix(self, load: PrefixLoad) -> float:
        start = time.perf_counter()
        kv = self.fetcher.take(load.key, load.path, load.num_tokens)
        self.kv_cache.write_prefix(kv, load.block_ids)
        return time.perf_counter() - start

    def _update_state(self, entry: ScheduledSequence) -> tuple[int, SequenceState, int]:
        if entry.state is not None:
            state = self.seqs[entry.seq_id] = entry.state
        else:
            state = self.seqs[entry.seq_id]
            if entry.table_from is not None:
                del state.block_table[entry.table_from:]
                state.block_table.extend(entry.table_tail)
        return entry.seq_id, state, entry.num_tokens

    def _run(self, scheduled: list[tuple[int, SequenceState, int]]) -> list:
        block_size = self.config.block_size
        step = StepInputs([], [], [], [], [], [], [])
        ids, positions, slots = step.input_ids, step.positions, step.slot_mapping
        to_sample: list[tuple[int, SequenceState]] = []
        rows: list[SampleRow | None] = []
        for seq_id, state, num_new in scheduled:
            start = state.num_computed  # KV-stream index of the first new token; also its position id
            end = start + num_new
            table = state.block_table
            first = token_index(state.prefix_len, start)
            if num_new == 1:  # decode: the common case, kept free of ranges and generators
                ids.append(state.tokens[first])
                positions.append(start)
                slots.append(slot_of(table, start, block_size))
            else:
                ids.extend(state.tokens[first:first + num_new])
                positions.extend(range(start, end))
                extend_slots(slots, table, start, end, block_size)
            step.query_lens.append(num_new)
            step.seq_lens.append(end)
            step.block_tables.append(table)
            state.num_computed = end
            if token_index(state.prefix_len, end) == len(state.tokens):
                step.sample_rows.append(len(ids) - 1)
                to_sample.append((seq_id, state))
                rows.append(_sample_row(state))
        logits = self.runner.execute(step)
        if not to_sample:
            return []
        sampled = sample(logits, rows) if self.rank == 0 else None
        if self.shard is not None:
            sampled = self._share_samples(sampled, [1 + len(state.fork_ids) for _, state in to_sample])
        results = []
        for (seq_id, state), toks in zip(to_sample, sampled):
            for child_id, offset, token in fork_children(state.fork_ids, toks[1:]):
                # a child of an n > 1 request: the same prompt and blocks, its own first token
                self.seqs[child_id] = SequenceState(
                    state.tokens + [token], state.prompt_len, state.prefix_len, state.num_computed,
                    list(state.block_table), state.sampling, state.sample_index + offset, [], state.prefix)
            state.fork_ids = []
            state.tokens.append(toks[0])
            results.append([seq_id, toks])
        return results

    def _run_decode(self, scheduled: list[tuple[int, SequenceState, int]], lengths: list[int]) -> list:
        """A decode run (see scheduler.py): forwards back to back, each one's input tokens the previous one's
        samples, which stay on the device. Row r takes part in the first lengths[r] forwards, then leaves the
        batch. The host reads the tokens once, at the end."""
        block_size = self.config.block_size
        states = [state for _, state, _ in scheduled]
        active = list(range(len(states)))  # rows in this forward, in batch order
        pick = RunSampler([state.sampling for state in states], self.runner.device)
        first_ids = [state.tokens[token_index(state.prefix_len, state.num_computed)] for state in states]
        tables = [state.block_table for state in states]
        starts = [state.num_computed for state in states]
        ones, rows = [1] * len(states), list(range(len(states)))
        forwards, previous = [], None  # (rows, their sampled tokens on the device) per forward
        ends = set(lengths)  # the forwards before which some rows leave
        for i in range(max(lengths)):
            if i in ends:  # some rows are done: drop them from the batch and their samples
                keep = [j for j, row in enumerate(active) if lengths[row] > i]
                active = [active[j] for j in keep]
                index = torch.tensor(keep).to(previous.device, non_blocking=True)
                previous = previous.index_select(0, index)
                pick = pick.select(index)
                first_ids, tables, starts = ([values[j] for j in keep] for values in (first_ids, tables, starts))
                ones, rows = ones[:len(active)], rows[:len(active)]
            positions = [start + i for start in starts]
            slots = [slot_of(table, p, block_size) for table, p in zip(tables, positions)]
            step = StepInputs(first_ids, positions, slots, ones, [p + 1 for p in positions], tables, rows)
            logits = self.runner.execute(step, input_ids=previous)
            if self.shard is None:
                previous = pick(logits)
            else:  # rank 0 samples; the tokens reach the other ranks on the device, not through the host
                previous = pick(logits) if self.rank == 0 else torch.empty(len(active), dtype=torch.long,
                                                                           device=self.runner.device)
                previous = broadcast_from_first(previous)
            forwards.append((active, previous))
        # the one device sync of the run
        if len(active) == len(states):  # every row ran every forward
            per_row = torch.stack([tokens for _, tokens in forwards], dim=1).tolist()
        else:
            flat = torch.cat([tokens for _, tokens in forwards]).tolist()
            per_row = [[] for _ in states]
            at = 0
            for members, _ in forwards:
                for row, token in zip(members, flat[at: at + len(members)]):
                    per_row[row].append(token)
                at += len(members)
        results = []
        for (seq_id, state, _), toks in zip(scheduled, per_row):
            state.tokens.extend(toks)
            state.num_computed += len(toks)
            results.append([seq_id, toks])
        return results


    def _agree_on_failed_loads(self, loads: list[PrefixLoad], failed: dict[str, str]) -> None:
        """A prefix that failed to load on any rank counts as failed on all of them, so that every rank leaves out
        the same sequences and their forwards stay in step (a file replaced between two ranks' reads)."""
        import torch.distributed as dist

        flags = torch.tensor([load.key in failed for load in loads], dtype=torch.int32, device=self.runner.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for load, flag in zip(loads, flags.tolist()):
            if flag and load.key not in failed:
                failed[load.key] = "it failed to load on another tensor-parallel rank"

    def _share_samples(self, sampled: list[list[int]] | None, counts: list[int]) -> list[list[int]]:
        """Rank 0's sampled tokens (`counts[i]` for row i) on every rank, in one broadcast."""
        flat = torch.empty(sum(counts), dtype=torch.long, device=self.runner.device)
        if self.rank == 0:
            flat.copy_(torch.tensor([token for toks in sampled for token in toks]))
        flat = broadcast_from_first(flat).tolist()
        out, at = [], 0
        for count in counts:
            out.append(flat[at: at + count])
            at += count
        return out


class RunSampler:
    """logits -> tokens on the device for a decode run: argmax when every row is greedy, else per-row
    temperature / top-k / top-p (the scheduler puts no seeded sampling row in a run)."""

    def __init__(self, settings: list[SamplingSettings], device: torch.device):
        self.greedy = all(s.temperature == 0 for s in settings)
        if self.greedy:
            return
        assert all(s.seed is None or s.temperature == 0 for s in settings), "seeded row in a decode run"
        # once per run, from pageable memory: the driver stages the source before the call returns
        self.temperature, self.top_k, self.top_p = (
            torch.tensor([getattr(s, key) for s in settings], dtype=dtype).to(device, non_blocking=True)
            for key, dtype in (("temperature", torch.float32), ("top_k", torch.long), ("top_p", torch.float32)))
        self.filtered = any(s.temperature != 0 and (s.top_k > 0 or s.top_p < 1) for s in settings)

    def select(self, index: torch.Tensor) -> "RunSampler":
        """This sampler for the rows `index` (a device tensor) only, without a trip through the host."""
        if not self.greedy:
            self.temperature, self.top_k, self.top_p = (t.index_select(0, index)
                                                        for t in (self.temperature, self.top_k, self.top_p))
        return self

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return greedy_tokens(logits)
        return sample_on_device(logits, self.temperature, self.top_k, self.top_p, self.filtered)


def _sample_row(state: SequenceState) -> SampleRow | None:
    """None for a plain greedy row (the sampler's fast path); otherwise the row's sampling settings."""
    s = state.sampling
    if s.temperature == 0 and not state.fork_ids:
        return None
    return SampleRow(s.temperature, s.top_p, s.top_k, s.seed, state.sample_index,
                     len(state.tokens) - state.prompt_len, 1 + len(state.fork_ids))
