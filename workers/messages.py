"""Versioned msgpack messages between the engine and its workers. Each step carries only what changed.

StepMessage (engine -> worker), version 4:
  {"v": 4,
   "drop": [seq_id, ...],                     # finished, aborted or preempted: forget their state
   "prefix_loads": [{"name", "path", "blocks", "num_tokens"}],   # materialize into these blocks first
   "copies": [[src_block, dst_block], ...],    # copy-on-write, after the loads, before the forward
   "seqs": [entry, ...],                       # scheduled sequences, in batch order
   "steps": K}                                 # K > 1: a decode run of K forwards, every "n" is 1
  entry for a sequence the worker has not seen (or that was preempted):
   {"id", "n" (tokens this step), "new": 1, "tokens", "prompt_len", "prefix_len", "computed", "table",
    "sampling": {"temperature", "top_p", "top_k", "seed"}, "index" (sample index), "fork_ids": [...],
    "prefix": the prefix load name it starts on, or None}
  entry for a known sequence: {"id", "n", ["table_from", "table_tail"] when its block table changed,
   ["k"] in a run when the sequence takes part in only its first k < K forwards}
StepResult (worker -> engine): {"v": 4, "sampled": [[seq_id, [token, ...]], ...], "load_seconds": [...],
                                 "failed_loads": {name: message}}
  The token list holds one token, or n at the end of a prompt whose request forks n samples, or K (or k) in a
  run. A prefix that could not be materialized (its file unreadable by now) is in "failed_loads"; the new
  sequences that start on it are left out of the step (not remembered, not run), and the engine fails their
  requests. Everything else in the step runs as usual.
"""

from __future__ import annotations

import msgpack

VERSION = 4


class ProtocolError(RuntimeError):
    pass


def pack(message: dict) -> bytes:
    return msgpack.packb({**message, "v": VERSION}, use_bin_type=True)


def unpack(data: bytes) -> dict:
    message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if message.get("v") != VERSION:
        raise ProtocolError(f"message version {message.get('v')} but this side speaks version {VERSION}")
    return message
