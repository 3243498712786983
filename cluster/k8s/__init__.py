"""The Kubernetes render of a cluster spec: the KubeRay RayService and what runs beside it, the
monitoring objects, and the kustomize tree with its overlays."""
