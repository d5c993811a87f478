"""Executors: where workers live. In-process (one worker, for tests and debugging), local processes ("mp", one per
tensor-parallel rank, no Ray needed) or Ray actors (one per rank, in one placement group).

The engine hands an executor one `StepMessage` per step; the executor encodes it once and gives the same bytes
to every worker it runs (mp: one pipe write per rank; Ray: one object put), so the cost of a step's message does
not grow with the number of workers. Every rank answers every step; rank 0's answer is the result. A rank that
dies or raises fails the step with `WorkerFailedError` at once (the executor watches every rank, so no hang
while the others wait in a collective), and the executor stops the other ranks. Ray is imported only by the Ray
executor, so `import engine` works without it.

A step is submitted, then its result collected: `execute` does both, and async scheduling submits step k+1 before
it collects step k (the engine's `step`). Workers run steps in the order they were submitted, each to its end
before the next, which is what lets the engine hand out blocks that a step still in flight reads or writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import traceback
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from engine.model_spec import ModelSpec
from engine.step_messages import StepMessage, StepResult, WorkerInfo
from workers.worker import Worker, WorkerConfig

logger = logging.getLogger("prefix_serve.executor")
EXECUTORS = ("inprocess", "mp", "ray")
PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
_OK, _FAILED = b"\x00", b"\x01"  # the first byte of a rank's answer
PLACEMENT_TIMEOUT_S = 300  # how long the Ray executor waits for its ranks' bundles (an autoscaler may add nodes)


class WorkerFailedError(RuntimeError):
    """A worker died or raised; the engine cannot go on (its KV cache and step are lost)."""


class WorkerStartupError(RuntimeError):
    """A worker could not start (model load, device, process group); nothing was served."""


class Executor(ABC):
    """Runs steps on its workers, in the order they are submitted. `info` holds what they reported at start-up (the
    fewest blocks of any rank)."""

    info: WorkerInfo

    def execute(self, message: StepMessage) -> StepResult:
        """Run one step and wait for its result (no other step may be in flight)."""
        return StepResult.decode(self._execute(message.encode()))

    def _execute(self, step: bytes) -> bytes:
        self._submit(step)
        return self._collect()

    def submit(self, message: StepMessage) -> None:
        """Hand a step to every worker without waiting for it."""
        self._submit(message.encode())

    def collect(self) -> StepResult:
        """The result of the oldest step submitted and not yet collected; waits for it."""
        return StepResult.decode(self._collect())

    @abstractmethod
    def _submit(self, step: bytes) -> None:
        """Send one encoded step to every worker."""

    @abstractmethod
    def _collect(self) -> bytes:
        """The encoded result of rank 0 (which samples) for the oldest step in flight."""

    def shutdown(self) -> None:
        pass


def _combined_info(infos: list[bytes]) -> WorkerInfo:
    """Every rank uses the same block ids, so the engine manages the fewest blocks any rank has. The weight bytes
    are the largest any rank holds (rank 0, which keeps the LM head)."""
    decoded = [WorkerInfo.decode(info) for info in infos]
    return WorkerInfo(min(info.num_blocks for info in decoded), decoded[0].attention_backend,
                      max(info.weight_bytes for info in decoded))


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class InProcessExecutor(Executor):
    """One worker in this process. `threaded` (async scheduling) runs it in a thread of its own, so that a step is
    worked on while the engine's thread schedules the next one: on a GPU the worker thread waits for the device
    (without the GIL) while the engine's host work runs. Without it a step runs inside `submit`."""

    def __init__(self, config: WorkerConfig, spec: ModelSpec, threaded: bool = False):
        self.worker = Worker(config, spec)
        self.info = WorkerInfo.decode(self.worker.info())
        self._answers: deque = deque()  # without a thread: the results not yet collected
        self._thread = None
        if threaded:
            self._steps, self._results = queue.SimpleQueue(), queue.SimpleQueue()
            self._thread = threading.Thread(target=self._serve, args=(_current_cuda_device(config.device),),
                                            name="prefix-serve-worker", daemon=True)
            self._thread.start()

    def _submit(self, step: bytes) -> None:
        if self._thread is not None:
            self._steps.put(step)
        else:
            self._answers.append(self.worker.execute(step))

    def _collect(self) -> bytes:
        if self._thread is None:
            return self._answers.popleft()
        answer, error = self._results.get()
        if error is not None:
            raise error  # the worker's own exception, as without a thread
        return answer

    def _serve(self, cuda_device: int | None) -> None:
        """The worker thread: run steps in order until told to stop (None). An exception is handed to `collect`."""
        if cuda_device is not None:  # the current device is per thread: keep the engine thread's
            import torch

            torch.cuda.set_device(cuda_device)
        while (step := self._steps.get()) is not None:
            try:
                self._results.put((self.worker.execute(step), None))
            except Exception as exc:  # noqa: BLE001 - raised again in the engine's thread
                self._results.put((None, exc))

    def shutdown(self) -> None:
        if self._thread is not None:
            self._steps.put(None)
            self._thread.join(timeout=30)
            self._thread = None


