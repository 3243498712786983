"""Composition root: the cluster spec, the Serve application, placement, autoscaling and the CLI."""
