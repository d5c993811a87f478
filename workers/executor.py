"""Executors: where workers live. In-process for tests and debugging, or Ray actors, one per device.

The engine hands an executor one `StepMessage` per step; the executor encodes it once and gives the same bytes
to every worker it runs, so the cost of a step's message does not grow with the number of workers. Ray is
imported only by the Ray executor, so `import engine` works without it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from engine.model_spec import ModelSpec
from engine.step_messages import StepMessage, StepResult, WorkerInfo
from workers.worker import Worker, WorkerConfig

logger = logging.getLogger("prefix_serve.executor")


class Executor(ABC):
    """Runs a step on its workers. `info` holds what they reported at start-up."""

    info: WorkerInfo

    def execute(self, message: StepMessage) -> StepResult:
        return StepResult.decode(self._execute(message.encode()))

    @abstractmethod
    def _execute(self, step: bytes) -> bytes:
        """Run one encoded step on every worker; returns the encoded result of the one that samples."""

    def shutdown(self) -> None:
        pass


class InProcessExecutor(Executor):
    def __init__(self, config: WorkerConfig, spec: ModelSpec):
        self.worker = Worker(config, spec)
        self.info = WorkerInfo.decode(self.worker.info())

    def _execute(self, step: bytes) -> bytes:
        return self.worker.execute(step)


class _WorkerActor:
    """The Ray actor: a thin shell around a plain Worker."""

    def __init__(self, config: WorkerConfig, spec: ModelSpec):
        self.worker = Worker(config, spec)

    def info(self) -> bytes:
        return self.worker.info()

    def execute(self, step: bytes) -> bytes:
        return self.worker.execute(step)


class RayExecutor(Executor):
    def __init__(self, config: WorkerConfig, spec: ModelSpec):
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=False)
        on_gpu = str(config.device).startswith("cuda")
        if on_gpu and ray.cluster_resources().get("GPU", 0) < 1:
            # not an error: an autoscaling cluster (KubeRay) adds GPU nodes when an actor asks for one
            logger.warning("The Ray cluster has no GPU now; the model worker waits until one joins. With no "
                           "autoscaler, start a GPU node or use device 'cpu'.")
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0)(_WorkerActor)
        if on_gpu:
            config = WorkerConfig(**{**config.__dict__, "device": "cuda"})  # Ray sets CUDA_VISIBLE_DEVICES
        self._ray = ray
        self.actor = actor_cls.remote(config, spec)
        self.info = WorkerInfo.decode(ray.get(self.actor.info.remote()))

    def _execute(self, step: bytes) -> bytes:
        return self._ray.get(self.actor.execute.remote(step))

    def shutdown(self) -> None:
        self._ray.kill(self.actor)


def make_executor(kind: str, config: WorkerConfig, spec: ModelSpec) -> Executor:
    if kind == "inprocess":
        return InProcessExecutor(config, spec)
    if kind == "ray":
        return RayExecutor(config, spec)
    raise ValueError(f"Unknown executor {kind!r}; choose 'inprocess' or 'ray'.")
