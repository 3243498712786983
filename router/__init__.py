"""Prefix-aware routing of requests to attention replicas.

`report` (inside a replica: what it publishes), `prefix_index` (a router's view of which replica
holds which blocks), `replica_loads` and `peer_loads` (how many requests each replica has, from
this router's and the other gateways' routers), `policy` (pure scoring in seconds and baselines),
`router_core` (one router's whole decision state, driven by the adapter and by the replay
benchmark), `hashing` (prompt block hashes without blocking the loop), `route_log` and
`route_board` (guesses and loads shared between gateway replicas' routers: the pure log and the Ray
actor around it) and `serve_adapter` (the one file that touches Serve's alpha RequestRouter API).
"""
