"""Attention backends by name, imported lazily so an optional dependency never breaks `import engine`."""

from __future__ import annotations

import importlib

from workers.attention.base import AttentionBackend, AttentionMetadata, write_kv

_BACKENDS = {
    "torch": "workers.attention.torch_ref:TorchPagedAttention",
    "cpu": "workers.attention.cpu_paged:CpuPagedAttention",
    "triton": "workers.attention.triton_paged:TritonPagedAttention",
    "xformers": "workers.attention.xformers_paged:XFormersPagedAttention",
}


def available_backends() -> list[str]:
    return list(_BACKENDS)


def get_backend_class(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {available_backends()}.")
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def default_backend_name(device: str) -> str:
    """On CPU, prefix-serve's C++ kernel when it builds, else the torch reference; on CUDA, xformers when its CUDA
    ops load, else Triton, else the torch reference."""
    on_cuda = str(device).startswith("cuda")
    for name in ("xformers", "triton") if on_cuda else ("cpu",):
        try:
            if get_backend_class(name).is_supported():
                return name
        except Exception:  # noqa: BLE001 - a missing optional dependency just rules the backend out
            continue
    return "torch"


__all__ = ["AttentionBackend", "AttentionMetadata", "write_kv", "get_backend_class", "default_backend_name",
           "available_backends"]
