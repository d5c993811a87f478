"""Scheduler: request queue, continuous-batching policy and the block manager."""