def _current_cuda_device(device: str) -> int | None:
    import torch

    return torch.cuda.current_device() if str(device).startswith("cuda") and torch.cuda.is_available() else None


# ---- local processes ---------------------------------------------------------------------------------------------

def _rank_device(device: str, rank: int) -> str:
    """One GPU per rank when there are enough (cuda:rank), else ranks share them round-robin; CPU stays CPU."""
    import torch

    if not str(device).startswith("cuda"):
        return device
    count = torch.cuda.device_count()
    return f"cuda:{rank % count}" if count else device


def _mp_worker_main(config: WorkerConfig, spec: ModelSpec, rank: int, init_method: str, backend: str, conn) -> None:
    """A rank's process: join the group, build the worker, report its info, then answer steps until the pipe
    closes. Every answer starts with _OK or _FAILED."""
    import torch

    from workers.parallel import cpu_threads_per_rank, init_process_group

    try:
        config = dataclasses.replace(config, device=_rank_device(config.device, rank))
        if not str(config.device).startswith("cuda"):
            torch.set_num_threads(cpu_threads_per_rank(config.tensor_parallel_size))
        else:
            torch.cuda.set_device(config.device)
        if config.tensor_parallel_size > 1:
            init_process_group(init_method, rank, config.tensor_parallel_size, backend)
        worker = Worker(config, spec, rank)
        conn.send_bytes(_OK + worker.info())
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which names the rank
        traceback.print_exc()
        conn.send_bytes(_FAILED + _failure(exc).encode())
        return
    # Answers are written from a thread of their own, so this rank reads the next step while its last answer is
    # still being written: with async scheduling the driver writes step k+1 before it reads step k's answer, and
    # two messages larger than the pipe's buffer would otherwise block both ends.
    with ThreadPoolExecutor(1, thread_name_prefix="prefix-serve-answers") as answers:
        while True:
            try:
                step = conn.recv_bytes()
            except (EOFError, OSError):  # the driver is gone
                return
            try:
                result = worker.execute(step)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                answers.submit(conn.send_bytes, _FAILED + _failure(exc).encode())
                return
            answers.submit(_send_answer, conn, _OK + (result if rank == 0 else b""))


def _send_answer(conn, answer: bytes) -> None:
    try:
        conn.send_bytes(answer)
    except (BrokenPipeError, OSError):  # the driver is gone; the next read ends the loop
        pass


