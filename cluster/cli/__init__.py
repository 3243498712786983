"""The `mimo` command: generate, inspect, plan, serve, render; and the one-process API server the
tests and benchmarks run."""
