"""Shared fixtures: tiny random models of each supported architecture, with PEFT prefix adapters.

Built once per session in a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_prefix_adapter, make_tiny_model  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
# name -> (num_virtual_tokens, prefix_projection, seed): P not a multiple of 4 or 16, a multiple of 4 only,
# and a multiple of both.
ADAPTERS = {"p5": (5, False, 1), "p8proj": (8, True, 2), "p16": (16, False, 3)}


def pytest_configure(config):
    # pyproject's markers are those of the whole project; this one belongs to tests/test_reliability.py
    config.addinivalue_line("markers", "reliability: the reliability suite (tests/test_reliability.py); its long "
                                       "variants are also marked slow, so the default run keeps the short ones")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """arch -> {"model": dir, "adapters": {name: dir}}, built lazily per architecture."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in cache:
            model = make_tiny_model(arch, root / arch)
            adapters = {name: make_prefix_adapter(model, root / f"{arch}-{name}", p, proj, seed)
                        for name, (p, proj, seed) in ADAPTERS.items()}
            cache[arch] = {"model": model, "adapters": adapters}
        return cache[arch]

    return get
