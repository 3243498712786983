"""Experts apart from attention: shards holding (layer, expert) weights, their placement and the
load balancer that moves them, the dispatcher that sends each MoE layer's rows to the shards, and
the transports that carry those messages (in process, Ray actor calls, collectives)."""
