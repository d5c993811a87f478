"""Prefix reads off the step path: a worker's staging area of prefix KV read from disk in background threads.

The engine asks for a prefix (`StepMessage.prefetch`) while its requests wait; a read runs in a small thread pool,
so the step loop never waits on a disk while other sequences run. A read's result is *staged*: held here until
the prefix is materialized into KV blocks (`take`) or no request wants it any more (`discard`). Staging does not
count against the host tier's byte budget, so a prefetched prefix is never lost between its read and its load,
even with the CPU default of no host tier. A prefix found in the host tier is staged at once, without a read.

Each staged key is reported once (`completed`), as ready or with the read's error. On GPUs the reads land in
page-locked memory, so the copy to the device (`KVCache.write_prefix`) is an asynchronous DMA.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable

import torch

from workers.kv_cache import HostPrefixCache

FETCH_THREADS = 4  # reads in parallel: enough to hide a disk's latency, few enough not to crowd the forward


def describe_failure(exc: BaseException) -> str:
    """The reason a prefix could not be loaded, as the requests that named it report it."""
    return f"{type(exc).__name__}: {exc}"


class PrefixFetcher:
    """Staged prefix reads by cache key. `read(path, num_tokens)` returns this rank's [L, 2, P, heads, dim] KV."""

    def __init__(self, read: Callable[[str, int], torch.Tensor], host: HostPrefixCache):
        self._read = read
        self.host = host
        self._pool = cf.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="prefix-fetch")
        self._staged: dict[str, cf.Future] = {}  # key -> its read, in flight or done, until taken or discarded
        self._unreported: dict[str, cf.Future] = {}  # the staged reads not yet reported by `completed`

    def prefetch(self, key: str, path: str, num_tokens: int) -> None:
        """Stage a prefix: from the host tier at once, else by a read in the background; each prefetch is answered
        by `completed`. A key already staged is not read again."""
        if key in self._staged:
            self._unreported[key] = self._staged[key]
            return
        kv = self.host.lookup(key)
        if kv is not None:
            future = cf.Future()
            future.set_result(kv)
        else:
            future = self._pool.submit(self._read_for_device, path, num_tokens)
        future.add_done_callback(_note_done_time)  # runs in the reading thread (or now, for a host-tier hit)
        self._staged[key] = self._unreported[key] = future

    def _read_for_device(self, path: str, num_tokens: int) -> torch.Tensor:
        kv = self._read(path, num_tokens)
        return kv.pin_memory() if self.host.pin else kv  # page-locked here, in the background, not in the step

    def take(self, key: str, path: str, num_tokens: int) -> torch.Tensor:
        """A prefix's KV for materializing it: its staged read (waiting for it if it is still running, as on a
        tensor-parallel rank slower than rank 0), else the host tier, else a read now. It goes to the host tier
        (which keeps it if its budget allows) and leaves the staging area. Raises what the read raised."""
        future = self._staged.pop(key, None)
        self._unreported.pop(key, None)
        kv = future.result() if future is not None else self.host.lookup(key)
        if kv is None:  # never prefetched (not the engine's way; kept correct for any caller)
            kv = self._read_for_device(path, num_tokens)
        return self.host.put(key, kv)

    def discard(self, key: str) -> None:
        """No request waits for this prefix any more (or its registration is gone): drop its staged read. A read
        still running finishes into a future no one holds, and its memory goes with it."""
        future = self._staged.pop(key, None)
        self._unreported.pop(key, None)
        if future is not None:
            future.cancel()  # a read not yet started never starts

    def wait(self, timeout: float) -> None:
        """Block until the unreported reads finish, or `timeout` seconds: an idle engine's poll. Waiting for all
        of them, not the first, lets the engine admit their requests together, in one prefill."""
        running = [f for f in self._unreported.values() if not f.done()]
        if running:
            cf.wait(running, timeout=timeout)

    def completed(self) -> tuple[dict[str, float], dict[str, str]]:
        """The staged keys whose read finished since the last call: ({ready key: seconds since its read finished},
        {failed key: why}). The age, not a time: the engine's clock may be another process's or machine's."""
        ready, failed = {}, {}
        now = time.monotonic()
        for key, future in list(self._unreported.items()):
            if future.done():
                del self._unreported[key]
                error = future.exception()
                if error is None:
                    ready[key] = max(0.0, now - getattr(future, "done_at", now))
                else:  # stays staged, so a load on another rank fails the same way, until the engine unstages it
                    failed[key] = describe_failure(error)
        return ready, failed

    @property
    def num_staged(self) -> int:
        return len(self._staged)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _note_done_time(future: cf.Future) -> None:
    future.done_at = time.monotonic()