class MultiprocExecutor(Executor):
    """One spawned process per rank, joined by a file rendezvous (no port to pick). Steps go down one pipe per
    rank and answers come back the same way; the driver waits on the pipes and the processes together, so a
    rank that dies is seen at once."""

    def __init__(self, config: WorkerConfig, spec: ModelSpec):
        import multiprocessing

        import torch

        from workers.parallel import collective_backend

        context = multiprocessing.get_context("spawn")
        size = config.tensor_parallel_size
        gpus = torch.cuda.device_count() if str(config.device).startswith("cuda") else 0
        if 0 < gpus < size:
            logger.warning("%d ranks share %d GPU(s) round-robin and talk through gloo (NCCL refuses two ranks on one "
                           "GPU): fine for checks, slow for serving.", size, gpus)
        backend = collective_backend(config.device, gpus >= size)
        self._tmp = tempfile.mkdtemp(prefix="prefix-serve-tp-")
        init_method = f"file://{os.path.join(self._tmp, 'rendezvous')}"
        self._conns, self._procs = [], []
        for rank in range(size):
            parent, child = context.Pipe()
            proc = context.Process(target=_mp_worker_main, args=(config, spec, rank, init_method, backend, child),
                                   name=f"prefix-serve-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            self.info = _combined_info(self._gather(WorkerStartupError))
        except BaseException:
            self.shutdown(wait=False)
            raise

    def _submit(self, step: bytes) -> None:
        try:
            for conn in self._conns:
                conn.send_bytes(step)
        except (BrokenPipeError, OSError) as exc:
            self.shutdown(wait=False)
            raise WorkerFailedError(f"a model worker process is gone: {exc}") from None

    def _collect(self) -> bytes:
        return self._gather(WorkerFailedError)[0]

    def _gather(self, error: type[Exception]) -> list[bytes]:
        """Every rank's answer; the first failure or death stops all ranks and raises `error`."""
        from multiprocessing.connection import wait

        answers: dict[int, bytes] = {}
        while len(answers) < len(self._conns):
            waiting = [rank for rank in range(len(self._conns)) if rank not in answers]
            ready = set(wait([self._conns[r] for r in waiting] + [self._procs[r].sentinel for r in waiting]))
            for rank in waiting:
                conn, proc = self._conns[rank], self._procs[rank]
                if conn in ready or (proc.sentinel in ready and conn.poll()):
                    try:
                        answer = conn.recv_bytes()
                    except (EOFError, OSError):
                        answer = _FAILED + f"its pipe closed (exit code {proc.exitcode})".encode()
                    if answer[:1] != _OK:
                        self.shutdown(wait=False)
                        raise error(f"model worker rank {rank} failed: {answer[1:].decode(errors='replace')}")
                    answers[rank] = answer[1:]
                elif proc.sentinel in ready:
                    code = proc.exitcode
                    self.shutdown(wait=False)
                    raise error(f"model worker rank {rank} died (exit code {code}) before it answered.")
        return [answers[rank] for rank in range(len(self._conns))]

    def shutdown(self, wait: bool = True) -> None:
        """Stop every rank: closing its pipe ends its loop; a rank that does not exit in time (or at once when
        `wait` is False, after a failure, since the others may be stuck in a collective) is killed."""
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            if wait:
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        self._conns, self._procs = [], []
        shutil.rmtree(self._tmp, ignore_errors=True)


# ---- Ray ---------------------------------------------------------------------------------------------------------

class _WorkerActor:
    """The Ray actor: a thin shell around a plain Worker, built once the rank has joined its group."""

    def __init__(self):
        self.worker = None

    def rendezvous(self) -> str:
        """A TCP address on this actor's node for the group's rendezvous (called on rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        return f"tcp://{host}:{port}"

    def start(self, config: WorkerConfig, spec: ModelSpec, rank: int, init_method: str) -> bytes:
        from workers.parallel import collective_backend, init_process_group

        if config.tensor_parallel_size > 1:  # each actor has a GPU of its own (num_gpus=1) or is on CPU
            backend = collective_backend(config.device, one_gpu_per_rank=True)
            init_process_group(init_method, rank, config.tensor_parallel_size, backend)
        self.worker = Worker(config, spec, rank)
        return self.worker.info()

    def execute(self, step: bytes) -> bytes:
        return self.worker.execute(step)


class RayExecutor(Executor):
    """One actor per rank in one placement group: the caller's, when it runs inside one (a Ray Serve replica
    that reserved the ranks' bundles), else one made here with one bundle per rank."""

    def __init__(self, config: WorkerConfig, spec: ModelSpec, placement_strategy: str = "STRICT_PACK"):
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=False)
        self._ray = ray
        self.actors, self._remove = [], None
        self._in_flight: deque[list] = deque()  # per step submitted and not collected: its calls, one per rank
        size = config.tensor_parallel_size
        on_gpu = str(config.device).startswith("cuda")
        if on_gpu and ray.cluster_resources().get("GPU", 0) < size:
            # not an error: an autoscaling cluster (KubeRay) adds GPU nodes when an actor asks for one
            logger.warning("The Ray cluster has fewer than %d GPUs now; the model workers wait until they join. "
                           "With no autoscaler, start GPU nodes or use device 'cpu'.", size)
        if on_gpu:
            config = dataclasses.replace(config, device="cuda")  # Ray sets CUDA_VISIBLE_DEVICES
        bundle = {"CPU": 1, "GPU": 1} if on_gpu else {"CPU": 1}
        self._group, own = get_current_placement_group(), False
        if self._group is None:
            self._group, own = placement_group([bundle] * size, strategy=placement_strategy), True
        self._remove = remove_placement_group if own else None
        try:
            ray.get(self._group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources()
            self.shutdown()
            raise WorkerStartupError(
                f"Ray could not place {size} worker bundles of {bundle} ({placement_strategy}) within "
                f"{PLACEMENT_TIMEOUT_S} s; the cluster has {free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} "
                "GPUs free. Add nodes, lower tensor_parallel_size, or try placement_strategy PACK or SPREAD."
            ) from None
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0)(_WorkerActor)
        self.actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self._group, placement_group_bundle_index=rank if own else -1)).remote() for rank in range(size)]
        try:
            init_method = ray.get(self.actors[0].rendezvous.remote())
            infos = self._gather([actor.start.remote(config, spec, rank, init_method)
                                  for rank, actor in enumerate(self.actors)], WorkerStartupError)
            self.info = _combined_info(infos)
        except BaseException:
            self.shutdown()
            raise

    def _submit(self, step: bytes) -> None:
        ref = self._ray.put(step)  # one copy in the object store, whatever the number of ranks
        # an actor runs one caller's calls in the order they were made, one at a time
        self._in_flight.append([actor.execute.remote(ref) for actor in self.actors])

    def _collect(self) -> bytes:
        return self._gather(self._in_flight.popleft(), WorkerFailedError)[0]

    def _gather(self, refs: list, error: type[Exception]) -> list:
        """Every rank's answer, taken as they come, so a failed rank is seen while the others wait for it."""
        ray = self._ray
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a dead actor or a raised step
                rank = refs.index(ready[0])
                self.shutdown()
                cause = getattr(exc, "cause", None) or exc
                raise error(f"model worker rank {rank} failed: {_failure(cause)}") from None
        return ray.get(refs)

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._remove is not None:
            self._remove(self._group)
            self._remove = None


def make_executor(kind: str, config: WorkerConfig, spec: ModelSpec, placement_strategy: str = "STRICT_PACK",
                  threaded: bool = False) -> Executor:
    """`threaded`: the in-process worker runs in a thread of its own (async scheduling); the others always run
    apart from the engine."""
    if kind == "inprocess":
        return InProcessExecutor(config, spec, threaded)
    if kind == "mp":
        return MultiprocExecutor(config, spec)
    if kind == "ray":
        return RayExecutor(config, spec, placement_strategy)
    raise ValueError(f"Unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}.")
