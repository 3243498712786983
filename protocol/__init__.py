"""The typed messages that cross process boundaries, imported by every side and importing nothing
of ours (standard library only): a generation request with its sampling parameters, the output
chunks and refusals streamed back, the replica report routers read, and the block hashing that
makes "cached on replica R" mean the same to the engine and to the router."""
