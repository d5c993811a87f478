"""Prefix registry: names -> PEFT prefix-tuning adapter directories, checked against the base model.

Registering a directory reads only `adapter_config.json`, so thousands of prefixes register quickly; the
tensor file's header is checked the first time a request needs the prefix (`load_prefix` checks it at once),
and its data is read by the worker that materializes it into KV blocks. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import AdapterMismatchError, InvalidAdapterError, PrefixPathError, UnknownPrefixError
from engine.model_spec import ModelSpec
from engine.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TENSOR_NAME, prefix_tensor_shape


@dataclass
class PrefixInfo:
    name: str
    path: str
    num_virtual_tokens: int
    tensor_checked: bool = False


class PrefixRegistry:
    def __init__(self, spec: ModelSpec, allowed_roots: list[str] | None = None):
        self.spec = spec
        self.allowed_roots = [Path(r).resolve() for r in (allowed_roots or [])]
        self._prefixes: dict[str, PrefixInfo] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._prefixes

    def __len__(self) -> int:
        return len(self._prefixes)

    def names(self) -> list[str]:
        return list(self._prefixes)

    def get(self, name: str) -> PrefixInfo:
        info = self._prefixes.get(name)
        if info is None:
            known = ", ".join(sorted(self._prefixes)[:10]) or "none"
            raise UnknownPrefixError(f"Unknown prefix {name!r}. Load it first with load_prefix(); "
                                     f"loaded prefixes: {known}{' ...' if len(self._prefixes) > 10 else ''}.")
        return info

    def check_path_allowed(self, path: str) -> str:
        """A path that comes from a request, resolved, if it lies inside a configured root (see allowed_path)."""
        return allowed_path(path, self.allowed_roots)

    def register(self, name: str, path: str, check_tensor: bool = False) -> PrefixInfo:
        """Check an adapter's config (and with `check_tensor` its tensor header) against the base model, then
        register it under `name`, replacing any. A failed check leaves the registry as it was."""
        if not name or not isinstance(name, str):
            raise InvalidAdapterError(f"A prefix needs a non-empty name, got {name!r}.")
        if "\x00" in str(path):
            raise InvalidAdapterError("A prefix path cannot contain a NUL character.")
        info = PrefixInfo(name, str(path), read_adapter_config(path, self.spec))
        if check_tensor:
            check_adapter_tensor(info.path, self.spec, info.num_virtual_tokens)
            info.tensor_checked = True
        self._prefixes[name] = info
        return info

    def register_dir(self, root: str) -> list[str]:
        """Register every subdirectory of `root` that holds an adapter config, named after the subdirectory."""
        names = []
        for sub in sorted(Path(root).iterdir()):
            if (sub / ADAPTER_CONFIG).is_file():
                self.register(sub.name, str(sub))
                names.append(sub.name)
        return names

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._prefixes[name]

    def ensure_tensor_ok(self, name: str) -> PrefixInfo:
        """Check the tensor file's header (name, dtype, shape) once, before any request is scheduled on it."""
        info = self.get(name)
        if not info.tensor_checked:
            check_adapter_tensor(info.path, self.spec, info.num_virtual_tokens)
            info.tensor_checked = True
        return info


def allowed_path(path: str, roots: list[Path]) -> str:
    """`path` resolved, if it and the adapter files in it lie inside one of the (resolved) `roots`: a symlink,
    of the directory or of a file in it, may not lead out of them. Messages name no path: the roots are the
    server's business, and the path is the client's own."""
    if not roots:
        raise PrefixPathError("Loading prefixes by path is disabled: start the server with --prefix-dir "
                              "(or --allowed-prefix-root) to allow paths under that directory.")
    if "\x00" in path:
        raise InvalidAdapterError("A prefix path cannot contain a NUL character.")
    try:
        resolved = Path(path).resolve()
        files = {name: (resolved / name).resolve() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    except (OSError, RuntimeError, ValueError) as exc:  # too long, a symlink loop, an undecodable name
        raise InvalidAdapterError(f"The prefix path cannot be resolved ({type(exc).__name__}).") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PrefixPathError("The prefix path lies outside the allowed prefix roots (the server's --prefix-dir "
                              "and --allowed-prefix-root directories).")
    for name, target in files.items():
        if not any(target.is_relative_to(root) for root in roots):
            raise PrefixPathError(f"{name} in the prefix directory links to a file outside the allowed prefix "
                                  "roots.")
    return str(resolved)


def read_adapter_config(path: str, spec: ModelSpec) -> int:
    """Validate a PEFT adapter directory's config against the model; returns its number of virtual tokens."""
    directory = Path(path)
    config_file = directory / ADAPTER_CONFIG
    if not config_file.is_file():
        raise InvalidAdapterError(f"{path!r} is not a PEFT adapter directory: {ADAPTER_CONFIG} is missing.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{config_file} is not valid JSON: {exc}") from None
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise InvalidAdapterError(f"{path!r} is a {peft_type} adapter, not a prefix-tuning adapter "
                                  "(adapter_config.json must have peft_type PREFIX_TUNING).")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise InvalidAdapterError(f"{path!r} holds pickled weights, which prefix-serve never loads. Re-save "
                                      "the adapter with save_pretrained(..., safe_serialization=True) to get "
                                      f"{ADAPTER_WEIGHTS}.")
        raise InvalidAdapterError(f"{path!r} has no {ADAPTER_WEIGHTS}.")
    expected = {"num_layers": spec.num_layers, "num_attention_heads": spec.num_kv_heads,
                "token_dim": spec.num_kv_heads * spec.head_dim}
    for key, want in expected.items():
        got = config.get(key)
        if got != want:
            raise AdapterMismatchError(
                f"Adapter {path!r} does not match the base model: {key} is {got} in the adapter but the model "
                f"needs {want} (model: {spec.num_layers} layers, {spec.num_kv_heads} KV heads, head dim "
                f"{spec.head_dim}). Was it trained for another base model ({config.get('base_model_name_or_path')})?")
    num_virtual_tokens = config.get("num_virtual_tokens")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise InvalidAdapterError(f"Adapter {path!r} has an invalid num_virtual_tokens: {num_virtual_tokens!r}.")
    return num_virtual_tokens


def check_adapter_tensor(path: str, spec: ModelSpec, num_virtual_tokens: int) -> None:
    from safetensors import safe_open

    weights = Path(path) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if TENSOR_NAME not in keys:
                raise InvalidAdapterError(f"{weights} has no {TENSOR_NAME!r} tensor (found {keys}).")
            shape = list(f.get_slice(TENSOR_NAME).get_shape())
    except InvalidAdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise InvalidAdapterError(f"{weights} is not a readable safetensors file: {exc}") from None
    want = prefix_tensor_shape(num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if shape != want:
        raise AdapterMismatchError(f"{weights}: {TENSOR_NAME} has shape {shape}, but num_virtual_tokens and the "
                                   f"base model need {want}.")
