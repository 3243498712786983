"""Observability: the one table of metric definitions, the recorder over a metrics backend, the
Grafana dashboards and the capacity model behind `mimo plan`. Imports only prometheus-client."""
