"""What runs inside the Ray actors: the attention replica's engine (`replicas.engine`) and the
expert shards with their placement, dispatch and transports (`replicas.experts`)."""
