"""Prefix registrations over time: which cache key a name means now, which keys unfinished requests still
hold, and when the blocks of an unloaded or replaced registration may go.

Each registration of a name gets its own cache key (`name#n`), under which its blocks live in the block manager.
Unloading or reloading a name affects only requests that arrive afterwards: a request accepted before runs on
the key it was accepted under, even if it waits or is preempted and must load that prefix again (from the old
path). A retired key's blocks are freed once its last request ends, and the workers are told to drop any host
copy of it with the next step.
"""

from __future__ import annotations

import itertools

from engine.prefix_registry import PrefixRegistry
from scheduler.block_manager import BlockManager


class PrefixLifecycle:
    def __init__(self, registry: PrefixRegistry, block_manager: BlockManager):
        self.registry = registry
        self.block_manager = block_manager
        self._keys: dict[str, str] = {}  # prefix name -> cache key of its current registration
        self._paths: dict[str, str] = {}  # cache key -> adapter path (kept while its blocks may be resident)
        self._numbers = itertools.count()
        self._retired: set[str] = set()  # keys of unloaded or replaced registrations that may still be in use
        self._holders: dict[str, int] = {}  # cache key -> unfinished requests on it (running or waiting)
        self._forgotten: list[str] = []  # retired keys whose host copies the workers have not been told to drop

    def load(self, name: str, path: str, check_path: bool = False) -> None:
        """Register a PEFT prefix adapter (config and tensor header checked now; its data is read when a request
        first needs it). A failed check raises and changes nothing. With `check_path` (a path from a request) the
        resolved path is registered: a directory symlink changed later does not move it out of the roots."""
        if check_path:
            path = self.registry.check_path_allowed(path)
        info = self.registry.register(name, path, check_tensor=True)  # on failure the old registration stays
        self._new_key(name, info.path)

    def register_dir(self, root: str) -> list[str]:
        """Register every adapter subdirectory of `root` lazily (config only; tensors on first use)."""
        names = self.registry.register_dir(root)
        for name in names:
            self._new_key(name, self.registry.get(name).path)
        return names

    def unload(self, name: str) -> None:
        """New requests can no longer use it; running ones finish on its blocks, which are freed after them."""
        self.registry.unregister(name)
        self._retire(name)

    def resolve(self, name: str) -> tuple[str, int]:
        """(cache key, number of virtual tokens) of the registration a new request on `name` runs on. The tensor
        file's header is checked the first time."""
        info = self.registry.ensure_tensor_ok(name)
        return self._keys[name], info.num_virtual_tokens

    def hold(self, key: str) -> None:
        """A request on this key was accepted."""
        self._holders[key] = self._holders.get(key, 0) + 1

    def release(self, key: str) -> None:
        """A request on this key finished or was aborted."""
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
        if self._retired:
            self._evict_retired()

    def path(self, key: str) -> str | None:
        return self._paths.get(key)

    def take_forgotten(self) -> list[str]:
        """Keys whose host copies the workers should drop, once each."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    def _new_key(self, name: str, path: str) -> None:
        self._retire(name)
        key = f"{name}#{next(self._numbers)}"
        self._keys[name] = key
        self._paths[key] = path

    def _retire(self, name: str) -> None:
        key = self._keys.pop(name, None)
        if key is not None:
            self._retired.add(key)
            self._evict_retired()

    def _evict_retired(self) -> None:
        for key in list(self._retired):
            if self._holders.get(key):
                continue
            self.block_manager.evict_prefix(key)
            if not self.block_manager.is_resident(key):
                self._retired.discard(key)
                del self._paths[key]
                self._forgotten.append(key)
