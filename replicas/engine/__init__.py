"""The attention replica's engine: scheduler, hybrid paged KV cache with prefix caching, model
runner over the paged blocks, sampler, MTP drafting and verification, and the async front that
streams chunks to the serving layer. It reaches experts only through the dispatcher it is given."""
