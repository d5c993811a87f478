"""Executors: where workers live. In-process for tests and debugging, or Ray actors, one per device.

Both take the engine's step as msgpack bytes and return the worker's result as bytes, so the engine cannot
tell them apart. Ray is imported only by the Ray executor, so `import engine` works without it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from engine.model_loader import ModelSpec
from workers.worker import Worker, WorkerConfig

logger = logging.getLogger("prefix_serve.executor")


class Executor(ABC):
    num_blocks: int
    attention_backend: str  # the backend the workers chose (or were told to use)

    @abstractmethod
    def execute(self, step: bytes) -> bytes: ...

    @abstractmethod
    def forget_prefix(self, path: str) -> None: ...

    def shutdown(self) -> None:
        pass


class InProcessExecutor(Executor):
    def __init__(self, config: WorkerConfig, spec: ModelSpec):
        self.worker = Worker(config, spec)
        self.num_blocks = self.worker.kv_cache.num_blocks
        self.attention_backend = self.worker.attention_backend

    def execute(self, step: bytes) -> bytes:
        return self.worker.execute(step)

    def forget_prefix(self, path: str) -> None:
        self.worker.forget_prefix(path)


class _WorkerActor:
    """The Ray actor: a thin shell around a plain Worker."""

    def __init__(self, config: WorkerConfig, spec: ModelSpec):
        self.worker = Worker(config, spec)

    def num_blocks(self) -> int:
        return self.worker.kv_cache.num_blocks

    def attention_backend(self) -> str:
        return self.worker.attention_backend

    def execute(self, step: bytes) -> bytes:
        return self.worker.execute(step)

    def forget_prefix(self, path: str) -> None:
        self.worker.forget_prefix(path)


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
        self.num_blocks = ray.get(self.actor.num_blocks.remote())
        self.attention_backend = ray.get(self.actor.attention_backend.remote())

    def execute(self, step: bytes) -> bytes:
        return self._ray.get(self.actor.execute.remote(step))

    def forget_prefix(self, path: str) -> None:
        self._ray.get(self.actor.forget_prefix.remote(path))

    def shutdown(self) -> None:
        self._ray.kill(self.actor)


def make_executor(kind: str, config: WorkerConfig, spec: ModelSpec) -> Executor:
    if kind == "inprocess":
        return InProcessExecutor(config, spec)
    if kind == "ray":
        return RayExecutor(config, spec)
    raise ValueError(f"Unknown executor {kind!r}; choose 'inprocess' or 'ray'.")
