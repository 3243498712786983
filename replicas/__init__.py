"""What runs inside the attention replica's Ray actors: the engine (scheduler, hybrid paged KV cache
with prefix caching, model runner, sampler, speculative decoding), expert shards and transports."""
