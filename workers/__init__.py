"""Workers: executors (in-process, Ray), the worker shell, the model runner, KV cache, attention backends, sampler."""
