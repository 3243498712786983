"""The Serve application and its deployments: gateway, attention replicas (relay or direct
streaming), the expert pool, the route chooser, shared rate limits, their metrics and autoscaling
policy, deployment through the declarative path, and Ray's token auth for the clusters we run."""
