"""The signal API: FastAPI routes, JWT auth, client store, rate limits, readiness, Prometheus
metrics, the operator app (metrics and detailed readiness, off the public port) and the
operator's token CLI (`python -m serve.api.tokens`)."""
