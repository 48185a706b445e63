"""The signal API: FastAPI routes, JWT auth, client store, rate limits, Prometheus metrics and
the operator's token CLI (`python -m serve.api.tokens`)."""
