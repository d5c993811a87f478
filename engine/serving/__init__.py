"""The HTTP frontend: the OpenAI-compatible server, its protocol shaping, the client of the engine process, the
engine process itself and the Prometheus metrics."""
