"""The Ray Serve signal application.

Sub-rooms: `serve.api` (HTTP routes, auth, clients, rate limits, metrics, the token CLI),
`serve.engine` (bar feed, online features, signals, Gold store, the typed snapshot) and
`serve.dashboard` (the Streamlit client). The Serve runtime sits at this level: `app`
(deployments), `deploy` (start and wait), `local` (in-process API for tests and benchmarks),
`operator` (each ingress replica's operator port: metrics and detailed readiness),
`ingress_env` (HAProxy ingress settings), `haproxy` (this machine's HAProxy processes of our
deployments: orphans, port checks) and `haproxy_launch` (how a local deployment starts HAProxy).
"""
