"""Prefix-aware routing of requests to attention replicas.

`report` (inside a replica: what it publishes), `prefix_index` (a router's view of which replica
holds which blocks), `policy` (pure scoring and baselines), `hashing` (prompt block hashes without
blocking the loop), `route_log` and `route_board` (guesses shared between gateway replicas' routers:
the pure log and the Ray actor around it) and `serve_adapter` (the one file that touches Serve's
alpha RequestRouter API).
"""
